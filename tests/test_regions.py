"""Defect regions on real data: each row's regions are ``scipy.ndimage.label``'s components of the mask it
wrote; ``--min-area`` drops the small ones from mask, regions and (with ``--verdict-rule regions``) verdict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from scipy import ndimage

from spade_ad import Spade, SpadeSettings

EIGHT = np.ones((3, 3), bool)  # 8-connectivity


def _components(mask: np.ndarray, amap: np.ndarray) -> list[tuple[list[int], int, float, float]]:
    """(box, area, peak, mean) of each 8-connected component, by scipy; largest first, then highest peak."""
    labels, n = ndimage.label(mask, structure=EIGHT)
    out = []
    for c, sl in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[sl] == c
        vals = amap[sl][inside].astype(np.float64)
        box = [sl[1].start, sl[0].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start]
        out.append((box, int(inside.sum()), float(vals.max()), float(vals.mean())))
    assert len(out) == n
    return sorted(out, key=lambda r: (-r[1], -r[2]))


def _check_rows(out: Path, min_area: int) -> list[dict]:
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    for row in rows:
        mask = np.asarray(Image.open(out / row["mask"])) > 0
        amap = np.load(out / row["map"])
        want = _components(mask, amap)
        got = [(r["box"], r["area"], r["peak"], r["mean"]) for r in row["regions"]]
        assert [g[:2] for g in got] == [w[:2] for w in want], row["file"]
        assert np.allclose([g[2:] for g in got], [w[2:] for w in want], rtol=1e-6, atol=0) if got else True
        assert all(r["area"] >= min_area for r in row["regions"])
        assert sum(r["area"] for r in row["regions"]) == row["defect_pixels"] == int(mask.sum())
        for r in row["regions"]:
            x, y = r["peak_at"]
            assert mask[y, x] and amap[y, x] == np.float32(r["peak"])
            assert r["peak_normalised"] == pytest.approx(r["peak"] / json.loads(
                (out / "run.json").read_text())["pixel_threshold"])
    return rows


@pytest.mark.slow
def test_regions_are_the_written_masks_components(bottle: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    train = sorted((bottle / "train" / "good").glob("*.png"))[:12]
    model_dir = tmp_path / "model"
    Spade(SpadeSettings()).fit([str(p) for p in train]).save(model_dir)
    images = [str(p) for sub in ("broken_small", "contamination", "good")
              for p in sorted((bottle / "test" / sub).glob("*.png"))[:3]]
    # a threshold at half the calibrated one: masks with several components of many sizes
    thr = Spade.load(model_dir).pixel_threshold_ * 0.5
    code, _, err = run_cli(["predict", str(model_dir), *images, "--out", str(tmp_path / "all"), "--threshold",
                            str(thr)], capsys)
    assert code == 0, err
    rows = _check_rows(tmp_path / "all", 0)
    areas = sorted(r["area"] for row in rows for r in row["regions"])
    assert len(areas) >= 4 and areas[0] < areas[-1]
    cut = areas[len(areas) // 2]  # drops about half the regions
    code, _, err = run_cli(["predict", str(model_dir), *images, "--out", str(tmp_path / "big"), "--threshold",
                            str(thr), "--min-area", str(cut)], capsys)
    assert code == 0, err
    big = _check_rows(tmp_path / "big", cut)
    for a, b in zip(rows, big, strict=True):  # the same regions less the small ones; the mask less their pixels
        assert [r for r in a["regions"] if r["area"] >= cut] == b["regions"]
        full = np.asarray(Image.open(tmp_path / "all" / a["mask"])) > 0
        kept = np.asarray(Image.open(tmp_path / "big" / b["mask"])) > 0
        labels, _ = ndimage.label(full, structure=EIGHT)
        sizes = np.bincount(labels.ravel())
        assert np.array_equal(kept, full & (sizes[labels] >= cut))
    assert json.loads((tmp_path / "big" / "run.json").read_text())["min_area"] == cut


def test_the_regions_verdict_rule_is_stored_and_followed(small_train: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "model"
    code, _, err = run_cli(["fit", str(small_train / "train" / "good"), "--out", str(model_dir), "--weights", "random",
                            "--k", "3", "--verdict-rule", "regions", "--min-area", "30"], capsys)
    assert code == 0, err
    model = Spade.load(model_dir, weights="random")
    tests = [str(p) for p in sorted((small_train / "test").glob("*/*.png"))]
    assert (model.settings.verdict_rule, model.settings.min_area) == ("regions", 30)
    pred = model.predict(tests, pixel_threshold=model.pixel_threshold_ * 0.8)
    assert pred.verdicts is not None and pred.masks is not None
    assert pred.verdicts.any() and not pred.verdicts.all(), pred.verdicts  # both verdicts occur
    for res, v, m in zip(pred, pred.verdicts, pred.masks, strict=True):
        assert v == bool(res.regions) == (res.verdict == "defective")
        assert all(r.area >= 30 for r in res.regions or []) and int(m.sum()) == sum(r.area for r in res.regions or [])
    assert [r.verdict for r in model.predict(tests, min_area=10**6)] == ["good"] * len(pred)
    code, _, err = run_cli(["predict", str(model_dir), *tests, "--out", str(tmp_path / "o"),
                            "--weights", "random"], capsys)
    assert code == 0, err
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert (run["verdict_rule"], run["min_area"]) == ("regions", 30)
    code, _, err = run_cli(["predict", str(model_dir), *tests, "--out", str(tmp_path / "p"),
                            "--weights", "random", "--min-area", "-1"], capsys)
    assert code == 2 and err.strip().endswith("--min-area must be a whole number of pixels >= 0, got -1")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "p").exists()

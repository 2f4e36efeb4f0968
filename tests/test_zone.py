"""Inspection zones (``fit --roi``): outside the zone nothing counts, exactly; the zone is stored, checked,
exported and changed as a generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from spade_ad import Spade, SpadeSettings
from spade_ad.io import load_image
from spade_ad_runtime.zone import FILL

RANDOM = ["--weights", "random"]


def _bottle_zone(h: int = 900, w: int = 900) -> np.ndarray:
    """The bottle's inner disc: inspected; the rest (table, rim's outside) ignored."""
    yy, xx = np.mgrid[:h, :w]
    return (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (0.3 * min(h, w)) ** 2


def _paste(image: np.ndarray, y: int, x: int, size: int = 90, seed: int = 0) -> np.ndarray:
    """A copy of ``image`` with a block of coloured noise (a made-up defect) at (y, x)."""
    out = image.copy()
    out[y : y + size, x : x + size] = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return out


@pytest.fixture(scope="module")
def zoned(bottle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model fitted on 12 bottle images with the inner disc as its zone, saved; and the zone picture."""
    tmp = tmp_path_factory.mktemp("zone")
    zone_png = tmp / "zone.png"
    Image.fromarray(_bottle_zone(450, 450).astype(np.uint8) * 255).save(zone_png)  # half size: scaled to images
    train = sorted((bottle / "train" / "good").glob("*.png"))[:12]
    model = Spade(SpadeSettings(image_score="combined")).fit([str(p) for p in train], zone=zone_png)
    model.save(tmp / "model")
    return tmp / "model", zone_png


@pytest.mark.slow
def test_a_defect_outside_the_zone_changes_nothing(zoned: tuple[Path, Path], bottle: Path) -> None:
    model = Spade.load(zoned[0])
    good = load_image(bottle / "test" / "good" / "000.png")
    outside, inside = _paste(good, 20, 20), _paste(good, 400, 400)
    pred = model.predict([good, outside, inside])
    assert pred.verdicts is not None and list(pred.verdicts) == [False, False, True]
    # bit for bit: the pasted corner is grey to the network, so the score and map are the good image's
    assert pred.scores[1] == pred.scores[0] and np.array_equal(pred.maps[1], pred.maps[0])
    assert model.state_.zone is not None
    ignored = ~model.state_.zone.at(900, 900)  # the half-size picture, scaled to the image
    assert abs(int(ignored.sum()) - int((~_bottle_zone()).sum())) < 0.01 * ignored.size
    for m in pred.maps:
        assert not m[ignored].any() and m[~ignored].max() > 0  # 0 outside the zone, scores inside it
    assert all(not (r.mask is not None and r.mask[ignored].any()) for r in pred)
    assert all(max((r.box[0] for r in res.regions or []), default=300) >= 270 for res in pred)  # inside the disc
    assert float(pred.maps[2][400:490, 400:490].max()) > model.pixel_threshold_


@pytest.mark.parametrize("tiled", [False, True])
def test_outside_the_zone_nothing_counts_tiled_or_not(small_train: Path, tiled: bool, tmp_path: Path) -> None:
    """A tiled model takes the zone too: the whole image is grey outside it before it is cut into tiles, each
    tile's map is 0 outside its part of the zone, and so is the stitched map."""
    zone = np.zeros((96, 96), bool)
    zone[8:88, 30:90] = True
    tiles = {"tile": 48, "tile_overlap": 0.25, "image_size": 48} if tiled else {}
    s = SpadeSettings(weights="random", k=3, calibration_images=4, image_score="max", **tiles)
    model = Spade(s).fit(str(small_train / "train" / "good"), zone=zone)
    assert (model.grid is not None) == tiled
    good = load_image(sorted((small_train / "test" / "good").glob("*.png"))[0])
    pasted = _paste(good, 10, 2, size=20)  # in the ignored left band
    inside = _paste(good, 40, 50, size=20)
    pred = model.predict([good, pasted, inside])
    assert pred.scores[1] == pred.scores[0] and np.array_equal(pred.maps[1], pred.maps[0])
    assert pred.scores[2] > pred.scores[0]
    for m in pred.maps:
        assert not m[~zone].any()
    assert model.pixel_threshold_ is not None
    model.save(tmp_path / "m")  # stored, and read back as it was
    again = Spade.load(tmp_path / "m", weights="random").predict([good, pasted, inside])
    assert np.array_equal(again.scores, pred.scores) and all(
        np.array_equal(a, b) for a, b in zip(again.maps, pred.maps, strict=True))


def test_calibration_sees_only_the_zone(small_train: Path, tmp_path: Path) -> None:
    """Training images that differ only outside the zone give the same model (thresholds, scores, maps)."""
    files = sorted((small_train / "train" / "good").glob("*.png"))
    zone = np.zeros((96, 96), bool)
    zone[16:80, 16:80] = True
    rng = np.random.default_rng(1)
    noisy, grey = [], []
    for f in files:
        img = load_image(f)
        a = img.copy()
        a[~zone] = rng.integers(0, 256, (int((~zone).sum()), 3), dtype=np.uint8)
        b = img.copy()
        b[~zone] = FILL
        noisy.append(a)
        grey.append(b)
    s = SpadeSettings(weights="random", k=3, image_score="max", calibration_images=6)
    m1, m2 = Spade(s).fit(noisy, zone=zone), Spade(s).fit(grey, zone=zone)
    assert m1.image_threshold_ == m2.image_threshold_ and m1.pixel_threshold_ == m2.pixel_threshold_
    assert m1.calibration_["image_scores"] == m2.calibration_["image_scores"]
    tests = [load_image(p) for p in sorted((small_train / "test").glob("*/*.png"))]
    p1, p2 = m1.predict(tests), m2.predict(tests)
    assert np.array_equal(p1.scores, p2.scores) and all(np.array_equal(a, b) for a, b in zip(p1.maps, p2.maps,
                                                                                            strict=True))
    unzoned = Spade(s).fit(noisy)
    assert unzoned.pixel_threshold_ != m1.pixel_threshold_  # without the zone the noise counts


def test_the_zone_is_stored_checked_and_refused_in_one_line(small_train: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    zone = tmp_path / "zone.png"
    z = np.zeros((48, 48), np.uint8)
    z[8:40, 8:40] = 255
    Image.fromarray(z).save(zone)
    model_dir = tmp_path / "model"
    code, _, err = run_cli(["fit", str(small_train / "train" / "good"), "--out", str(model_dir), "--roi", str(zone),
                            "--k", "3", *RANDOM], capsys)
    assert code == 0, err
    header = json.loads((model_dir / "model.json").read_text())
    assert header["zone"] == [48, 48]
    loaded = Spade.load(model_dir, weights="random")
    assert loaded.state_.zone is not None and np.array_equal(loaded.state_.zone.mask, z > 0)
    # predict: maps are 0 outside the zone scaled to the image (96 x 96: 16 pixels of border)
    out = tmp_path / "out"
    tests = [str(p) for p in sorted((small_train / "test").glob("*/*.png"))]
    code, _, err = run_cli(["predict", str(model_dir), *tests, "--out", str(out), *RANDOM], capsys)
    assert code == 0, err
    for row in (json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()):
        m = np.load(out / row["map"])
        assert not m[:16].any() and not m[:, :16].any() and not m[80:].any() and not m[:, 80:].any()
        assert m[16:80, 16:80].max() > 0
    # an image of another aspect ratio: one line naming it
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((50, 120, 3), np.uint8)).save(wide)
    code, _, err = run_cli(["predict", str(model_dir), str(wide), "--out", str(tmp_path / "o2"), *RANDOM], capsys)
    assert code == 2 and err.strip().endswith("wide.png: its aspect ratio (120x50) does not match the inspection "
                                              "zone's (48x48)") and len(err.strip().splitlines()) == 1
    # a black zone, a missing one, a tiled model: one line each, nothing written
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(black)
    for roi, extra, message in ((black, [], "the inspection zone is all black"),
                                (tmp_path / "nope.png", [], "nope.png")):
        code, _, err = run_cli(["fit", str(small_train / "train" / "good"), "--out", str(tmp_path / "m2"), "--roi",
                                str(roi), "--k", "3", *extra, *RANDOM], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "m2").exists()


def test_update_changes_the_zone_as_a_generation(small_train: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """update --roi gives exactly the model fit --roi gives; --clear-roi the model without one; a training image
    changed since fit is refused by name."""
    import shutil

    train = tmp_path / "train"
    shutil.copytree(small_train / "train" / "good", train)
    zone = tmp_path / "zone.png"
    z = np.zeros((96, 96), np.uint8)
    z[10:90, 20:96] = 255
    Image.fromarray(z).save(zone)
    args = ["--k", "3", "--calibration-images", "4", *RANDOM]
    assert run_cli(["fit", str(train), "--out", str(tmp_path / "plain"), *args], capsys)[0] == 0
    assert run_cli(["fit", str(train), "--out", str(tmp_path / "zoned"), "--roi", str(zone), *args], capsys)[0] == 0
    code, _, err = run_cli(["update", str(tmp_path / "plain"), "--roi", str(zone), *RANDOM], capsys)
    assert code == 0, err
    a, b = (Spade.load(tmp_path / m, weights="random") for m in ("plain", "zoned"))
    assert a.image_threshold_ == b.image_threshold_ and a.pixel_threshold_ == b.pixel_threshold_
    assert torch_equal(a.global_, b.global_) and a.history_[-1]["action"] == "zone"
    tests = [str(p) for p in sorted((small_train / "test").glob("*/*.png"))]
    pa, pb = a.predict(tests), b.predict(tests)
    assert np.array_equal(pa.scores, pb.scores) and all(np.array_equal(x, y) for x, y in zip(pa.maps, pb.maps,
                                                                                            strict=True))
    code, out, _ = run_cli(["history", str(tmp_path / "plain")], capsys)
    assert code == 0 and "zone set" in out
    code, _, err = run_cli(["update", str(tmp_path / "plain"), "--clear-roi", *RANDOM], capsys)
    assert code == 0, err
    c = Spade.load(tmp_path / "plain", weights="random")
    assert c.state_.zone is None and len(c.history_) == 3
    first = Spade(SpadeSettings(k=3, calibration_images=4, weights="random")).fit(sorted(str(p) for p in
                                                                                       train.iterdir()))
    assert c.image_threshold_ == first.image_threshold_ and torch_equal(c.global_, first.global_)
    # a training image changed since: refused by name, the model unchanged
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(sorted(train.iterdir())[2])
    code, _, err = run_cli(["update", str(tmp_path / "plain"), "--roi", str(zone), *RANDOM], capsys)
    assert code == 2 and "not the image this model was fitted on" in err and len(err.strip().splitlines()) == 1
    assert len(Spade.load(tmp_path / "plain", weights="random").history_) == 3


def torch_equal(x: object, y: object) -> bool:
    import torch

    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    return bool(torch.equal(x, y))

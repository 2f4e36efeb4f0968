"""The CSV manifest layout: data not arranged in folders, listed one image per row."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from conftest import run_cli

from spade_ad import SpadeSettings
from spade_ad.data import load_csv_category, load_mvtec_category
from spade_ad.evaluate import run_benchmark

TIMINGS = ("fit_seconds", "predict_seconds_per_image")


def _manifest(category: Path, csv_path: Path) -> None:
    """The MVTec-layout category as a manifest, paths relative to the CSV's folder."""
    cat = load_mvtec_category(category)
    rel = lambda p: os.path.relpath(p, csv_path.parent)  # noqa: E731
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "split", "label", "mask"])
        for p in cat.train:
            w.writerow([rel(p), "train", "good", ""])
        for s in cat.test:
            w.writerow([rel(s.path), "test", s.defect_type, rel(s.mask_path) if s.mask_path else ""])


def _bottle_subset(bottle: Path, root: Path) -> Path:
    """An MVTec-layout category of links to a fifth of bottle's files (its own files, not copies)."""
    for sub in ("train/good", "test/good", *(f"{k}/{t}" for k in ("test", "ground_truth")
                                            for t in ("broken_large", "broken_small", "contamination"))):
        (root / sub).mkdir(parents=True)
        for p in sorted((bottle / sub).glob("*.png"))[::5]:
            (root / sub / p.name).symlink_to(p)
    return root


@pytest.mark.slow
def test_the_manifest_of_bottle_gives_the_folder_runs_metrics(bottle: Path, tmp_path: Path) -> None:
    folder = _bottle_subset(bottle, tmp_path / "bottle")
    manifest = tmp_path / "lists" / "bottle.csv"
    manifest.parent.mkdir()
    _manifest(folder, manifest)
    s = SpadeSettings(image_size=96, k=5, calibration_images=6)
    by_folder, by_csv = run_benchmark(folder, s), run_benchmark(manifest, s)
    a, b = by_folder["categories"]["bottle"], by_csv["categories"]["bottle"]
    assert by_csv["layout"] == "csv" and a["n_test"] == 18 and a["n_train"] == 42
    assert {k: v for k, v in a.items() if k not in TIMINGS} == {k: v for k, v in b.items() if k not in TIMINGS}
    assert set(a["types"]) == {"broken_large", "broken_small", "contamination"} and a["aupimo"] is not None


def test_manifest_rows_are_checked_one_line_each(small_train: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    good = sorted((small_train / "train" / "good").glob("*.png"))
    bad = sorted(p for p in (small_train / "test").glob("*/*.png") if p.parent.name != "good")
    m = tmp_path / "m.csv"

    def write(rows: list[list[str]], header: tuple[str, ...] = ("image", "split", "label", "mask")) -> None:
        with open(m, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    ok = [[str(good[0]), "train", "good", ""], [str(good[1]), "test", "good", ""], [str(bad[0]), "test", "dent", ""]]
    write(ok)
    cat = load_csv_category(m)
    assert cat.name == "m" and cat.train == [good[0]] and [s.defect_type for s in cat.test] == ["good", "dent"]
    for rows, header, message in (
        ([*ok, [str(good[0]), "test", "good", ""]], None, "m.csv:5: " + str(good[0]) + " is listed twice (also on "
                                                                                         "line 2)"),
        ([[str(good[0]), "valid", "good", ""]], None, "m.csv:2: split must be train or test, got 'valid'"),
        ([[str(tmp_path / "nope.png"), "train", "good", ""]], None, "nope.png: image file does not exist"),
        ([[str(good[0]), "train", "dent", ""]], None, "m.csv:2: training images are good images without masks"),
        ([*ok[:2], [str(bad[0]), "test", "dent", "x.jpg"]], None, "masks saved as JPEG are refused"),
        ([*ok[:2], [str(bad[0]), "test", "dent", "none.png"]], None, "none.png: mask file does not exist"),
        (ok[:1], None, "m.csv: no test images"),
        (ok, ("image", "label"), "needs a header with columns image, split, label, mask"),
    ):
        write(rows, header or ("image", "split", "label", "mask"))
        code, _, err = run_cli(["benchmark", str(m), "--out", str(tmp_path / "o"), "--weights", "random"], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (message, err)


def test_a_defective_row_without_its_mask_is_refused_when_others_have_masks(small_train: Path, tmp_path: Path
                                                                           ) -> None:
    from spade_ad.errors import SpadeError

    good = sorted((small_train / "train" / "good").glob("*.png"))
    bad = sorted(p for p in (small_train / "test").glob("*/*.png") if p.parent.name != "good")
    masks = sorted((small_train / "ground_truth").glob("*/*.png"))
    m = tmp_path / "m.csv"
    m.write_text("image,split,label,mask\n"
                 f"{good[0]},train,good,\n"
                 f'"{bad[0]}",test,dent,{masks[0]}\n'
                 f"{bad[1]},test,dent,\n")
    with pytest.raises(SpadeError, match="a defective test image without a mask, while others have masks"):
        load_csv_category(m)

"""The command line: outputs of fit / predict, and one clear line per bad input with a non-zero exit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

run = run_cli


@pytest.fixture(scope="module")
def model_dir(small_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "model"
    from spade_ad import Spade

    Spade(k=3, k_image=2, image_size=64, calibration_images=3).fit(small_train / "train" / "good").save(d)
    return d


def test_fit_writes_a_model(small_train: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["fit", str(small_train / "train" / "good"), "--out", str(tmp_path / "m"), "--k", "3",
                        "--image-size", "64", "--calibration-images", "2"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "m").iterdir() if p.name not in (".lock", "generations"))
    assert len(names) == 3 and names[2] == "model.json"  # nothing else: no staging file left behind
    assert re.fullmatch(r"bank-[0-9a-f]{16}\.safetensors", names[0]) and names[1].startswith("index-")
    assert "fitted on 8 images" in " ".join(err.split())


def test_predict_writes_outputs(model_dir: Path, small_train: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    one = small_train / "test" / "good" / "000.png"
    code, _, err = run(["predict", str(model_dir), str(small_train / "test" / "scratch"), str(one),
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert r["verdict"] in ("good", "defective") and len(r["neighbours"]) == 3
        overlay = Image.open(tmp_path / "o" / r["overlay"])
        src = Image.open(r["file"])
        assert overlay.size == src.size
        assert np.load(tmp_path / "o" / r["map"]).shape == (src.size[1], src.size[0])
        assert Image.open(tmp_path / "o" / r["mask"]).size == src.size
    assert rows[0]["overlay"] == "scratch_000_overlay.png"


def test_predict_png16_raw_maps(model_dir: Path, small_train: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    one = small_train / "test" / "good" / "000.png"
    code, _, err = run(["predict", str(model_dir), str(one), "--out", str(tmp_path / "o"), "--raw", "png16"], capsys)
    assert code == 0, err
    assert np.asarray(Image.open(tmp_path / "o" / "000_map.png")).dtype in (np.uint16, np.int32)


def test_bad_inputs_give_one_line_and_keep_earlier_outputs(model_dir: Path, small_train: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    good = small_train / "test" / "good" / "000.png"
    code, _, _ = run(["predict", str(model_dir), str(good), "--out", str(out)], capsys)
    assert code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not really a png")
    code, _, err = run(["predict", str(model_dir), str(bad), "--out", str(out)], capsys)
    assert code != 0
    line = " ".join(err.split())
    assert "broken.png: not an image file" in line and "Traceback" not in err
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before  # nothing lost or half-written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "{empty}", "--out", "{tmp}/m"], "no image files"),
        (["fit", "{tmp}/missing", "--out", "{tmp}/m"], "folder does not exist"),
        (["fit", "{train}", "--out", "{tmp}/m", "--backbone", "vgg"], "unknown backbone 'vgg'"),
        (["fit", "{train}", "--out", "{tmp}/m", "--k", "0"], "k must be an integer between 1 and 10000, got 0"),
        (["fit", "{train}", "--out", "{tmp}/m", "--device", "tpu"], "unknown device 'tpu'"),
        (["fit", "{train}", "--out", "{tmp}/m", "--backbone", "wide_resnet50_2"], "--weights PATH"),
        (["predict", "{tmp}/nomodel", "{train}", "--out", "{tmp}/o"], "model folder does not exist"),
        (["predict", "{empty}", "{train}", "--out", "{tmp}/o"], "model.json: model file is missing"),
        (["benchmark", "{empty}", "--out", "{tmp}/b"], "no MVTec-layout category"),
        (["benchmark", "{empty}", "--out", "{tmp}/b"], "/empty/train/good, and {tmp}/empty/test)"),
        (["benchmark", "{empty}", "--out", "{tmp}/b", "--layout", "folder"],
         "empty: generic folder has no good/ (or train/good/) folder"),
        (["benchmark", "{root}", "--out", "{tmp}/b", "--layout", "odd"], "unknown layout 'odd'"),
        (["benchmark", "{root}", "--out", "{tmp}/b", "--protocol", "odd"], "unknown protocol 'odd'"),
    ],
)
def test_errors(argv: list[str], message: str, small_train: Path, tmp_path: Path,
                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    subs = {"{empty}": str(tmp_path / "empty"), "{tmp}": str(tmp_path), "{train}": str(small_train / "train" / "good"),
            "{root}": str(small_train)}
    args = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        args.append(a)
    message = message.replace("{tmp}", str(tmp_path))
    code, _, err = run(args, capsys)
    assert code != 0
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["fit", "x", "--frobnicate"], capsys)
    assert code == 2 and "frobnicate" in err


def test_mask_of_wrong_size_in_benchmark(small_train: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    root = tmp_path / "cat"
    shutil.copytree(small_train, root)
    mask = root / "ground_truth" / "scratch" / "000_mask.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
    code, _, err = run(["benchmark", str(root), "--out", str(tmp_path / "b"), "--k", "2", "--image-size", "64",
                        "--calibration-images", "0"], capsys)
    assert code != 0
    assert "000_mask.png: mask size 10x10 does not match its image (96x96)" in " ".join(err.split())


def test_benchmark_writes_metrics(small_train: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["benchmark", str(small_train), "--out", str(tmp_path / "b"), "--k", "3", "--image-size",
                          "64", "--calibration-images", "0", "--protocol", "paper"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "b" / "metrics.json").read_text())
    row = doc["categories"][small_train.name]
    assert set(row) >= {"image_auroc", "pixel_auroc", "aupro", "n_train", "n_test", "fit_seconds",
                        "predict_seconds_per_image"}
    assert row["n_train"] == 8 and row["n_test"] == 6 and 0 <= row["aupro"] <= 1
    assert doc["settings"]["protocol"] == "paper" and "mean" in doc
    assert "image AUROC" in out


def _generic_folder(bottle: Path, root: Path, train: str, masks: bool) -> Path:
    """A generic-layout folder copied from real bottle images: 4 training images in ``train``, test/good (2),
    test/broken_large (2) and, with ``masks``, their masks in masks/ as <stem>_mask.png."""
    import shutil

    def copy(src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)

    for f in sorted((bottle / "train" / "good").glob("*.png"))[:4]:
        copy(f, root / train / f.name)
    for f in sorted((bottle / "test" / "good").glob("*.png"))[:2]:
        copy(f, root / "test" / "good" / f.name)
    for f in sorted((bottle / "test" / "broken_large").glob("*.png"))[:2]:
        copy(f, root / "test" / "broken_large" / f"bl_{f.name}")
        if masks:
            gt = bottle / "ground_truth" / "broken_large" / f"{f.stem}_mask.png"
            copy(gt, root / "masks" / f"bl_{f.stem}_mask.png")
    return root


@pytest.mark.parametrize(("train", "masks", "extra"), [
    ("good", True, []),  # detected: good/ at the top
    ("train/good", True, []),  # detected: masks/ and no ground_truth/
    ("train/good", False, ["--layout", "folder"]),  # no masks: no pixel metrics
])
def test_benchmark_on_a_generic_folder(bottle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       train: str, masks: bool, extra: list[str]) -> None:
    import math

    root = _generic_folder(bottle, tmp_path / "parts", train, masks)
    code, out, err = run(["benchmark", str(root), "--out", str(tmp_path / "b"), "--k", "2", "--k-image", "2",
                          "--image-size", "64", "--calibration-images", "0", *extra], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert doc["layout"] == "folder" and list(doc["categories"]) == ["parts"]
    row = doc["categories"]["parts"]
    assert set(row) >= {"image_auroc", "pixel_auroc", "aupro", "n_train", "n_test", "fit_seconds",
                        "predict_seconds_per_image"}
    assert row["n_train"] == 4 and row["n_test"] == 4
    pixel = ("pixel_auroc", "aupro")
    for k in ("image_auroc", *pixel) if masks else ("image_auroc",):
        assert math.isfinite(row[k]) and 0 <= row[k] <= 1 and doc["mean"][k] == row[k], k
    if not masks:
        assert all(row[k] is None and doc["mean"][k] is None for k in pixel)
    assert "image AUROC" in out and "parts" in out


def test_generic_folder_with_a_missing_mask(bottle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _generic_folder(bottle, tmp_path / "parts", "good", masks=True)
    missing = sorted((root / "masks").iterdir())[0]
    missing.unlink()
    code, _, err = run(["benchmark", str(root), "--out", str(tmp_path / "b")], capsys)
    assert code != 0 and "Traceback" not in err
    image = root / "test" / "broken_large" / missing.name.replace("_mask", "")
    assert f"{image}: no mask in {root / 'masks'}" in " ".join(err.split())

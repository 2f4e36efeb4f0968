"""Operating points (``spade-ad calibrate``), known defects and the defect gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from spade_ad import Spade
from spade_ad.io import load_image, load_mask
from spade_ad.operating import Evidence, costs, recall_threshold

RANDOM = ["--weights", "random"]


def test_recall_threshold_is_the_highest_that_reaches_the_recall() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        v = rng.integers(0, 6, rng.integers(1, 12)).astype(float)  # many ties
        r = float(rng.choice([0.1, 0.25, 0.5, 0.9, 1.0, rng.random()]))
        want = max(t for t in v if np.mean(v >= t) >= r - 1e-12)  # brute force over candidate thresholds
        assert recall_threshold(v, r) == want


def test_costs_count_what_a_threshold_flags() -> None:
    calib = {"image_scores": [1.0, 2.0, 3.0, 4.0], "map_maxima": [10.0, 20.0, 30.0, 40.0]}
    ev = Evidence(("a", "b"), np.array([2.5, 5.0]), np.array([5.0, 15.0, 25.0, 35.0, 45.0]))
    c = costs(calib, 3.0, 30.0, ev)
    assert c == {"image_threshold": 3.0, "image_false_alarm_rate": 0.5, "image_recall": 0.5, "pixel_threshold": 30.0,
                 "pixel_false_alarm_rate": 0.5, "pixel_recall": 0.4}
    assert costs(calib, 3.0, 30.0, None)["image_recall"] is None


@pytest.fixture(scope="module")
def scene(bottle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 good bottles to fit on, 3 broken ones with masks to calibrate with, 12 more broken ones that a careless
    update adds as good."""
    root = tmp_path_factory.mktemp("operating")
    for sub in ("train", "defects", "masks", "more"):
        (root / sub).mkdir()
    for p in sorted((bottle / "train" / "good").glob("*.png"))[:12]:
        shutil.copy(p, root / "train")
    for i in ("000", "001", "002"):
        shutil.copy(bottle / "test" / "broken_large" / f"{i}.png", root / "defects")
        shutil.copy(bottle / "ground_truth" / "broken_large" / f"{i}_mask.png", root / "masks")
    for p in sorted((bottle / "test" / "broken_large").glob("*.png"))[3:15]:
        shutil.copy(p, root / "more" / f"bl_{p.name}")
    return root


@pytest.mark.slow
def test_calibrate_for_a_recall_and_the_defect_gate(scene: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    m = str(tmp_path / "m")
    assert run_cli(["fit", str(scene / "train"), "--out", m, "--image-size", "128"], capsys)[0] == 0
    fitted = Spade.load(m)
    defects = sorted((scene / "defects").glob("*.png"))
    names = [str(p) for p in defects]
    # known defects with the good-image rule: thresholds as fitted, the defects kept
    code, out, err = run_cli(["calibrate", m, "--defects", str(scene / "defects"), "--masks", str(scene / "masks")],
                             capsys)
    assert code == 0, err
    assert "operating point" in out and "generation 2; 3 known defect(s)" in err
    model = Spade.load(m)
    assert (model.image_threshold_, model.pixel_threshold_) == (fitted.image_threshold_, fitted.pixel_threshold_)
    header = json.loads((Path(m) / "model.json").read_text())
    assert [d["name"] for d in header["defects"]] == names and "defects" in header["files"]
    assert model.history_[-1]["defects_added"] == names and model.missed_defects() == []

    # the gate: adding broken bottles as good ones would make the model judge the known defects good
    code, _, err = run_cli(["update", m, "--add", str(scene / "more")], capsys)
    assert code == 2 and "would judge 3 known defect(s) good" in err and names[0] in err
    assert len(err.strip().splitlines()) == 1 and len(Spade.load(m).history_) == 2  # nothing changed
    code, _, err = run_cli(["update", m, "--add", str(scene / "more"), "--force"], capsys)
    assert code == 0, err
    forced = Spade.load(m)
    assert forced.history_[-1]["forced"] == names and forced.missed_defects() == names

    # a target recall: independently, the defects' scores and defect-pixel values give the thresholds
    code, _, err = run_cli(["calibrate", m, "--target-recall", "1"], capsys)
    assert code == 0, err
    model = Spade.load(m)
    pred = model.predict(names)
    pixels = np.concatenate([pred.maps[i][load_mask(scene / "masks" / f"{p.stem}_mask.png")]
                             for i, p in enumerate(defects)])
    assert model.image_threshold_ == pytest.approx(float(pred.scores.min()), rel=1e-6)
    assert model.pixel_threshold_ == pytest.approx(float(pixels.min()), rel=1e-6)
    entry = model.history_[-1]
    assert entry["action"] == "calibrate" and entry["operating_point"] == {"rule": "recall", "value": 1.0}
    assert entry["costs"]["before"]["image_recall"] == 0.0 and entry["costs"]["after"]["image_recall"] == 1.0
    assert entry["costs"]["after"]["pixel_recall"] == 1.0 and model.missed_defects() == []

    # the operating point stays chosen: after an update the recall rule is measured again on the new model
    code, _, err = run_cli(["update", m, "--remove", "bl_003.png"], capsys)
    assert code == 0, err
    model = Spade.load(m)
    again = model.predict(names)
    assert model.image_threshold_ == pytest.approx(float(again.scores.min()), rel=1e-6)
    assert model.calibration_["operating_point"] == {"rule": "recall", "value": 1.0}
    code, out, _ = run_cli(["history", m], capsys)
    assert code == 0 and "recall" in out and "forced" in out

    # a rollback to a generation that misses them is gated too
    code, _, err = run_cli(["rollback", m, "--to", "3"], capsys)
    assert code == 2 and "generation 3 would judge 3 known defect(s) good" in err and len(Spade.load(m).history_) == 5
    code, _, err = run_cli(["rollback", m, "--to", "3", "--force"], capsys)
    assert code == 0, err
    back = Spade.load(m)
    assert back.history_[-1]["forced"] == names and back.state_.defects is not None  # the defects stay known
    assert len(back.state_.defects) == 3


def test_calibrate_refuses_bad_input_in_one_line(small_train: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    m = str(tmp_path / "m")
    train = small_train / "train" / "good"
    assert run_cli(["fit", str(train), "--out", m, "--k", "3", *RANDOM], capsys)[0] == 0
    defect = sorted((small_train / "test").glob("*/*.png"))[-1]
    for argv, message in (
        (["--target-recall", "1.5", "--defects", str(defect)], "--target-recall must be in (0, 1], got 1.5"),
        (["--false-alarm-rate", "1"], "--false-alarm-rate must be in (0, 1), got 1.0"),
        (["--target-recall", "0.9", "--false-alarm-rate", "0.1"], "give one"),
        (["--target-recall", "0.9"], "--target-recall needs defective images"),
        (["--defects", str(sorted(train.iterdir())[0])], "it is the model's good training image"),
        (["--defects", str(tmp_path / "nope.png")], "nope.png: file or folder does not exist"),
        (["--masks", str(tmp_path)], "--masks: give the defective images with --defects"),
    ):
        code, _, err = run_cli(["calibrate", m, *argv, *RANDOM], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert len(Spade.load(m, weights="random").history_) == 1  # nothing changed
    code, _, err = run_cli(["calibrate", m, "--defects", str(defect), *RANDOM], capsys)
    assert code == 0, err
    code, _, err = run_cli(["calibrate", m, "--defects", str(defect), *RANDOM], capsys)
    assert code == 2 and "already a known defect of this model" in err
    # a mask of another size than its image
    masks = tmp_path / "masks"
    masks.mkdir()
    from PIL import Image

    other = sorted((small_train / "test").glob("*/*.png"))[-2]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / f"{other.stem}_mask.png")
    code, _, err = run_cli(["calibrate", m, "--defects", str(other), "--masks", str(masks), *RANDOM], capsys)
    assert code == 2 and "a mask must have its image's size" in err, err
    # a dry run changes nothing
    code, _, err = run_cli(["calibrate", m, "--false-alarm-rate", "0.2", "--dry-run", *RANDOM], capsys)
    assert code == 0 and "dry run" in err and len(Spade.load(m, weights="random").history_) == 2
    img = load_image(other)
    assert img.shape[:2] != (10, 10)


@pytest.mark.slow
def test_the_inspector_keeps_a_missed_defect_and_gates_its_changes(scene: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from spade_ad.delivery.inspector import create_app

    token = "operating-test-token-0123456789"
    auth = {"Authorization": f"Bearer {token}"}
    folder = tmp_path / "m"
    Spade().fit(sorted(str(p) for p in (scene / "train").iterdir())).save(folder)
    c = TestClient(create_app(folder, allow_updates=True, token=token), base_url="http://localhost")
    defect = sorted((scene / "defects").glob("*.png"))[0]
    up = c.post("/predict", files={"file": ("broken.png", defect.read_bytes(), "image/png")}).json()
    assert c.post("/defects", json={"id": up["id"]}).status_code == 401  # no token
    r = c.post("/defects", json={"id": up["id"]}, headers={**auth, "Origin": "http://evil.example"})
    assert r.status_code == 403  # another origin may not write
    assert len(Spade.load(folder).history_) == 1
    r = c.post("/defects", json={"id": up["id"]}, headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["action"] == "calibrate" and body["generation"] == 2 and body["defects_added"][0].endswith("broken.png")
    model = Spade.load(folder)
    assert model.state_.defects is not None and len(model.state_.defects) == 1 and model.missed_defects() == []
    # marking that very image as normal would make the model judge it good: the gate refuses it
    r = c.post("/normals", json={"id": up["id"]}, headers=auth)
    assert r.status_code == 409 and "would judge 1 known defect(s) good" in r.json()["detail"]
    assert len(Spade.load(folder).history_) == 2

"""The paper protocol's preprocessing travels with the model: a model saved from a paper-protocol report
gives, through Spade.load().predict on the original 900x900 images, ``spade-ad predict`` and the
inspector's POST /predict, exactly the per-image scores the report measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from fastapi.testclient import TestClient

from spade_ad import Spade
from spade_ad.delivery.inspector import create_app
from spade_ad.preprocess import Preprocessor


@pytest.fixture(scope="module")
def small_bottle(bottle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bottle category cut down to 12 training and 6 test images (links, nothing copied)."""
    root = tmp_path_factory.mktemp("bottle") / "bottle"
    (root / "train" / "good").mkdir(parents=True)
    for f in sorted((bottle / "train" / "good").glob("*.png"))[:12]:
        (root / "train" / "good" / f.name).symlink_to(f)
    for kind in ("good", "broken_large"):
        (root / "test" / kind).mkdir(parents=True)
        for f in sorted((bottle / "test" / kind).glob("*.png"))[:3]:
            (root / "test" / kind / f.name).symlink_to(f)
    (root / "ground_truth" / "broken_large").mkdir(parents=True)
    for f in sorted((bottle / "test" / "broken_large").glob("*.png"))[:3]:
        m = f"{f.stem}_mask.png"
        (root / "ground_truth" / "broken_large" / m).symlink_to(bottle / "ground_truth" / "broken_large" / m)
    return root


def test_paper_protocol_scores_reproduce_through_predict_cli_and_inspector(
    small_bottle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "model"
    code, _, err = run_cli(["report", str(small_bottle), "--out", str(tmp_path / "rep"), "--protocol", "paper",
                            "--k", "5", "--calibration-images", "4", "--model-out", str(model_dir)], capsys)
    assert code == 0, err
    reported = {Path(r["name"]).resolve(): r["score"]
                for r in json.loads((tmp_path / "rep" / "report.json").read_text())["images"]}
    files = sorted(reported)
    assert len(files) == 6

    model = Spade.load(model_dir)
    assert model.settings.preprocess == "paper" and model.settings.image_size == 224
    pred = model.predict(files)
    assert [float(s) for s in pred.scores] == [reported[f] for f in files]
    # maps come back at the original resolution, 0 outside the centre crop (7/8 of each side)
    assert pred.maps[0].shape == (900, 900)
    y0, x0, y1, x1 = Preprocessor("paper", 224).crop_box(900, 900)
    assert (y0, x0, y1, x1) == (56, 56, 844, 844)
    assert np.all(pred.maps[0][:y0] == 0) and np.all(pred.maps[0][:, x1:] == 0)
    assert np.all(pred.maps[0][y0:y1, x0:x1] > 0)

    code, _, err = run_cli(["predict", str(model_dir), *map(str, files), "--out", str(tmp_path / "pred")], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert {Path(r["file"]).resolve(): r["score"] for r in rows} == reported

    client = TestClient(create_app(model_dir), base_url="http://localhost")
    for f in files[:3]:
        r = client.post("/predict", files={"file": (f.name, f.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["score"] == reported[f]
    assert client.get("/info").json()["preprocess"] == "paper"


def test_paper_protocol_refuses_a_conflicting_preprocess(small_bottle: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["benchmark", str(small_bottle), "--out", str(tmp_path / "b"), "--protocol", "paper",
                            "--preprocess", "resize"], capsys)
    assert code == 2 and "--protocol paper evaluates on the paper's centre crop" in " ".join(err.split())

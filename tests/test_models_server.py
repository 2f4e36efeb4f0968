"""``spade-ad serve MODELS_DIR``: several models side by side in one real server, each answering as
``spade-ad predict`` does, changes by another process picked up without a restart, folders that appear or
are damaged, and least-recently-used unloading within --max-memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import run_cli, serve_app

from spade_ad import Spade
from spade_ad.delivery.models_server import create_models_app, model_bytes

FAST = dict(k=3, k_image=2, image_size=64, calibration_images=4)
CLI = [sys.executable, "-m", "spade_ad.delivery.cli"]


@pytest.fixture(scope="module")
def models(small_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two models (all training images; the first four only) and a damaged third."""
    root = tmp_path_factory.mktemp("models")
    good = sorted((small_train / "train" / "good").glob("*.png"))
    Spade(**FAST).fit(good).save(root / "widget")
    Spade(**FAST).fit(good[:4]).save(root / "widget-small")
    shutil.copytree(root / "widget-small", root / "broken")
    header = json.loads((root / "broken" / "model.json").read_text())
    header["n_train"] = 99  # no longer matches its own checksum
    (root / "broken" / "model.json").write_text(json.dumps(header))
    return root


@pytest.fixture()
def server(models: Path) -> Iterator[str]:
    yield from serve_app(create_models_app(models))


def _predict(c: httpx.Client, name: str, image: Path) -> dict[str, Any]:
    r = c.post(f"/models/{name}/predict", files={"file": (image.name, image.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_two_models_side_by_side_answer_as_predict_does(models: Path, server: str, small_train: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = httpx.Client(base_url=server, timeout=120)
    listing = {m["name"]: m for m in c.get("/models").json()["models"]}
    assert set(listing) == {"widget", "widget-small", "broken"}
    assert listing["widget"]["available"] and listing["widget"]["images"] == 8 and listing["widget"]["generation"] == 1
    assert listing["widget-small"]["images"] == 4 and listing["widget"]["preset"] == "paper"
    assert not listing["broken"]["available"] and "checksum" in listing["broken"]["reason"]
    image = sorted((small_train / "test").glob("*/*.png"))[-1]
    for name in ("widget", "widget-small"):
        got = _predict(c, name, image)
        code, _, err = run_cli(["predict", str(models / name), str(image), "--out", str(tmp_path / name)], capsys)
        assert code == 0, err
        row = json.loads((tmp_path / name / "predictions.jsonl").read_text())
        assert got["score"] == row["score"] and got["verdict"] == row["verdict"] and got["regions"] == row["regions"]
        info = c.get(f"/models/{name}/info").json()
        assert info["n_train"] == listing[name]["images"]
        thumb = c.get(f"/models/{name}" + got["neighbours"][0]["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
        assert c.get(f"/models/{name}/health").json()["images"] == 1
    assert _predict(c, "widget", image)["score"] != _predict(c, "widget-small", image)["score"]
    r = c.post("/models/broken/predict", files={"file": (image.name, image.read_bytes(), "image/png")})
    assert r.status_code == 503 and "unavailable" in r.json()["detail"]
    assert c.get("/models/nothing/info").status_code == 404
    assert c.get("/").status_code == 200 and c.get("/health").json() == {"status": "ok"}
    code, _, err = run_cli(["history", str(models / "widget"), "--health", f"{server}/models/widget"], capsys)
    assert code == 0 and "health warming up:" in err and "recent image(s)" in err, err


def test_changes_on_disk_and_new_folders_are_served_without_a_restart(models: Path, small_train: Path,
                                                                      tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(models / "widget-small", root / "a")
    gen = serve_app(create_models_app(root))
    url = next(gen)
    try:
        c = httpx.Client(base_url=url, timeout=120)
        image = sorted((small_train / "test").glob("*/*.png"))[-1]
        before = _predict(c, "a", image)
        assert before["generation"] == 1
        good = sorted((small_train / "train" / "good").glob("*.png"))
        p = subprocess.run([*CLI, "update", str(root / "a"), "--add", str(good[5])], capture_output=True, text=True,
                           timeout=300)  # another process changes the model
        assert p.returncode == 0, p.stderr
        after = _predict(c, "a", image)
        assert after["generation"] == 2 and after["score"] != before["score"]
        assert after["score"] == Spade.load(root / "a").predict([str(image)]).scores[0]
        shutil.copytree(models / "widget", root / "b")  # a folder added while serving
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["a", "b"]
        assert _predict(c, "b", image)["generation"] == 1
    finally:
        next(gen, None)


def test_least_recently_used_models_are_unloaded_within_the_memory(models: Path, small_train: Path) -> None:
    from fastapi.testclient import TestClient

    one = model_bytes(Spade.load(models / "widget"))
    app = create_models_app(models, max_memory=int(one * 1.5))  # room for one model
    c = TestClient(app, base_url="http://localhost")
    image = sorted((small_train / "test").glob("*/*.png"))[-1]
    r = c.get("/models/widget/info", headers={"Host": "evil.example"})  # DNS rebinding: refused before loading
    assert r.status_code == 421 and not app.registry.loaded
    for name in ("widget", "widget-small", "widget"):
        assert c.post(f"/models/{name}/predict", files={"file": (image.name, image.read_bytes(),
                                                                 "image/png")}).status_code == 200
        assert list(app.registry.loaded) == [name]
    loaded = {m["name"]: m["loaded"] for m in c.get("/models").json()["models"]}
    assert loaded == {"widget": True, "widget-small": False, "broken": False}
    assert c.get("/models").json()["memory_bytes"] == one


def test_serve_takes_a_models_folder_and_refuses_bad_options(models: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    code, _, err = run_cli(["serve", str(models), "--max-memory-mb", "0"], capsys)
    assert code == 2 and "--max-memory-mb must be positive" in err and len(err.strip().splitlines()) == 1

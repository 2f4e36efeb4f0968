"""A model that keeps learning: add and remove good images without refitting, bit-identical to a fresh
fit; generations, history and rollback; interrupted updates; the inspector's guarded write endpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from spade_ad import Spade, SpadeError
from spade_ad.delivery.inspector import create_app

FAST = dict(k=3, k_image=2, image_size=64, calibration_images=4)
CLI = [sys.executable, "-m", "spade_ad.delivery.cli"]
TOKEN = "t0ken-for-tests-0123456789"


def spade_ad(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def sets(small_train: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    files = sorted((small_train / "train" / "good").glob("*.png"))  # 000..007
    root = tmp_path_factory.mktemp("sets")
    out: dict[str, list[Path]] = {}
    for name, chosen in (("A", files[:5]), ("B", files[5:]), ("C", [files[1]]), ("ABC", files[:1] + files[2:])):
        (root / name).mkdir()
        for f in chosen:
            (root / name / f.name).symlink_to(f)
        out[name] = sorted((root / name).iterdir())
    return out


def _same(p: Spade, q: Spade, test: list[Path]) -> None:
    a, b = p.predict(test), q.predict(test)
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.neighbours, b.neighbours)
    assert all(np.array_equal(x, y) for x, y in zip(a.maps, b.maps, strict=True))
    assert (p.image_threshold_, p.pixel_threshold_) == (q.image_threshold_, q.pixel_threshold_)
    assert p.calibration_ == q.calibration_


def test_add_then_remove_equals_a_fresh_fit(sets: dict[str, list[Path]], small_train: Path, tmp_path: Path) -> None:
    test = sorted((small_train / "test").rglob("*.png"))
    m = Spade(**FAST).fit(sets["A"]).add(sets["B"]).remove(["001.png"])
    fresh = Spade(**FAST).fit([f for f in sets["A"] + sets["B"] if f.name != "001.png"])
    _same(m, fresh, test)
    assert [e["action"] for e in m.history_] == ["fit", "add", "remove"]
    assert m.history_[1]["before"]["n_train"] == 5 and m.history_[1]["after"]["n_train"] == 8
    # through a saved folder and a fresh load: still identical, and the folder remembers the generation
    m.save(tmp_path / "m")
    _same(Spade.load(tmp_path / "m"), fresh, test)
    assert json.loads((tmp_path / "m" / "model.json").read_text())["generation"] == 3


def test_names_and_bad_removals(sets: dict[str, list[Path]]) -> None:
    m = Spade(**FAST).fit(sets["A"])
    assert m.resolve_names(["002.png", str(sets["A"][3]), 0]) == [0, 2, 3]
    with pytest.raises(SpadeError, match="nope.png: not a training image"):
        m.remove(["nope.png"])
    with pytest.raises(SpadeError, match="index 9 is out of range"):
        m.remove([9])
    with pytest.raises(SpadeError, match="cannot remove every training image"):
        m.remove(list(range(5)))
    with pytest.raises(SpadeError, match="already a training image"):
        m.add([sets["A"][0]])


def test_cli_update_history_rollback(sets: dict[str, list[Path]], small_train: Path, tmp_path: Path) -> None:
    d, ref = tmp_path / "m", tmp_path / "ref"
    common = ["--k", "3", "--k-image", "2", "--image-size", "64", "--calibration-images", "4"]
    assert spade_ad("fit", str(sets["A"][0].parent), "--out", str(d), *common).returncode == 0
    r = spade_ad("update", str(d), "--add", str(sets["B"][0].parent), "--remove", "001.png")
    assert r.returncode == 0, r.stderr
    line = " ".join(r.stderr.split())
    assert "generation 3" in line and "added 3, removed 1" in line and "before: 5 images" in line
    assert "after: 7 images" in line
    assert spade_ad("fit", str(sets["ABC"][0].parent), "--out", str(ref), *common).returncode == 0
    test = sorted((small_train / "test").rglob("*.png"))
    _same(Spade.load(d), Spade.load(ref), test)
    h = spade_ad("history", str(d))
    assert h.returncode == 0 and "remove -1 (001.png)" in h.stdout and "add +3" in h.stdout
    r = spade_ad("rollback", str(d), "--to", "1")
    assert r.returncode == 0 and "generation 4: back to generation 1" in r.stderr
    back = Spade.load(d)
    assert len(back.history_) == 4 and back.train_names_ == [str(f) for f in sets["A"]]
    r = spade_ad("rollback", str(d), "--to", "9")
    assert r.returncode == 2 and "generation must be between 1 and 3" in r.stderr


@pytest.mark.parametrize(("point", "sig"), [("fit-bank", "KILL"), ("save-bank", "KILL"), ("save-index", "INT"),
                                            ("save-generation", "KILL"), ("save-header", "KILL")])
def test_killed_update_leaves_a_loadable_generation(sets: dict[str, list[Path]], tmp_path: Path,
                                                   point: str, sig: str) -> None:
    d = tmp_path / "m"
    Spade(**FAST).fit(sets["A"]).save(d)
    r = spade_ad("update", str(d), "--add", str(sets["B"][0]), env={"SPADE_AD_CRASH_AT": f"{point}:{sig}"})
    assert r.returncode == (-signal.SIGKILL if sig == "KILL" else 130)
    m = Spade.load(d)
    gen = json.loads((d / "model.json").read_text())["generation"]
    assert gen == len(m.history_) == (2 if point == "save-header" else 1)  # the history tells which
    assert len(m.train_names_) == (6 if gen == 2 else 5)
    h = spade_ad("history", str(d))
    assert h.returncode == 0 and f"current generation: {gen}" in h.stderr


# ------------------------------------------------------------------ the inspector
@pytest.fixture()
def folder(sets: dict[str, list[Path]], tmp_path: Path) -> Path:
    return Spade(**FAST).fit(sets["A"]).save(tmp_path / "m")


def _upload(client: TestClient, f: Path) -> dict:
    r = client.post("/predict", files={"file": (f.name, f.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def test_writes_are_refused_without_permission_token_or_same_origin(folder: Path, sets: dict[str, list[Path]]
                                                                     ) -> None:
    ro = TestClient(create_app(folder), base_url="http://localhost")
    j = _upload(ro, sets["B"][0])
    r = ro.post("/normals", json={"id": j["id"]}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 403 and "read-only" in r.json()["detail"]
    assert ro.delete("/normals/0?generation=1").status_code == 403
    rw = TestClient(create_app(folder, allow_updates=True, token=TOKEN), base_url="http://localhost")
    j = _upload(rw, sets["B"][0])
    assert rw.post("/normals", json={"id": j["id"]}).status_code == 401
    assert rw.post("/normals", json={"id": j["id"]}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = rw.post("/normals", json={"id": j["id"]},
                headers={"Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"})
    assert r.status_code == 403
    assert rw.get("/info").json()["generation"] == 1  # nothing changed


def test_mark_as_normal_then_the_same_upload_scores_lower_and_survives_a_restart(
        folder: Path, sets: dict[str, list[Path]]) -> None:
    app = create_app(folder, allow_updates=True, token=TOKEN)
    c = TestClient(app, base_url="http://localhost")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    f = sets["B"][1]
    first = _upload(c, f)
    r = c.post("/normals", json={"id": first["id"]}, headers=auth)
    assert r.status_code == 200, r.text
    u = r.json()
    assert u["generation"] == 2 and u["n_train"] == 6 and u["before"]["n_train"] == 5
    again = _upload(c, f)
    assert again["score"] < first["score"]
    assert again["neighbours"][0]["name"].endswith(f.name)  # its nearest normal image is now itself
    info = c.get("/info").json()
    assert info["generation"] == 2 and info["n_train"] == 6
    # removing it again (a training image that 'shows a defect')
    ref = next(n["id"] for n in again["neighbours"] if n["name"].endswith(f.name))
    assert again["generation"] == 2
    r = c.delete(f"/normals/{ref}?generation=2", headers=auth)
    assert r.status_code == 200 and r.json()["generation"] == 3 and r.json()["n_train"] == 5
    # a restart keeps the generation; the history names the client
    again = TestClient(create_app(folder), base_url="http://localhost").get("/info").json()
    assert again["generation"] == 3
    hist = Spade.load(folder).history_
    assert [e["action"] for e in hist] == ["fit", "add", "remove"] and hist[1]["source"].startswith("inspector ")


def test_predictions_during_an_update_use_the_old_or_the_new_model(folder: Path, sets: dict[str, list[Path]],
                                                                   small_train: Path) -> None:
    app = create_app(folder, allow_updates=True, token=TOKEN)
    c = TestClient(app, base_url="http://localhost")
    files = sorted((small_train / "test").rglob("*.png"))
    test = [files[i % len(files)] for i in range(8)]
    old = Spade.load(folder).predict(test).scores
    j = _upload(c, sets["B"][2])
    results: dict[int, float] = {}

    def one(i: int) -> None:
        results[i] = _upload(c, test[i])["score"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    r = c.post("/normals", json={"id": j["id"]}, headers={"Authorization": f"Bearer {TOKEN}"})
    for t in threads:
        t.join()
    assert r.status_code == 200 and len(results) == 8
    new = Spade.load(folder).predict(test).scores
    for i in range(8):
        assert results[i] in (float(old[i]), float(new[i]))

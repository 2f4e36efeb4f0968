"""Model writes never lose a change and never accept a wrong model: image identity (no image twice),
writers that take turns (real processes and a real server), removals that name what the client saw,
re-fits that keep the folder's generations, honest reports, failed writes that name their file and
leave a folder a retry can use, and stored names printed safely."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import rng_images, run_cli, serve_app
from fastapi.testclient import TestClient

from spade_ad import Spade, SpadeError
from spade_ad.delivery.inspector import create_app
from spade_ad.persistence import folder_lock

FAST = dict(k=3, k_image=2, image_size=64, calibration_images=4)
COMMON = ["--k", "3", "--k-image", "2", "--image-size", "64", "--calibration-images", "4"]
CLI = [sys.executable, "-m", "spade_ad.delivery.cli"]
TOKEN = "t0ken-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def good(small_train: Path) -> list[Path]:
    return sorted((small_train / "train" / "good").glob("*.png"))  # 000..007


@pytest.fixture()
def folder(good: list[Path], tmp_path: Path) -> Path:
    """A model of the first five good images, saved (generation 1)."""
    return Spade(**FAST).fit(good[:5]).save(tmp_path / "m")


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ})


def _wait_for_line(p: subprocess.Popen[str], text: str) -> None:
    """Read the process's stderr until a line holds ``text`` (it then waits for the folder's lock)."""
    assert p.stderr is not None
    for line in p.stderr:
        if text in line:
            return
    pytest.fail(f"the command ended without saying {text!r} (exit {p.wait()})")


def _finish(p: subprocess.Popen[str]) -> str:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return " ".join(err.split())


# ------------------------------------------------------------------ 3. an image is in a model once
def test_the_same_image_however_spelled_is_refused(good: list[Path], folder: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    m = Spade.load(folder)
    assert all(isinstance(x, str) and len(x) == 64 for x in m.train_ids_) and len(set(m.train_ids_)) == 5
    twin = tmp_path / "copy" / "renamed.png"  # the same pixels under another path and name
    twin.parent.mkdir()
    twin.write_bytes(good[2].read_bytes())
    with pytest.raises(SpadeError, match=r"identical pixels.*renamed\.png \(= .*002\.png, already a training image"):
        m.add([twin])
    with pytest.raises(SpadeError, match="already a training image"):
        m.add([good[1].resolve()])  # an absolute path to an image fitted by another spelling
    with pytest.raises(SpadeError, match=r"given twice|renamed\.png"):
        m.add([good[6], twin])
    pair = tmp_path / "pair"
    pair.mkdir()
    (pair / "a.png").write_bytes(good[6].read_bytes())
    (pair / "b.png").write_bytes(good[6].read_bytes())
    with pytest.raises(SpadeError, match=r"b\.png \(= .*a\.png\)"):
        m.add(pair)
    arrays = rng_images(3)
    with pytest.raises(SpadeError, match=r"array\[2\] \(= array\[0\]\)"):
        Spade(**FAST).fit([arrays[0], arrays[1], arrays[0].copy()])  # fit, arrays: the same check
    # through the command line, with the folder given as an absolute path: refused, model unchanged
    code, _, err = run_cli(["update", str(folder), "--add", str(good[0].parent.resolve())], capsys)
    assert code == 2 and "already a training image" in err
    assert len(Spade.load(folder).history_) == 1
    # a model saved before images had ids still loads; its ids are unknown
    header = json.loads((folder / "model.json").read_text())
    del header["train_ids"]
    from spade_ad.persistence import header_digest

    header["header_sha256"] = header_digest(header)
    (folder / "model.json").write_text(json.dumps(header))
    old = Spade.load(folder)
    assert old.train_ids_ == [None] * 5
    old.add([good[6]])
    assert old.train_ids_[:5] == [None] * 5 and old.train_ids_[5] is not None


# ------------------------------------------------------------------ 4. and 10. honest removals
def test_shrinking_to_one_image_needs_force_and_says_no_thresholds(folder: Path, good: list[Path],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SpadeError, match="would leave one: the model would have no thresholds"):
        Spade.load(folder).remove([0, 1, 2, 3])
    code, _, err = run_cli(["update", str(folder), "--remove", "0", "--remove", "1", "--remove", "2",
                            "--remove", "3"], capsys)
    assert code == 2 and "--force" in err and len(Spade.load(folder).history_) == 1
    code, _, err = run_cli(["update", str(folder), "--remove", "0", "--remove", "1", "--remove", "2",
                            "--remove", "3", "--force"], capsys)
    line = " ".join(err.split())
    assert code == 0 and "removed 4" in line and "after: 1 images, no thresholds" in line
    code, _, err = run_cli(["history", str(folder)], capsys)
    assert code == 0 and "current generation: 2; the model has no thresholds" in " ".join(err.split())
    out = folder.parent / "out-no-thresholds"
    code, _, err = run_cli(["predict", str(folder), str(good[5]), "--out", str(out)], capsys)
    line = " ".join(err.split())
    assert code == 0 and "no verdicts: the model has no thresholds" in line and "flagged" not in line


def test_an_image_named_twice_for_removal_is_refused(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SpadeError, match=r"3 and 003\.png name the same training image"):
        Spade.load(folder).remove([3, "003.png"])
    code, _, err = run_cli(["update", str(folder), "--remove", "3", "--remove", "003.png"], capsys)
    assert code == 2 and "name the same training image" in err and len(Spade.load(folder).history_) == 1
    code, _, err = run_cli(["update", str(folder), "--remove", "3", "--remove", "004.png"], capsys)
    assert code == 0 and "removed 2" in err and len(Spade.load(folder).train_names_) == 3


# ------------------------------------------------------------------ 6. writers take turns (real processes)
def test_two_updates_started_together_both_count(good: list[Path], folder: Path) -> None:
    with folder_lock(folder):  # both start while another writer holds the folder: they must queue, not race
        a = _start("update", str(folder), "--remove", "0")
        b = _start("update", str(folder), "--add", str(good[6]))
        _wait_for_line(a, "waiting for it to finish")
        _wait_for_line(b, "waiting for it to finish")
    lines = [_finish(a), _finish(b)]
    assert sorted(int(x.split()[1]) for x in lines) == [2, 3]
    m = Spade.load(folder)
    assert [e["action"] for e in m.history_[1:]] in (["remove", "add"], ["add", "remove"])
    assert good[0].name not in {Path(n).name for n in m.train_names_} and str(good[6]) in m.train_names_
    assert len(m.train_names_) == 5


def test_an_update_and_a_rollback_started_together_both_count(good: list[Path], folder: Path) -> None:
    Spade.load(folder).add([good[5]]).save(folder)  # generation 2
    with folder_lock(folder):
        a = _start("update", str(folder), "--add", str(good[6]))
        b = _start("rollback", str(folder), "--to", "1")
        _wait_for_line(a, "waiting for it to finish")
        _wait_for_line(b, "waiting for it to finish")
    _finish(a)
    _finish(b)
    m = Spade.load(folder)
    actions = [e["action"] for e in m.history_]
    assert len(actions) == 4 and sorted(actions[2:]) == ["add", "rollback"]
    assert (str(good[6]) in m.train_names_) == (actions[3] == "add")


def test_a_save_from_an_out_of_date_model_is_refused(good: list[Path], folder: Path) -> None:
    stale = Spade.load(folder)
    Spade.load(folder).remove([0]).save(folder)
    with pytest.raises(SpadeError, match="changed since this model was read .* generation 2"):
        stale.add([good[6]]).save(folder)
    assert len(Spade.load(folder).history_) == 2


@pytest.fixture()
def server(folder: Path) -> Iterator[str]:
    yield from serve_app(create_app(folder, allow_updates=True, token=TOKEN))


def test_an_inspector_change_during_a_cli_update_both_count(good: list[Path], folder: Path, server: str) -> None:
    c = httpx.Client(base_url=server, timeout=300)
    up = c.post("/predict", files={"file": ("new.png", good[7].read_bytes(), "image/png")}).json()
    assert up["generation"] == 1
    result: dict[str, Any] = {}
    with folder_lock(folder):
        cli = _start("update", str(folder), "--remove", "001.png")
        _wait_for_line(cli, "waiting for it to finish")
        post = threading.Thread(target=lambda: result.update(r=c.post("/normals", json={"id": up["id"]},
                                                                      headers=AUTH)))
        post.start()
        time.sleep(1.0)  # the server's change is waiting for the lock too
    _finish(cli)
    post.join(timeout=300)
    assert result["r"].status_code == 200, result["r"].text
    m = Spade.load(folder)
    assert sorted(e["action"] for e in m.history_[1:]) == ["add", "remove"] and len(m.history_) == 3
    assert len(m.train_names_) == 5 and not any(n.endswith("001.png") for n in m.train_names_)
    listing = c.get("/normals").json()  # and the server serves the folder's generation now
    assert listing["generation"] == 3 and [n["id"] for n in listing["normals"]] == m.train_ids_
    assert c.get("/info").json()["generation"] == 3


# ------------------------------------------------------------------ 7. removals name what the client saw
def test_removals_name_the_image_and_the_generation(folder: Path) -> None:
    c = TestClient(create_app(folder, allow_updates=True, token=TOKEN), base_url="http://localhost")
    seen = c.get("/normals").json()
    assert seen["generation"] == 1 and len(seen["normals"]) == 5
    five = seen["normals"][3]
    r = c.delete(f"/normals/{five['id']}?generation=1", headers=AUTH)
    assert r.status_code == 200 and r.json()["removed"] == [five["name"]]
    r = c.delete(f"/normals/{five['id']}?generation=1", headers=AUTH)  # sent twice: the second is refused
    assert r.status_code == 409 and "generation 1, now 2" in r.json()["detail"]
    nxt = seen["normals"][4]  # a CLI update moves the generation under the server's feet
    Spade.load(folder).remove([0]).save(folder)
    r = c.delete(f"/normals/{nxt['id']}?generation=2", headers=AUTH)
    assert r.status_code == 409 and len(Spade.load(folder).train_names_) == 3
    r = c.delete(f"/normals/{'0' * 64}?generation=3", headers=AUTH)
    assert r.status_code == 404
    assert c.delete(f"/normals/{nxt['id']}", headers=AUTH).status_code == 422  # the generation is required
    names = Spade.load(folder).train_names_
    assert [Path(n).name for n in names] == ["001.png", "002.png", "004.png"]


# ------------------------------------------------------------------ 8. a re-fit keeps the folder's generations
def test_a_refit_becomes_the_next_generation(good: list[Path], folder: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    Spade.load(folder).add([good[5]]).save(folder)
    code, _, err = run_cli(["fit", str(good[0].parent), "--out", str(folder), *COMMON], capsys)
    assert code == 0 and "as generation 3" in " ".join(err.split())
    m = Spade.load(folder)
    assert [e["action"] for e in m.history_] == ["fit", "add", "fit"] and len(m.train_names_) == 8
    assert m.history_[2]["before"]["n_train"] == 6
    code, _, err = run_cli(["rollback", str(folder), "--to", "2"], capsys)
    assert code == 0 and "generation 4: back to generation 2" in err
    assert len(Spade.load(folder).train_names_) == 6
    refit = Spade.load(folder).fit(good[:3])  # through the API too, even from a model read from that folder
    refit.save(folder)
    assert [e["action"] for e in Spade.load(folder).history_] == ["fit", "add", "fit", "rollback", "fit"]


# ------------------------------------------------------------------ 10. failed writes, debris, names
def test_disk_full_while_writing_the_bank_names_the_file(good: list[Path], folder: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import spade_ad.bank as bank

    def full(self: Any, index: int, rows: dict[str, np.ndarray]) -> None:
        with self._writing():
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bank.BankWriter, "write", full)
    code, _, err = run_cli(["update", str(folder), "--add", str(good[6])], capsys)
    line = " ".join(err.split())
    assert code == 2 and ".bank.safetensors: cannot write (No space left on device)" in line
    assert str(folder) in line
    assert not [p for p in folder.iterdir() if p.name.startswith(".staging")]


def test_a_failed_header_write_leaves_a_folder_the_retry_can_use(good: list[Path], folder: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import spade_ad.persistence as persistence

    before = sorted(p.name for p in folder.iterdir())
    real = persistence.save_json

    def full(path: Path, obj: Any) -> Path:
        if Path(path).name == "model.json":
            raise SpadeError(f"{path}: cannot write (No space left on device)")
        return real(path, obj)

    monkeypatch.setattr(persistence, "save_json", full)
    code, _, err = run_cli(["update", str(folder), "--add", str(good[6])], capsys)
    assert code == 2 and "model.json: cannot write (No space left on device)" in " ".join(err.split())
    kept = sorted(p.name for p in folder.iterdir() if not p.name.startswith(f".staging-{os.getpid()}-"))
    assert kept == before  # the new bank and index were not kept (a bank this process may retry with is staged)
    m = Spade(**FAST).fit(good[5:])
    with pytest.raises(SpadeError, match="No space left"):
        m.save(folder)  # in-process: the retry of the same model finds its bank again
    monkeypatch.setattr(persistence, "save_json", real)
    m.save(folder)
    assert len(Spade.load(folder).history_) == 2
    code, _, err = run_cli(["update", str(folder), "--add", str(good[0])], capsys)
    assert code == 0, err


def test_rollback_removes_the_debris_of_killed_writers(good: list[Path], folder: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    Spade.load(folder).add([good[5]]).save(folder)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    debris = [folder / f".staging-{int(dead.stdout)}-0badf00d.bank.safetensors", folder / ".model.json.x1y2.tmp",
              folder / "generations" / ".abc-3.json.q9.tmp"]
    for f in debris:
        f.write_bytes(b"left by a killed writer")
    code, _, err = run_cli(["rollback", str(folder), "--to", "1"], capsys)
    assert code == 0, err
    assert not [f for f in debris if f.exists()]


def test_stored_names_are_printed_escaped(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = "inspector/evil\x1b[31m.png"
    Spade.load(folder).add(rng_images(1, seed=7), names=[evil]).save(folder)
    code, out, err = run_cli(["history", str(folder)], capsys)
    assert code == 0 and "\x1b" not in out + err and "evil\\x1b[31m.png" in out
    code, _, err = run_cli(["update", str(folder), "--remove", "evil\x1b[31m.png", "--remove", "5"], capsys)
    assert code == 2 and "\x1b" not in err and "evil\\x1b[31m.png" in err

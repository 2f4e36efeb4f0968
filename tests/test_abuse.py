"""Trustworthy under abuse: damaged or tampered model files, hostile inputs, interruptions, the real
``spade-ad`` command's exit codes and messages, and the inspector's Host / origin checks.

Every hostile input is generated here; nothing large is committed."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from fastapi.testclient import TestClient
from PIL import Image

from spade_ad import Spade, SpadeError
from spade_ad.delivery.inspector import create_app
from spade_ad.persistence import header_digest
from spade_ad.result import verdict

FAST = dict(k=3, k_image=2, image_size=64, calibration_images=3)
CLI = [sys.executable, "-m", "spade_ad.delivery.cli"]


def spade_ad(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real command in a subprocess."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def model_dir(small_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("abuse") / "model"
    Spade(**FAST).fit(small_train / "train" / "good").save(d)
    return d


def _rewrite(d: Path, change: dict, digest: bool = True) -> None:
    header = json.loads((d / "model.json").read_text())
    header.update(change)
    if digest:
        header["header_sha256"] = header_digest(header)
    (d / "model.json").write_text(json.dumps(header))


def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ 1. the header is checked and validated
def test_one_flipped_bit_in_the_header_is_refused(model_dir: Path, tmp_path: Path) -> None:
    d = _copy_model(model_dir, tmp_path / "m")
    text = (d / "model.json").read_text()
    thr = json.loads(text)["image_threshold"]
    (d / "model.json").write_text(text.replace(repr(thr), repr(thr + 80.0), 1))
    with pytest.raises(SpadeError, match=r"model\.json: checksum mismatch \(the header is damaged or was modified\)"):
        Spade.load(d)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"settings": "k_image=-1"}, "k_image must be an integer between 1"),
        ({"image_threshold": "high"}, "image_threshold must be a finite number"),
        ({"image_threshold": -3.0}, "image_threshold must be a finite number >= 0"),
        ({"level_shapes": [[16, 16], [8, 8], [2, 2]]}, "level_shapes in model.json disagree with the feature bank"),
        ({"train_names": ["a.png"]}, "train_names must be a list of 8 names"),
        ({"weights": "random:seed0"}, "random backbone weights"),
        ({"files": {"bank": {"name": "../../etc/passwd", "sha256": "0"}, "index": {"name": "x", "sha256": "0"}}},
         "not a bank file of this folder"),
        ({"n_train": 0}, "n_train must be an integer >= 1"),
    ],
)
def test_invalid_header_fields_are_refused(model_dir: Path, tmp_path: Path, change: dict, message: str) -> None:
    d = _copy_model(model_dir, tmp_path / "m")
    if change.get("settings") == "k_image=-1":
        settings = json.loads((d / "model.json").read_text())["settings"]
        change = {"settings": {**settings, "k_image": -1}}
    _rewrite(d, change)
    with pytest.raises(SpadeError, match=message):
        Spade.load(d)


def test_nan_in_the_header_is_refused(model_dir: Path, tmp_path: Path) -> None:
    d = _copy_model(model_dir, tmp_path / "m")
    text = (d / "model.json").read_text()
    thr = json.loads(text)["pixel_threshold"]
    (d / "model.json").write_text(text.replace(repr(thr), "NaN", 1))
    with pytest.raises(SpadeError, match=r"model\.json: damaged model header \(NaN is not a valid number"):
        Spade.load(d)


def test_non_finite_scores_never_mean_good() -> None:
    assert verdict(float("nan"), 1.0) == "defective"
    assert verdict(float("inf"), 1.0) == "defective"
    assert verdict(0.5, 1.0) == "good" and verdict(1.0, 1.0) == "defective" and verdict(0.5, None) is None


def test_tampered_header_through_the_cli_exits_2_and_serve_refuses(model_dir: Path, tmp_path: Path,
                                                                   small_train: Path) -> None:
    d = _copy_model(model_dir, tmp_path / "m")
    settings = json.loads((d / "model.json").read_text())["settings"]
    _rewrite(d, {"settings": {**settings, "k": -5}})
    r = spade_ad("predict", str(d), str(small_train / "test" / "good"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "k must be an integer between 1 and 10000, got -5" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
    r = spade_ad("serve", str(d), "--port", "8765", timeout=60)
    assert r.returncode == 2 and "k must be an integer" in r.stderr


# ------------------------------------------------------------------ 4-6. interruptions and debris
def _fit_args(train: Path, out: Path) -> list[str]:
    return ["fit", str(train), "--out", str(out), "--k", "2", "--image-size", "64", "--calibration-images", "2"]


def _train_names(d: Path) -> list[str]:
    return Spade.load(d).train_names_


@pytest.fixture(scope="module")
def two_sets(small_train: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sets")
    files = sorted((small_train / "train" / "good").glob("*.png"))
    a, b = root / "a", root / "b"
    for folder, chosen in ((a, files[:5]), (b, files[3:])):
        folder.mkdir()
        for f in chosen:
            (folder / f.name).symlink_to(f)
    return a, b


@pytest.fixture(scope="module")
def old_model(two_sets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("old") / "m"
    assert spade_ad(*_fit_args(two_sets[0], d)).returncode == 0
    return d


@pytest.mark.parametrize(("point", "sig"), [("fit-bank", "KILL"), ("save-bank", "KILL"), ("save-index", "KILL"),
                                            ("save-header", "KILL"), ("fit-bank", "INT"), ("save-index", "INT")])
def test_killed_fit_leaves_the_old_or_the_new_model(two_sets: tuple[Path, Path], old_model: Path, tmp_path: Path,
                                                    point: str, sig: str) -> None:
    """Fault injection: fit over an existing model is killed at each stage of writing the folder."""
    a, b = two_sets
    d = _copy_model(old_model, tmp_path / "m")
    old = _train_names(d)
    r = spade_ad(*_fit_args(b, d), env={"SPADE_AD_CRASH_AT": f"{point}:{sig}"})
    assert r.returncode == (-signal.SIGKILL if sig == "KILL" else 130), r.stderr
    names = _train_names(d)  # always loads ...
    new = [str(f) for f in sorted(b.iterdir())]
    assert names in (old, new)  # ... as the old or the new model
    assert names == (new if point == "save-header" else old)
    leftovers = [p.name for p in d.iterdir() if p.name.startswith(".staging")]
    if sig == "INT":
        assert r.stderr.strip().endswith("interrupted") and not leftovers  # no debris
    if sig == "KILL" and point in ("fit-bank", "save-index"):
        debris = [p for p in d.iterdir() if p.name.startswith(".staging") or p.suffix == ".safetensors"]
        assert len(debris) > 2  # a killed writer cannot clean up; the next one removes what it left
        assert spade_ad(*_fit_args(a, d)).returncode == 0
        assert sorted(p.name[:5] for p in d.iterdir() if p.name != "generations") == [".lock", "bank-", "index",
                                                                                      "model"]
        assert _train_names(d) == old


def test_ctrl_c_and_sigterm_exit_non_zero_without_debris(small_train: Path, tmp_path: Path) -> None:
    train = tmp_path / "many"
    train.mkdir()
    for i in range(400):  # enough work to be interrupted mid-fit
        (train / f"{i:03d}.png").symlink_to(next((small_train / "train" / "good").glob("000.png")))
    for sig, code, word in ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")):
        out = tmp_path / f"m{code}"
        p = subprocess.Popen([*CLI, *_fit_args(train, out)], stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not (out.is_dir() and any(out.iterdir())) and time.time() < deadline:
            time.sleep(0.1)  # the staging bank appears once fitting runs
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        assert p.returncode == code and err.strip().endswith(word)
        assert not out.exists()  # the folder it created is gone again: nothing half-written, no staging file


def test_interrupted_predict_says_so_in_run_json(model_dir: Path, small_train: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from spade_ad import runs

    calls = {"n": 0}
    real = runs.RowWriter.add

    def interrupt_second(self: runs.RowWriter, *args: object) -> bool:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(runs.RowWriter, "add", interrupt_second)
    out = tmp_path / "o"
    code, _, err = run_cli(["predict", str(model_dir), str(small_train / "test" / "scratch"),
                            str(small_train / "test" / "blob"), "--out", str(out), "--batch-size", "1"], capsys)
    assert code == 130 and "interrupted" in err
    run = json.loads((out / "run.json").read_text())
    rows = (out / "predictions.jsonl").read_text().splitlines()
    assert run["status"] == "interrupted" and run["n_images"] >= len(rows) > 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ 7-8. resources
def _huge_png(path: Path, w: int = 30000, h: int = 30000) -> Path:
    """A small file that claims a huge picture (header + one compressed empty row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"\x00" * (w // 8 + 2))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


def test_pixel_bombs_and_fifos_are_refused_by_the_cli_and_the_inspector(model_dir: Path, tmp_path: Path) -> None:
    bomb = _huge_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 2000
    r = spade_ad("predict", str(model_dir), str(bomb), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and f"{bomb}: image is too large (30000x30000 pixels" in " ".join(r.stderr.split())
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    r = spade_ad("predict", str(model_dir), str(fifo), "--out", str(tmp_path / "o"), timeout=60)
    assert r.returncode == 2 and "pipe.png: not a regular file" in r.stderr
    client = TestClient(create_app(model_dir), base_url="http://localhost")
    resp = client.post("/predict", files={"file": ("bomb.png", bomb.read_bytes(), "image/png")})
    assert resp.status_code == 400 and "bomb.png: image is too large" in resp.json()["detail"]


# ------------------------------------------------------------------ 9-11. the command line
@pytest.mark.parametrize("name", ["[/]corrupt.png", "[red]corrupt.png"])
def test_file_names_are_printed_literally(model_dir: Path, tmp_path: Path, name: str) -> None:
    bad = tmp_path / name
    bad.parent.mkdir(exist_ok=True)  # "[/]corrupt.png" is the file "]corrupt.png" in a folder "["
    bad.write_bytes(b"not an image")
    r = spade_ad("predict", str(model_dir), str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and f"{bad}: not an image file" in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr and "MarkupError" not in r.stderr


def test_predict_never_overwrites_files_it_did_not_write(model_dir: Path, small_train: Path,
                                                          tmp_path: Path) -> None:
    src = small_train / "test" / "good"
    out = tmp_path / "o"
    out.mkdir()
    (out / "000_mask.png").write_bytes(b"my own file")
    r = spade_ad("predict", str(model_dir), str(src / "000.png"), "--out", str(out))
    assert r.returncode == 2 and "holds files spade-ad did not write (e.g. 000_mask.png)" in r.stderr
    assert (out / "000_mask.png").read_bytes() == b"my own file"
    r = spade_ad("predict", str(model_dir), str(src), "--out", str(src))
    assert r.returncode == 2 and "--out is also an input folder" in r.stderr
    clean = tmp_path / "clean"
    for _ in range(2):  # a folder this command wrote may be written again
        assert spade_ad("predict", str(model_dir), str(src / "000.png"), "--out", str(clean)).returncode == 0
    assert spade_ad("predict", str(model_dir), str(src / "000.png"), "--out", str(out), "--overwrite").returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "{train}", "--out", "{tmp}/m", "--sigma", "inf"], "sigma must be a finite number"),
        (["fit", "{train}", "--out", "{tmp}/m", "--kappa", "1000000"], "kappa must be an integer between 1 and 1000"),
        (["fit", "{train}", "--out", "{tmp}/m", "--image-size", "2048"], "image_size must be an integer between"),
        (["serve", "{model}", "--max-upload-mb", "nan"], "--max-upload-mb must be a number in (0, 4096]"),
        (["serve", "{model}", "--max-upload-mb", "inf"], "--max-upload-mb must be a number in (0, 4096]"),
        (["serve", "{model}", "--port", "99999"], "--port must be between 1 and 65535"),
        (["predict", "{model}", "{train}", "--out", "{tmp}/o", "--threshold", "nan"],
         "--threshold must be a positive number"),
        (["predict", "{model}", "{tmp}/loop.png", "--out", "{tmp}/o"], "loop.png: symbolic link loop"),
    ],
)
def test_bad_options_give_one_clear_line(args: list[str], message: str, model_dir: Path, small_train: Path,
                                         tmp_path: Path) -> None:
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    subs = {"{train}": str(small_train / "train" / "good"), "{tmp}": str(tmp_path), "{model}": str(model_dir)}
    r = spade_ad(*[_sub(a, subs) for a in args], timeout=60)
    assert r.returncode == 2, r.stderr
    assert message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _sub(arg: str, subs: dict[str, str]) -> str:
    for k, v in subs.items():
        arg = arg.replace(k, v)
    return arg


def test_disk_full_names_the_file(model_dir: Path, small_train: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import spade_ad_runtime.io as io  # where the io functions live (spade_ad.io re-exports them)

    real = io._fsync_file

    def full_from_the_overlay(path: Path) -> None:  # the disk fills up while the outputs are written
        if "overlay" in path.name or full_from_the_overlay.full:  # type: ignore[attr-defined]
            full_from_the_overlay.full = True  # type: ignore[attr-defined]
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path)

    full_from_the_overlay.full = False  # type: ignore[attr-defined]
    monkeypatch.setattr(io, "_fsync_file", full_from_the_overlay)
    code, _, err = run_cli(["predict", str(model_dir), str(small_train / "test" / "good" / "000.png"),
                            "--out", str(tmp_path / "o")], capsys)
    line = " ".join(err.split())
    assert code == 2 and "000_overlay.png: cannot write (No space left on device)" in line
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.endswith(".tmp")]
    # a full disk from the first write on: that first file (run.json, written before any output) is named
    monkeypatch.setattr(io, "_fsync_file", lambda path: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    code, _, err = run_cli(["predict", str(model_dir), str(small_train / "test" / "good" / "000.png"),
                            "--out", str(tmp_path / "o2")], capsys)
    assert code == 2 and "o2/run.json: cannot write (No space" in " ".join(err.split())


# ------------------------------------------------------------------ 12-14. the inspector and loading
def test_inspector_validates_level_host_and_origin(model_dir: Path, small_train: Path) -> None:
    app = create_app(model_dir)
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    img = (small_train / "test" / "good" / "000.png").read_bytes()
    j = client.post("/predict", files={"file": ("a.png", img, "image/png")}).json()
    r = client.get("/correspondence", params={"id": j["id"], "y": 3, "x": 3, "level": 3})
    assert r.status_code == 400 and "level must be in 0..2, got 3" in r.json()["detail"]
    evil = TestClient(app, base_url="http://attacker.example")
    r = evil.get("/info")
    assert r.status_code == 421 and "attacker.example" in r.json()["detail"]
    r = client.post("/predict", files={"file": ("a.png", img, "image/png")},
                    headers={"Origin": "http://attacker.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    r = client.post("/predict", files={"file": ("a.png", img, "image/png")}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    same = client.post("/predict", files={"file": ("a.png", img, "image/png")},
                       headers={"Origin": "http://127.0.0.1:8000"})
    assert same.status_code == 200
    assert all("/" not in n["name"] for n in same.json()["neighbours"])
    allowed = TestClient(create_app(model_dir, allowed_hosts=["inspector.lan"]), base_url="http://inspector.lan:8000")
    assert allowed.get("/info").status_code == 200


def test_loading_reads_nothing_outside_the_folder_and_never_the_network(small_train: Path, tmp_path: Path) -> None:
    m = Spade(backbone="resnet18", weights="random", **FAST).fit(small_train / "train" / "good")
    d = m.save(tmp_path / "m")
    assert "weights_src" not in json.loads((d / "model.json").read_text())
    t0 = time.perf_counter()
    with pytest.raises(SpadeError, match="random backbone weights"):
        Spade.load(d)
    assert Spade.load(d, weights="random").predict(small_train / "test" / "good").scores.shape == (2,)
    # a ResNet fitted with a weights file: load needs the file from the caller, at once, no download
    import timm
    import torch

    wfile = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), wfile)
    d2 = Spade(backbone="resnet18", weights=str(wfile), **FAST).fit(small_train / "train" / "good").save(
        tmp_path / "m2")
    with pytest.raises(SpadeError, match="whose ImageNet weights are not bundled; pass the weights file"):
        Spade.load(d2)
    assert time.perf_counter() - t0 < 60  # no network retries
    assert Spade.load(d2, weights=str(wfile)).settings.backbone == "resnet18"


def test_exif_orientation_reaches_predict_and_the_inspector(model_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 90, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotated 90 degrees)
    f = tmp_path / "phone.jpg"
    img.save(f, exif=exif.tobytes())
    code, _, err = run_cli(["predict", str(model_dir), str(f), "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "o" / "phone_map.npy").shape == (90, 40)  # as viewers show it
    client = TestClient(create_app(model_dir), base_url="http://localhost")
    j = client.post("/predict", files={"file": ("phone.jpg", f.read_bytes(), "image/jpeg")}).json()
    assert (j["height"], j["width"]) == (90, 40)

"""``spade-ad watch``: each image of an inbox scored exactly once, after it is complete, through kills and
restarts; rows as ``predict`` writes them; rows posted without holding scoring up."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_cli

from spade_ad import Spade
from spade_ad.watch import Inbox, is_temporary, watch

FAST = dict(k=3, k_image=2, image_size=64, calibration_images=4)
CLI = [sys.executable, "-m", "spade_ad.delivery.cli"]


@pytest.fixture(scope="module")
def images(small_train: Path) -> list[Path]:
    return sorted((small_train / "test").glob("*/*.png"))  # 6 test images, 2 good and 4 defective


@pytest.fixture(scope="module")
def model_dir(small_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("watch") / "model"
    Spade(**FAST).fit(str(small_train / "train" / "good")).save(folder)
    return folder


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]


def _drop(src: Path, inbox: Path, name: str | None = None) -> Path:
    """Put a copy of ``src`` into the inbox the way cameras do: written under a temporary name, then renamed."""
    target = inbox / (name or src.name)
    part = target.with_name(target.name + ".part")
    part.write_bytes(src.read_bytes())
    os.replace(part, target)
    return target


def test_temporary_names_and_files_being_written_are_not_read(tmp_path: Path) -> None:
    assert all(is_temporary(n) for n in (".a.png", "~a.png", "a.png~", "a.png.part", "a.png.TMP", "a.crdownload"))
    assert not any(is_temporary(n) for n in ("a.png", "a.part.png"))
    box = Inbox(tmp_path, settle=1.0)
    f = tmp_path / "a.png"
    f.write_bytes(b"x" * 10)
    assert box.ready(100.0) == []  # just seen
    f.write_bytes(b"x" * 20)  # still growing
    assert box.ready(100.6) == []
    assert box.ready(101.2) == []  # unchanged for 0.6 s only
    got = box.ready(101.7)
    assert [p.name for p, _ in got] == ["a.png"] and got[0][1][1] == 20


def test_once_scores_what_predict_scores_and_never_twice(model_dir: Path, images: list[Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    inbox, out, done = tmp_path / "inbox", tmp_path / "out", tmp_path / "done"
    inbox.mkdir()
    for p in images[:4]:
        _drop(p, inbox, f"{p.parent.name}_{p.name}")
    (inbox / "notes.txt").write_text("not an image")  # other files are left alone
    s = watch(model_dir, inbox, out, once=True, settle=0.0, move_to=done)
    assert (s.n_rows, s.n_failed) == (4, 0)
    rows = _rows(out)
    assert [Path(r["file"]).name for r in rows] == sorted(f"{p.parent.name}_{p.name}" for p in images[:4])
    assert sorted(os.listdir(done)) == sorted(Path(r["file"]).name for r in rows)
    assert os.listdir(inbox) == ["notes.txt"]
    # the same numbers as predict, for the same images
    code, _, err = run_cli(["predict", str(model_dir), *(str(done / Path(r["file"]).name) for r in rows), "--out",
                            str(tmp_path / "p")], capsys)
    assert code == 0, err
    for a, b in zip(rows, _rows(tmp_path / "p"), strict=True):
        assert a["score"] == b["score"] and a["verdict"] == b["verdict"] and a["regions"] == b["regions"]
        assert np.array_equal(np.load(out / a["map"]), np.load(tmp_path / "p" / b["map"]))
        assert a["generation"] == 1 and set(a["source"]) == {"name", "size", "mtime_ns"}
    # again: nothing new, nothing scored twice; a new image of an old name gets its own outputs
    assert watch(model_dir, inbox, out, once=True, settle=0.0, move_to=done).n_rows == 0
    first = rows[0]["source"]["name"]
    _drop(images[5], inbox, first)
    assert watch(model_dir, inbox, out, once=True, settle=0.0, move_to=done).n_rows == 1
    last = _rows(out)[-1]
    assert last["overlay"] == f"{Path(first).stem}~2_overlay.png" and len(_rows(out)) == 5
    assert (done / f"{Path(first).stem}~2.png").exists()


def test_a_file_written_slowly_is_scored_once_when_complete(model_dir: Path, images: list[Path],
                                                            tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    stop = threading.Event()
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(s=watch(model_dir, inbox, out, settle=1.0, interval=0.1,
                                                              stop=stop)))
    t.start()
    data = images[3].read_bytes()
    with open(inbox / "slow.png", "wb") as f:  # a camera writing in pieces over about 2 s, under its final name
        for i in range(0, len(data), max(1, len(data) // 8)):
            f.write(data[i : i + max(1, len(data) // 8)])
            f.flush()
            time.sleep(0.25)
            assert not (out / "predictions.jsonl").exists() or _rows(out) == []  # nothing read while growing
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not (out / "predictions.jsonl").exists() or not _rows(out)):
        time.sleep(0.1)
    time.sleep(1.5)  # and not again
    stop.set()
    t.join(timeout=60)
    rows = _rows(out)
    assert len(rows) == 1 and "error" not in rows[0] and rows[0]["source"]["size"] == len(data)
    assert result["s"].n_rows == 1
    assert json.loads((out / "watch.json").read_text())["status"] == "stopped"


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, "watch", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_at_any_moment_every_image_is_scored_once(model_dir: Path, images: list[Path],
                                                         tmp_path: Path) -> None:
    """A real watcher process killed with SIGKILL while images arrive, twice, then restarted: each image has
    exactly one row, every image ends in DONE, the rows' files exist."""
    inbox, out, done = tmp_path / "inbox", tmp_path / "out", tmp_path / "done"
    inbox.mkdir()
    names = [f"img{i:02d}.png" for i in range(12)]
    args = [str(model_dir), str(inbox), "--out", str(out), "--move-to", str(done), "--settle", "0.2",
            "--interval", "0.05", "--batch-size", "2"]
    for round_, batch in enumerate((names[:6], names[6:])):
        p = _start(*args)
        for i, n in enumerate(batch):
            _drop(images[(round_ * 6 + i) % len(images)], inbox, n)
            time.sleep(0.1)
        deadline = time.monotonic() + 120  # kill once the first rows of this round are written
        while time.monotonic() < deadline:
            have = _rows(out) if (out / "predictions.jsonl").exists() else []
            if len(have) >= round_ * 6 + 2:
                break
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    final = _start(*args, "--once")
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    rows = _rows(out)
    assert sorted(r["source"]["name"] for r in rows) == names  # each image once
    assert sorted(os.listdir(done)) == names and os.listdir(inbox) == []
    for r in rows:
        assert "error" not in r and (out / r["map"]).exists() and (out / r["overlay"]).exists()


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first two POSTs, then 200; keeps the bodies it accepted."""

    calls = 0
    got: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls += 1
        if type(self).calls <= 2:
            self.send_response(503)
        else:
            type(self).got.append(json.loads(body))
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_rows_are_posted_in_order_through_failures(model_dir: Path, images: list[Path], tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/rows"
    try:
        for p in images[:3]:
            _drop(p, inbox, f"{p.parent.name}_{p.name}")
        t0 = time.monotonic()
        s = watch(model_dir, inbox, out, once=True, settle=0.0, post=url, on_error="skip")
        assert s.n_rows == 3 and s.posted == 3 and time.monotonic() - t0 < 60
        assert [r["file"] for r in _Flaky.got] == [r["file"] for r in _rows(out)]  # in order, each once
        assert _Flaky.calls == 5 and json.loads((out / "posted.json").read_text())["rows"] == 3
    finally:
        server.shutdown()


def test_bad_input_is_one_line(model_dir: Path, images: list[Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for argv, message in (
        ([str(model_dir), str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "the inbox folder does not exist"),
        ([str(model_dir), str(inbox), "--out", str(inbox)], "--out is the inbox itself"),
        ([str(model_dir), str(inbox), "--out", str(tmp_path / "o"), "--on-error", "maybe"], "--on-error must be"),
    ):
        code, _, err = run_cli(["watch", *argv, "--once"], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    # an unreadable image: stop (one line naming it) or skip (its row says why)
    (inbox / "broken.png").write_bytes(b"not a picture")
    code, _, err = run_cli(["watch", str(model_dir), str(inbox), "--out", str(tmp_path / "o3"), "--once",
                            "--settle", "0"], capsys)
    last = err.strip().splitlines()[-1]  # after the line saying what is watched
    assert code == 2 and last.startswith("error: ") and "broken.png: not an image file" in last
    code, _, err = run_cli(["watch", str(model_dir), str(inbox), "--out", str(tmp_path / "o4"), "--once",
                            "--settle", "0", "--on-error", "skip"], capsys)
    assert code == 0, err
    rows = _rows(tmp_path / "o4")
    assert len(rows) == 1 and "broken.png" in rows[0]["error"]
    shutil.rmtree(inbox)

"""``spade-ad watch MODEL INBOX --out OUT``: score each new image of a folder exactly once, as it arrives.

* **Ready.** An image file of INBOX (not its sub-folders) is read once its size and modification time
  have not changed for ``settle`` seconds; temporary names (a leading ``.`` or ``~``; ``.tmp``, ``.part``,
  ``.partial``, ``.crdownload``, ``.download``, ``.filepart`` or a trailing ``~``) are never read, so a
  camera that writes ``x.png.part`` and renames it is picked up after the rename.
* **Exactly once.** An image is known by its name, size and modification time (``source`` in its row). Its
  outputs are written first, then its row is appended to ``OUT/predictions.jsonl`` and made durable (the
  commit point), then it is moved to ``--move-to``. On start the rows say what was done: a half-written last
  row is cut off, an image with a row is never scored again (one left in INBOX by a kill before its move is
  moved now), one without is scored (its outputs, if a kill left them, are written again under the same
  names). Killed at any moment and restarted, the watcher scores every image once.
* **Rows and files** are ``predict``'s (``file``, the numbers, the verdict, the regions, the output files,
  the model generation), plus ``source``. Output names are the file's stem, numbered (``~2``) when a later
  image of the same name comes. A changed model (``update``, ``calibrate``, ``rollback`` by another process)
  is loaded between batches; each row says which generation scored it.
* **Posting** (``--post URL``): a thread POSTs each row as JSON, in order, retrying with back-off (1 s
  doubling to 60 s) while the server is down; it reads the rows from the file, so scoring never waits for
  it, and ``OUT/posted.json`` counts the rows delivered (and where the next begins), so a restart goes on
  from there (at-least-once: a row whose POST succeeded just before a kill is sent again).
* **Drift.** The watcher keeps the model's drift window (:mod:`spade_ad.drift`: the last ``WINDOW`` images
  its current generation scored, refilled from the rows on restart) and writes its health to
  ``OUT/health.json`` after each batch.
* **Memory** holds the keys of the images still in INBOX, the output stems used (a few dozen bytes per
  distinct file name), the drift window and one batch; the rows are streamed, never held.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .drift import WINDOW, DriftMonitor, monitor_for
from .errors import SpadeError
from .io import IMAGE_SUFFIXES, save_json
from .runs import (
    ROWS_FILE,
    error_row,
    jsonl_line,
    prediction_row,
    read_input,
    write_image_outputs,
)

STATE_FILE = "watch.json"
POSTED_FILE = "posted.json"
HEALTH_FILE = "health.json"
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", ".filepart")
Key = tuple[str, int, int]  # (name, size, mtime_ns): an inbox image


def is_temporary(name: str) -> bool:
    """A name a writer uses while the file is not complete yet (never read)."""
    low = name.lower()
    return name.startswith((".", "~")) or name.endswith("~") or low.endswith(TEMP_SUFFIXES)


@dataclass
class Inbox:
    """The folder watched: which image files have stayed unchanged for ``settle`` seconds."""

    folder: Path
    settle: float
    _last: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # name -> (size, mtime_ns, since)

    def ready(self, now: float) -> list[tuple[Path, Key]]:
        """The image files complete by now (name order), each with its key."""
        seen: dict[str, tuple[int, int, float]] = {}
        out = []
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            raise SpadeError(f"{self.folder}: cannot read the inbox ({exc.strerror or exc})") from None
        for e in sorted(entries, key=lambda e: e.name):
            if is_temporary(e.name) or Path(e.name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                if not e.is_file():
                    continue
                st = e.stat()
            except OSError:
                continue  # gone meanwhile
            prev = self._last.get(e.name)
            since = prev[2] if prev is not None and prev[:2] == (st.st_size, st.st_mtime_ns) else now
            seen[e.name] = (st.st_size, st.st_mtime_ns, since)
            if st.st_size > 0 and now - since >= self.settle:
                out.append((Path(e.path), (e.name, st.st_size, st.st_mtime_ns)))
        self._last = seen
        return out

    def names(self) -> set[str]:
        """The image files seen in the last scan (ready or still being written)."""
        return set(self._last)

    def pending(self, done: set[Key]) -> list[str]:
        """The image files seen in the last scan that are not scored yet (ready or still being written)."""
        return [name for name, (size, mtime, _) in self._last.items()
                if size > 0 and (name, size, mtime) not in done]  # (an empty file is no image: never read)


class Ledger:
    """``OUT/predictions.jsonl`` as the record of what was scored: the keys and output stems of its rows."""

    def __init__(self, out: Path) -> None:
        self.path = out / ROWS_FILE
        self.done: set[Key] = set()
        self.stems: set[str] = set()
        self.n_rows = 0
        if self.path.exists():
            size = 0
            with open(self.path, "rb") as f:  # streamed: a day of rows is not held at once
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # a row cut short by a kill is dropped
                    self._note(json.loads(line))
                    size += len(line)
            if size != self.path.stat().st_size:
                os.truncate(self.path, size)
        self.fh = open(self.path, "ab")  # noqa: SIM115 - closed by close()

    def _note(self, row: dict[str, Any]) -> None:
        src = row.get("source")
        if isinstance(src, dict):
            self.done.add((str(src.get("name")), int(src.get("size", -1)), int(src.get("mtime_ns", -1))))
        overlay = row.get("overlay")
        if isinstance(overlay, str):
            self.stems.add(overlay.removesuffix("_overlay.png"))
        self.n_rows += 1

    def forget_gone(self, present: set[str]) -> None:
        """Drop the keys of images no longer in the inbox (moved or deleted): memory follows the inbox, not
        the number of images scored. (A later file of the same name, size and time is a new arrival.)"""
        if len(self.done) > 2 * max(len(present), 64):
            self.done = {k for k in self.done if k[0] in present}

    def stem_for(self, name: str) -> str:
        """The output stem of a new image called ``name``: its stem, numbered if an earlier image had it."""
        base = Path(name).stem
        stem, n = base, 1
        while stem in self.stems:
            n += 1
            stem = f"{base}~{n}"
        return stem

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append rows and make them durable (the commit point of their images)."""
        try:
            self.fh.write("".join(jsonl_line(r) for r in rows).encode())
            self.fh.flush()
            os.fsync(self.fh.fileno())
        except OSError as exc:
            raise SpadeError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        for r in rows:
            self._note(r)

    def close(self) -> None:
        self.fh.close()


class Poster(threading.Thread):
    """POSTs the rows of ``predictions.jsonl`` in order to ``url``, from the count in ``posted.json`` on."""

    def __init__(self, out: Path, url: str, timeout: float = 10.0, max_wait: float = 60.0) -> None:
        super().__init__(name="spade-watch-post", daemon=True)
        self.out, self.url, self.timeout, self.max_wait = out, url, timeout, max_wait
        self.stop = threading.Event()
        self.posted, self.offset = self._read_state()
        self.last_error: str | None = None

    def _read_state(self) -> tuple[int, int]:
        """(rows delivered, byte offset of the next row) from ``posted.json``."""
        try:
            doc = json.loads((self.out / POSTED_FILE).read_text())
            return int(doc["rows"]), int(doc["offset"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0, 0

    def _next_rows(self, limit: int = 64) -> list[bytes]:
        """The complete rows after the delivered ones (read from their offset on, a few at a time)."""
        try:
            with open(self.out / ROWS_FILE, "rb") as f:
                f.seek(self.offset)
                lines: list[bytes] = []
                for line in f:
                    if not line.endswith(b"\n") or len(lines) == limit:
                        break
                    lines.append(line)
                return lines
        except OSError:
            return []

    def run(self) -> None:
        wait = 1.0
        while not self.stop.is_set():
            rows = self._next_rows()
            if not rows:
                self.stop.wait(0.2)
                continue
            for line in rows:
                if self.stop.is_set():
                    return
                if not self._send(line.rstrip(b"\n")):
                    self.stop.wait(wait)
                    wait = min(self.max_wait, wait * 2)
                    break
                wait = 1.0
                self.posted += 1
                self.offset += len(line)
                save_json(self.out / POSTED_FILE, {"url": self.url, "rows": self.posted, "offset": self.offset})

    def _send(self, line: bytes) -> bool:
        req = urllib.request.Request(self.url, data=line, headers={"Content-Type": "application/json"},
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - the user's URL
                ok = 200 <= resp.status < 300
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.last_error = str(exc)
            return False
        if not ok:
            self.last_error = f"HTTP {resp.status}"
        return ok


@dataclass
class WatchSummary:
    n_rows: int = 0  # rows this session appended
    n_failed: int = 0
    n_defective: int = 0
    posted: int | None = None  # rows delivered to --post (all sessions)
    health: dict[str, Any] = field(default_factory=dict)  # the model's drift health (spade_ad.drift), now


def check_watch_options(out: Path, inbox: Path, move_to: Path | None, on_error: str, settle: float,
                        interval: float) -> None:
    """Refuse bad folders and values, one line each."""
    if not inbox.is_dir():
        raise SpadeError(f"{inbox}: the inbox folder does not exist")
    if on_error not in ("skip", "stop"):
        raise SpadeError(f"--on-error must be skip or stop, got {on_error!r}")
    if not (settle >= 0 and interval > 0):
        raise SpadeError("--settle must be >= 0 and --interval > 0 seconds")
    for other, flag in ((out, "--out"), (move_to, "--move-to")):
        if other is not None and other.resolve() == inbox.resolve():
            raise SpadeError(f"{other}: {flag} is the inbox itself; choose another folder")
    if out.exists() and not out.is_dir():
        raise SpadeError(f"{out}: --out exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / STATE_FILE).exists():
        raise SpadeError(f"{out}: --out holds files a watcher did not write; choose an empty folder")


def watch(model_dir: str | Path, inbox: str | Path, out: str | Path, *, move_to: str | Path | None = None,
          post: str | None = None, on_error: str = "stop", settle: float = 1.0, interval: float = 0.5,
          once: bool = False, batch_size: int | None = None, device: str = "cpu", weights: str | None = None,
          stop: threading.Event | None = None, progress: Callable[[WatchSummary], None] | None = None,
          started: Callable[[], None] | None = None) -> WatchSummary:
    """Watch ``inbox`` and score each new image into ``out`` (see the module docstring) until ``stop`` is set
    (or, with ``once``, until no image is waiting: every ready one scored, none still being written).
    ``started`` is called once the model is loaded and OUT is ready; ``progress`` after each batch."""
    from .model import Spade
    from .persistence import read_header

    model_dir, inbox, out = Path(model_dir), Path(inbox), Path(out)
    dest = None if move_to is None else Path(move_to)
    check_watch_options(out, inbox, dest, on_error, settle, interval)
    model = Spade.load(model_dir, device=device, weights=weights)
    if batch_size is not None:
        model.set_params(batch_size=batch_size)
    out.mkdir(parents=True, exist_ok=True)
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
    save_json(out / STATE_FILE, {"model": str(model_dir), "inbox": str(inbox), "move_to": None if dest is None
                                 else str(dest), "post": post, "status": "watching", "pid": os.getpid()})
    ledger = Ledger(out)
    poster = Poster(out, post) if post else None
    if poster is not None:
        poster.start()
    box = Inbox(inbox, settle)
    summary = WatchSummary()
    if started:
        started()
    stop = stop or threading.Event()
    header_sha = model.base_sha256_
    monitor = _monitor(model, ledger)
    status = "interrupted"
    try:
        while not stop.is_set():
            ready = box.ready(time.monotonic())
            ledger.forget_gone(box.names())
            todo = [(p, k) for p, k in ready if k not in ledger.done]
            for path, key in ready:  # scored before a kill stopped its move
                if key in ledger.done and dest is not None:
                    _move(path, dest)
            if todo:
                current = _current_sha(model_dir, read_header)
                if current is not None and current != header_sha:  # another process changed the model
                    model = Spade.load(model_dir, device=device, weights=weights)
                    header_sha = model.base_sha256_
                    monitor = _monitor(model, ledger)  # a new generation: new thresholds, a new window
                rows = _score(model, todo[: model.settings.batch_size], ledger, out, dest, on_error, summary)
                for r in rows:
                    if "error" not in r:
                        monitor.add(r["score"], r["verdict"])
                summary.health = monitor.health()
                save_json(out / HEALTH_FILE, {"model": str(model_dir), "generation": len(model.history_),
                                              **summary.health})
                if progress:
                    progress(summary)
                continue  # more may be ready at once
            if once and not box.pending(ledger.done):  # nothing waiting, nothing being written
                break
            stop.wait(interval)
        status = "stopped"
    finally:
        ledger.close()
        if poster is not None:
            if once and status == "stopped":  # deliver what this session wrote before returning
                deadline = time.monotonic() + 30
                while poster.posted < ledger.n_rows and time.monotonic() < deadline and poster.is_alive():
                    time.sleep(0.05)
            poster.stop.set()
            poster.join(timeout=5)
            summary.posted = poster.posted
        with contextlib.suppress(SpadeError, OSError):
            save_json(out / STATE_FILE, {"model": str(model_dir), "inbox": str(inbox), "move_to": None
                                         if dest is None else str(dest), "post": post, "status": status,
                                         "rows": ledger.n_rows})
    return summary


def _current_sha(model_dir: Path, read_header: Callable[[Path], dict[str, Any]]) -> str | None:
    try:
        return str(read_header(model_dir).get("header_sha256"))
    except SpadeError:
        return None  # being replaced this very moment, or damaged: keep the model in hand


def _monitor(model: Any, ledger: Ledger) -> DriftMonitor:
    """The drift window of ``model``, refilled from the rows its generation scored (the last ``WINDOW``)."""
    monitor = monitor_for(model)
    generation = len(model.history_)
    recent: deque[tuple[float, str | None]] = deque(maxlen=WINDOW)
    with contextlib.suppress(OSError), open(ledger.path, "rb") as f:  # streamed, the last WINDOW kept
        for line in f:
            if line.endswith(b"\n"):
                row = json.loads(line)
                if row.get("generation") == generation and "error" not in row:
                    recent.append((row["score"], row["verdict"]))
    for score, verdict in recent:
        monitor.add(score, verdict)
    return monitor


def _score(model: Any, todo: list[tuple[Path, Key]], ledger: Ledger, out: Path, dest: Path | None,
           on_error: str, summary: WatchSummary) -> list[dict[str, Any]]:
    """One batch: read, score, write the outputs, append the rows (the commit), move the images."""
    rows: list[dict[str, Any]] = []
    stems: list[str] = []
    arrays = [read_input(path, str(path), model.settings.max_pixels, on_error, model.check_image)
              for path, _ in todo]
    ok = [a for a in arrays if not isinstance(a, str)]
    results = iter(model.predict(ok)) if ok else iter(())
    for (path, key), img in zip(todo, arrays, strict=True):
        source = {"name": key[0], "size": key[1], "mtime_ns": key[2]}
        if isinstance(img, str):
            rows.append({**error_row(str(path), img), "source": source})
            continue
        stem = ledger.stem_for(key[0])
        while stem in stems:  # two images of one name in one batch
            stem = f"{stem}~"
        stems.append(stem)
        res = next(results)
        files = write_image_outputs(out, stem, img, res, res.pixel_threshold, "npy")
        rows.append({**prediction_row(str(path), res, files, len(model.history_)), "source": source})
    ledger.append(rows)
    for r in rows:
        summary.n_rows += 1
        summary.n_failed += "error" in r
        summary.n_defective += r.get("verdict") == "defective"
    if dest is not None:
        for path, _ in todo:
            _move(path, dest)
    return rows


def _move(path: Path, dest: Path) -> None:
    """Move a scored image to ``dest`` (numbered if the name is taken); a file already gone is left alone."""
    target = dest / path.name
    n = 1
    while target.exists():
        n += 1
        target = dest / f"{path.stem}~{n}{path.suffix}"
    try:
        os.replace(path, target)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SpadeError(f"{path}: cannot move it to {dest} ({exc.strerror or exc})") from None


__all__ = ["watch", "WatchSummary", "Inbox", "Ledger", "Poster", "is_temporary", "STATE_FILE", "POSTED_FILE",
           "HEALTH_FILE"]

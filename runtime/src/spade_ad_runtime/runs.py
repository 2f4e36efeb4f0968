"""Prediction runs: scoring image files into an output folder, the protocol of ``spade-ad predict``.

One module for every way of running it: spade-ad's local run (``spade_ad.runs.predict``), its Ray run
(``spade_ad.distributed``) and the runtime's (:func:`spade_ad_runtime.cli.predict`) share every rule below,
so the same inputs give the same files, names and rows whichever package scored them. Nothing here knows
how images are scored; the command lines only print.

Inputs (:func:`expand_inputs`)
    Files and folders as given; a folder's images sorted by name (broken symbolic links included: reading
    them says why). Each input is read by :func:`read_input`, whose error policy is ``stop`` (the first
    unreadable image stops the run) or ``skip`` (its row is ``{"file", "error"}``).

Output names (:func:`unique_stems`)
    An image's files are ``<stem>_overlay.png``, ``<stem>_map.npy`` (``_map.png`` with ``raw="png16"``) and
    ``<stem>_mask.png``. Its *natural* stem is the file's stem, prefixed with ``<folder>_`` when it comes
    from a folder argument. Natural stems that no other input shares (compared without case, so that
    case-insensitive file systems cannot merge two) are kept. Inputs that share one keep their file's
    extension: ``coll_a.png``, ``coll_a.jpg`` (so ``coll_a.png_overlay.png``). Names still shared (the same
    file name in two folders of the same name, the same file given twice) or taken by a natural stem are
    numbered in input order: ``good_000.png~1``, ``good_000.png~2``. The names are a function of the list of
    inputs alone (computed before any work starts), so the same inputs get the same names in every run, on
    every path, whatever the threads or workers do.

The output folder (:func:`check_output_folder`, :class:`Run`)
    OUT must be new, empty, or a folder spade-ad wrote before (its ``run.json`` lists every file it wrote);
    anything else is refused unless ``overwrite``; an input folder is refused as OUT. ``run.json`` records
    the model (or deploy) folder and the model *generation* the run used (``lineage``, ``generation``,
    ``header_sha256``; every row comes from that generation and says so), the thresholds,
    ``outputs`` (the files of this run only) and ``previous_outputs`` (files of earlier runs into OUT that
    this run did not rewrite; no row points at them). Before the first file is written it lists every file
    the run may write, with status ``running``; at the end it says ``complete`` or ``interrupted`` (any
    exception: Ctrl+C, a full disk; the first error is the one raised) and lists exactly the files that
    exist. A rerun into OUT therefore needs no ``overwrite``.

``predictions.jsonl`` (:class:`RowWriter`)
    One row per input, in input order, appended as rows arrive (rows that arrive early wait in a spool file
    in OUT): every row is written at most twice, so the bytes written grow linearly with the number of
    images. An interrupted run keeps the rows it received, in input order, each line complete.
"""

from __future__ import annotations

import json
import math
import os
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SpadeError
from .result import check_min_area

Progress = Callable[[str, int, int], None]
Check = Callable[[np.ndarray, str], None]  # a model's check of one decoded image (raises SpadeError naming it)
RUN_FILE = "run.json"
ROWS_FILE = "predictions.jsonl"
COLOUR_SCALE = "map / pixel_threshold on [0, 2]; 1.0 = threshold"
BATCH_SIZE = 16  # images decoded (and scored) per step by default


# --------------------------------------------------------------------------- options
def check_options(raw: str, threshold: float | None, on_error: str, min_area: int | None = None) -> None:
    """Refuse bad ``raw``, ``threshold``, ``on_error`` and ``min_area`` values (``--raw``, ``--threshold``,
    ``--on-error``, ``--min-area``)."""
    if min_area is not None:
        check_min_area(min_area, "--min-area")
    if raw not in ("npy", "png16"):
        raise SpadeError(f"--raw must be npy or png16, got {raw!r}")
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise SpadeError(f"--threshold must be a positive number, got {threshold}")
    if on_error not in ("skip", "stop"):
        raise SpadeError(f"--on-error must be skip or stop, got {on_error!r}")


# --------------------------------------------------------------------------- inputs and their names
@dataclass(frozen=True)
class Input:
    """One image of a run: its place in the run, where it is read from, and its unique output stem."""

    index: int
    path: Path
    stem: str

    @property
    def file(self) -> str:
        """The file as the user gave it (its row's ``file``)."""
        return str(self.path)


def _folder_prefix(folder: Path) -> str:
    """The name a folder argument's images are prefixed with (``.`` and ``..`` by the folder they name)."""
    if folder.name not in ("", ".", ".."):
        return folder.name
    return folder.resolve().name or "root"


def expand_inputs(items: Sequence[str | Path]) -> list[Input]:
    """The images of files and folders given on the command line, in order, each with its output stem.

    A folder contributes its images sorted by name, broken symbolic links included (so they are reported,
    not skipped); a path that does not exist is refused with one line.
    """
    from .io import list_images

    found: list[tuple[Path, str]] = []  # (file, natural stem)
    for item in map(Path, items):
        if item.is_dir():
            prefix = _folder_prefix(item)
            found += [(f, f"{prefix}_{f.stem}") for f in list_images(item, broken_links=True)]
        elif item.exists() or item.is_symlink():  # a broken link or a loop: reading it says which
            found.append((item, item.stem))
        else:
            raise SpadeError(f"{item}: file or folder does not exist")
    stems = unique_stems([(stem, f.suffix) for f, stem in found])
    return [Input(i, f, s) for i, ((f, _), s) in enumerate(zip(found, stems, strict=True))]


def _key(name: str) -> str:
    """Names that one file system may take for the same file (case, Unicode normalisation) share a key."""
    return unicodedata.normalize("NFC", name).casefold()


def unique_stems(named: Sequence[tuple[str, str]]) -> list[str]:
    """Unique output stems for inputs given as (natural stem, file suffix); see the module docstring.

    A function of the list alone: stable across runs, independent of the order in which images are scored.
    """
    count = Counter(_key(stem) for stem, _ in named)
    names: list[str | None] = [stem if count[_key(stem)] == 1 else None for stem, _ in named]
    taken = {_key(n) for n in names if n is not None}
    second = [f"{stem}{suffix}" for stem, suffix in named]  # the extension kept
    count2 = Counter(_key(second[i]) for i, n in enumerate(names) if n is None)
    for i, n in enumerate(names):
        if n is None and count2[_key(second[i])] == 1 and _key(second[i]) not in taken:
            names[i] = second[i]
            taken.add(_key(second[i]))
    for i, n in enumerate(names):  # still shared: numbered in input order
        if n is None:
            k = 1
            while _key(f"{second[i]}~{k}") in taken:
                k += 1
            names[i] = f"{second[i]}~{k}"
            taken.add(_key(names[i]))  # type: ignore[arg-type]
    return [n for n in names if n is not None]


def read_input(path: str | Path, file: str, max_pixels: int | None, on_error: str = "stop",
               check: Check | None = None) -> np.ndarray | str:
    """The decoded image at ``path``, or (``on_error="skip"``) why it cannot be read or the model cannot take it
    (``check(image, file)`` raising: an inspection zone's aspect ratio), naming ``file`` (the file as the user
    gave it; ``path`` may be its absolute path on a worker). ``"stop"`` raises that line."""
    from .io import load_image

    try:
        image = load_image(path, max_pixels=max_pixels)
        if check is not None:
            check(image, file)
        return image
    except SpadeError as exc:
        message = str(exc)
        if message.startswith(str(path)):
            message = file + message[len(str(path)):]
        if on_error == "stop":
            raise SpadeError(message) from None
        return message


# --------------------------------------------------------------------------- one image's files and row
def output_names(stem: str, raw: str, masked: bool) -> dict[str, str | None]:
    """The files written for one image (the ``overlay``, ``map`` and ``mask`` fields of its row)."""
    return {"overlay": f"{stem}_overlay.png", "map": f"{stem}_map.{'npy' if raw == 'npy' else 'png'}",
            "mask": f"{stem}_mask.png" if masked else None}


def write_image_outputs(out: Path, stem: str, img: np.ndarray, res: Any, thr: float | None,
                        raw: str) -> dict[str, str | None]:
    """Write one image's overlay, raw map and mask into ``out``, each atomically (local and Ray runs).

    ``res`` is its :class:`~spade_ad.ImageResult`, ``thr`` the pixel threshold in force. Returns
    :func:`output_names`.
    """
    from .io import save_npy, save_png
    from .viz import overlay

    mask = res.mask
    names = output_names(stem, raw, mask is not None)
    save_png(out / f"{stem}_overlay.png", overlay(img, res.map, thr, mask))
    if raw == "npy":
        save_npy(out / f"{stem}_map.npy", res.map.astype(np.float32))
    else:
        scale = 65535.0 / (2.0 * thr) if thr else 65535.0 / max(res.max_pixel_score, 1e-12)
        save_png(out / f"{stem}_map.png", np.clip(res.map * scale, 0, 65535).astype(np.uint16))
    if mask is not None:
        save_png(out / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
    return names


def prediction_row(file: str, res: Any, outputs: dict[str, str | None], generation: int | None) -> dict[str, Any]:
    """One ``predictions.jsonl`` row: the file as given, the result's numbers, its output files and the model
    generation that scored it."""
    return {"file": file, **res.summary(), **outputs, "generation": generation}


def error_row(file: str, message: str) -> dict[str, Any]:
    """The row of an image that could not be read (``on_error="skip"``)."""
    return {"file": file, "error": message}


def jsonl_line(row: dict[str, Any]) -> str:
    return json.dumps(row, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- the output folder
def previous_outputs(out: Path) -> list[str]:
    """The files earlier runs into ``out`` wrote (``outputs`` and ``previous_outputs`` of its run.json)."""
    try:
        doc = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(doc, dict):
        return []
    names: list[str] = []
    for key in ("outputs", "previous_outputs"):
        listed = doc.get(key, [])
        if isinstance(listed, list):
            names += [n for n in listed if isinstance(n, str) and "/" not in n and n not in (".", "..")]
    return list(dict.fromkeys(names))


def check_output_folder(out: Path, items: Sequence[str | Path], overwrite: bool) -> None:
    """Refuse an output folder that is an input folder, or that holds files spade-ad did not write."""
    if out.exists() and not out.is_dir():
        raise SpadeError(f"{out}: --out exists and is not a folder")
    for item in map(Path, items):
        if item.is_dir() and item.resolve() == out.resolve():
            raise SpadeError(f"{out}: --out is also an input folder (its outputs would be read as inputs next "
                             "time); choose another folder")
    if overwrite or not out.is_dir():
        return
    ours = {RUN_FILE, ROWS_FILE, *previous_outputs(out)}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
    if foreign:
        raise SpadeError(f"{out}: --out holds files spade-ad did not write (e.g. {foreign[0]}); choose an empty "
                         "folder or pass --overwrite")


def remove_debris(out: Path, names: set[str]) -> None:
    """Remove the temporary files (``.<name>.<random>.tmp``) of outputs ``names`` that a killed writer left."""
    for p in out.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.name[1:].rsplit(".", 2)[0] in names:
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- predictions.jsonl
class RowWriter:
    """``predictions.jsonl``, append-only, one row per input in input order.

    Rows may arrive in any order (Ray workers) and more than once (a batch run again): a row is appended as
    soon as every earlier input has its row; one that arrives early is kept in a spool file until then, so
    memory holds one offset per input and every row is written at most twice. A row delivered again is
    ignored. :meth:`close` appends the spooled rows of an interrupted run (in input order) and cuts off a
    line that an interruption left half-written.
    """

    def __init__(self, out: Path, n: int) -> None:
        self.path = out / ROWS_FILE
        self.out = out
        self.n = n
        self.next = 0  # the input whose row is appended next
        self.seen = np.zeros(n, dtype=bool)
        self.spooled: dict[int, tuple[int, int]] = {}  # input -> (offset, length) in the spool
        self.spool: Any = None
        self.spool_path: Path | None = None
        self.fh: Any = None
        self.size = 0  # bytes of complete rows in the file
        self.n_rows = self.n_failed = self.n_defective = 0

    def open(self) -> None:
        """Start an empty ``predictions.jsonl`` (an earlier run's rows would not describe this run's files)."""
        from .io import atomic_write

        atomic_write(self.path, lambda tmp: tmp.write_bytes(b""))
        self.fh = open(self.path, "ab")  # noqa: SIM115 - closed by close()

    def add(self, index: int, line: str, row: dict[str, Any] | None = None) -> bool:
        """Take input ``index``'s row (``line``: its JSON line; ``row``: the same parsed, if at hand); False if
        it had one already."""
        if self.seen[index]:
            return False
        row = json.loads(line) if row is None else row
        self.seen[index] = True
        self.n_rows += 1
        self.n_failed += "error" in row
        self.n_defective += row.get("verdict") == "defective"
        data = line.encode()
        if index != self.next:
            self._to_spool(index, data)
            return True
        self._append(data)
        self.next += 1
        while self.next in self.spooled:
            self._append(self._from_spool(self.spooled.pop(self.next)))
            self.next += 1
        return True

    def _append(self, data: bytes) -> None:
        try:
            self.fh.write(data)
        except OSError as exc:
            raise SpadeError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        self.size += len(data)

    def _to_spool(self, index: int, data: bytes) -> None:
        from .io import staging_path

        if self.spool is None:
            self.spool_path = staging_path(self.out, ".rows.jsonl")
            self.spool = open(self.spool_path, "w+b")  # noqa: SIM115 - closed by close()
        self.spool.seek(0, os.SEEK_END)
        self.spooled[index] = (self.spool.tell(), len(data))
        self.spool.write(data)

    def _from_spool(self, place: tuple[int, int]) -> bytes:
        self.spool.seek(place[0])
        return bytes(self.spool.read(place[1]))

    def flush(self) -> None:
        """Make the rows appended so far durable."""
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
        except OSError as exc:
            raise SpadeError(f"{self.path}: cannot write ({exc.strerror or exc})") from None

    def close(self, interrupted: bool) -> None:
        """Finish the file: an interrupted run's spooled rows are appended in input order (the rows received,
        with gaps), and anything after the last complete row is cut off. Removes the spool."""
        if self.fh is None:
            return
        try:
            if interrupted:
                with suppress(OSError, ValueError):  # a half-written row from an interrupted write
                    self.fh.flush()
                with suppress(OSError, ValueError):
                    os.truncate(self.path, self.size)
                self.fh.seek(0, os.SEEK_END)  # ("ab" appends at the end anyway)
                for index in sorted(self.spooled):
                    self._append(self._from_spool(self.spooled[index]))
                self.spooled.clear()
            self.flush()
        finally:
            self.fh.close()
            if self.spool is not None:
                self.spool.close()
            if self.spool_path is not None:
                self.spool_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- run.json and the run's lifecycle
@dataclass
class RunSummary:
    """What a run did (also in ``OUT/run.json``)."""

    n_rows: int  # rows in predictions.jsonl: one per input
    n_failed: int  # rows with an "error" (images that could not be read)
    n_defective: int  # rows with verdict "defective"
    seconds: float  # wall time of the run, from its first image to its last row
    workers: dict[str, dict[str, float]] = field(default_factory=dict)  # Ray: per worker images, busy_s, load_s
    has_verdicts: bool = True  # False: the model has no image threshold, so no row has a verdict

    @property
    def images_per_second(self) -> float:
        return (self.n_rows - self.n_failed) / max(self.seconds, 1e-9)


class Run:
    """One run into OUT: ``run.json`` and ``predictions.jsonl`` from :meth:`start` to :meth:`finish`.

    ``source`` names the model the run uses (``model`` or ``deploy``: its folder; ``lineage``, ``generation``,
    ``header_sha256``: its generation). :meth:`start` is called just before the first file is written (so a run
    that stops before, on an unreadable image, leaves OUT as it was): it writes ``run.json`` (status
    ``running``) listing every file the run may write and starts an empty ``predictions.jsonl``. :meth:`add`
    takes rows in any order. :meth:`finish` says ``complete`` or ``interrupted`` and lists exactly the files
    that exist. ``run.json`` is written twice per run, whatever the number of images.
    """

    def __init__(self, out: Path, inputs: Sequence[Input], source: dict[str, Any], image_threshold: float | None,
                 pixel_threshold: float | None, raw: str, min_area: int = 0, verdict_rule: str = "score") -> None:
        self.out = out
        self.planned = [n for inp in inputs for n in output_names(inp.stem, raw, pixel_threshold is not None)
                        .values() if n]
        self.record: dict[str, Any] = {
            **source, "status": "running", "n_images": 0, "n_inputs": len(inputs),
            "image_threshold": image_threshold, "pixel_threshold": pixel_threshold, "min_area": min_area,
            "verdict_rule": verdict_rule, "colour_scale": COLOUR_SCALE,
            "outputs": [], "previous_outputs": []}
        self.rows = RowWriter(out, len(inputs))
        self.started = self.finished = False
        self.t0 = time.perf_counter()

    def start(self) -> None:
        from .io import clean_staging, save_json

        self.out.mkdir(parents=True, exist_ok=True)
        clean_staging(self.out)  # spools of killed runs
        mine = set(self.planned)
        remove_debris(self.out, mine)
        self.record["outputs"] = self.planned
        self.record["previous_outputs"] = [n for n in previous_outputs(self.out) if n not in mine]
        save_json(self.out / RUN_FILE, self.record)  # lists every file before any is written or any row names it
        self.started = True
        self.rows.open()

    def add(self, index: int, line: str, row: dict[str, Any] | None = None) -> bool:
        return self.rows.add(index, line, row)

    def finish(self, status: str, **fields: Any) -> RunSummary:
        """Close ``predictions.jsonl`` and write the final ``run.json``. ``interrupted``: called while an
        exception propagates; failures here (a full disk) are swallowed so that the first error is reported."""
        from .io import save_json

        seconds = time.perf_counter() - self.t0
        interrupted = status != "complete"
        self.finished = True
        try:
            self.rows.close(interrupted)
        except (OSError, SpadeError):
            if not interrupted:
                raise
        remove_debris(self.out, set(self.planned))
        r = self.rows
        self.record.update(status=status, n_images=r.n_rows, n_failed=r.n_failed, **fields)
        if not interrupted:
            self.record["seconds"] = round(seconds, 3)
        self.record["outputs"] = [n for n in self.planned if (self.out / n).is_file()]
        self.record["previous_outputs"] = [n for n in self.record["previous_outputs"] if (self.out / n).is_file()]
        try:
            save_json(self.out / RUN_FILE, self.record)
        except SpadeError:
            if not interrupted:
                raise
        return RunSummary(r.n_rows, r.n_failed, r.n_defective, seconds, fields.get("workers", {}),
                          self.record["image_threshold" if self.record["verdict_rule"] == "score"
                                      else "pixel_threshold"] is not None)


def summary_line(out: Path, summary: RunSummary) -> str:
    """The line a predict command prints at the end of a run (both packages' commands)."""
    scored = summary.n_rows - summary.n_failed
    failed = f", {summary.n_failed} failed" if summary.n_failed else ""
    verdicts = (f"{summary.n_defective} flagged defective" if summary.has_verdicts
                else "no verdicts: the model has no thresholds (one training image)")
    return (f"{scored} images in {summary.seconds:.1f}s ({scored / max(summary.seconds, 1e-9):.2f} images/s){failed}; "
            f"{verdicts}; outputs in {out} ({ROWS_FILE})")


def check_failed(out: Path, summary: RunSummary) -> None:
    """Raise the one line of a run with unreadable images (its command exits non-zero)."""
    if summary.n_failed:
        raise SpadeError(f"{summary.n_failed} of {summary.n_rows} images could not be read; their rows in "
                         f"{out / ROWS_FILE} say why")


def score_into(run: Run, items: Sequence[Input], score: Callable[[list[np.ndarray]], Sequence[Any]], *, step: int,
               threads: int, max_pixels: int | None, thr: float | None, raw: str, generation: int | None,
               on_error: str = "stop", progress: Progress | None = None, check: Check | None = None) -> RunSummary:
    """Score ``items`` chunk by chunk (``step`` images) into ``run``; ``score`` maps a chunk's decoded images to
    their results (``ImageResult``: spade-ad's model or the runtime's detector).

    A chunk's images are decoded, and their files written, on ``threads`` threads (Pillow's decoder, zlib and
    the file writes run outside Python's lock); the scorer runs in between; the chunk's rows are then
    appended. (Overlapping the chunks, decoding and writing while the model scores, was measured: no faster on
    two cores, where the search already keeps both busy, and it holds three chunks in memory.)

    On any exception once the run has started writing (a full disk, Ctrl+C), the writes not started are
    dropped, the running ones finish, and the run is finished as ``interrupted``.
    """

    def read(inp: Input) -> np.ndarray | str:
        return read_input(inp.path, inp.file, max_pixels, on_error, check)

    def write(job: tuple[str, np.ndarray, Any]) -> dict[str, str | None]:
        stem, img, res = job
        return write_image_outputs(run.out, stem, img, res, thr, raw)

    pool = ThreadPoolExecutor(max(1, threads), "spade-predict-io")
    try:
        with shut_down_at_exit(pool):
            for s in range(0, len(items), step):
                chunk = items[s : s + step]
                arrays = list(pool.map(read, chunk))  # the first error, in input order, is raised
                ok = [i for i, a in enumerate(arrays) if isinstance(a, np.ndarray)]
                results = list(score([arrays[i] for i in ok])) if ok else []  # type: ignore[misc]
                if not run.started:
                    run.start()
                jobs = [(chunk[i].stem, arrays[i], res) for i, res in zip(ok, results, strict=True)]
                files = run_all(pool, write, jobs)
                scored = dict(zip(ok, zip(results, files, strict=True), strict=True))
                for i, (inp, img) in enumerate(zip(chunk, arrays, strict=True)):
                    row = error_row(inp.file, img) if isinstance(img, str) else prediction_row(
                        inp.file, *scored[i], generation)
                    run.add(inp.index, jsonl_line(row), row)
                run.rows.flush()
                if progress:
                    progress("predict", run.rows.n_rows, len(items))
    except BaseException:
        if run.started:
            run.finish("interrupted")
        raise
    if not run.started:  # no inputs at all cannot happen (folders without images are refused); kept for safety
        run.start()
    return run.finish("complete")


def run_all(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], jobs: list[Any]) -> list[Any]:
    """``[fn(job) for job in jobs]`` on ``pool``; if one fails (or the wait is interrupted), the jobs not started
    are cancelled and the running ones finish before the exception is raised: nothing writes afterwards."""
    futures = [pool.submit(fn, job) for job in jobs]
    try:
        return [fut.result() for fut in futures]
    except BaseException:
        for fut in futures:
            fut.cancel()
        wait(futures)
        raise


@contextmanager
def shut_down_at_exit(pool: ThreadPoolExecutor) -> Iterator[None]:
    """Shut ``pool`` down when the block ends; on an exception its queued work is dropped first."""
    try:
        yield
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()


__all__ = ["Run", "RunSummary", "RowWriter", "Input", "Progress", "expand_inputs", "unique_stems", "read_input",
           "check_options", "check_output_folder", "previous_outputs", "remove_debris", "output_names",
           "write_image_outputs", "prediction_row", "error_row", "jsonl_line", "run_all", "shut_down_at_exit",
           "score_into", "summary_line", "check_failed", "RUN_FILE", "ROWS_FILE", "COLOUR_SCALE", "BATCH_SIZE"]

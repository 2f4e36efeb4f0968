"""Scale out: fit and predict on a Ray cluster (``pip install 'spade-ad[ray]'``).

``predict`` scores image files into an output folder exactly as ``spade-ad predict`` does (same files, same
``predictions.jsonl`` rows, same ``run.json`` rules); ``fit`` computes a model's features on the workers and
writes the same model folder as a local fit; ``score_dataset`` scores a ``ray.data.Dataset`` of images you
already have. The command line's ``--ray`` option calls them.

How the work is split:

* The driver (this process) lists the input files and validates the model folder once.
* Workers form a Ray Data actor pool (``map_batches`` with a callable class): each loads the model once
  (:meth:`Spade.load <spade_ad.Spade.load>`, or the backbone for ``fit``), then reads, decodes and scores
  batches of images. ``predict``'s workers write each image's overlay, map and mask into OUT themselves
  (atomically, by the same code as a local run), so the model folder, the inputs and OUT must be on a file
  system every node sees. ``fit``'s workers send the bank rows back; the driver writes them into the bank
  at each image's index as they arrive, then calibrates and saves exactly as a local fit.
* The driver pins the model generation (:func:`spade_ad.runs.pin_model`); every worker loads exactly that
  generation (:func:`spade_ad.runs.load_pinned`), even if the folder is updated while the run starts, and
  ``run.json`` and every row name it.
* Results stream back in whatever order workers finish (``iter_batches``). The driver keeps no results:
  rows go to ``predictions.jsonl`` through the same append-only writer as a local run
  (:class:`spade_ad.runs.RowWriter`), in input order, rows that arrive early waiting in a spool file in OUT.
  The inputs, their output names, ``run.json`` and the output folder's rules are those of
  :mod:`spade_ad.runs` too.
* Faults: Ray Data restarts a dead worker process (its actor pools default to ``max_restarts=-1``) and
  runs its batch again (``max_task_retries=-1``), on another node if its node is gone; outputs are
  rewritten identically and a batch delivered twice is counted once, so every input gets exactly one row.
  An image that cannot be read is not a fault: it gets an error row (``on_error="skip"``) or stops the run
  (``"stop"``). Other errors in a worker (a full disk in OUT, say) are not retried: the run stops.
* Identical results: on a CPU the backbone's last bits depend on torch's thread count (1 thread differs
  from 2 or more), so each worker uses ``threads`` torch threads (and reserves as many CPUs), by default
  this process's own count: rows and model files then equal a local run on this machine bit for bit.

Ray is imported only inside these functions: the rest of spade-ad never needs it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import runs
from .bank import level_key
from .errors import SpadeError
from .features import BankRows
from .model import Spade, resolve_images
from .runs import RunSummary
from .settings import SpadeSettings

INSTALL_HINT = "pip install 'spade-ad[ray]'"
Progress = Callable[[str, int, int], None]


def _ray() -> Any:
    """The ``ray`` module (with Ray Data), or one line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data needs pyarrow and pandas: the [ray] extra installs them
    except ImportError as exc:
        raise SpadeError(f"Ray is not installed (no module {exc.name!r}): {INSTALL_HINT}") from None
    return ray


@contextmanager
def connected(address: str = "local") -> Iterator[Any]:
    """Ray, initialised: ``local`` starts a cluster on this machine (shut down on exit), ``auto`` joins the cluster
    this machine belongs to, anything else is a cluster's address (``host:port``, ``ray://host:port``). If Ray is
    already initialised in this process, that connection is used and left open."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    if not address:
        raise SpadeError("--ray needs local, auto or a cluster address")
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    main = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
        raise SpadeError(f"--ray {address}: cannot connect to a Ray cluster ({_first_line(exc)})") from None
    if main and on_sigterm is not None:  # Ray's driver installs a SIGTERM handler that aborts the process;
        signal.signal(signal.SIGTERM, on_sigterm)  # keep ours: finish the rows so far, exit 143
    try:
        yield ray
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class _Pool:
    """The actor pool: how many workers, what each reserves, how many images per call."""

    workers: int
    threads: int
    gpus: float
    batch_size: int

    def map_args(self, rows_per_call: int) -> dict[str, Any]:
        ray = _ray()
        args: dict[str, Any] = {
            "compute": ray.data.ActorPoolStrategy(size=self.workers),
            "batch_size": rows_per_call,
            "batch_format": "numpy",
            "num_cpus": self.threads,
            # no max_restarts / max_task_retries: Ray Data's actor pools default to -1 for both (a dead worker
            # is started again, its batch is run again) and take these as deprecated free-form arguments;
            # tests/test_distributed.py kills a worker and removes a node to hold them to it
        }
        if self.gpus:
            args["num_gpus"] = self.gpus
        return args

    def describe(self, address: str) -> dict[str, Any]:
        return {"address": address, "workers": self.workers, "threads_per_worker": self.threads,
                "gpus_per_worker": self.gpus, "batch_size": self.batch_size}


def _check_pool(workers: int | None, gpus_per_worker: float, threads: int | None, batch_size: int | None) -> None:
    """Refuse bad pool options with one line (before any cluster is started)."""
    for name, value in (("workers", workers), ("threads_per_worker", threads), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SpadeError(f"{name} must be an integer >= 1, got {value!r}")
    if not (isinstance(gpus_per_worker, (int, float)) and math.isfinite(gpus_per_worker) and gpus_per_worker >= 0):
        raise SpadeError(f"gpus_per_worker must be a number >= 0, got {gpus_per_worker!r}")


def _pool(ray: Any, n_images: int, workers: int | None, gpus_per_worker: float, threads: int | None,
          batch_size: int | None) -> _Pool:
    """Fill in the pool's defaults from this process and the cluster's resources (options checked before)."""
    import torch

    if threads is None:
        threads = torch.get_num_threads()
    if workers is None:
        have = ray.cluster_resources()
        cpus, gpus = float(have.get("CPU", 0)), float(have.get("GPU", 0))
        workers = int(gpus // gpus_per_worker) if gpus_per_worker else int(cpus // threads)
        if workers < 1:
            raise SpadeError(f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs, not enough for one worker with "
                             f"{threads} threads and {gpus_per_worker:g} GPUs (see --threads-per-worker, "
                             "--gpus-per-worker; give --workers to wait for an autoscaling cluster)")
    if batch_size is None:  # at least two batches per worker, so that they finish together
        batch_size = max(1, min(16, math.ceil(n_images / (2 * workers))))
    workers = max(1, min(workers, math.ceil(n_images / batch_size)))
    return _Pool(workers, threads, float(gpus_per_worker), batch_size)


def _worker_device(device: str, gpus_per_worker: float) -> str:
    if gpus_per_worker and device == "cpu":
        return "cuda"  # Ray gives each worker its own GPU(s) through CUDA_VISIBLE_DEVICES
    if device != "cpu" and not gpus_per_worker:
        raise SpadeError(f"--device {device} on Ray workers needs --gpus-per-worker")
    return device


def _quiet_data(ray: Any) -> None:
    """Our own progress bar replaces Ray Data's; its INFO lines stay in its log files."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _from_ray(exc: BaseException) -> BaseException:
    """The error to show for a failed Ray run: a worker's :class:`SpadeError` (one line naming the file) if
    there is one, else the innermost cause in one line (``--debug`` shows the whole chain)."""
    stack, seen, inner = [exc], set(), exc
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, SpadeError) and type(e).__module__.startswith("spade_ad"):
            return SpadeError(str(e))
        inner = e
        stack += [c for c in (e.__context__, e.__cause__, getattr(e, "cause", None)) if isinstance(c, BaseException)]
    return RuntimeError(f"a Ray worker failed: {type(inner).__name__}: {_first_line(inner)}")


def _batches(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    """The output blocks of ``ds`` as they come (any order); Ray's errors become :func:`_from_ray`'s."""
    it = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    while True:
        try:
            b = next(it)
        except StopIteration:
            return
        except Exception as exc:
            raise _from_ray(exc) from exc
        yield b


def _safe_stem(name: str) -> bool:
    return bool(name) and len(name) <= 200 and not name.startswith(".") and not any(c in name for c in "/\\\0")


# --------------------------------------------------------------------------- workers
class _Scorer:
    """Actor of the scoring pool: loads the model once, then scores batches and writes each image's outputs.

    For :func:`predict` each input row is one *step* of a local run (column ``step``: JSON
    ``[[index, path, file, stem], ...]``, ``batch_size`` consecutive inputs): its images are scored together,
    as the local run scores them (results do not depend on the batch), and one row per image comes out
    (``index``). For :func:`score_dataset` a batch holds arrays (``image_column``, named by ``name_column``)
    and keeps its other columns. Either way the output has
    ``prediction`` (the ``predictions.jsonl`` line) and ``failed``; with ``stats``, also ``worker``,
    ``busy_s`` (seconds per image) and ``load_s`` (this worker's model load).
    """

    def __init__(self, pin: runs.ModelPin, runtime: dict[str, Any], threads: int, out: str | None,
                 threshold: float | None, raw: str, image_column: str | None, name_column: str,
                 stats: bool, min_area: int | None = None) -> None:
        import torch

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.model = runs.load_pinned(pin, **runtime)  # exactly the generation the driver pinned, or one line
        self.load_s = time.perf_counter() - t0
        self.generation = len(self.model.history_)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.out = Path(out) if out else None
        self.threshold, self.raw, self.stats, self.min_area = threshold, raw, stats, min_area
        self.image_column, self.name_column = image_column, name_column
        self.thr = self.model.pixel_threshold_ if threshold is None else threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        if self.image_column is None:
            index: list[int] = []
            lines: list[str] = []
            failed: list[bool] = []
            for step in batch["step"]:
                items = json.loads(str(step))
                images = [self._read(path, file) for _, path, file, _ in items]
                ln, fl = self._score([it[2] for it in items], [it[3] for it in items], images)
                index += [int(it[0]) for it in items]
                lines += ln
                failed += fl
            out: dict[str, np.ndarray] = {"index": np.array(index, dtype=np.int64)}
        else:
            names = [str(n) for n in batch[self.name_column]]
            lines, failed = self._score(names, names, [self._array(a, n) for a, n in zip(
                batch[self.image_column], names, strict=True)])
            out = {k: v for k, v in batch.items() if k != self.image_column}
        out["prediction"] = np.array(lines, dtype=object)
        out["failed"] = np.array(failed, dtype=bool)
        if self.stats:
            n = len(lines)
            out["worker"] = np.array([self.worker] * n, dtype=object)
            out["busy_s"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
            out["load_s"] = np.full(n, self.load_s)
        return out

    def _read(self, path: str, file: str) -> np.ndarray | str:
        """The decoded image, or why it could not be read (naming the file as given)."""
        return runs.read_input(path, file, self.model.settings.max_pixels, "skip", self.model.check_image)

    def _array(self, arr: Any, name: str) -> np.ndarray | str:
        from .io import to_rgb_uint8

        try:
            if self.out is not None and not _safe_stem(name):
                raise SpadeError(f"{name}: not usable as an output file name (no '/', '\\', leading '.')")
            return to_rgb_uint8(np.asarray(arr), name)
        except SpadeError as exc:
            return str(exc)

    def _score(self, files: list[str], stems: list[str], images: list[np.ndarray | str]
               ) -> tuple[list[str], list[bool]]:
        """Score the readable ``images`` as one batch (as a local step does); one JSON line per image."""
        readable = [a for a in images if isinstance(a, np.ndarray)]
        results = iter(self.model.predict(readable, pixel_threshold=self.threshold,
                                                  min_area=self.min_area) if readable else [])
        lines, failed = [], []
        for file, stem, img in zip(files, stems, images, strict=True):
            if isinstance(img, str):
                row = runs.error_row(file, img)
            else:
                res = next(results)
                outputs = {} if self.out is None else runs.write_image_outputs(self.out, stem, img, res, self.thr,
                                                                               self.raw)
                row = runs.prediction_row(file, res, outputs, self.generation)
            lines.append(runs.jsonl_line(row))
            failed.append(isinstance(img, str))
        return lines, failed


class _Featurizer:
    """Actor of the fit pool: builds the backbone once, then turns batches of training images into bank rows."""

    def __init__(self, settings: SpadeSettings, threads: int, input_shape: tuple[int, int],
                 grid: dict[str, Any] | None = None, zone: np.ndarray | None = None) -> None:
        import torch

        from .features import level_shapes
        from .tiling import grid_from_dict

        torch.set_num_threads(threads)
        self.model = Spade(settings)
        # the driver's input shape and tile grid, read from the training files' headers
        self.model.fix_input_shape(shape=input_shape, grid=None if grid is None else grid_from_dict(grid))
        self.model.set_zone(zone)  # the driver's inspection zone
        self.per_image = len(self.model.grid) if self.model.grid is not None else 1
        net = self.model._net()
        self.shapes = [(h * w, c) for (h, w), c in zip(level_shapes(net, self.model.prep), net.channels, strict=True)]
        self.global_dim = net.global_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .features import THUMB

        n = len(batch["index"])
        errors = [""] * n
        images: list[np.ndarray] = []
        ok: list[int] = []
        for j, (path, file) in enumerate(zip(batch["path"], batch["file"], strict=True)):
            img = runs.read_input(str(path), str(file), self.model.settings.max_pixels, "skip",
                                  self.model.check_image)
            if isinstance(img, str):
                errors[j] = img
            else:
                images.append(img)
                ok.append(j)
        out: dict[str, np.ndarray] = {"index": batch["index"], "error": np.array(errors, dtype=object)}
        t = self.per_image  # bank rows per image (a tiled model's tiles)
        for li, shape in enumerate(self.shapes):
            out[level_key(li)] = np.zeros((n, t, *shape), np.float16)
        out["global"] = np.zeros((n, t, self.global_dim), np.float32)
        out["thumbnails"] = np.zeros((n, t, THUMB, THUMB, 3), np.uint8)
        out["id"] = np.array([""] * n, dtype=object)
        if images:
            rows = self.model.bank_rows(images, 0)
            b = len(images)
            for li, lv in enumerate(rows.levels):
                out[level_key(li)][ok] = lv.reshape(b, t, *lv.shape[1:])
            out["global"][ok] = rows.global_.reshape(b, t, -1)
            out["thumbnails"][ok] = rows.thumbnails.reshape(b, t, THUMB, THUMB, 3)
            out["id"][ok] = rows.ids
        return out


# --------------------------------------------------------------------------- fit
def fit(
    images: str | Path | Sequence[str | Path],
    settings: SpadeSettings | None = None,
    *,
    workdir: str | Path | None = None,
    progress: Progress | None = None,
    address: str = "local",
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    threads: int | None = None,
    batch_size: int | None = None,
    zone: str | Path | np.ndarray | None = None,
) -> Spade:
    """``Spade(settings).fit(images, progress, workdir, zone)`` with the features computed on Ray workers.

    The workers read the training images (so they must see them at the same paths) and send back bank rows;
    this process writes them into the bank at each image's index, then calibrates the thresholds as a local
    fit does. With CPU workers at the same thread count the bank and index files are byte-identical to a local
    fit's (so ``save`` gives them the same content-addressed names). A training image that cannot be read
    stops the fit with one line naming it, as locally.

    Args:
        images: a folder or a list of image files.
        settings, workdir, progress: as for :class:`~spade_ad.Spade` and :meth:`~spade_ad.Spade.fit`.
        address: ``local``, ``auto`` or a cluster address (see :func:`connected`).
        workers: worker processes (default: as many as the cluster's CPUs, or GPUs, allow).
        gpus_per_worker: GPUs per worker (fractions share a GPU); the workers then extract on ``cuda``.
        threads: torch threads per worker, also the CPUs each reserves (default: this process's count).
        batch_size: images per worker call (default: enough for two calls per worker, at most 16).
        zone: an inspection zone, as for :meth:`~spade_ad.Spade.fit`.

    Returns:
        The fitted model (call ``save``).
    """
    _check_pool(workers, gpus_per_worker, threads, batch_size)
    model = Spade(settings if settings is not None else SpadeSettings())
    items, names = resolve_images(images)
    files = [x for x in items if isinstance(x, (str, Path))]
    if len(files) != len(items):
        raise SpadeError("a distributed fit reads image files on the workers: give a folder or a list of files")
    model.set_zone(zone)
    model.fix_input_shape(files)
    worker_settings = model.settings.replace(device=_worker_device(model.settings.device, gpus_per_worker))
    with connected(address) as ray:
        _quiet_data(ray)
        pool = _pool(ray, len(files), workers, gpus_per_worker, threads, batch_size)
        todo = [{"index": i, "path": os.path.abspath(p), "file": names[i]} for i, p in enumerate(files)]
        ds = ray.data.from_items(todo, override_num_blocks=math.ceil(len(todo) / pool.batch_size)).map_batches(
            _Featurizer, fn_constructor_kwargs={"settings": worker_settings, "threads": pool.threads,
                                              "input_shape": model.prep.input_shape,
                                              "grid": None if model.grid is None else model.grid.to_dict(),
                                              "zone": None if model.zone is None else model.zone.mask},
            **pool.map_args(pool.batch_size))

        def rows() -> Iterator[BankRows]:
            for b in _batches(ds):
                levels = sorted((k for k in b if k.startswith("level")), key=lambda k: int(k[5:]))
                for j, i in enumerate(b["index"]):
                    if b["error"][j]:
                        raise SpadeError(str(b["error"][j]))
                    yield BankRows(int(i), [b[k][j] for k in levels], b["global"][j], b["thumbnails"][j],
                                   [str(b["id"][j])])

        return model.fit_rows(names, rows(), progress, workdir)


# --------------------------------------------------------------------------- predict
def predict(
    model_dir: str | Path,
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    address: str = "local",
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    threads: int | None = None,
    device: str = "cpu",
    weights: str | None = None,
    threshold: float | None = None,
    min_area: int | None = None,
    raw: str = "npy",
    batch_size: int | None = None,
    max_pixels: int | None = None,
    on_error: str = "skip",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> RunSummary:
    """``spade-ad predict MODEL_DIR INPUTS... --out OUT`` on a Ray cluster: the same files in OUT.

    Per image ``<stem>_overlay.png``, ``<stem>_map.npy`` (or ``.png`` with ``raw="png16"``) and
    ``<stem>_mask.png``, written by the workers; ``predictions.jsonl`` with one row per input in the order of
    the inputs (folders sorted by file name), field for field the rows of a local run; ``run.json``. OUT
    follows the local rules: refused if it holds files spade-ad did not write (unless ``overwrite``).

    Args:
        model_dir: a model folder written by ``fit``; it, the inputs and ``out`` must be on a file system
            every node sees, at the same paths.
        inputs: image files and/or folders, as on the command line.
        out: the output folder.
        address, workers, gpus_per_worker, threads: as for :func:`fit`.
        device, weights, threshold, min_area, raw, max_pixels: as for ``spade-ad predict``.
        batch_size: images scored together, as ``--batch-size`` of a local run (default: the model's
            ``batch_size``, 16); one worker call scores one such step, so the rows equal those of a local
            run with the same ``batch_size``.
        on_error: ``skip``: an image that cannot be read gets a row ``{"file", "error"}`` and no outputs, the
            others are scored; ``stop``: the run stops at the first one (``SpadeError``).
        progress: callback ``("predict", done, total)``.

    Returns:
        A :class:`RunSummary`. The command line exits with code 2 when ``n_failed`` > 0.
    """
    model_dir, out = Path(model_dir), Path(out)
    given, options = runs.run_request(inputs, batch_size, max_pixels)
    runs.check_options(raw, threshold, on_error, min_area)
    _check_pool(workers, gpus_per_worker, threads, batch_size)
    runtime: dict[str, Any] = {"device": _worker_device(device, gpus_per_worker), "weights": weights, **options}
    pin = runs.pin_model(model_dir)  # the generation every worker loads, whatever is committed meanwhile
    run, items, step = _new_run(model_dir, out, given, pin, runtime, threshold, min_area, raw, overwrite)
    status, workers_seen = "interrupted", dict[str, dict[str, float]]()
    try:
        with connected(address) as ray:
            _quiet_data(ray)
            pool = _pool(ray, len(items), workers, gpus_per_worker, threads, step)
            run.record["ray"] = pool.describe(address)
            run.start()  # run.json lists every file this run may write before any worker writes one
            ds = _scoring_dataset(ray, items, step, pool, {
                "pin": pin, "runtime": runtime, "threads": pool.threads, "out": os.path.abspath(out),
                "threshold": threshold, "raw": raw, "image_column": None, "name_column": "file", "stats": True,
                "min_area": min_area})
            workers_seen = _collect(ds, run, on_error, progress)
            status = "complete"
    finally:
        if run.started:  # the workers are gone (or going): list exactly the files of this run that exist
            summary = run.finish(status, **({"workers": workers_seen} if status == "complete" else {}))
    return summary


def _new_run(model_dir: Path, out: Path, given: list[Path], pin: runs.ModelPin, runtime: dict[str, Any],
             threshold: float | None, min_area: int | None, raw: str, overwrite: bool
             ) -> tuple[runs.Run, list[runs.Input], int]:
    """The run (not started), its inputs and the images per worker call (the model's batch size), once the
    pinned model loads here (one clear line if anything is wrong) and OUT may be written."""
    model = runs.load_pinned(pin, **{**runtime, "device": "cpu"})
    thr = model.pixel_threshold_ if threshold is None else threshold
    image_threshold, step = model.image_threshold_, model.settings.batch_size
    rule = runs.decision_rule(model, min_area)
    del model  # the workers load their own; the driver keeps none
    items = runs.expand_inputs(given)
    runs.check_output_folder(out, given, overwrite)
    return runs.Run(out, items, pin.run_source(model_dir), image_threshold, thr, raw, *rule), items, step


def _scoring_dataset(ray: Any, items: list[runs.Input], step: int, pool: _Pool, scorer: dict[str, Any]) -> Any:
    """The inputs in steps of ``step`` images (one worker call each, as a local run's batches) mapped by a pool
    of ``_Scorer`` actors built with ``scorer``; lazy: nothing runs until it is consumed."""
    steps = [{"step": json.dumps([[it.index, os.path.abspath(it.path), it.file, it.stem]
                                  for it in items[a : a + step]])}
             for a in range(0, len(items), step)]
    return ray.data.from_items(steps, override_num_blocks=len(steps)).map_batches(
        _Scorer, fn_constructor_kwargs=scorer, **pool.map_args(1))


def _collect(ds: Any, run: runs.Run, on_error: str, progress: Progress | None) -> dict[str, dict[str, float]]:
    """Stream the rows of ``ds`` into ``run`` (in any order; a row delivered again after a retry counts once);
    returns the per-worker statistics. ``on_error="stop"``: the first unreadable image stops the run."""
    n = run.rows.n
    workers: dict[str, dict[str, float]] = {}
    for b in _batches(ds):
        for j, i in enumerate(b["index"]):
            line = str(b["prediction"][j])
            row = json.loads(line)
            if not run.add(int(i), line, row):
                continue  # a batch delivered again after a retry
            w = workers.setdefault(str(b["worker"][j]), {"images": 0, "busy_s": 0.0, "load_s": 0.0})
            w["images"] += 1
            w["busy_s"] += float(b["busy_s"][j])
            w["load_s"] = float(b["load_s"][j])
            if b["failed"][j] and on_error == "stop":
                raise SpadeError(row["error"])
        run.rows.flush()
        if progress:
            progress("predict", run.rows.n_rows, n)
    missing = np.flatnonzero(~run.rows.seen)
    if len(missing):  # Ray Data delivers every block or raises; this guards the promise anyway
        raise RuntimeError(f"the Ray run returned no row for {len(missing)} inputs (e.g. input {missing[0]})")
    return workers


# --------------------------------------------------------------------------- datasets
def score_dataset(
    ds: Any,
    model_dir: str | Path,
    *,
    image_column: str = "image",
    name_column: str = "name",
    out: str | Path | None = None,
    threshold: float | None = None,
    min_area: int | None = None,
    raw: str = "npy",
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    threads: int | None = None,
    device: str = "cpu",
    weights: str | None = None,
    batch_size: int = 16,
) -> Any:
    """Score a ``ray.data.Dataset`` whose rows hold an image array (HxW, HxWx3 or HxWx4; any dtype
    :func:`spade_ad.io.to_rgb_uint8` takes) and a name.

    Returns a lazy ``ray.data.Dataset``: the input's other columns, ``prediction`` (the ``predictions.jsonl``
    row as JSON text, ``file`` being the name; ``json.loads`` it) and ``failed`` (True for a row with an
    ``error``: an array that is not an image). With ``out`` (a folder every node sees), each image's overlay,
    map and mask are written there as ``<name>_overlay.png`` etc. (names must be unique and usable as file
    names) and the rows name them; ``run.json`` is not written (that is :func:`predict`'s run folder).
    Requires Ray to be initialised (creating ``ds`` did that); nothing runs until you consume the result.

    Example:
        >>> scored = score_dataset(ds, "model_dir", workers=4)                 # doctest: +SKIP
        >>> for row in scored.iter_rows():                                       # doctest: +SKIP
        ...     print(row["name"], json.loads(row["prediction"])["verdict"])
    """
    ray = _ray()
    runs.check_options(raw, threshold, "skip", min_area)
    _check_pool(workers, gpus_per_worker, threads, batch_size)
    pin = runs.pin_model(model_dir)  # every worker loads this generation
    runs.load_pinned(pin, device="cpu", weights=weights)  # one clear line here if the folder is damaged
    pool = _pool(ray, 10**9, workers, gpus_per_worker, threads, batch_size)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    return ds.map_batches(_Scorer, fn_constructor_kwargs={
        "pin": pin, "runtime": {"device": _worker_device(device, gpus_per_worker),
                                                            "weights": weights},
        "threads": pool.threads, "out": None if out is None else os.path.abspath(out), "threshold": threshold,
        "raw": raw, "image_column": image_column, "name_column": name_column, "stats": False, "min_area": min_area},
        **pool.map_args(batch_size))


__all__ = ["predict", "fit", "score_dataset", "connected", "RunSummary", "INSTALL_HINT"]

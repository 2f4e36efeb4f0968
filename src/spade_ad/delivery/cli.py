"""Command line: ``spade-ad fit | predict | benchmark | report | serve | demo``.

The options of ``fit``, ``benchmark`` and ``report`` that set the model are generated from
:class:`~spade_ad.SpadeSettings` (:func:`settings_options`): a new setting appears here by itself.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from spade_ad_runtime.cli import ENDINGS, ending, on_sigterm
from spade_ad_runtime.result import MIN_AREA_HELP

from .. import settings
from ..errors import SpadeError
from ..io import printable
from ..version import __version__

if typing.TYPE_CHECKING:
    from ..runs import RunSummary

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="SPADE anomaly detection: learn from good images, find and outline defects.",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()
if not out_console.is_terminal:  # pipes and logs: keep table rows on one line
    out_console = Console(width=120)
_state = {"debug": False}

ProtocolOpt = Annotated[
    str, typer.Option(help="full: whole image, metrics at the mask's resolution; paper: the paper's resize and "
                           "centre crop (sets --preprocess paper), metrics on the crop")
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or auto")]
MaxPixelsOpt = Annotated[int | None, typer.Option("--max-pixels", help="refuse images with more pixels, from their "
                                                                        "header (default: 100 million)")]
WeightsOpt = Annotated[str | None, typer.Option(help="backbone weights file, for a model whose backbone's weights "
                                                    "are not bundled (the ResNets)")]


def say(text: str) -> None:
    """Print a message to stderr literally (file names are never read as markup, and control characters in
    them are shown escaped: :func:`printable`)."""
    console.print(printable(text), markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- settings as options
def settings_options(func: Callable[..., None]) -> Callable[..., None]:
    """Give a command one option per setting of :class:`~spade_ad.SpadeSettings`.

    The command receives ``given``: the settings the user set explicitly (options default to unset,
    so presets and protocols can fill in the rest). Help texts, defaults and bounds come from the
    settings' own declarations.
    """
    hints = typing.get_type_hints(settings.SpadeSettings)
    sig = inspect.signature(func, eval_str=True)
    params = [p for p in sig.parameters.values() if p.name != "given"]
    added = []
    for f in settings.fields():
        spec = settings.spec_of(f)
        if not spec.cli:
            continue
        kind = settings.base_type(hints[f.name])
        extra = ""
        if spec.choices:
            extra = f" ({', '.join(spec.choices)})"
        elif spec.low is not None and spec.high is not None:
            extra = f" {settings.describe_bounds(spec)}"
        option = typer.Option(f"--{f.name.replace('_', '-')}", help=spec.help + extra,
                               show_default=str(f.default) if f.default is not None else False)
        added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                       annotation=Annotated[kind | None, option]))
    names = [p.name for p in added]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        given = {n: kwargs.pop(n) for n in names if n in kwargs}
        return func(*args, **kwargs, given={k: v for k, v in given.items() if v is not None})

    new_params = params + added
    wrapper.__signature__ = sig.replace(parameters=new_params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in new_params}
    return wrapper


def _settings(given: dict[str, Any], protocol: str | None = None) -> settings.SpadeSettings:
    from ..data import check_protocol

    if protocol is not None:
        check_protocol(protocol)
        if protocol == "paper" and given.get("preprocess", "paper") != "paper":
            raise SpadeError("--protocol paper evaluates on the paper's centre crop: it needs --preprocess paper "
                             f"(got --preprocess {given['preprocess']})")
    return settings.SpadeSettings.from_preset(**given)


class _RateColumn(ProgressColumn):
    """Items per second (images/s), once there is a measurement."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.2f}/s")


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar per stage; yields the ``(stage, done, total)`` callback."""
    with Progress(
        TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), _RateColumn(),
        console=console, transient=False, disable=not console.is_terminal and not _state["debug"],
    ) as bars:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


def _version(value: bool) -> None:
    if value:
        out_console.print(f"spade-ad {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks on errors")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    _state["debug"] = debug


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"


# --------------------------------------------------------------------------- fit / predict
RayOpt = Annotated[str | None, typer.Option(
    "--ray", metavar="local|auto|ADDRESS", help="run on a Ray cluster (pip install 'spade-ad[ray]'): local (start one "
    "on this machine), auto (the cluster this machine belongs to) or its address (host:port, ray://host:port)")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="with --ray: worker processes, each loading the "
                                                                   "model once (default: as many as fit the cluster)")]
GpusOpt = Annotated[float | None, typer.Option("--gpus-per-worker", help="with --ray: GPUs per worker (0.5 shares one "
                                                                          "GPU between two workers; default 0)")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads-per-worker", help="with --ray: torch threads (and CPUs reserved) per worker (default: this process's "
    "torch thread count, so results equal a local run here bit for bit)")]


def _ray_options(ray: str | None, **given: float | None) -> None:
    """Refuse the Ray options without ``--ray``."""
    for name, value in given.items():
        if value is not None and ray is None:
            raise SpadeError(f"--{name.replace('_', '-')} needs --ray")


@app.command()
@settings_options
def fit(
    train_dir: Annotated[Path, typer.Argument(help="folder of good images")],
    out: Annotated[Path, typer.Option("--out", help="model folder to write")],
    given: dict[str, Any],
    roi: Annotated[Path | None, typer.Option("--roi", help="inspection zone: a picture with the images' aspect "
                                             "ratio, white = inspect, black = ignore (stored with the model)")] = None,
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusOpt = None,
    threads_per_worker: ThreadsOpt = None,
) -> None:
    """Fit on a folder of good images and save the model folder (with --ray: features computed on a Ray cluster)."""
    from ..io import list_images, remove_own_staging
    from ..model import Spade

    _ray_options(ray, workers=workers, gpus_per_worker=gpus_per_worker, threads_per_worker=threads_per_worker)
    files = list_images(train_dir)
    chosen = _settings(given)
    t0 = time.perf_counter()
    created = not out.exists()
    try:
        with progress_bars() as cb:
            # the bank is written into the model folder as a staging file and renamed on save: no copy,
            # no bank-sized debris elsewhere; the old model in OUT stays intact until the new one is complete
            if ray is None:
                model = Spade(chosen).fit(files, progress=cb, workdir=out, zone=roi)
            else:
                from ..distributed import fit as fit_on_ray

                model = fit_on_ray(files, chosen, workdir=out, progress=cb, address=ray, workers=workers,
                                   gpus_per_worker=gpus_per_worker or 0, threads=threads_per_worker, zone=roi)
        model.save(out)
    except BaseException:
        if created and out.is_dir():  # a folder this fit created: its staging files, then the folder, go
            remove_own_staging(out)
            if not any(out.iterdir()):
                out.rmdir()
        raise
    gen = len(model.history_)
    say(f"fitted on {_numbers(model.thresholds_summary())} in {time.perf_counter() - t0:.1f}s; model written to "
        f"{out}" + (f" as generation {gen} (the earlier ones stay: spade-ad history, rollback)" if gen > 1 else ""))


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(help="model folder written by fit")],
    images: Annotated[list[Path], typer.Argument(help="image files and/or folders")],
    out: Annotated[Path, typer.Option("--out", help="output folder")],
    device: DeviceOpt = "cpu",
    threshold: Annotated[
        float | None, typer.Option(help="pixel threshold for the masks (default: the model's calibrated one)")
    ] = None,
    min_area: Annotated[int | None, typer.Option("--min-area", help=f"{MIN_AREA_HELP} (default: the model's)")
                        ] = None,
    raw: Annotated[str, typer.Option(help="raw map format: npy (float32) or png16 (16-bit, scaled)")] = "npy",
    weights: WeightsOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="images per step (outputs are written "
                                                                         "after each step)")] = None,
    max_pixels: MaxPixelsOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="allow OUT to hold files spade-ad did not write "
                                                                  "(they may be overwritten)")] = False,
    on_error: Annotated[str | None, typer.Option(
        "--on-error", metavar="skip|stop", help="an unreadable image: stop (the default; with --ray: skip) or skip "
        "it (its row says why, the others are scored, exit code 2 at the end)")] = None,
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusOpt = None,
    threads_per_worker: ThreadsOpt = None,
) -> None:
    """Score images: overlay PNG, raw map, mask PNG per image and one predictions.jsonl row each.

    OUT must be empty, new, or a folder this command wrote before (its run.json lists every file in it);
    anything else is refused unless --overwrite, so a user's own files are never overwritten.
    """
    from .. import runs

    policy = on_error or ("stop" if ray is None else "skip")
    runs.check_options(raw, threshold, policy, min_area)
    _ray_options(ray, workers=workers, gpus_per_worker=gpus_per_worker, threads_per_worker=threads_per_worker)
    with progress_bars() as cb:
        if ray is None:
            summary = runs.predict(model_dir, images, out, device=device, weights=weights, threshold=threshold,
                                   min_area=min_area, raw=raw, batch_size=batch_size, max_pixels=max_pixels,
                                   on_error=policy, overwrite=overwrite, progress=cb)
        else:
            from ..distributed import predict as predict_on_ray

            summary = predict_on_ray(model_dir, images, out, address=ray, workers=workers,
                                     gpus_per_worker=gpus_per_worker or 0, threads=threads_per_worker, device=device,
                                     weights=weights, threshold=threshold, min_area=min_area, raw=raw,
                                     batch_size=batch_size,
                                     max_pixels=max_pixels, on_error=policy, overwrite=overwrite, progress=cb)
    report_predictions(out, summary)


@app.command()
def watch(
    model_dir: Annotated[Path, typer.Argument(help="model folder written by fit")],
    inbox: Annotated[Path, typer.Argument(help="folder new images arrive in")],
    out: Annotated[Path, typer.Option("--out", help="output folder: predict's files and rows, and the watch state")],
    move_to: Annotated[Path | None, typer.Option("--move-to", help="move each image here once its row is "
                                                 "written")] = None,
    post: Annotated[str | None, typer.Option("--post", help="POST each row as JSON to this URL (retried with "
                                             "back-off; never holds scoring up)")] = None,
    on_error: Annotated[str, typer.Option("--on-error", metavar="skip|stop", help="an unreadable image: stop (the "
                                          "default) or skip it (its row says why)")] = "stop",
    settle: Annotated[float, typer.Option("--settle", help="seconds a file's size and time must stay unchanged "
                                          "before it is read")] = 1.0,
    interval: Annotated[float, typer.Option("--interval", help="seconds between looks at the inbox")] = 0.5,
    once: Annotated[bool, typer.Option("--once", help="score what is in the inbox, then stop")] = False,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="images scored together")] = None,
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
) -> None:
    """Score each new image of INBOX exactly once, after it is completely written, as predict would (rows in
    OUT/predictions.jsonl). Stopped (Ctrl+C) or killed at any moment and started again, it scores every image
    once: its state lives in OUT."""
    from ..drift import health_line
    from ..watch import WatchSummary
    from ..watch import watch as run_watch

    warned = {"status": ""}

    def note(s: WatchSummary) -> None:
        say(f"{s.n_rows} scored ({s.n_defective} defective, {s.n_failed} failed)")
        status = s.health.get("status", "")
        if status != warned["status"] and status in ("drift", "ok") and (status == "drift" or warned["status"]):
            say(health_line(s.health))  # when drift starts, and when it ends
        warned["status"] = status

    summary = run_watch(model_dir, inbox, out, move_to=move_to, post=post, on_error=on_error, settle=settle,
                        interval=interval, once=once, batch_size=batch_size, device=device, weights=weights,
                        progress=None if once else note, started=lambda: say(
                            f"watching {inbox} with {model_dir}; rows in {out / 'predictions.jsonl'}"
                            + ("" if once else " (Ctrl+C stops)")))
    posted = "" if summary.posted is None else f"; {summary.posted} row(s) posted in all"
    say(f"stopped: {summary.n_rows} image(s) scored this session ({summary.n_defective} defective, "
        f"{summary.n_failed} failed){posted}")
    if summary.health:
        say(health_line(summary.health))


def report_predictions(out: Path, summary: RunSummary) -> None:
    """The summary line of a predict run; images that could not be read make it exit with code 2."""
    from ..runs import check_failed, summary_line

    say(summary_line(out, summary))
    check_failed(out, summary)


# --------------------------------------------------------------------------- benchmark / report / demo
def _metric(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"  # pixel metrics of a folder without masks: undefined


def _print_table(doc: dict[str, Any]) -> None:
    table = Table(title=f"spade-ad benchmark (protocol: {doc['settings']['protocol']})")
    cols = ("category", "image AUROC", "pixel AUROC", "AUPRO", "AUPIMO", "image F1", "pixel F1", "train", "test",
            "fit s", "predict s/img")
    for col in cols:
        table.add_column(col, justify="right" if col != "category" else "left")
    for name, r in doc["categories"].items():
        table.add_row(name, *(_metric(r[k]) for k in ("image_auroc", "pixel_auroc", "aupro", "aupimo", "image_f1",
                                                       "pixel_f1")),
                      str(r["n_train"]), str(r["n_test"]), f"{r['fit_seconds']:.1f}",
                      f"{r['predict_seconds_per_image']:.3f}")
        for t, tr in r.get("types", {}).items():  # per defect type, with the good images; recall at the threshold
            recall = "" if tr.get("image_recall") is None else f"recall {tr['image_recall']:.2f}"
            table.add_row(f"  {t}", _metric(tr["image_auroc"]), _metric(tr.get("pixel_auroc")),
                          _metric(tr.get("aupro")), _metric(tr.get("aupimo")), recall, "", "", str(tr["n_test"]), "",
                          "")
    m = doc["mean"]
    if len(doc["categories"]) > 1:
        table.add_row("mean", *(_metric(m[k]) for k in ("image_auroc", "pixel_auroc", "aupro", "aupimo", "image_f1",
                                                         "pixel_f1")), "", "", "", "")
    out_console.print(table, markup=False, highlight=False)  # category names are folder names: printed literally


@app.command()
@settings_options
def benchmark(
    data: Annotated[Path, typer.Argument(help="an MVTec-layout category folder or a root holding several, a "
                                              "generic folder (good/ or train/good/, test/<label>/, optional masks/), "
                                              "or a CSV manifest (image,split,label,mask)")],
    out: Annotated[Path, typer.Option("--out", help="folder for metrics.json")],
    given: dict[str, Any],
    protocol: ProtocolOpt = "full",
    layout: Annotated[str, typer.Option(help="auto: tell the layouts apart; mvtec: train/good, test/<defect>/, "
                                             "ground_truth/<defect>/; folder: good/ (or train/good/), "
                                             "test/good/ and test/<defect>/, optional masks/ (<stem>.png or "
                                             "<stem>_mask.png); csv: a manifest with columns image, split "
                                             "(train/test), label (good or the defect type), mask")] = "auto",
) -> None:
    """Fit on the good training images, evaluate on the test images and masks, print a table, write metrics.json."""
    from ..evaluate import run_benchmark
    from ..io import save_json

    chosen = _settings(given, protocol)
    with progress_bars() as cb:
        doc = run_benchmark(data, chosen, protocol, cb, layout)
    save_json(out / "metrics.json", doc)
    _print_table(doc)
    say(f"metrics written to {out / 'metrics.json'}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="folder for the demo data, model and outputs")] = Path(
        "spade-demo"),
    device: DeviceOpt = "cpu",
) -> None:
    """Run everything on a generated synthetic inspection set (nothing to download)."""
    from ..data import load_mvtec_category
    from ..evaluate import evaluate_category
    from ..io import load_image, save_json, save_png
    from ..synthetic import make_dataset
    from ..viz import overlay

    t0 = time.perf_counter()
    say(f"generating a synthetic inspection set in {out / 'data'} ...")
    cat = load_mvtec_category(make_dataset(out / "data"))
    chosen = settings.SpadeSettings(device=device)
    with progress_bars() as cb:
        ev = evaluate_category(cat, chosen, "full", cb, keep_maps=True)
    ev.model.save(out / "model")
    shown = out / "outputs"
    for s, res in zip(cat.test, ev.kept()[0], strict=True):
        save_png(shown / f"{s.defect_type}_{s.path.stem}_overlay.png",
                 overlay(load_image(s.path), res.map, res.pixel_threshold, res.mask))
    doc = {"categories": {cat.name: ev.row}, "mean": {k: ev.row[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
           "settings": {**chosen.as_dict(), "protocol": "full"}}
    save_json(out / "metrics.json", doc)
    _print_table(doc)
    say(f"demo finished in {time.perf_counter() - t0:.0f}s: data {out / 'data'}, model {out / 'model'}, "
        f"heatmap overlays {shown}, metrics {out / 'metrics.json'}")


@app.command()
@settings_options
def report(
    data: Annotated[Path, typer.Argument(help="one MVTec-layout category folder (train/good, test/, ground_truth/) "
                                              "or a CSV manifest (image,split,label,mask)")],
    out: Annotated[Path, typer.Option("--out", help="folder for report.html and report.json")],
    given: dict[str, Any],
    protocol: ProtocolOpt = "full",
    model_out: Annotated[
        Path | None, typer.Option("--model-out", help="also save the fitted model folder here (for predict/serve)")
    ] = None,
) -> None:
    """Fit and evaluate one category; write a self-contained HTML report (report.html) and report.json."""
    from ..data import find_categories, load_csv_category, load_mvtec_category, resolve_layout
    from ..evaluate import evaluate_category
    from .report import write_report

    chosen = _settings(given, protocol)
    if resolve_layout(data) == "csv":
        cat = load_csv_category(data)
    else:
        cats = find_categories(data)
        if len(cats) != 1:
            raise SpadeError(f"{data}: holds {len(cats)} categories; report takes one category folder "
                             f"(e.g. {cats[0]})")
        cat = load_mvtec_category(cats[0])
    with progress_bars() as cb:
        ev = evaluate_category(cat, chosen, protocol, cb, keep_maps=True, type_pixels=True)
    if model_out is not None:
        ev.model.save(model_out)
    path = write_report(out / "report.html", ev, title=f"spade-ad report: {cat.name} (protocol {protocol})")
    d = json.loads(path.with_suffix(".json").read_text())["decision"]
    row = ev.row
    say(f"image AUROC {row['image_auroc']:.4f}, pixel AUROC {row['pixel_auroc']:.4f}, AUPRO {row['aupro']:.4f}; "
        f"calibrated image threshold {_fmt(ev.model.image_threshold_)}: false-alarm rate on good test images "
        f"{_fmt(d['false_alarm_rate'])}, F1 {_fmt(d['f1'])}; best F1 {_fmt(d['best_f1'])} at threshold "
        f"{_fmt(d['best_f1_threshold'])}")
    out_console.print(str(path), soft_wrap=True, highlight=False, markup=False)


# --------------------------------------------------------------------------- keeping a model up to date
NO_THRESHOLDS = "no thresholds (one training image: nothing to calibrate against; no verdicts or masks)"


def _numbers(h: dict[str, Any] | None) -> str:
    if not h:
        return "-"
    if h["image_threshold"] is None and h["pixel_threshold"] is None:
        return f"{h['n_train']} images, {NO_THRESHOLDS}"
    return (f"{h['n_train']} images, image threshold {_fmt(h['image_threshold'])}, "
            f"pixel threshold {_fmt(h['pixel_threshold'])}")


def _image_files(items: list[Path] | None) -> list[Path]:
    """Image files given as files and/or folders (a folder: its images, sorted), each checked to exist."""
    from ..io import list_images

    files: list[Path] = []
    for item in items or []:
        if item.is_dir():
            files += list_images(item)
        elif item.exists() or item.is_symlink():
            files.append(item)
        else:
            raise SpadeError(f"{item}: file or folder does not exist")
    return files


def _waiting(model_dir: Path) -> Callable[[], None]:
    return lambda: say(f"{model_dir}: another writer is changing this model; waiting for it to finish")


@app.command()
def update(
    model_dir: Annotated[Path, typer.Argument(help="model folder written by fit")],
    add: Annotated[list[Path] | None, typer.Option("--add", help="good image or folder to add (repeatable)")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="training image to remove: its path as "
                                                     "given to fit, its file name, its id or its index "
                                                     "(repeatable; each image once)")] = None,
    force: Annotated[bool, typer.Option("--force", help="allow leaving a single training image (the model then "
                                                        "has no thresholds: no verdicts, no masks), and a change "
                                                        "that judges a known defect good (recorded)")] = False,
    roi: Annotated[Path | None, typer.Option("--roi", help="a new inspection zone (white = inspect): the training "
                                             "images are read again from their paths and checked unchanged")] = None,
    clear_roi: Annotated[bool, typer.Option("--clear-roi", help="inspect the whole image again (as --roi)")] = False,
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
) -> None:
    """Add and/or remove good images without refitting; thresholds are recalibrated as fit would.

    The result equals a model fitted from scratch on the resulting images (old ones, then the added
    ones, less the removed ones). The folder gains a generation; `spade-ad history` lists them and
    `spade-ad rollback` returns to an earlier one. Writers of one folder take turns: the model is read,
    changed and saved while holding the folder's lock. An image already in the model (identical pixels,
    however its path is spelled) is refused. --roi / --clear-roi change the inspection zone: the training
    images are read again (from their paths as fitted, checked to be the same pixels) and the model becomes
    what fit with that zone gives.
    """
    from ..model import Spade
    from ..persistence import folder_lock

    if not add and not remove and roi is None and not clear_roi:
        raise SpadeError("nothing to do: give --add PATH, --remove NAME, --roi ZONE or --clear-roi")
    if roi is not None and clear_roi:
        raise SpadeError("--roi and --clear-roi: give one")
    files = _image_files(add)
    t0 = time.perf_counter()
    with folder_lock(model_dir, on_wait=_waiting(model_dir)):
        model = Spade.load(model_dir, device=device, weights=weights)
        start, before = len(model.history_), model.thresholds_summary()
        missed_before = set(model.missed_defects())
        with progress_bars() as cb:
            if roi is not None or clear_roi:
                model.change_zone(roi, progress=cb, source="cli")
            if remove:
                model.remove([int(r) if r.isdigit() else r for r in remove], progress=cb, source="cli", force=force)
            if files:
                model.add([str(f) for f in files], progress=cb, source="cli")
        gate(model_dir, model, force, missed_before)
        model.save(model_dir)
    changes = model.history_[start:]
    added = sum(len(e["added"]) for e in changes)
    removed = sum(len(e["removed"]) for e in changes)
    say(f"generation {len(model.history_)} in {time.perf_counter() - t0:.1f}s: added {added}, removed "
        f"{removed}; before: {_numbers(before)}; after: {_numbers(model.thresholds_summary())}")


@app.command()
def calibrate(
    model_dir: Annotated[Path, typer.Argument(help="model folder written by fit")],
    defects: Annotated[list[Path] | None, typer.Option("--defects", help="defective images or folders to keep as "
                                                       "known defects (repeatable)")] = None,
    masks: Annotated[Path | None, typer.Option("--masks", help="their masks: <stem>_mask.png or <stem>.png, any "
                                               "non-zero pixel a defect")] = None,
    target_recall: Annotated[float | None, typer.Option("--target-recall", help="thresholds for this recall on "
                                                        "the known defects (image; pixel with masks)")] = None,
    false_alarm_rate: Annotated[float | None, typer.Option("--false-alarm-rate", help="thresholds for this "
                                                           "false-alarm rate on the good calibration images")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what the choice costs, change nothing")] = False,
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
) -> None:
    """Choose the operating point: thresholds from the good images (a false-alarm rate, the default rule) or for
    a target recall on labelled defective images, which are kept with the model as known defects (the defect
    gate). Prints what the thresholds before and after cost; the change is a new generation."""
    from ..data import match_masks
    from ..io import list_images, load_mask
    from ..model import Spade
    from ..persistence import folder_lock

    files = _image_files(defects)
    if masks is not None and not files:
        raise SpadeError("--masks: give the defective images with --defects")
    owners = match_masks(list_images(masks), files, masks) if masks is not None else {}
    given = [(str(f), load_mask(owners[f]) if f in owners else None) for f in files]
    with folder_lock(model_dir, on_wait=_waiting(model_dir)):
        model = Spade.load(model_dir, device=device, weights=weights)
        with progress_bars():
            before, after = model.calibrate(given, target_recall=target_recall, false_alarm_rate=false_alarm_rate,
                                            source="cli")
        if not dry_run:
            model.save(model_dir)
    table = Table(title=Text(printable(f"operating point of {model_dir}")))
    for col in ("", "image threshold", "false alarms (good)", "recall (defects)", "pixel threshold",
                "good images flagged", "defect pixels flagged"):
        table.add_column(col)
    keys = ("image_threshold", "image_false_alarm_rate", "image_recall", "pixel_threshold", "pixel_false_alarm_rate",
            "pixel_recall")
    for label, row in (("before", before), ("after", after)):
        table.add_row(label, *(_fmt(row[k]) for k in keys))
    out_console.print(table, markup=False, highlight=False)
    n = len(model.state_.defects or ())
    say(("dry run: nothing changed" if dry_run else f"generation {len(model.history_)}") +
        f"; {n} known defect(s); measured on {len(model.calibration_.get('image_scores', []))} good calibration "
        "images")


def gate(model_dir: Path, model: Any, force: bool, before: set[str]) -> None:
    """The defect gate: a changed model that judges good a known defect the model before the change (which
    missed ``before``) judged defective is refused, unless ``force`` (then the change's history records them)."""
    missed = [d for d in model.missed_defects() if d not in before]
    if not missed:
        return
    if not force:
        raise SpadeError(f"{model_dir}: this change would judge {len(missed)} known defect(s) good: "
                         f"{', '.join(missed)}; nothing was changed (--force to accept it anyway)")
    model.history_[-1]["forced"] = missed
    say(f"forced: known defect(s) judged good from now on: {', '.join(missed)}")


@app.command()
def history(
    model_dir: Annotated[Path, typer.Argument(help="model folder")],
    health: Annotated[list[str] | None, typer.Option("--health", help="a watch output folder, or the URL of a "
                                                     "served model (http://host:port or .../models/<name>): add a "
                                                     "line on the model's health there (drift; repeatable)")] = None,
) -> None:
    """List the model's generations: time, what was added or removed, counts and thresholds before/after."""
    from ..persistence import read_history

    table = Table(title=Text(printable(f"history of {model_dir}")))  # a title is read as markup: a name is not
    for col in ("gen", "time (UTC)", "change", "by", "training images", "image threshold", "pixel threshold"):
        table.add_column(col, overflow="fold")
    entries = read_history(model_dir)
    for e in entries:
        b, a = e.get("before") or {}, e.get("after") or {}
        what = e.get("action", "?")
        if e.get("added"):
            what += f" +{len(e['added'])} ({_short_list(e['added'])})"
        if e.get("removed"):
            what += f" -{len(e['removed'])} ({_short_list(e['removed'])})"
        if e.get("to"):
            what += f" to generation {e['to']}"
        if e.get("action") == "zone":
            what += " cleared: the whole image" if e.get("zone") is None else " set"
        if e.get("operating_point"):
            op = e["operating_point"]
            what += f" {op['rule'].replace('_', ' ')} {op['value']:g}"
            if e.get("defects_added"):
                what += f" +{len(e['defects_added'])} known defect(s)"
        if e.get("forced"):
            what += f" (forced: {len(e['forced'])} known defect(s) judged good)"

        def arrow(key: str, b: dict[str, Any] = b, a: dict[str, Any] = a) -> str:
            return f"{_fmt(b.get(key)) if b else '-'} -> {_fmt(a.get(key))}" if key != "n_train" else (
                f"{b.get(key, '-')} -> {a.get(key)}")

        cells = (str(e.get("generation")), str(e.get("time", "")).replace("+00:00", ""), what,
                 str(e.get("source") or ""), arrow("n_train"), arrow("image_threshold"), arrow("pixel_threshold"))
        table.add_row(*(printable(c) for c in cells))
    out_console.print(table, markup=False, highlight=False)
    last = entries[-1].get("after") or {} if entries else {}
    bare = last.get("image_threshold", 0) is None and last.get("pixel_threshold", 0) is None
    say(f"current generation: {len(entries)}" + (f"; the model has {NO_THRESHOLDS}" if bare else ""))
    for folder in health or []:
        say(f"{folder}: {_health_of(folder, len(entries))}")


def _health_of(where: str, generation: int) -> str:
    """The health line of a watcher's output folder (its ``health.json``) or of a served model (``GET /health``)."""
    from ..drift import health_line
    from ..watch import HEALTH_FILE

    if where.startswith(("http://", "https://")):
        import urllib.request

        url = where.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - the user's URL
                h = json.loads(resp.read())
        except (OSError, ValueError) as exc:
            raise SpadeError(f"{url}: no health answer ({exc})") from None
    else:
        folder = Path(where)
        try:
            h = json.loads((folder / HEALTH_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise SpadeError(f"{folder / HEALTH_FILE}: no health record here ({exc})") from None
    if not isinstance(h, dict) or "images" not in h:
        raise SpadeError(f"{where}: not a health record")
    gen = h.get("generation")
    when = "" if gen == generation else f" (measured on generation {gen}, the model is now at {generation})"
    return health_line(h) + when


def _short_list(names: list[str], n: int = 3) -> str:
    shown = ", ".join(Path(x).name for x in names[:n])
    return shown + (f", ... {len(names) - n} more" if len(names) > n else "")


@app.command()
def rollback(
    model_dir: Annotated[Path, typer.Argument(help="model folder")],
    to: Annotated[int, typer.Option("--to", help="the generation to return to (see spade-ad history)")],
    force: Annotated[bool, typer.Option("--force", help="return even if that generation judges a known defect "
                                                        "good (recorded)")] = False,
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
) -> None:
    """Make an earlier generation current again (recorded as a new generation: nothing is lost).

    The defect gate: if that generation would judge one of the model's known defects good, the rollback is
    refused unless --force."""
    from ..defects import defects_from_header
    from ..model import Spade
    from ..persistence import folder_lock, read_header
    from ..persistence import rollback as do_rollback

    with folder_lock(model_dir, on_wait=_waiting(model_dir)):
        missed: list[str] = []
        header = read_header(model_dir)  # (not a full load: a generation that does not load can be left)
        if header.get("defects") and 1 <= to < header.get("generation", 0):
            defects = defects_from_header(header["defects"], model_dir / header["files"]["defects"]["name"],
                                          model_dir / "model.json")
            target = Spade.load(model_dir, device=device, weights=weights, generation=to)
            before = set(Spade.load(model_dir, device=device, weights=weights).missed_defects())
            target.state_.defects = defects  # the folder's known defects, not that generation's
            missed = [d for d in target.missed_defects() if d not in before]
            if missed and not force:
                raise SpadeError(f"{model_dir}: generation {to} would judge {len(missed)} known defect(s) good: "
                                 f"{', '.join(missed)}; nothing was changed (--force to return anyway)")
        entry = do_rollback(model_dir, to, source="cli", forced=missed)
    say(f"generation {entry['generation']}: back to generation {to}; before: {_numbers(entry['before'])}; "
        f"after: {_numbers(entry['after'])}")


@app.command()
def export(
    model_dir: Annotated[Path, typer.Argument(help="model folder")],
    out: Annotated[Path, typer.Option("--out", help="the deploy folder to write (for spade-ad-runtime)")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing deploy folder")] = False,
    weights: Annotated[str | None, typer.Option("--weights", help="backbone weights file (backbones without "
                                                "bundled weights)")] = None,
) -> None:
    """Write a deploy folder for spade-ad-runtime: the backbone as ONNX, the bank as it is, a checked header."""
    from ..export import OPSET
    from ..export import export as do_export

    t0 = time.perf_counter()
    dst = do_export(model_dir, out, overwrite=overwrite, weights=weights)
    size = sum(f.stat().st_size for f in dst.iterdir()) / 1e6
    say(f"exported {printable(str(model_dir))} to {printable(str(dst))} ({size:.1f} MB, ONNX opset {OPSET}) in "
        f"{time.perf_counter() - t0:.1f}s; run it with: spade-ad-runtime or spade_ad_runtime.Detector.load")


# --------------------------------------------------------------------------- serve
@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="model folder written by fit, or a folder of model folders "
                                                  "(each served at /models/<name>/)")],
    host: Annotated[str, typer.Option(help="address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="largest accepted upload, in MB")] = 20.0,
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", help="refuse uploads with more pixels, from "
                                                                        "their header (default: 50 million)")] = None,
    allow_updates: Annotated[bool, typer.Option("--allow-updates", help="let the page and the API add and remove "
                                                "good images (needs a token: SPADE_AD_TOKEN or --token-file; one is "
                                                "generated and printed if neither is given)")] = False,
    token_file: Annotated[Path | None, typer.Option("--token-file", help="file holding the token for updates")] = None,
    max_memory_mb: Annotated[float, typer.Option("--max-memory-mb", help="a folder of models: keep loaded models "
                                                 "within this estimate, least recently used unloaded first")] = 2048,
    allowed_hosts: Annotated[list[str] | None, typer.Option("--allow-host", help="also accept requests whose Host "
                                                            "header names this host (repeatable; default: the "
                                                            "address served on, localhost)")] = None,
) -> None:
    """Start the web inspector: upload images, see heatmaps and masks, click a pixel to see its normal match."""
    import math

    import uvicorn

    from .inspector import create_app
    from .models_server import create_models_app, is_models_dir

    if not (math.isfinite(max_upload_mb) and 0 < max_upload_mb <= 4096):
        raise SpadeError(f"--max-upload-mb must be a number in (0, 4096], got {max_upload_mb}")
    if not 1 <= port <= 65535:
        raise SpadeError(f"--port must be between 1 and 65535, got {port}")
    if not (math.isfinite(max_memory_mb) and max_memory_mb > 0):
        raise SpadeError(f"--max-memory-mb must be positive, got {max_memory_mb}")
    token = _update_token(token_file) if allow_updates else None
    options = dict(max_upload_bytes=int(max_upload_mb * 1024 * 1024), device=device, weights=weights,
                   allowed_hosts=[host, *(allowed_hosts or [])], allow_updates=allow_updates, token=token,
                   max_pixels=max_pixels)
    if is_models_dir(model_dir):
        application = create_models_app(model_dir, max_memory=int(max_memory_mb * 1024 * 1024), **options)
        names = [m["name"] for m in application.registry.listing()]
        say(f"spade-ad models server on http://{host}:{port}/ ({len(names)} model folders, each at /models/<name>/; "
            "Ctrl+C stops); " + ("updates ALLOWED (token required)" if allow_updates else "read-only"))
    else:
        application = create_app(model_dir, **options)  # type: ignore[arg-type]
        say(f"spade-ad inspector on http://{host}:{port}/ (API docs at /docs; Ctrl+C stops); "
            + ("updates ALLOWED (token required)" if allow_updates else "read-only"))
    uvicorn.run(application, host=host, port=port, log_level="info")


def _update_token(token_file: Path | None) -> str:
    """The inspector's write token: from --token-file, else SPADE_AD_TOKEN, else a new one printed once."""
    import os
    import secrets

    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise SpadeError(f"{token_file}: cannot read the token file ({exc.strerror})") from None
        if len(token) < 16:
            raise SpadeError(f"{token_file}: the token must be at least 16 characters")
        return token
    token = os.environ.get("SPADE_AD_TOKEN", "").strip()
    if token:
        if len(token) < 16:
            raise SpadeError("SPADE_AD_TOKEN must be at least 16 characters")
        return token
    token = secrets.token_urlsafe(24)
    say(f"update token (shown once; send it as 'Authorization: Bearer <token>'): {token}")
    return token


def command() -> Any:
    """The click command of ``app`` with every help text literal.

    Typer reads help texts and docstrings as Rich markup, where ``[ray]`` (as in ``pip install
    'spade-ad[ray]'``) or a bracketed word in a setting's help is a style tag and vanishes from ``--help``.
    Every command's and option's help is escaped here, once, so that square brackets always print.
    """
    from rich.markup import escape

    root = typer.main.get_command(app)

    def literal(cmd: Any) -> None:
        if cmd.help:
            cmd.help = escape(cmd.help)
        for param in cmd.params:
            if getattr(param, "help", None):
                param.help = escape(param.help)
        for sub in getattr(cmd, "commands", {}).values():
            literal(sub)

    literal(root)
    return root


def main() -> None:
    """Entry point: one clear line per error (``--debug`` for the traceback), non-zero exit.

    Exit codes: 0 success, 1 unexpected error, 2 bad input or usage, 130 interrupted (Ctrl+C),
    143 terminated (SIGTERM). An interrupted command leaves every file it wrote complete (or absent).
    """
    import signal

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = command()(standalone_mode=False)
    except ENDINGS as exc:
        if _state["debug"] and isinstance(exc, SpadeError):
            raise
        code, line = ending(exc)
        say(line)
        sys.exit(code)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and anything unexpected
        # usage errors (unknown option, missing argument): typer's own click prints them
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            say("interrupted")
            sys.exit(130)
        if _state["debug"]:
            raise
        say(f"error: {type(exc).__name__}: {exc} (rerun with --debug for details)")
        sys.exit(1)
    if isinstance(code, int) and code != 0:  # typer reports an interrupt (Abort) as 130 under standalone_mode=False
        if code == 130:
            say("interrupted")
        sys.exit(code)
    sys.exit(0)


if __name__ == "__main__":
    main()

"""Command line: ``spade-ad fit | predict | benchmark | demo``."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import SpadeError

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

BackboneOpt = Annotated[str, typer.Option(help="efficientnet_lite0 (bundled ImageNet weights), "
                                          "wide_resnet50_2, resnet18, resnet50")]
KOpt = Annotated[int, typer.Option("--k", help="training images retrieved as the pixel-stage gallery")]
KImageOpt = Annotated[int, typer.Option("--k-image", help="nearest training images averaged for the image score")]
KappaOpt = Annotated[int, typer.Option("--kappa", help="nearest gallery features averaged per pixel")]
SigmaOpt = Annotated[float, typer.Option(help="Gaussian smoothing of the map, in pixels at --image-size")]
SizeOpt = Annotated[int, typer.Option("--image-size", help="network input size (images are resized to it)")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or auto")]
WeightsOpt = Annotated[
    str | None, typer.Option(help="backbone weights: a torchvision/timm state_dict file (for the ResNets)")
]
CalibOpt = Annotated[
    int, typer.Option("--calibration-images", help="good training images used (leave-one-out) to set thresholds")
]
ProtocolOpt = Annotated[
    str, typer.Option(help="full: whole image, metrics at the mask's resolution; paper: resize 256, centre-crop 224")
]
FarOpt = Annotated[
    float, typer.Option("--false-alarm-rate", help="target fraction of good images flagged by the thresholds")
]


def _params(backbone: str, k: int, k_image: int, kappa: int, sigma: float, image_size: int, device: str,
            weights: str | None, calibration_images: int, false_alarm_rate: float) -> dict[str, Any]:
    return {
        "backbone": backbone, "k": k, "k_image": k_image, "kappa": kappa, "sigma": sigma,
        "image_size": image_size, "device": device, "weights": weights,
        "calibration_images": calibration_images, "false_alarm_rate": false_alarm_rate,
    }


@contextmanager
def progress_bars():
    """A rich progress bar per stage; yields the ``(stage, done, total)`` callback."""
    with Progress(
        TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
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


@app.command()
def fit(
    train_dir: Annotated[Path, typer.Argument(help="folder of good images")],
    out: Annotated[Path, typer.Option("--out", help="model folder to write")],
    backbone: BackboneOpt = "efficientnet_lite0",
    k: KOpt = 50,
    k_image: KImageOpt = 5,
    kappa: KappaOpt = 1,
    sigma: SigmaOpt = 4.0,
    image_size: SizeOpt = 224,
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
    calibration_images: CalibOpt = 16,
    false_alarm_rate: FarOpt = 0.01,
) -> None:
    """Fit on a folder of good images and save the model folder."""
    from .io import list_images
    from .model import Spade

    files = list_images(train_dir)
    params = _params(backbone, k, k_image, kappa, sigma, image_size, device, weights, calibration_images,
                     false_alarm_rate)
    t0 = time.perf_counter()
    with progress_bars() as cb:
        model = Spade(**params).fit(files, progress=cb)
    model.save(out)
    console.print(
        f"fitted on {len(files)} images in {time.perf_counter() - t0:.1f}s; image threshold "
        f"{_fmt(model.image_threshold_)}, pixel threshold {_fmt(model.pixel_threshold_)}; model written to {out}"
    )


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"


def _output_stems(inputs: list[Path]) -> list[tuple[Path, str]]:
    """(image file, unique output stem) for files and folders given on the command line."""
    from .io import list_images

    pairs: list[tuple[Path, str]] = []
    for item in inputs:
        if item.is_dir():
            pairs += [(f, f"{item.name}_{f.stem}") for f in list_images(item)]
        elif item.exists():
            pairs.append((item, item.stem))
        else:
            raise SpadeError(f"{item}: file or folder does not exist")
    seen: dict[str, int] = {}
    out = []
    for f, stem in pairs:
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append((f, stem if n == 0 else f"{stem}_{n}"))
    return out


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(help="model folder written by fit")],
    images: Annotated[list[Path], typer.Argument(help="image files and/or folders")],
    out: Annotated[Path, typer.Option("--out", help="output folder")],
    device: DeviceOpt = "cpu",
    threshold: Annotated[
        float | None, typer.Option(help="pixel threshold for the masks (default: the model's calibrated one)")
    ] = None,
    raw: Annotated[str, typer.Option(help="raw map format: npy (float32) or png16 (16-bit, scaled)")] = "npy",
) -> None:
    """Score images: overlay PNG, raw map, mask PNG per image and one predictions.jsonl row each."""
    from .io import load_image, save_json, save_npy, save_png
    from .model import Spade
    from .viz import normalise, overlay

    if raw not in ("npy", "png16"):
        raise SpadeError(f"--raw must be npy or png16, got {raw!r}")
    model = Spade.load(model_dir, device=device)
    pairs = _output_stems(images)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    jsonl = out / "predictions.jsonl"
    thr = model.pixel_threshold_ if threshold is None else threshold
    t0 = time.perf_counter()
    with progress_bars() as cb:
        for s in range(0, len(pairs), model.batch_size):
            chunk = pairs[s : s + model.batch_size]
            arrays = [load_image(f) for f, _ in chunk]
            res = model.predict(arrays, pixel_threshold=threshold)
            for b, ((f, stem), img) in enumerate(zip(chunk, arrays, strict=True)):
                amap = res.maps[b]
                mask = res.masks[b] if res.masks is not None else None
                save_png(out / f"{stem}_overlay.png", overlay(img, amap, thr, mask))
                if raw == "npy":
                    save_npy(out / f"{stem}_map.npy", amap.astype(np.float32))
                else:
                    scale = 65535.0 / (2.0 * thr) if thr else 65535.0 / max(float(amap.max()), 1e-12)
                    save_png(out / f"{stem}_map.png", np.clip(amap * scale, 0, 65535).astype(np.uint16))
                if mask is not None:
                    save_png(out / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
                score = float(res.scores[b])
                verdict = None if model.image_threshold_ is None else (
                    "defective" if score >= model.image_threshold_ else "good")
                rows.append({
                    "file": str(f),
                    "score": score,
                    "score_normalised": None if not model.image_threshold_ else score / model.image_threshold_,
                    "verdict": verdict,
                    "max_pixel_score_normalised": float(normalise(amap, thr).max()),
                    "defect_pixels": int(mask.sum()) if mask is not None else None,
                    "neighbours": res.neighbour_names(b),
                    "overlay": f"{stem}_overlay.png",
                    "map": f"{stem}_map.{'npy' if raw == 'npy' else 'png'}",
                    "mask": f"{stem}_mask.png" if mask is not None else None,
                })
            _write_jsonl(jsonl, rows)
            cb("predict", s + len(chunk), len(pairs))
    elapsed = time.perf_counter() - t0
    save_json(out / "run.json", {"model": str(model_dir), "n_images": len(rows), "seconds": round(elapsed, 3),
                                 "image_threshold": model.image_threshold_, "pixel_threshold": thr,
                                 "colour_scale": "map / pixel_threshold on [0, 2]; 1.0 = threshold"})
    n_bad = sum(r["verdict"] == "defective" for r in rows)
    console.print(f"{len(rows)} images in {elapsed:.1f}s ({len(rows) / elapsed:.2f} images/s); "
                  f"{n_bad} flagged defective; outputs in {out} (predictions.jsonl)")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from .io import atomic_write

    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _print_table(doc: dict[str, Any]) -> None:
    table = Table(title=f"spade-ad benchmark (protocol: {doc['settings']['protocol']})")
    for col in ("category", "image AUROC", "pixel AUROC", "AUPRO", "train", "test", "fit s", "predict s/img"):
        table.add_column(col, justify="right" if col != "category" else "left")
    for name, r in doc["categories"].items():
        table.add_row(name, f"{r['image_auroc']:.4f}", f"{r['pixel_auroc']:.4f}", f"{r['aupro']:.4f}",
                      str(r["n_train"]), str(r["n_test"]), f"{r['fit_seconds']:.1f}",
                      f"{r['predict_seconds_per_image']:.3f}")
    m = doc["mean"]
    if len(doc["categories"]) > 1:
        table.add_row("mean", f"{m['image_auroc']:.4f}", f"{m['pixel_auroc']:.4f}", f"{m['aupro']:.4f}",
                      "", "", "", "")
    out_console.print(table)


@app.command()
def benchmark(
    data: Annotated[Path, typer.Argument(help="an MVTec-layout category folder, or a root holding several")],
    out: Annotated[Path, typer.Option("--out", help="folder for metrics.json")],
    protocol: ProtocolOpt = "full",
    backbone: BackboneOpt = "efficientnet_lite0",
    k: KOpt = 50,
    k_image: KImageOpt = 5,
    kappa: KappaOpt = 1,
    sigma: SigmaOpt = 4.0,
    image_size: SizeOpt = 224,
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
    calibration_images: CalibOpt = 16,
    false_alarm_rate: FarOpt = 0.01,
) -> None:
    """Fit on train/good, evaluate on test/ with ground_truth/, print a table, write metrics.json."""
    from .data import check_protocol
    from .evaluate import run_benchmark
    from .io import save_json

    check_protocol(protocol)
    params = _params(backbone, k, k_image, kappa, sigma, image_size, device, weights, calibration_images,
                     false_alarm_rate)
    with progress_bars() as cb:
        doc = run_benchmark(data, params, protocol, cb)
    save_json(out / "metrics.json", doc)
    _print_table(doc)
    console.print(f"metrics written to {out / 'metrics.json'}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="folder for the demo data, model and outputs")] = Path(
        "spade-demo"),
    device: DeviceOpt = "cpu",
) -> None:
    """Run everything on a generated synthetic inspection set (nothing to download)."""
    from .data import load_mvtec_category
    from .evaluate import evaluate_category
    from .io import save_json, save_png
    from .synthetic import make_dataset
    from .viz import overlay

    t0 = time.perf_counter()
    console.print(f"generating a synthetic inspection set in {out / 'data'} ...")
    cat_dir = make_dataset(out / "data")
    cat = load_mvtec_category(cat_dir)
    params = _params("efficientnet_lite0", 50, 5, 1, 4.0, 224, device, None, 16, 0.01)
    with progress_bars() as cb:
        row, model, pred, masks, labels = evaluate_category(cat, params, "full", cb)
    model.save(out / "model")
    shown = out / "outputs"
    for i, s in enumerate(cat.test):
        from .io import load_image

        img = load_image(s.path)
        m = pred.masks[i] if pred.masks is not None else None
        save_png(shown / f"{s.defect_type}_{s.path.stem}_overlay.png", overlay(img, pred.maps[i],
                                                                                model.pixel_threshold_, m))
    doc = {"categories": {cat.name: row}, "mean": {k: row[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
           "settings": {**params, "protocol": "full"}}
    save_json(out / "metrics.json", doc)
    _print_table(doc)
    console.print(
        f"demo finished in {time.perf_counter() - t0:.0f}s: data {out / 'data'}, model {out / 'model'}, "
        f"heatmap overlays {shown}, metrics {out / 'metrics.json'}"
    )


@app.command()
def report(
    data: Annotated[Path, typer.Argument(help="one MVTec-layout category folder (train/good, test/, ground_truth/)")],
    out: Annotated[Path, typer.Option("--out", help="folder for report.html and report.json")],
    protocol: ProtocolOpt = "full",
    backbone: BackboneOpt = "efficientnet_lite0",
    k: KOpt = 50,
    k_image: KImageOpt = 5,
    kappa: KappaOpt = 1,
    sigma: SigmaOpt = 4.0,
    image_size: SizeOpt = 224,
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
    calibration_images: CalibOpt = 16,
    false_alarm_rate: FarOpt = 0.01,
    model_out: Annotated[
        Path | None, typer.Option("--model-out", help="also save the fitted model folder here (for serve)")
    ] = None,
) -> None:
    """Fit and evaluate one category; write a self-contained HTML report (report.html) and report.json."""
    from .data import check_protocol, find_categories, load_mvtec_category, load_sample
    from .evaluate import evaluate_category
    from .report import write_report

    check_protocol(protocol)
    cats = find_categories(data)
    if len(cats) != 1:
        raise SpadeError(f"{data}: holds {len(cats)} categories; report takes one category folder "
                         f"(e.g. {cats[0]})")
    cat = load_mvtec_category(cats[0])
    params = _params(backbone, k, k_image, kappa, sigma, image_size, device, weights, calibration_images,
                     false_alarm_rate)
    with progress_bars() as cb:
        row, model, pred, masks, labels = evaluate_category(cat, params, protocol, cb)
    if model_out is not None:
        model.save(model_out)
    images = [load_sample(s, protocol)[0] for s in cat.test]
    path = write_report(out / "report.html", row, model, pred, masks, labels, images,
                        title=f"spade-ad report: {cat.name} (protocol {protocol})")
    doc = json.loads(path.with_suffix(".json").read_text())
    d = doc["decision"]
    console.print(
        f"image AUROC {row['image_auroc']:.4f}, pixel AUROC {row['pixel_auroc']:.4f}, AUPRO {row['aupro']:.4f}; "
        f"calibrated image threshold {_fmt(model.image_threshold_)}: false-alarm rate on good test images "
        f"{_fmt(d['false_alarm_rate'])}, F1 {_fmt(d['f1'])}; best F1 {_fmt(d['best_f1'])} at threshold "
        f"{_fmt(d['best_f1_threshold'])}"
    )
    out_console.print(str(path), soft_wrap=True, highlight=False, markup=False)


@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="model folder written by fit")],
    host: Annotated[str, typer.Option(help="address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="largest accepted upload, in MB")] = 20.0,
    device: DeviceOpt = "cpu",
) -> None:
    """Start the web inspector: upload images, see heatmaps and masks, click a pixel to see its normal match."""
    import uvicorn

    from .server import create_app

    if max_upload_mb <= 0:
        raise SpadeError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    application = create_app(model_dir, max_upload_bytes=int(max_upload_mb * 1024 * 1024), device=device)
    console.print(f"spade-ad inspector on http://{host}:{port}/ (API docs at /docs; Ctrl+C stops)")
    uvicorn.run(application, host=host, port=port, log_level="info")


def main() -> None:
    """Entry point: one clear line per error (``--debug`` for the traceback), non-zero exit."""
    try:
        app(standalone_mode=False)
    except SpadeError as exc:
        if _state["debug"]:
            raise
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and anything unexpected
        # usage errors (unknown option, missing argument): typer's own click prints them
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        if _state["debug"]:
            raise
        console.print(f"[red]error:[/red] {type(exc).__name__}: {exc} (rerun with --debug for details)",
                      highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(0)

"""Throughput of ``spade-ad predict`` with every output written, per code version, runs interleaved.

    python benchmarks/predict_throughput.py --data /work/shared/datasets/mvtec_ad/bottle \\
        --src new=src --src old=/path/to/an/older/checkout/src --repeats 3 \\
        --out benchmarks/results/predict_throughput_bottle_cpu.json

One model is fitted on ``DATA/train/good`` (default settings, with the first version, or ``--model``), then
``spade-ad predict MODEL DATA/test/<every type> --out OUT`` runs ``--repeats`` times per version, each in a
fresh process importing ``spade_ad`` from that version's ``src``, the versions taking turns so that a change
in the machine's speed hits all of them alike. Per run it records:

* ``reported``: the seconds the command itself reports (``run.json``; reading, scoring and writing every
  output, from the first image to the last), as images/s;
* ``process``: the whole process, Python's start-up, imports and loading the model included, as images/s;
* CPU seconds (user + system, all threads) per image, and peak RSS.

The outputs of every run are compared with the first version's: ``predictions.jsonl`` text, raw maps (bytes),
masks (pixels) and overlays (largest pixel difference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from cli_run import run  # noqa: E402

from spade_ad.evaluate import machine_description  # noqa: E402


def compare(ref: Path, other: Path) -> dict[str, object]:
    """How the outputs in ``other`` differ from those in ``ref`` (same inputs, same model)."""
    rows = (ref / "predictions.jsonl").read_text()
    same_rows = rows == (other / "predictions.jsonl").read_text()
    maps = masks = True
    overlay = 0
    for row in map(json.loads, rows.splitlines()):
        maps &= (ref / row["map"]).read_bytes() == (other / row["map"]).read_bytes()
        if row.get("mask"):
            masks &= bool(np.array_equal(np.asarray(Image.open(ref / row["mask"])),
                                         np.asarray(Image.open(other / row["mask"]))))
        a = np.asarray(Image.open(ref / row["overlay"]), dtype=np.int16)
        b = np.asarray(Image.open(other / row["overlay"]), dtype=np.int16)
        overlay = max(overlay, int(np.abs(a - b).max()))
    return {"rows_identical": same_rows, "maps_identical": maps, "masks_identical": masks,
            "overlay_max_pixel_difference": overlay}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/datasets/mvtec_ad/bottle"))
    ap.add_argument("--src", action="append", default=None, metavar="LABEL=DIR",
                    help="code versions to measure (default: new=<this checkout>/src)")
    ap.add_argument("--model", type=Path, default=None, help="a fitted model folder (default: fit one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "predict_throughput.json")
    a = ap.parse_args()
    versions = {k: str(Path(v).resolve()) for k, v in
                (x.split("=", 1) for x in (a.src or [f"new={HERE.parent / 'src'}"]))}
    first = next(iter(versions))
    inputs = [str(p) for p in sorted((a.data / "test").iterdir()) if p.is_dir()]
    n = sum(1 for d in inputs for f in Path(d).iterdir() if f.is_file())
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in versions}
    diffs: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model
        if model is None:
            model = Path(tmp) / "model"
            run(["fit", str(a.data / "train" / "good"), "--out", str(model)], src=versions[first])
        for r in range(a.repeats):
            for label, src in versions.items():
                out = Path(tmp) / f"{label}-{r}"
                m = run(["predict", str(model), *inputs, "--out", str(out)], src=src)
                reported = json.loads((out / "run.json").read_text())["seconds"]
                rec = {"reported_seconds": reported, "reported_images_per_second": round(n / reported, 2),
                       "process_seconds": m["process_seconds"],
                       "process_images_per_second": round(n / m["process_seconds"], 2),
                       "cpu_ms_per_image": round(1000 * m["cpu_seconds"] / n, 1), "peak_rss_mb": m["peak_rss_mb"]}
                runs[label].append(rec)
                print(f"run {r + 1} {label}: {n} images, {reported:.1f} s as reported "
                      f"({rec['reported_images_per_second']} images/s), {m['process_seconds']:.1f} s with start-up "
                      f"({rec['process_images_per_second']} images/s), CPU {rec['cpu_ms_per_image']} ms/image, "
                      f"peak RSS {m['peak_rss_mb']:.0f} MB", flush=True)
            ref = Path(tmp) / f"{first}-0"
            for label in versions:
                if label != first and r == 0:
                    diffs[label] = compare(ref, Path(tmp) / f"{label}-0")
    summary = {}
    for label, rs in runs.items():
        rep = [x["reported_images_per_second"] for x in rs]
        proc = [x["process_images_per_second"] for x in rs]
        summary[label] = {"reported_images_per_second": {"median": statistics.median(rep), "best": max(rep),
                                                         "worst": min(rep)},
                          "process_images_per_second": {"median": statistics.median(proc), "best": max(proc),
                                                        "worst": min(proc)},
                          "cpu_ms_per_image_median": round(statistics.median(x["cpu_ms_per_image"] for x in rs), 1)}
        print(f"{label}: images/s as reported median {statistics.median(rep):.2f} (best {max(rep):.2f}, worst "
              f"{min(rep):.2f}); with start-up median {statistics.median(proc):.2f} (best {max(proc):.2f}, worst "
              f"{min(proc):.2f}); CPU {summary[label]['cpu_ms_per_image_median']} ms/image")
    for label, d in diffs.items():
        print(f"{label} against {first}: {d}")
    doc = {"machine": machine_description(), "data": str(a.data), "n_images": n, "versions": versions,
           "runs": runs, "summary": summary, "outputs_against_first": diffs,
           "command": "python benchmarks/predict_throughput.py " + " ".join(sys.argv[1:])}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()

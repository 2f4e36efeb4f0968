"""Peak resident memory of ``spade-ad benchmark --protocol full`` on one real category, per code version.

    python benchmarks/benchmark_memory.py --data /work/shared/datasets/mpdd/metal_plate \\
        --src new=src --src old=/path/to/a/checkout/of/main/src --out benchmarks/results/benchmark_memory.json

Each ``--src LABEL=DIR`` runs the command in a fresh process importing ``spade_ad`` from ``DIR`` (default: this
checkout's ``src``); peak RSS is that process's ``getrusage`` maximum at exit (see ``cli_run.py``). The
metrics of all versions are compared (they should agree within 1e-9). For the pixel metrics alone on a
synthetic test set, and their growth per image, see ``metrics_memory.py``.

Results on MPDD metal_plate (54 training, 97 test images of 512x512; default settings; 2 shared CPU cores
under load from other work, so the seconds are noisy; ``benchmarks/results/benchmark_memory_metal_plate*.json``):

=========================================  =============  ======  ==========================
code                                       peak RSS       time    image / pixel AUROC, AUPRO
=========================================  =============  ======  ==========================
old: main at aab91f2 (one predict call,    1296 MB        362 s   0.98483 / 0.98873, 0.93848
all maps and masks kept)
new: chunks of --batch-size, maps dropped  1216, 1240 MB  383 s,  identical (difference 0)
                                                          131 s
``spade-ad fit`` alone (the floor)         923 MB         89 s
=========================================  =============  ======  ==========================

What the new code holds on top of the fit is one batch and the model's search caches, whatever the
test set's size; the old code also held every full-resolution map, input map and mask (about 1.5 MB per
512x512 test image here; 2 MB of map per 1130x460 image, plus its mask, for larger sets).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from cli_run import run  # noqa: E402

from spade_ad.evaluate import METRIC_KEYS, machine_description  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/datasets/mpdd/metal_plate"))
    ap.add_argument("--src", action="append", default=None, metavar="LABEL=DIR",
                    help="code versions to measure (default: new=<this checkout>/src)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "benchmark_memory.json")
    ap.add_argument("--fit-too", action="store_true",
                    help="also measure `spade-ad fit DATA/train/good` alone (the floor: the benchmark fits first)")
    a = ap.parse_args()
    versions = dict(v.split("=", 1) for v in (a.src or [f"new={HERE.parent / 'src'}"]))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, src in versions.items():
            out = Path(tmp) / label
            r = run(["benchmark", str(a.data), "--protocol", "full", "--out", str(out)], src=str(Path(src).resolve()))
            doc = json.loads((out / "metrics.json").read_text())
            (row,) = doc["categories"].values()
            rows[label] = {"src": src, **r, "metrics": {k: row[k] for k in METRIC_KEYS},
                           "n_train": row["n_train"], "n_test": row["n_test"]}
            print(f"{label}: peak RSS {r['peak_rss_mb']:.0f} MB, {r['seconds']:.0f} s, "
                  f"{row['n_test']} test images, " + ", ".join(f"{k} {row[k]!r}" for k in METRIC_KEYS), flush=True)
        fit = None
        if a.fit_too:
            fit = run(["fit", str(a.data / "train" / "good"), "--out", str(Path(tmp) / "model")],
                      src=str(Path(next(iter(versions.values()))).resolve()))
            print(f"fit alone: peak RSS {fit['peak_rss_mb']:.0f} MB, {fit['seconds']:.0f} s", flush=True)
    first = next(iter(rows.values()))["metrics"]
    diff = {label: max(abs(r["metrics"][k] - first[k]) for k in METRIC_KEYS) for label, r in rows.items()}
    print("largest metric difference to the first version: " + ", ".join(f"{k} {v:.3g}" for k, v in diff.items()))
    doc = {"machine": machine_description(), "data": str(a.data), "protocol": "full", "versions": rows,
           "fit_alone": fit, "max_metric_difference": diff,
           "command": "python benchmarks/benchmark_memory.py " + " ".join(sys.argv[1:])}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Ray overhead benchmark: ``spade-ad predict`` locally and with ``--ray local`` on the same machine.

    python benchmarks/ray_predict.py                       # MVTec bottle: fit on train/good, score the 83 test images
    python benchmarks/ray_predict.py --n-train 50          # a quicker fit (a subset of train/good)

Steps (each a real ``spade-ad`` command in a subprocess, so start-up is included in the wall times):

1. ``fit`` on ``train/good`` (default settings), then ``fit --ray local``: both wall times, and whether the model
   files are byte-identical (they must be).
2. ``predict`` the 83 test images: locally, with ``--ray local`` (defaults: workers use this machine's torch
   thread count, so rows must equal the local ones byte for byte), and with ``--ray local --workers W
   --threads-per-worker 1`` (throughput setting; rows then equal a local run with one torch thread).

For each predict run: the command's wall time, its own summary (images/s from the first image sent to the last
row written: actor start and model load included, ``ray.init`` and shutdown not) and, for Ray, per worker
the images scored, seconds busy (images/s per worker) and the model-load time (to size a cluster). Results go
to ``benchmarks/results/ray_predict_bottle_cpu.json`` with the machine described and its load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

from spade_ad.evaluate import machine_description  # noqa: E402

BOTTLE = HERE.parent.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
SUMMARY = re.compile(r"(\d+) images in ([\d.]+)s \(([\d.]+) images/s\)")


def spade_ad(*args: str) -> tuple[float, str]:
    """Run ``spade-ad ARGS`` with this checkout's code; (wall seconds, stderr). Fails loudly on an error."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "spade_ad.delivery.cli", *args], env=env, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"spade-ad {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return wall, r.stderr


def predict_run(name: str, model: Path, inputs: list[Path], out: Path, extra: list[str]) -> dict[str, Any]:
    wall, err = spade_ad("predict", str(model), *map(str, inputs), "--out", str(out), *extra)
    m = SUMMARY.search(" ".join(err.split()))
    if not m:
        raise SystemExit(f"{name}: no summary line in\n{err}")
    run = json.loads((out / "run.json").read_text())
    row: dict[str, Any] = {"command": f"spade-ad predict MODEL TEST_FOLDERS --out OUT {' '.join(extra)}".strip(),
                           "images": int(m.group(1)), "wall_seconds": round(wall, 2),
                           "wall_images_per_second": round(int(m.group(1)) / wall, 3),
                           "run_seconds": float(m.group(2)), "run_images_per_second": float(m.group(3))}
    if "ray" in run:
        row["ray"] = run["ray"]
        row["workers"] = {w: {"images": s["images"], "busy_seconds": round(s["busy_s"], 2),
                              "images_per_second_busy": round(s["images"] / s["busy_s"], 3),
                              "model_load_seconds": round(s["load_s"], 2)} for w, s in run["workers"].items()}
    print(f"{name:>10}: {row['images']} images, wall {wall:.1f}s ({row['wall_images_per_second']:.2f} images/s), "
          f"run {row['run_seconds']:.1f}s ({row['run_images_per_second']:.2f} images/s)", flush=True)
    for w, s in row.get("workers", {}).items():
        print(f"{'':>12}worker {w}: {s['images']} images, {s['images_per_second_busy']:.2f} images/s busy, "
              f"model load {s['model_load_seconds']:.1f}s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=BOTTLE)
    ap.add_argument("--n-train", type=int, default=0, help="fit on the first N training images (0: all)")
    ap.add_argument("--workers", type=int, default=2, help="workers of the throughput setting (1 thread each)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ray_predict_bottle_cpu.json")
    args = ap.parse_args()
    tests = sorted(p for p in (args.data / "test").iterdir() if p.is_dir())
    doc: dict[str, Any] = {"machine": machine_description(), "load_average_before": os.getloadavg(),
                           "note": "shared machine (2 cores, other engineers' jobs running): one run of each, noisy"}
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp_s:
        tmp = Path(tmp_s)
        train = args.data / "train" / "good"
        if args.n_train:
            train = tmp / "train"
            train.mkdir()
            for f in sorted((args.data / "train" / "good").glob("*.png"))[: args.n_train]:
                (train / f.name).symlink_to(f)
        n_train = len(list(train.glob("*.png")))
        fits = {}
        for name, extra in (("local", []), ("ray_local", ["--ray", "local"])):
            wall, _ = spade_ad("fit", str(train), "--out", str(tmp / f"model_{name}"), *extra)
            fits[name] = {"wall_seconds": round(wall, 2)}
            print(f"fit {name:>10}: {n_train} images, wall {wall:.1f}s", flush=True)
        same_model = {p.name: p.read_bytes() for p in (tmp / "model_local").iterdir()} == {
            p.name: p.read_bytes() for p in (tmp / "model_ray_local").iterdir()}
        print(f"fit: model files byte-identical: {same_model}", flush=True)
        doc["fit"] = {"n_train": n_train, "settings": "defaults", **fits, "model_files_identical": same_model,
                      "bank_mb": round(sum(p.stat().st_size for p in (tmp / "model_local").glob("bank-*")) / 1e6, 1)}
        model = tmp / "model_local"
        runs = {
            "local": predict_run("local", model, tests, tmp / "p_local", []),
            "ray_local": predict_run("ray local", model, tests, tmp / "p_ray", ["--ray", "local"]),
            "ray_local_1_thread": predict_run(
                f"ray {args.workers}x1", model, tests, tmp / "p_ray1",
                ["--ray", "local", "--workers", str(args.workers), "--threads-per-worker", "1"]),
        }
        rows = {k: (tmp / d / "predictions.jsonl").read_bytes() for k, d in
                (("local", "p_local"), ("ray_local", "p_ray"), ("ray_local_1_thread", "p_ray1"))}
        doc["predict"] = runs
        doc["rows_identical_to_local"] = {k: rows[k] == rows["local"] for k in ("ray_local", "ray_local_1_thread")}
        for k in ("ray_local", "ray_local_1_thread"):
            doc["predict"][k]["throughput_vs_local"] = {
                "wall": round(runs[k]["wall_images_per_second"] / runs["local"]["wall_images_per_second"], 3),
                "run": round(runs[k]["run_images_per_second"] / runs["local"]["run_images_per_second"], 3)}
        shutil.rmtree(tmp, ignore_errors=True)
    doc["load_average_after"] = os.getloadavg()
    print(json.dumps({k: doc[k] for k in ("rows_identical_to_local",)}), flush=True)
    for k in ("ray_local", "ray_local_1_thread"):
        print(f"{k}: throughput vs local {doc['predict'][k]['throughput_vs_local']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

"""spade-ad and spade-ad-runtime on a GPU, in one short run (the prepared script for a lent GPU machine).

For the default settings and the ``fast`` preset: fits a model on the first N training images (on the
device), saves and exports it, then measures on the same test images

* images/s at batch 1 (one image per call) and batch 32 (one call, ``batch_size=32``), after a warm-up,
  for spade-ad (``Spade.load(MODEL, device=D)``) and the runtime (``Detector.load(DEPLOY, device=D)``);
* the largest difference of the device's maps and scores from the CPU's (relative to the largest map value
  and to each score), for both packages;
* peak GPU memory: torch's ``max_memory_allocated`` for spade-ad; for the runtime, the growth of the
  device's used memory reported by ``nvidia-smi`` (onnxruntime's arena), when it is there.

Every path also runs with ``--device cpu`` (then the GPU fields are null), which is how it is checked
without a GPU. Prints and saves one JSON document (``results/gpu_<data>.json``).

    python benchmarks/gpu.py --data ../shared/datasets/mvtec_ad/bottle --train 30 --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spade_ad import Spade, SpadeSettings
from spade_ad.evaluate import machine_description
from spade_ad.export import export
from spade_ad.io import load_image
from spade_ad_runtime.detector import Detector

RESULTS = Path(__file__).resolve().parent / "results"


def _gpu_used_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True, timeout=20).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _rate(score: Any, images: list[np.ndarray], batch: int) -> float:
    """Images per second of ``score`` over ``images``, ``batch`` images per call (one warm-up call first)."""
    score(images[:batch])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, len(images), batch):
        score(images[s : s + batch])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t0)


def _worst(maps: list[np.ndarray], ref: list[np.ndarray], scores: list[float], ref_scores: list[float]
           ) -> dict[str, float]:
    top = max(float(np.abs(r).max()) for r in ref)
    return {"map_max_rel": max(float(np.abs(m - r).max()) for m, r in zip(maps, ref, strict=True)) / top,
            "score_max_rel": max(abs(float(a) - float(b)) / abs(float(b)) for a, b in zip(scores, ref_scores,
                                                                                       strict=True))}


def measure(preset: str, train: list[Path], images: list[np.ndarray], device: str, tmp: Path) -> dict[str, Any]:
    settings = SpadeSettings() if preset == "paper" else SpadeSettings.from_preset(preset)
    model_dir, deploy = tmp / f"model-{preset}", tmp / f"deploy-{preset}"
    Spade(settings, device=device).fit([str(p) for p in train]).save(model_dir)
    export(model_dir, deploy)
    row: dict[str, Any] = {"preset": preset}

    cpu = Spade.load(model_dir, device="cpu").predict(images)
    model = Spade.load(model_dir, device=device, batch_size=32)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    row["spade-ad"] = {f"batch{b}_images_per_second": round(_rate(model.predict, images, b), 2) for b in (1, 32)}
    pred = model.predict(images)
    row["spade-ad"].update(_worst(pred.maps, cpu.maps, list(pred.scores), list(cpu.scores)))
    row["spade-ad"]["peak_gpu_mib"] = (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                                       if device.startswith("cuda") else None)
    del model

    rt_cpu = Detector.load(deploy, device="cpu").predict(images)
    before = _gpu_used_mib() if device.startswith("cuda") else None
    det = Detector.load(deploy, device="cuda" if device.startswith("cuda") else "cpu")
    row["runtime"] = {f"batch{b}_images_per_second": round(_rate(det.predict, images, b), 2) for b in (1, 32)}
    got = det.predict(images)
    row["runtime"].update(_worst([r.map for r in got], [r.map for r in rt_cpu], [r.score for r in got],
                                 [r.score for r in rt_cpu]))
    after = _gpu_used_mib() if device.startswith("cuda") else None
    row["runtime"]["gpu_used_growth_mib"] = None if before is None or after is None else after - before
    row["runtime_vs_spade_ad_cpu"] = _worst([r.map for r in rt_cpu], cpu.maps, [r.score for r in rt_cpu],
                                            list(cpu.scores))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--train", type=int, default=30)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--presets", default="paper,fast")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    train = sorted((args.data / "train" / "good").glob("*.png"))[: args.train]
    tests = [p for sub in sorted((args.data / "test").iterdir()) for p in sorted(sub.glob("*.png"))]
    images = [load_image(p) for p in tests[: args.images]]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(p, train, images, args.device, Path(tmp)) for p in args.presets.split(",")]
    doc = {"machine": machine_description(), "device": args.device, "data": args.data.name, "n_train": len(train),
           "n_images": len(images), "results": rows, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(doc, indent=1))
    dst = args.out or RESULTS / f"gpu_{args.data.name}_{args.device.replace(':', '')}.json"
    dst.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"saved {dst}")


if __name__ == "__main__":
    main()

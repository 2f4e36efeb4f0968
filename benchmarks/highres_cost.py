"""Cost of the tiled mode against image size: seconds per megapixel and peak memory of predicting one image.

For each size: one process fits eleven synthetic textured training images of that size with ``--preset
highres --tile-scale S --tile-span 0`` (tiles cut at scale ``S``) and saves the model; a second process
loads it and predicts one test image of the same size twice (decode from PNG included; the first call
also builds the backbone, the second is timed as the steady state), so its peak RSS is what predicting
costs. Prints and saves one JSON row per size: tiles, fit seconds and peak RSS, predict
seconds, seconds per native megapixel, RSS after loading and peak RSS of the predicting process.

    python benchmarks/highres_cost.py --sizes 1000x1000,3000x4000,4000x6000 --scale 1.0
    python benchmarks/highres_cost.py --sizes 3000x4000 --scale 0 --out benchmarks/results/highres_cost_preset.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from spade_ad import Spade, SpadeSettings
from spade_ad.evaluate import machine_description

RESULTS = Path(__file__).resolve().parent / "results"
N_TRAIN = 11  # more than the preset's k (10), so that every test tile searches k full training tiles


def _image(h: int, w: int, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    small = r.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def _rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def fit_one(h: int, w: int, scale: float, folder: Path) -> dict[str, object]:
    """Fit N_TRAIN synthetic images of h x w and save the model (and one more image, the test) in ``folder``."""
    paths = []
    for i in range(N_TRAIN + 1):
        p = folder / f"{i}.png"
        Image.fromarray(_image(h, w, i)).save(p, compress_level=1)
        paths.append(str(p))
    scaling = {"tile_scale": scale, "tile_span": 0.0} if scale > 0 else {}  # 0: the preset's own tile_span
    settings = SpadeSettings.from_preset("highres", calibration_images=2, **scaling)
    t0 = time.perf_counter()
    model = Spade(settings).fit(paths[:N_TRAIN])
    fit_s = time.perf_counter() - t0
    model.save(folder / "model")
    grid = model.grid
    assert grid is not None
    return {"tiles": len(grid), "tile_scale": round(grid.scale, 4), "fit_seconds": round(fit_s, 1),
            "fit_peak_rss_mb": _rss_mb()}


def predict_one(h: int, w: int, folder: Path) -> dict[str, object]:
    """Load the model and predict the test image (decode included), in a process of its own."""
    model = Spade.load(folder / "model")
    loaded = _rss_mb()
    times = []
    for _ in range(2):  # the first call also builds the backbone; the second is the steady state
        t1 = time.perf_counter()
        pred = model.predict([str(folder / f"{N_TRAIN}.png")])
        times.append(time.perf_counter() - t1)
        assert pred.maps[0].shape == (h, w)
        del pred
    first_s, pred_s = times
    return {"first_predict_seconds": round(first_s, 2), "predict_seconds": round(pred_s, 2),
            "predict_seconds_per_megapixel": round(pred_s / (h * w / 1e6), 3),
            "rss_after_load_mb": loaded, "predict_peak_rss_mb": _rss_mb(),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def _child(args: list[str]) -> dict[str, object]:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if res.returncode:
        sys.exit(f"{args}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000x1000,2000x3000,4000x6000")
    ap.add_argument("--scale", type=float, default=1.0, help="tile scale (1: native; 0: the preset's tile_span rule)")
    ap.add_argument("--out", type=Path, default=RESULTS / "highres_cost.json")
    ap.add_argument("--fit-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--predict-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fit_child or args.predict_child:
        size, folder = args.fit_child or args.predict_child
        h, w = (int(v) for v in size.split("x"))
        res = fit_one(h, w, args.scale, Path(folder)) if args.fit_child else predict_one(h, w, Path(folder))
        print(json.dumps(res))
        return
    rows = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            row: dict[str, object] = {"size": size, "megapixels": round(h * w / 1e6, 2), "scale": args.scale}
            row.update(_child(["--fit-child", size, tmp, "--scale", str(args.scale)]))
            row.update(_child(["--predict-child", size, tmp]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_description(), "runs": rows}, indent=1) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

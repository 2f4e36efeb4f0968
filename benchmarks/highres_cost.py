"""Cost of the tiled mode against image size: seconds per megapixel and peak memory of predicting one image.

For each size, in its own process (its own peak RSS): three synthetic textured training images of that
size are fitted with ``--preset highres --tile-scale S --tile-span 0`` (tiles cut at scale ``S``), then one
test image of the same size is predicted (decode from PNG included). Prints and saves one JSON row per
size: tiles, fit and predict seconds, predict seconds per native megapixel, peak RSS of the process.

    python benchmarks/highres_cost.py --sizes 1000x1000,2000x3000,4000x6000 --scale 1.0
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


def _image(h: int, w: int, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    small = r.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def run_one(h: int, w: int, scale: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(4):
            p = Path(tmp) / f"{i}.png"
            Image.fromarray(_image(h, w, i)).save(p, compress_level=1)
            paths.append(str(p))
        settings = SpadeSettings.from_preset("highres", tile_scale=scale, tile_span=0.0, calibration_images=2)
        t0 = time.perf_counter()
        model = Spade(settings).fit(paths[:3])
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        pred = model.predict([paths[3]])
        pred_s = time.perf_counter() - t1
        assert pred.maps[0].shape == (h, w)
        grid = model.grid
        assert grid is not None
        return {"size": f"{h}x{w}", "megapixels": round(h * w / 1e6, 2), "scale": scale, "tiles": len(grid),
                "fit_seconds": round(fit_s, 1), "predict_seconds": round(pred_s, 2),
                "predict_seconds_per_megapixel": round(pred_s / (h * w / 1e6), 3),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                "loadavg_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000x1000,2000x3000,4000x6000")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "highres_cost.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        h, w = (int(v) for v in args.child.split("x"))
        print(json.dumps(run_one(h, w, args.scale)))
        return
    rows = []
    for size in args.sizes.split(","):
        res = subprocess.run([sys.executable, __file__, "--child", size, "--scale", str(args.scale)],
                             capture_output=True, text=True, check=False)
        if res.returncode:
            sys.exit(f"{size}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_description(), "runs": rows}, indent=1) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

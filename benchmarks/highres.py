"""The presets side by side on the real sets (full protocol), with the tiled mode's image-score rules.

Each (set, preset) runs in its own process (its own peak RSS): fit on every training image, predict
every test image ``batch`` at a time, metrics streamed at each image's own resolution (the full
protocol of ``spade-ad benchmark``). For tiled models the per-tile kNN scores and map maxima of the
test images and of the leave-one-out calibration images are kept, so that the image-score rules below
are compared on one fit (``rules`` in the JSON; the model's own rule is ``image_auroc``):

* ``tile_knn_raw`` / ``tile_max_raw`` / ``map_max``: highest tile kNN score, highest tile map maximum,
  maximum of the stitched map (no per-position scaling);
* ``RULE/POOL``: each tile's kNN score and map maximum divided by its grid position's calibration
  median, the tile's score by ``image_score=RULE`` (``knn``, ``max``, ``combined``), pooled over the
  tiles by ``tile_pool=POOL`` (``max``, ``mean``, ``max_mean``): the library's rules;
* ``combined_global``: the ``combined`` rule, highest tile, with one median per score over all positions.

    python benchmarks/highres.py            # every preset on bsdata, bottle and metal_plate (the README's table)
    python benchmarks/highres.py --data bottle --presets highres --set tile_span=1.0 --label span1
    python benchmarks/highres.py --table benchmarks/results/highres_bsdata_bottle_metal_plate.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from spade_ad import Spade, SpadeSettings, metrics
from spade_ad.data import load_mvtec_category, load_truth
from spade_ad.evaluate import machine_description
from spade_ad.retrieval import tile_image_scores

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATA = {"bsdata": SHARED / "bsdata", "bottle": SHARED / "mvtec_ad" / "bottle",
        "metal_plate": SHARED / "mpdd" / "metal_plate"}
RESULTS = Path(__file__).resolve().parent / "results"


def _value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _rules(model: Spade, knn: list[np.ndarray], mx: list[np.ndarray], map_max: list[float],
           labels: list[int]) -> dict[str, float]:
    cal = model.calibration_
    k, m = np.stack(knn), np.stack(mx)
    scales = np.asarray(cal["position_scales"])
    ck, cm = np.asarray(cal["tile_knn"]), np.asarray(cal["tile_max"])
    one = np.tile([[float(np.median(ck)), float(np.median(cm))]], (k.shape[1], 1))
    out = {"tile_knn_raw": k.max(1), "tile_max_raw": m.max(1), "map_max": np.asarray(map_max),
           "combined_global": tile_image_scores("combined", "max", one, k, m)}
    for rule in ("knn", "max", "combined"):
        for pool in ("max", "mean", "max_mean"):
            out[f"{rule}/{pool}"] = tile_image_scores(rule, pool, scales, k, m)
    return {name: round(metrics.image_auroc(labels, s), 4) for name, s in out.items()}


def _shrink(amap: np.ndarray, f: int = 4) -> np.ndarray:
    """A map averaged over f x f blocks (float16): small enough to keep every test image's for offline rules."""
    h, w = amap.shape[0] // f * f, amap.shape[1] // f * f
    return amap[:h, :w].reshape(h // f, f, w // f, f).mean((1, 3)).astype(np.float16)


def run_one(data: str, preset: str, extra: dict[str, Any], batch: int, raw: Path | None) -> dict[str, Any]:
    cat = load_mvtec_category(DATA[data])
    settings = SpadeSettings.from_preset(preset, **extra)
    t0 = time.perf_counter()
    model = Spade(settings).fit([str(p) for p in cat.train])
    fit_s = time.perf_counter() - t0
    labels = [s.label for s in cat.test]
    scores: list[float] = []
    knn: list[np.ndarray] = []
    mx: list[np.ndarray] = []
    map_max: list[float] = []
    small: list[np.ndarray] = []
    pixels = 0
    pred_s = 0.0
    with metrics.PixelMetrics() as acc:
        for a in range(0, len(cat.test), batch):
            part = cat.test[a : a + batch]
            t1 = time.perf_counter()
            pred = model.predict([str(s.path) for s in part])
            pred_s += time.perf_counter() - t1
            scores.extend(pred.scores.tolist())
            for j, s in enumerate(part):
                amap = pred.maps[j]
                pixels += amap.size
                map_max.append(float(amap.max()))
                small.append(_shrink(amap))
                acc.add(load_truth(s, amap.shape), amap)
            if pred.tile_knn is not None and pred.tile_max is not None:
                knn.extend(pred.tile_knn)
                mx.extend(pred.tile_max)
        row: dict[str, Any] = {
            "data": data, "preset": preset, "settings": extra, "n_train": len(cat.train), "n_test": len(cat.test),
            "image_auroc": round(metrics.image_auroc(labels, np.asarray(scores)), 4),
            "pixel_auroc": round(acc.pixel_auroc(), 4), "aupro": round(acc.aupro(), 4),
            "fit_seconds": round(fit_s, 1), "predict_seconds_per_image": round(pred_s / len(cat.test), 3),
            "predict_seconds_per_megapixel": round(pred_s / (pixels / 1e6), 3),
            "grid": None if model.grid is None else {"scale": round(model.grid.scale, 4),
                                                     "tiles": list(model.grid.shape)},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "loadavg_1min": round(os.getloadavg()[0], 2),
        }
    if knn:
        row["rules"] = _rules(model, knn, mx, map_max, labels)
    if raw is not None:  # per-image numbers, for comparing image-score rules across presets offline
        raw.parent.mkdir(parents=True, exist_ok=True)
        cal = {f"cal_{k}": np.asarray(v) for k, v in model.calibration_.items()
               if isinstance(v, list) and v and not isinstance(v[0], str)}
        np.savez(raw, labels=np.asarray(labels), scores=np.asarray(scores), map_max=np.asarray(map_max),
                 maps=np.asarray(small, dtype=object),
                 **({"tile_knn": np.stack(knn), "tile_max": np.stack(mx)} if knn else {}), **cal)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The README's results table (markdown) of a run's rows."""
    out = ["| set | preset | image ROC-AUC | pixel ROC-AUC | AUPRO | fit s | predict s/image | s/MP | peak RSS MB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["grid"]
        grid = f" ({g['tiles'][0]}x{g['tiles'][1]} tiles at {g['scale']:.2f})" if g else ""
        out.append(f"| {r['data']} | `{r['preset']}`{grid} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
                   f"{r['aupro']:.4f} | {r['fit_seconds']:.0f} | {r['predict_seconds_per_image']:.3f} | "
                   f"{r['predict_seconds_per_megapixel']:.2f} | {r['peak_rss_mb']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="bsdata,bottle,metal_plate",
                    help=f"comma-separated sets: {', '.join(sorted(DATA))}")
    ap.add_argument("--presets", default="paper,accurate,fast,highres")
    ap.add_argument("--set", action="append", default=[], help="setting=value over the preset (repeatable)")
    ap.add_argument("--label", default="")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--raw", type=Path, help="folder for each run's per-image scores (.npz)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--table", type=Path, help="print the markdown table of a saved run and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())["runs"]))
        return
    extra = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    sets = args.data.split(",")
    unknown = sorted(set(sets) - set(DATA))
    if unknown:
        sys.exit(f"--data: unknown set {unknown[0]!r}; choose from {', '.join(sorted(DATA))}")
    tag = "_" + args.label if args.label else ""
    if args.child:
        raw = args.raw / f"{sets[0]}_{args.child}{tag}.npz" if args.raw else None
        print(json.dumps(run_one(sets[0], args.child, extra, args.batch, raw)))
        return
    out = args.out or RESULTS / f"highres_{'_'.join(sets)}{tag}.json"
    rows = []
    for data in sets:
        for preset in args.presets.split(","):
            cmd = [sys.executable, __file__, "--data", data, "--child", preset, "--batch", str(args.batch)]
            cmd += [x for s in args.set for x in ("--set", s)]
            cmd += ["--label", args.label] + (["--raw", str(args.raw)] if args.raw else [])
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode:
                err = res.stderr.strip().splitlines()
                sys.exit(f"{data} {preset}: {err[-1] if err else res.returncode}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_description(), "runs": rows}, indent=1) + "\n")
    print(f"saved {out}")
    print(table(rows))


if __name__ == "__main__":
    main()

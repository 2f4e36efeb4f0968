"""Spike: tiled SPADE at native resolution ("see small defects in large images"), measured.

Each training image is scaled by ``scale`` and cut into overlapping ``tile``-pixel tiles on a grid
fixed at fit time (:mod:`spade_ad.tiling`); each tile is an image to SPADE (public API only:
``Spade(...).fit(arrays)``, ``predict(arrays)``). Retrieval ``all``: one model over the tiles of every
position (a test tile's K nearest training tiles come from any position); ``position``: one model per
grid position (K nearest among the training tiles at the same position). The tile maps are stitched
with blended overlaps, resized to the image's own size, and the metrics computed at mask resolution
(full protocol, streamed into ``PixelMetrics``). Image scores, all from one fit (``image_score=knn``):

* ``knn``: max over tiles of the tile's global kNN score;
* ``max``: max of the stitched map;
* ``combined``: max over tiles of ``knn / s_knn + tile_map_max / s_max``, the library's ``combined``
  rule per tile, with the medians ``s_*`` of that tile's model's leave-one-out calibration.

The untiled model (``tile: None``) is scored by the same code, so the rows compare. Each
configuration runs in its own process (its own peak RSS). Times are wall seconds on decoded-from-disk
images: fit (decode, cut, fit, calibration) and predict (decode, cut, predict, stitch, resize; the
metrics excluded), per test image and per megapixel of native image.

    python benchmarks/highres_spike.py --data bsdata --n-train 60 --n-test 40 --only default,t224_h_o50_all
    python benchmarks/highres_spike.py --data bsdata --only default,t224_h_o50_all --out results/x.json
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
import torch

from spade_ad import Spade, metrics, tiling
from spade_ad.data import load_mvtec_category, load_truth
from spade_ad.evaluate import machine_description
from spade_ad.io import load_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATA = {"bsdata": SHARED / "bsdata", "bottle": SHARED / "mvtec_ad" / "bottle",
        "metal_plate": SHARED / "mpdd" / "metal_plate"}
RESULTS = Path(__file__).resolve().parent / "results"

# tile: side in network pixels (None: the untiled model); scale: native -> tile pixels, or "short":
# the image's short side becomes one tile; overlap: minimum fraction; retrieval: all | position;
# settings: Spade settings over the defaults (each tile is one image to SPADE).
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {"tile": None, "settings": {}},
    "accurate": {"tile": None, "settings": {"preset": "accurate"}},
    "t224_h_o50_all": {"tile": 224, "scale": "short", "overlap": 0.5, "retrieval": "all", "settings": {}},
    "t224_h_o50_pos": {"tile": 224, "scale": "short", "overlap": 0.5, "retrieval": "position", "settings": {}},
    "t224_h_o50_pos_k10": {"tile": 224, "scale": "short", "overlap": 0.5, "retrieval": "position",
                           "settings": {"k": 10}},
    "t224_h_o25_all": {"tile": 224, "scale": "short", "overlap": 0.25, "retrieval": "all", "settings": {}},
    "t224_h_o50_all_agg3": {"tile": 224, "scale": "short", "overlap": 0.5, "retrieval": "all",
                            "settings": {"aggregate": 3}},
    "t224_s0.75_o25_all_k10": {"tile": 224, "scale": 0.75, "overlap": 0.25, "retrieval": "all",
                               "settings": {"k": 10}},
    "t224_s0.75_o25_pos_k10": {"tile": 224, "scale": 0.75, "overlap": 0.25, "retrieval": "position",
                               "settings": {"k": 10}},
    "t320_s1_o25_pos_k10": {"tile": 320, "scale": 1.0, "overlap": 0.25, "retrieval": "position",
                            "settings": {"k": 10}},
}
RULES = ("knn", "max", "combined")


def _spread(n: int, m: int | None) -> list[int]:
    """``m`` indices spread evenly over ``range(n)`` (all of them when ``m`` is None or >= n)."""
    if m is None or m >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, m).round().astype(int).tolist()))


def _median_scale(values: list[float]) -> float:
    med = float(np.median(values)) if values else 1.0
    return med if med > 0 else 1.0


class Tiled:
    """A tiled SPADE made of public ``Spade`` models: one over all positions, or one per position."""

    def __init__(self, cfg: dict[str, Any], shape: tuple[int, int]) -> None:
        h, w = shape
        self.untiled = cfg["tile"] is None
        settings = {"image_score": "knn", **cfg["settings"]}
        if self.untiled:
            self.grid = None
            self.models = [Spade(**settings)]
            return
        scale = cfg["tile"] / min(h, w) if cfg["scale"] == "short" else float(cfg["scale"])
        self.grid = tiling.make_grid(h, w, tile=cfg["tile"], overlap=cfg["overlap"], scale=scale)
        self.per_position = cfg["retrieval"] == "position"
        n_models = len(self.grid) if self.per_position else 1
        self.models = [Spade(image_size=cfg["tile"], **settings) for _ in range(n_models)]

    def fit(self, images: list[np.ndarray]) -> None:
        if self.grid is None:
            self.models[0].fit(images)
        else:
            tiles = np.stack([tiling.cut_tiles(im, self.grid) for im in images])  # (N, P, T, T, 3)
            if self.per_position:
                for p, m in enumerate(self.models):
                    m.fit(list(tiles[:, p]))
            else:
                self.models[0].fit(list(tiles.reshape(-1, *tiles.shape[2:])))
        self.scales = []
        for m in self.models:
            cal = m.calibration_
            self.scales.append((_median_scale(cal.get("image_scores", [])), _median_scale(cal.get("map_maxima", []))))

    def predict(self, images: list[np.ndarray]) -> tuple[dict[str, list[float]], list[np.ndarray]]:
        """Per rule, the images' scores; and their maps at their own size."""
        out: dict[str, list[float]] = {r: [] for r in RULES}
        if self.grid is None:
            pred = self.models[0].predict(images)
            sk, sm = self.scales[0]
            for s, amap in zip(pred.scores, pred.maps, strict=True):
                out["knn"].append(float(s))
                out["max"].append(float(amap.max()))
                out["combined"].append(float(s) / sk + float(amap.max()) / sm)
            return out, list(pred.maps)
        g = self.grid
        tiles = np.stack([tiling.cut_tiles(im, g) for im in images])  # (B, P, T, T, 3)
        b, p = tiles.shape[:2]
        knn = np.zeros((b, p))
        maps = np.zeros((b, p, g.tile, g.tile), np.float32)
        comb = np.zeros((b, p))
        if self.per_position:
            for j, m in enumerate(self.models):
                pred = m.predict(list(tiles[:, j]))
                knn[:, j] = pred.scores
                maps[:, j] = np.stack(pred.maps)
                sk, sm = self.scales[j]
                comb[:, j] = knn[:, j] / sk + maps[:, j].max(axis=(1, 2)) / sm
        else:
            pred = self.models[0].predict(list(tiles.reshape(-1, *tiles.shape[2:])))
            knn[:] = pred.scores.reshape(b, p)
            maps[:] = np.stack(pred.maps).reshape(b, p, g.tile, g.tile)
            sk, sm = self.scales[0]
            comb[:] = knn / sk + maps.max(axis=(2, 3)) / sm
        full = []
        for i, im in enumerate(images):
            stitched = tiling.stitch(maps[i], g)
            full.append(tiling.to_native(stitched, g, im.shape[:2]))
            out["knn"].append(float(knn[i].max()))
            out["max"].append(float(full[-1].max()))
            out["combined"].append(float(comb[i].max()))
        return out, full


def run_one(name: str, data: str, n_train: int | None, n_test: int | None, batch: int) -> dict[str, Any]:
    torch.set_num_threads(2)
    cfg = CONFIGS[name]
    cat = load_mvtec_category(DATA[data])
    train = [cat.train[i] for i in _spread(len(cat.train), n_train)]
    good = [s for s in cat.test if s.label == 0]
    bad = [s for s in cat.test if s.label == 1]
    half = None if n_test is None else n_test // 2
    test = [good[i] for i in _spread(len(good), half)] + [bad[i] for i in _spread(len(bad), half)]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    train_imgs = [load_image(p) for p in train]
    model = Tiled(cfg, train_imgs[0].shape[:2])
    model.fit(train_imgs)
    fit_s = time.perf_counter() - t0
    del train_imgs
    scores: dict[str, list[float]] = {r: [] for r in RULES}
    pred_s, mpix = 0.0, 0.0
    with metrics.PixelMetrics() as acc:
        for a in range(0, len(test), batch):
            part = test[a : a + batch]
            t1 = time.perf_counter()
            imgs = [load_image(s.path) for s in part]
            sc, maps = model.predict(imgs)
            pred_s += time.perf_counter() - t1
            mpix += sum(im.shape[0] * im.shape[1] for im in imgs) / 1e6
            for r in RULES:
                scores[r] += sc[r]
            for s, amap in zip(part, maps, strict=True):
                acc.add(load_truth(s, amap.shape), amap)
        pixel_auroc, aupro = acc.pixel_auroc(), acc.aupro()
    labels = [s.label for s in test]
    g = model.grid
    return {
        "config": name, "data": data, **cfg, "n_train": len(train), "n_test": len(test),
        "grid": None if g is None else {**g.to_dict(), "n_tiles": len(g), "n_models": len(model.models)},
        "image_auroc": {r: round(metrics.image_auroc(labels, scores[r]), 4) for r in RULES},
        "pixel_auroc": round(pixel_auroc, 4), "aupro": round(aupro, 4),
        "fit_seconds": round(fit_s, 1), "predict_seconds_per_image": round(pred_s / len(test), 3),
        "predict_seconds_per_megapixel": round(pred_s / mpix, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="bsdata", choices=sorted(DATA))
    ap.add_argument("--only", default="default,t224_h_o50_all", help="comma-separated names of CONFIGS")
    ap.add_argument("--n-train", type=int, default=None, help="training images, spread evenly (default: all)")
    ap.add_argument("--n-test", type=int, default=None, help="test images, half good, half defective (default: all)")
    ap.add_argument("--batch", type=int, default=8, help="test images per predict call")
    ap.add_argument("--out", default=str(RESULTS / "highres_spike_bsdata.json"))
    ap.add_argument("--label", default="", help="a name for this run inside the JSON file")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one config, JSON on stdout
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.data, args.n_train, args.n_test, args.batch)))
        return
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"machine": machine_description(), "runs": []}
    for name in args.only.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--data", args.data, "--batch", str(args.batch)]
        cmd += [] if args.n_train is None else ["--n-train", str(args.n_train)]
        cmd += [] if args.n_test is None else ["--n-test", str(args.n_test)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(f"{name}: failed\n{res.stderr[-3000:]}", file=sys.stderr)
            continue
        row = {"label": args.label, **json.loads(res.stdout.strip().splitlines()[-1])}
        print(json.dumps({k: row[k] for k in ("config", "n_train", "n_test", "image_auroc", "pixel_auroc", "aupro",
                                              "fit_seconds", "predict_seconds_per_image",
                                              "predict_seconds_per_megapixel", "peak_rss_mb", "loadavg_1min")}),
              flush=True)
        doc["runs"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()

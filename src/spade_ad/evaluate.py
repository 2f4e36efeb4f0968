"""Benchmarking on MVTec-layout data: fit on train/good, evaluate on test/ with ground_truth/."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, metrics
from .data import Category, check_protocol, find_categories, load_mvtec_category, load_sample, load_train_image
from .model import Progress, Spade

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro")


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def evaluate_category(
    category: Category,
    params: dict[str, Any],
    protocol: str = "full",
    progress: Progress | None = None,
    on_model: Callable[[Spade], None] | None = None,
) -> tuple[dict[str, Any], Spade, Any, list[np.ndarray], list[int]]:
    """Fit on the category's good training images, predict its test set, compute the metrics."""
    check_protocol(protocol)
    t0 = time.perf_counter()
    train = [load_train_image(p, protocol) for p in category.train]
    model = Spade(**params).fit(train, progress=progress)
    model.train_names_ = [str(p) for p in category.train]
    fit_s = time.perf_counter() - t0
    if on_model:
        on_model(model)
    images, masks = [], []
    for s in category.test:
        img, mask = load_sample(s, protocol)
        images.append(img)
        masks.append(mask)
    labels = [s.label for s in category.test]
    t1 = time.perf_counter()
    pred = model.predict(images, progress=progress)
    pred.names = [str(s.path) for s in category.test]
    pred_s = time.perf_counter() - t1
    row: dict[str, Any] = {
        "image_auroc": metrics.image_auroc(labels, pred.scores),
        "pixel_auroc": metrics.pixel_auroc(masks, pred.maps),
        "aupro": metrics.aupro(masks, pred.maps),
        "n_train": len(category.train),
        "n_test": len(category.test),
        "fit_seconds": round(fit_s, 3),
        "predict_seconds_per_image": round(pred_s / len(images), 4),
    }
    return row, model, pred, masks, labels


def run_benchmark(
    data: str | Path, params: dict[str, Any], protocol: str = "full", progress: Progress | None = None
) -> dict[str, Any]:
    """All categories under ``data``; returns the metrics.json document."""
    cats = [load_mvtec_category(p) for p in find_categories(data)]
    results: dict[str, Any] = {}
    for cat in cats:
        row, *_ = evaluate_category(cat, params, protocol, progress)
        results[cat.name] = row
    mean = {k: float(np.mean([r[k] for r in results.values()])) for k in METRIC_KEYS}
    return {
        "categories": results,
        "mean": mean,
        "settings": {**params, "protocol": protocol},
        "machine": machine_description(),
        "package_version": __version__,
    }

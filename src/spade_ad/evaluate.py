"""Benchmarking on MVTec-layout data: fit on train/good, evaluate on test/ with ground_truth/.

Protocols: ``full`` evaluates the maps at each mask's own resolution, with the model's own
preprocessing; ``paper`` fits with the paper's preprocessing (resize to 8/7 of the input size,
centre-crop; the ``preprocess="paper"`` setting) and evaluates on that same crop, masks moved into the
input frame by nearest-neighbour resizing, as in the paper. Either way the model scores the original
images, so a model saved from a benchmark gives exactly the benchmark's scores through ``predict`` and
the inspector.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, metrics
from .data import Category, check_protocol, find_categories, load_mvtec_category, load_truth
from .errors import SpadeError
from .io import load_image
from .model import Progress, Spade
from .result import Prediction
from .settings import SpadeSettings

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro")


def machine_description() -> dict[str, Any]:
    """CPU model, cores, GPU, Python and torch versions (recorded with every benchmark)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": torch.get_num_threads(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__}


def protocol_settings(settings: SpadeSettings, protocol: str) -> SpadeSettings:
    """The settings a protocol evaluates: ``paper`` implies the paper's preprocessing."""
    check_protocol(protocol)
    return settings.replace(preprocess="paper") if protocol == "paper" else settings


@dataclass
class Evaluation:
    """One category's evaluation. ``masks`` and ``maps`` are in the protocol's frame (the crop for
    ``paper``, each image's own pixels for ``full``); ``pred`` holds the model's results as any user
    gets them."""

    row: dict[str, Any]
    model: Spade
    pred: Prediction
    masks: list[np.ndarray]
    maps: list[np.ndarray]
    labels: list[int]
    protocol: str

    def picture(self, i: int) -> np.ndarray:
        """Test image ``i`` in the protocol's frame (what the maps cover)."""
        img = load_image(self.pred.names[i])
        return self.model.prep.input_view(img) if self.protocol == "paper" else img


def evaluate_category(
    category: Category,
    settings: SpadeSettings,
    protocol: str = "full",
    progress: Progress | None = None,
) -> Evaluation:
    """Fit on the category's good training images, predict its test set, compute the metrics."""
    settings = protocol_settings(settings, protocol)
    t0 = time.perf_counter()
    model = Spade(settings).fit([str(p) for p in category.train], progress=progress)
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = model.predict([str(s.path) for s in category.test], progress=progress)
    pred_s = time.perf_counter() - t1
    masks, maps = [], []
    for i, s in enumerate(category.test):
        truth = load_truth(s, pred.sizes[i])
        if protocol == "paper":
            masks.append(model.prep.mask_to_input(truth))
            maps.append(pred.input_maps[i])
        else:
            masks.append(truth)
            maps.append(pred.maps[i])
    labels = [s.label for s in category.test]
    if not any(labels) or all(labels):
        raise SpadeError(f"{category.root}: the test set needs both good and defective images")
    row: dict[str, Any] = {
        "image_auroc": metrics.image_auroc(labels, pred.scores),
        "pixel_auroc": metrics.pixel_auroc(masks, maps),
        "aupro": metrics.aupro(masks, maps),
        "n_train": len(category.train),
        "n_test": len(category.test),
        "fit_seconds": round(fit_s, 3),
        "predict_seconds_per_image": round(pred_s / len(category.test), 4),
    }
    return Evaluation(row, model, pred, masks, maps, labels, protocol)


def run_benchmark(
    data: str | Path, settings: SpadeSettings, protocol: str = "full", progress: Progress | None = None
) -> dict[str, Any]:
    """All categories under ``data``; returns the ``metrics.json`` document."""
    cats = [load_mvtec_category(p) for p in find_categories(data)]
    settings = protocol_settings(settings, protocol)
    results: dict[str, Any] = {}
    for cat in cats:
        results[cat.name] = evaluate_category(cat, settings, protocol, progress).row
    mean = {k: float(np.mean([r[k] for r in results.values()])) for k in METRIC_KEYS}
    return {
        "categories": results,
        "mean": mean,
        "settings": {**settings.as_dict(), "protocol": protocol},
        "machine": machine_description(),
        "package_version": __version__,
    }

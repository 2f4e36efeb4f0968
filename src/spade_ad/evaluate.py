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

from . import metrics
from .data import GOOD, Category, check_protocol, load_categories, load_truth, resolve_layout
from .errors import SpadeError
from .io import load_image
from .model import Progress, Spade
from .result import DEFECTIVE, Prediction
from .settings import SpadeSettings
from .version import __version__

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "aupimo", "image_f1", "pixel_f1")


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
    """One category's evaluation.

    ``scores`` are the test images' scores, in the order of ``names`` and ``labels``. With
    ``keep_maps=True``, ``masks`` and ``maps`` are in the protocol's frame (the crop for ``paper``, each
    image's own pixels for ``full``) and ``pred`` holds the model's results as any user gets them;
    otherwise (the default: memory bounded whatever the test set's size) all three are ``None``.
    """

    row: dict[str, Any]
    model: Spade
    scores: np.ndarray
    names: list[str]
    labels: list[int]
    protocol: str
    pred: Prediction | None = None
    masks: list[np.ndarray] | None = None
    maps: list[np.ndarray] | None = None

    def kept(self) -> tuple[Prediction, list[np.ndarray], list[np.ndarray]]:
        """``(pred, masks, maps)``; an error when the evaluation was made without ``keep_maps=True``."""
        if self.pred is None or self.masks is None or self.maps is None:
            raise SpadeError("this evaluation kept no maps: use evaluate_category(..., keep_maps=True)")
        return self.pred, self.masks, self.maps

    def picture(self, i: int) -> np.ndarray:
        """Test image ``i`` in the protocol's frame (what the maps cover)."""
        img = load_image(self.names[i])
        return self.model.prep.input_view(img) if self.protocol == "paper" else img


def _joined(parts: list[Prediction]) -> Prediction:
    """One Prediction of the images of ``parts`` (predictions of consecutive slices by one model)."""
    first = parts[0]
    return Prediction(
        scores=np.concatenate([p.scores for p in parts]),
        maps=[m for p in parts for m in p.maps],
        input_maps=[m for p in parts for m in p.input_maps],
        neighbours=np.concatenate([p.neighbours for p in parts]),
        names=[n for p in parts for n in p.names],
        image_threshold=first.image_threshold,
        pixel_threshold=first.pixel_threshold,
        train_names=first.train_names,
        sizes=[s for p in parts for s in p.sizes],
        state=first.state,
    )


def evaluate_category(
    category: Category,
    settings: SpadeSettings,
    protocol: str = "full",
    progress: Progress | None = None,
    keep_maps: bool = False,
    type_pixels: bool = False,
) -> Evaluation:
    """Fit on the category's good training images, predict its test set, compute the metrics.

    The test images are predicted ``settings.batch_size`` at a time (the batches one ``predict`` call
    over all of them would make, hence the same numbers) and each image's (mask, map) goes to a
    :class:`~spade_ad.metrics.PixelMetrics` and is dropped: memory does not grow with the test set,
    unless ``keep_maps`` asks to keep every map, mask and result (for :func:`spade_ad.delivery.report.write_report`).
    A test set without any mask file (a generic folder without masks) gets ``None`` pixel metrics.
    ``row["types"]`` has one row per defect type; ``type_pixels`` adds each type's pixel ROC-AUC and AUPRO
    (one more streaming accumulator per type, fed the good images too: about a fifth more time on bottle;
    ``benchmark`` and ``report`` ask for them).
    """
    settings = protocol_settings(settings, protocol)
    labels = [s.label for s in category.test]
    if not any(labels) or all(labels):
        raise SpadeError(f"{category.root}: the test set needs both good and defective images")
    with_masks = any(s.mask_path is not None for s in category.test)
    t0 = time.perf_counter()
    model = Spade(settings).fit([str(p) for p in category.train], progress=progress)
    fit_s = time.perf_counter() - t0
    paths = [str(s.path) for s in category.test]
    n = len(paths)
    step = max(1, settings.batch_size)
    parts: list[Prediction] = []
    scores: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    verdicts: list[str | None] = []
    tally = _Tally(category, with_masks, model.pixel_threshold_, type_pixels)
    pred_s = 0.0
    with tally:
        for a in range(0, n, step):
            t1 = time.perf_counter()
            part = model.predict(paths[a : a + step])
            pred_s += time.perf_counter() - t1
            scores.append(part.scores)
            for j, s in enumerate(category.test[a : a + step]):
                truth = load_truth(s, part.sizes[j])
                if protocol == "paper":
                    mask, amap = model.prep.mask_to_input(truth), part.input_maps[j]
                else:
                    mask, amap = truth, part.maps[j]
                flagged = part[j].mask  # the model's own mask (min_area, zone), in the protocol's frame
                if flagged is not None and protocol == "paper":
                    flagged = model.prep.mask_to_input(flagged)
                tally.add(s.defect_type, mask, amap, flagged)
                verdicts.append(part[j].verdict)
                if keep_maps:
                    masks.append(mask)
                    maps.append(amap)
            if keep_maps:
                parts.append(part)
            del part
            if progress:
                progress("predict", min(a + step, n), n)
        all_scores = np.concatenate(scores)
        row: dict[str, Any] = {
            "image_auroc": metrics.image_auroc(labels, all_scores),
            **tally.pixel_row(),
            **_at_threshold("image", labels, verdicts),
            "n_train": len(category.train),
            "n_test": n,
            "fit_seconds": round(fit_s, 3),
            "predict_seconds_per_image": round(pred_s / n, 4),
            "types": tally.type_rows(category, all_scores, verdicts),
        }
    ev = Evaluation(row, model, all_scores, paths, labels, protocol)
    if keep_maps:
        ev.pred, ev.masks, ev.maps = _joined(parts), masks, maps
    return ev


def _at_threshold(level: str, labels: list[int], verdicts: list[str | None]) -> dict[str, float | None]:
    """Precision, recall and F1 of the model's verdicts (``None`` without thresholds)."""
    keys = [f"{level}_precision", f"{level}_recall", f"{level}_f1"]
    if any(v is None for v in verdicts):
        return dict.fromkeys(keys)
    flagged = [1.0 if v == DEFECTIVE else 0.0 for v in verdicts]
    return dict(zip(keys, metrics.precision_recall_f1(labels, flagged, 0.5), strict=True))


class _Tally:
    """The pixel metrics of a category's test images, fed one image at a time: pixel ROC-AUC, AUPRO and AUPIMO
    over all, per defect type (with the good images), and the pixel counts at the pixel threshold (each image's
    mask as the model gives it, ``min_area`` and the zone applied, moved into the protocol's frame)."""

    def __init__(self, category: Category, with_masks: bool, pixel_threshold: float | None,
                 type_pixels: bool) -> None:
        self.with_masks, self.thr = with_masks, pixel_threshold
        types = sorted({s.defect_type for s in category.test if s.label})
        self.acc = metrics.PixelMetrics()
        self.type_pixels = type_pixels
        self.by_type = {t: metrics.PixelMetrics() for t in types} if with_masks and type_pixels and len(types) > 1 \
            else {}
        self.pimo = metrics.Aupimo()
        self.pimo_types: list[str] = []
        self.counts = {t: [0, 0, 0] for t in [*types, ""]}  # per type and in all ("") : TP, FP, FN pixels

    def __enter__(self) -> _Tally:
        return self

    def __exit__(self, *exc: object) -> None:
        self.acc.close()
        for a in self.by_type.values():
            a.close()

    def add(self, defect_type: str, mask: np.ndarray, amap: np.ndarray, flagged: np.ndarray | None) -> None:
        if not self.with_masks:
            return
        self.acc.add(mask, amap)
        for t, a in self.by_type.items():
            if defect_type in (t, GOOD):
                a.add(mask, amap)
        self.pimo.add(mask, amap)
        if mask.any():
            self.pimo_types.append(defect_type)
        if flagged is not None:
            tp = int(np.count_nonzero(flagged & mask))
            fp = int(np.count_nonzero(flagged & ~mask))
            fn = int(np.count_nonzero(~flagged & mask))
            for key in ("", defect_type) if defect_type != GOOD else ("",):
                c = self.counts[key]
                c[0], c[1], c[2] = c[0] + tp, c[1] + fp, c[2] + fn

    def pixel_row(self) -> dict[str, float | None]:
        """Pixel ROC-AUC, AUPRO, AUPIMO and precision, recall and F1 at the pixel threshold, over all images."""
        if not self.with_masks:
            return dict.fromkeys(("pixel_auroc", "aupro", "aupimo", "pixel_precision", "pixel_recall", "pixel_f1"))
        return {"pixel_auroc": self.acc.pixel_auroc(), "aupro": self.acc.aupro(), "aupimo": self.pimo.score(),
                **_pixel_prf(self.counts[""] if self.thr is not None else None)}

    def type_rows(self, category: Category, scores: np.ndarray, verdicts: list[str | None]) -> dict[str, Any]:
        """Per defect type, with the good test images: image ROC-AUC, the share of its images judged defective,
        and with masks pixel ROC-AUC, AUPRO, AUPIMO (its images' mean) and pixel recall at the threshold."""
        labels = np.array([s.label for s in category.test])
        kinds = [s.defect_type for s in category.test]
        per_image = self.pimo.per_image()
        rows: dict[str, Any] = {}
        for t in sorted(set(kinds) - {GOOD}):
            mine = np.array([k == t for k in kinds])
            keep = mine | (labels == 0)
            flagged = [verdicts[i] for i in np.flatnonzero(mine)]
            row: dict[str, Any] = {
                "n_test": int(mine.sum()),
                "image_auroc": metrics.image_auroc(labels[keep], scores[keep]),
                "image_recall": None if any(v is None for v in flagged) else float(np.mean(
                    [v == DEFECTIVE for v in flagged])),
            }
            if self.with_masks:
                acc = self.by_type.get(t, self.acc if len(self.counts) == 2 else None)  # one type: all images
                pimo = [p for p, k in zip(per_image, self.pimo_types, strict=True) if k == t]
                tp, _, fn = self.counts[t]
                row.update(pixel_auroc=acc.pixel_auroc() if acc else None, aupro=acc.aupro() if acc else None,
                           aupimo=float(np.mean(pimo)) if pimo and not np.isnan(pimo).any() else None,
                           pixel_recall=tp / (tp + fn) if self.thr is not None and tp + fn else None)
            rows[t] = row
        return rows


def _pixel_prf(counts: list[int] | None) -> dict[str, float | None]:
    keys = ("pixel_precision", "pixel_recall", "pixel_f1")
    if counts is None:
        return dict.fromkeys(keys)
    tp, fp, fn = counts
    return {"pixel_precision": tp / (tp + fp) if tp + fp else 0.0, "pixel_recall": tp / (tp + fn) if tp + fn else 0.0,
            "pixel_f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0}


def run_benchmark(
    data: str | Path,
    settings: SpadeSettings,
    protocol: str = "full",
    progress: Progress | None = None,
    layout: str = "auto",
) -> dict[str, Any]:
    """All categories under ``data`` (see :func:`spade_ad.data.load_categories` for ``layout``); returns the
    ``metrics.json`` document. No map is kept: memory does not grow with the test sets."""
    cats = load_categories(data, layout)
    settings = protocol_settings(settings, protocol)
    results: dict[str, Any] = {}
    for cat in cats:
        results[cat.name] = evaluate_category(cat, settings, protocol, progress, type_pixels=True).row
    mean: dict[str, float | None] = {}
    for k in METRIC_KEYS:  # over the categories where the metric is defined (pixel metrics need masks)
        values = [r[k] for r in results.values() if r[k] is not None]
        mean[k] = float(np.mean(values)) if values else None
    return {
        "categories": results,
        "mean": mean,
        "settings": {**settings.as_dict(), "protocol": protocol},
        "layout": resolve_layout(data, layout),
        "machine": machine_description(),
        "package_version": __version__,
    }

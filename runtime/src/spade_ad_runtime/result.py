"""What a prediction means: one result per image, and the one verdict rule.

Both packages' results are :class:`ImageResult` (spade-ad's ``Prediction`` yields them, the runtime's
``Detector.predict`` returns them): the command lines, the report and the inspector all read it, and
nothing else computes a verdict, a normalised score, a mask or a ``predictions.jsonl`` row's numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFECTIVE, GOOD = "defective", "good"


def verdict(score: float, threshold: float | None) -> str | None:
    """``defective`` when ``score >= threshold``, else ``good``; ``None`` without a threshold.

    Fails closed: a score that is not a finite number (NaN, inf) is ``defective``, never ``good``.
    """
    if threshold is None:
        return None
    if not math.isfinite(score) or score >= threshold:
        return DEFECTIVE
    return GOOD


def normalised(value: float, threshold: float | None) -> float | None:
    """``value / threshold`` (1.0 = at the threshold), ``None`` without a positive threshold."""
    return value / threshold if threshold else None


@dataclass(frozen=True)
class ImageResult:
    """The prediction for one image.

    Attributes:
        name: the image's file path (or ``array[i]``).
        score: image anomaly score under the model's ``image_score`` rule (:func:`spade_ad.retrieval.image_scores`):
            the mean distance to the ``k_image`` nearest training images (``knn``, the paper's), the map's
            maximum (``max``), or both divided by their calibration medians and added (``combined``).
        map: float32 anomaly map at the image's own resolution (0 outside a ``paper`` crop).
        input_map: the same map in the network's input frame (``image_size`` square).
        neighbours: indices of the retrieved training images (the gallery), nearest first.
        neighbour_names: their names as given to ``fit``.
        image_threshold / pixel_threshold: the thresholds in force (calibrated, or given to ``predict``).
    """

    name: str
    score: float
    map: np.ndarray
    input_map: np.ndarray
    neighbours: tuple[int, ...]
    neighbour_names: tuple[str, ...]
    image_threshold: float | None
    pixel_threshold: float | None

    @property
    def normalised_score(self) -> float | None:
        """Score / image threshold (1.0 = at the threshold)."""
        return normalised(self.score, self.image_threshold)

    @property
    def verdict(self) -> str | None:
        """``defective``, ``good``, or ``None`` without a threshold (see :func:`verdict`)."""
        return verdict(self.score, self.image_threshold)

    @property
    def mask(self) -> np.ndarray | None:
        """Predicted defect pixels (map >= pixel threshold), ``None`` without a threshold."""
        return None if self.pixel_threshold is None else self.map >= self.pixel_threshold

    @property
    def max_pixel_score(self) -> float:
        return float(self.map.max())

    def summary(self) -> dict[str, Any]:
        """The JSON-ready numbers of this result (one ``predictions.jsonl`` row, less the file names)."""
        mask = self.mask
        return {
            "score": self.score,
            "score_normalised": self.normalised_score,
            "verdict": self.verdict,
            "max_pixel_score": self.max_pixel_score,
            "max_pixel_score_normalised": normalised(self.max_pixel_score, self.pixel_threshold),
            "defect_pixels": None if mask is None else int(mask.sum()),
            "defect_fraction": None if mask is None else float(mask.mean()),
            "neighbours": list(self.neighbour_names),
        }


__all__ = ["ImageResult", "verdict", "normalised", "DEFECTIVE", "GOOD"]

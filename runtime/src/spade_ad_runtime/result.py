"""What a prediction means: one result per image, and the one verdict rule.

Both packages' results are :class:`ImageResult` (spade-ad's ``Prediction`` yields them, the runtime's
``Detector.predict`` returns them): the command lines, the report and the inspector all read it, and
nothing else computes a verdict, a normalised score, a mask or a ``predictions.jsonl`` row's numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .errors import SpadeError
from .regions import Region, find_regions

DEFECTIVE, GOOD = "defective", "good"
VERDICT_RULES = ("score", "regions")  # the ``verdict_rule`` setting's choices; see ImageResult.verdict
MIN_AREA_HELP = ("defect regions (8-connected components of the mask) of fewer pixels of the image are dropped from "
                 "the mask and the regions; 0: keep all")


def verdict(score: float, threshold: float | None) -> str | None:
    """``defective`` when ``score >= threshold``, else ``good``; ``None`` without a threshold.

    Fails closed: a score that is not a finite number (NaN, inf) is ``defective``, never ``good``.
    """
    if threshold is None:
        return None
    if not math.isfinite(score) or score >= threshold:
        return DEFECTIVE
    return GOOD


def check_min_area(value: Any, name: str = "min_area") -> int:
    """``value`` as a region area in pixels (a whole number >= 0), or one line naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise SpadeError(f"{name} must be a whole number of pixels >= 0, got {value!r}")
    return int(value)


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
        min_area: defect regions of fewer pixels are dropped from the mask and the regions (0 or 1: none).
        verdict_rule: ``score`` (defective when the score reaches the image threshold, :func:`verdict`) or
            ``regions`` (defective when at least one defect region survives ``min_area``).
    """

    name: str
    score: float
    map: np.ndarray
    input_map: np.ndarray
    neighbours: tuple[int, ...]
    neighbour_names: tuple[str, ...]
    image_threshold: float | None
    pixel_threshold: float | None
    min_area: int = 0
    verdict_rule: str = "score"

    @property
    def normalised_score(self) -> float | None:
        """Score / image threshold (1.0 = at the threshold)."""
        return normalised(self.score, self.image_threshold)

    @property
    def verdict(self) -> str | None:
        """``defective``, ``good``, or ``None`` without the threshold the rule needs.

        ``score`` rule: :func:`verdict` of the score and the image threshold. ``regions`` rule: defective when
        a defect region survives (``min_area``); fails closed like the score rule (a score or map that is not
        finite is ``defective``).
        """
        if self.verdict_rule == "score":
            return verdict(self.score, self.image_threshold)
        if self.pixel_threshold is None:
            return None
        if self.regions or not math.isfinite(self.score) or not np.isfinite(self.max_pixel_score):
            return DEFECTIVE
        return GOOD

    @cached_property
    def _found(self) -> tuple[np.ndarray, list[Region]] | None:
        if self.pixel_threshold is None:
            return None
        return find_regions(self.map, self.pixel_threshold, self.min_area)

    @property
    def mask(self) -> np.ndarray | None:
        """Predicted defect pixels (map >= pixel threshold, less regions under ``min_area``), ``None`` without
        a threshold."""
        return None if self._found is None else self._found[0]

    @property
    def regions(self) -> list[Region] | None:
        """The mask's 8-connected components, largest first (:func:`~spade_ad_runtime.regions.find_regions`),
        ``None`` without a threshold."""
        return None if self._found is None else self._found[1]

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
            "regions": None if self.regions is None else [r.as_dict() for r in self.regions],
            "neighbours": list(self.neighbour_names),
        }


__all__ = ["ImageResult", "Region", "verdict", "normalised", "DEFECTIVE", "GOOD", "VERDICT_RULES",
           "MIN_AREA_HELP", "check_min_area"]

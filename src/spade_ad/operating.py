"""Operating points: where a model's thresholds sit, chosen by a rule, and what each choice costs.

Two rules, recorded in the model's calibration as ``operating_point`` and applied again after every change
of the model (``update``, a new zone), so a chosen operating point stays chosen:

* ``false_alarm_rate`` F (the default, from good images alone, :func:`spade_ad.calibration.good_threshold`):
  both thresholds at the ``1 - F`` quantile of the leave-one-out good images' image scores and map maxima.
* ``recall`` R (needs known defects, :mod:`spade_ad.defects`): the image threshold is the highest at which at
  least a fraction R of the defective images score at or over it; with their masks, the pixel threshold is
  the highest at which at least R of their defect pixels are flagged (without masks it keeps the good-image
  rule).

What a choice costs (:func:`costs`): the false-alarm rate on the good calibration images (image level:
score at or over the image threshold; pixel level: any pixel flagged, i.e. map maximum at or over the pixel
threshold) and the recall on the known defects (image level; pixel level: defect pixels flagged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .calibration import good_threshold
from .errors import SpadeError
from .settings import OPERATING_RULES as RULES
from .settings import check_operating_point as check_rule


@dataclass(frozen=True)
class Evidence:
    """The known defects as the model scores them: image scores and the map values of their defect pixels
    (``None``: no defect has a mask)."""

    names: tuple[str, ...]
    scores: np.ndarray
    pixels: np.ndarray | None


def recall_threshold(values: np.ndarray, recall: float) -> float:
    """The highest threshold t with ``mean(values >= t) >= recall``: the ``ceil(recall * n)``-th largest value."""
    v = np.sort(np.asarray(values, np.float64))[::-1]
    if len(v) == 0:
        raise SpadeError("a target recall needs at least one defective image")
    k = max(1, math.ceil(recall * len(v) - 1e-9))
    return float(v[k - 1])


def thresholds(calibration: dict[str, Any], rule: str, value: float, evidence: Evidence | None,
               false_alarm_rate: float) -> tuple[float, float]:
    """(image, pixel) thresholds under ``rule`` with ``value``; ``false_alarm_rate``: the good-image rule's
    rate where the recall rule has nothing to go on (the pixel threshold without masks)."""
    check_rule(rule, value)
    good_scores, good_maxima = calibration.get("image_scores"), calibration.get("map_maxima")
    if not good_scores or not good_maxima:
        raise SpadeError("this model has no calibration scores (fewer than two training images): no thresholds "
                         "to set")
    if rule == "false_alarm_rate":
        return good_threshold(good_scores, value), good_threshold(good_maxima, value)
    if evidence is None or len(evidence.scores) == 0:
        raise SpadeError("--target-recall needs defective images: give --defects DIR (or store some first)")
    image = recall_threshold(evidence.scores, value)
    pixel = (recall_threshold(evidence.pixels, value) if evidence.pixels is not None and len(evidence.pixels)
             else good_threshold(good_maxima, false_alarm_rate))
    if not (image > 0 and pixel > 0):
        raise SpadeError(f"a recall of {value:g} needs a threshold of 0 (defects the model scores 0): nothing would "
                         "be judged good; choose a lower --target-recall")
    return image, pixel


def costs(calibration: dict[str, Any], image_threshold: float | None, pixel_threshold: float | None,
          evidence: Evidence | None) -> dict[str, float | None]:
    """What thresholds cost: false-alarm rates on the good calibration images, recalls on the known defects
    (``None`` where there is nothing to measure on)."""

    def share(values: Any, t: float | None) -> float | None:
        if t is None or values is None or len(values) == 0:
            return None
        return float(np.mean(np.asarray(values, np.float64) >= t))

    ev = evidence
    return {
        "image_threshold": image_threshold,
        "image_false_alarm_rate": share(calibration.get("image_scores"), image_threshold),
        "image_recall": share(None if ev is None else ev.scores, image_threshold),
        "pixel_threshold": pixel_threshold,
        "pixel_false_alarm_rate": share(calibration.get("map_maxima"), pixel_threshold),
        "pixel_recall": share(None if ev is None else ev.pixels, pixel_threshold),
    }


__all__ = ["Evidence", "RULES", "recall_threshold", "thresholds", "costs", "check_rule"]

"""Drift: is what the line shows now still what the model calls normal?

A :class:`DriftMonitor` keeps a rolling window of a model's most recent image scores (``window`` images) and
compares them with the model's own calibration:

* **The share judged defective.** On a line making good parts, about ``false_alarm_rate`` of them are
  flagged (the thresholds were set so). The expected band is the central 99% of Binomial(n, rate) / n; a
  one-sided binomial test gives the chance of flagging at least as many if nothing changed. A share above
  the band means drift (lighting, wear, soiling: good parts scoring higher) or a real run of defects.
* **Where the good scores sit.** The images judged good are compared with the calibration images' scores
  under the image threshold (what good images scored when the model was calibrated): their mean
  percentile there (0.5 when nothing changed) and a one-sided Mann-Whitney test that they score higher.

``status`` is ``warming up`` (fewer than ``MIN_IMAGES`` in the window), ``drift`` (either test below
``ALPHA``) or ``ok``; with drift, ``advice`` says what to do (look at the flagged images; if they are good,
``spade-ad update MODEL --add`` some recent good images).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np
from scipy import stats

WINDOW = 500  # recent images kept
MIN_IMAGES = 30  # fewer: no verdict on drift yet
ALPHA = 0.01  # a test below this is drift


class DriftMonitor:
    """The rolling window of one model's recent scores and verdicts, and its health.

    ``reference``: the calibration images' scores that the model's verdict rule judges good (what good images
    scored when it was calibrated); ``rate``: the share of good images it is expected to flag; ``active``:
    False for a model without thresholds (no verdicts, no verdict on drift). Thread-safe.
    """

    def __init__(self, reference: list[float] | None, rate: float, window: int = WINDOW, active: bool = True) -> None:
        self.rate, self.active = rate, active
        self.reference = np.sort(np.asarray(reference or [], np.float64))
        self.recent: deque[tuple[float, bool]] = deque(maxlen=window)
        self.lock = threading.Lock()

    def add(self, score: float, verdict: str | None) -> None:
        """One scored image (its verdict ``None``: the model has no thresholds; ignored)."""
        if verdict is not None and np.isfinite(score):
            with self.lock:
                self.recent.append((float(score), verdict == "defective"))

    def health(self) -> dict[str, Any]:
        """The window's numbers, the tests and the status (see the module docstring)."""
        with self.lock:
            recent = list(self.recent)
        n = len(recent)
        flagged = sum(d for _, d in recent)
        good = np.array([s for s, d in recent if not d], np.float64)
        out: dict[str, Any] = {"images": n, "defective": flagged, "defective_share": flagged / n if n else None,
                               "false_alarm_rate": self.rate, "expected_band": None, "binomial_p": None,
                               "good_score_percentile": None, "mannwhitney_p": None}
        if not self.active:
            return {**out, "status": "no thresholds", "advice": None}
        if n:
            lo, hi = stats.binom.ppf([0.005, 0.995], n, self.rate) / n
            out.update(expected_band=[float(lo), float(hi)],
                       binomial_p=float(stats.binomtest(flagged, n, self.rate, alternative="greater").pvalue))
        if len(good) and len(self.reference):
            ranks = np.searchsorted(self.reference, good, side="right") / len(self.reference)
            out["good_score_percentile"] = float(ranks.mean())
            out["mannwhitney_p"] = float(stats.mannwhitneyu(good, self.reference, alternative="greater").pvalue)
        if n < MIN_IMAGES:
            return {**out, "status": "warming up", "advice": None}
        drift = any(p is not None and p < ALPHA for p in (out["binomial_p"], out["mannwhitney_p"]))
        advice = ("recent images score higher than the model's good images did: look at the flagged ones; if "
                  "they are good, add some recent good images (spade-ad update MODEL --add ...)") if drift else None
        return {**out, "status": "drift" if drift else "ok", "advice": advice}


def health_line(h: dict[str, Any]) -> str:
    """One line for people: the status, the share flagged against its band, where the good scores sit."""
    if not h.get("images"):
        return "health: no images scored yet"
    share = h["defective_share"]
    band = h.get("expected_band")
    text = f"health {h['status']}: {h['images']} recent image(s), {share:.1%} flagged defective"
    if band:
        text += f" (expected at most {band[1]:.1%} of good parts, false-alarm rate {h['false_alarm_rate']:g})"
    if h.get("good_score_percentile") is not None:
        text += f"; good-judged scores at the {h['good_score_percentile']:.0%} point of the calibration's"
    return text + (f"; {h['advice']}" if h.get("advice") else "")


def monitor_for(model: Any) -> DriftMonitor:
    """A monitor of a fitted :class:`~spade_ad.Spade`: its calibration images judged by its verdict rule (the
    ``regions`` rule by their map maxima against the pixel threshold: any flagged pixel), the good ones as the
    reference, and as the expected rate the larger of its ``false_alarm_rate`` and the share of calibration
    images its thresholds flag (a threshold chosen for a recall, or a small calibration set, flags more)."""
    calib = model.calibration_ or {}
    scores, maxima = calib.get("image_scores") or [], calib.get("map_maxima") or []
    regions = model.settings.verdict_rule == "regions"
    threshold = model.pixel_threshold_ if regions else model.image_threshold_
    if threshold is None or not scores:
        return DriftMonitor(None, float(model.settings.false_alarm_rate), active=threshold is not None)
    flagged = [v >= threshold for v in (maxima if regions else scores)]
    rate = max(float(model.settings.false_alarm_rate), float(np.mean(flagged)))
    return DriftMonitor([x for x, f in zip(scores, flagged, strict=True) if not f], min(rate, 0.999))


__all__ = ["DriftMonitor", "health_line", "monitor_for", "WINDOW", "MIN_IMAGES", "ALPHA"]

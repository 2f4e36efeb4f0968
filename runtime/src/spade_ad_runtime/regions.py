"""Defect regions: the 8-connected components of a prediction's mask, each with its box, area and scores.

Labelling works on runs (maximal horizontal stretches of mask pixels): a run touches a run of the row
above when their column ranges, widened by one pixel, overlap (8-connectivity), and the touching runs are
joined with a union-find. The mask's pixels in row-major order are its runs one after the other, so each
pixel's component comes from its run's with one ``np.repeat``; the per-region numbers are bincounts over
them. Cost: one pass over the mask plus work proportional to the number of runs (a smoothed anomaly map
has few), with numpy only (the runtime has no scipy); tests hold it to ``scipy.ndimage.label`` and to a
flood fill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Region:
    """One defect region (an 8-connected component of the mask, at the image's own resolution).

    Attributes:
        box: ``(x, y, width, height)`` of its bounding box, in pixels of the image.
        area: its pixels.
        peak: the highest map value in it; ``peak_at`` its ``(x, y)`` (the first in row-major order on a tie).
        mean: the mean map value over its pixels.
        peak_normalised: ``peak / pixel threshold`` (1.0 = at the threshold).
    """

    box: tuple[int, int, int, int]
    area: int
    peak: float
    peak_at: tuple[int, int]
    mean: float
    peak_normalised: float | None

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready form (an entry of a ``predictions.jsonl`` row's ``regions``)."""
        return {"box": list(self.box), "area": self.area, "peak": self.peak, "peak_at": list(self.peak_at),
                "mean": self.mean, "peak_normalised": self.peak_normalised}


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each run's row, first column and end column (exclusive), in row-major order."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # the same rows, in the same order: each run starts before it ends
    return rows, starts, ends


def _find(parent: list[int], a: int) -> int:
    while parent[a] != a:
        parent[a] = parent[parent[a]]  # path halving
        a = parent[a]
    return a


def _run_components(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """The component (0..n-1, numbered in order of first appearance) of each run."""
    n = len(rows)
    if n == 0:
        return np.zeros(0, np.int64)
    stride = width + 2
    start_key = rows * stride + starts
    end_key = rows * stride + ends
    # the runs of the row above that touch run b: end >= start_b and start <= end_b (touching diagonally included)
    above = rows - 1
    lo = np.searchsorted(end_key, above * stride + starts, side="left")
    hi = np.searchsorted(start_key, above * stride + ends, side="right")
    # keep only runs of the row above (the keys of other rows fall outside that row's key range)
    lo = np.maximum(lo, np.searchsorted(rows, above, side="left"))
    hi = np.minimum(hi, np.searchsorted(rows, above, side="right"))
    counts = np.maximum(hi - lo, 0)
    b = np.repeat(np.arange(n), counts)
    a = np.repeat(lo, counts) + (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))
    parent = list(range(n))
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = _find(parent, x), _find(parent, y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    roots = np.array([_find(parent, i) for i in range(n)], np.int64)
    _, first, comp = np.unique(roots, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # number components by their first run
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return np.asarray(rank[comp.reshape(-1)], np.int64)


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labelling of a 2-D bool mask: ``(labels, n)``, labels 1..n numbered in row-major order
    of each component's first pixel and 0 off the mask (``scipy.ndimage.label`` with a 3x3 structure)."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    rows, starts, ends = _runs(mask)
    comp = _run_components(rows, starts, ends, mask.shape[1])
    labels = np.zeros(mask.shape, np.int32)
    labels.reshape(-1)[np.flatnonzero(mask)] = np.repeat(comp + 1, ends - starts)
    return labels, int(comp.max()) + 1 if len(comp) else 0


def find_regions(amap: np.ndarray, threshold: float, min_area: int = 0) -> tuple[np.ndarray, list[Region]]:
    """The mask (``amap >= threshold``, less the components under ``min_area`` pixels) and its regions,
    largest first (then highest peak, then first in row-major order)."""
    amap = np.asarray(amap)
    mask = amap >= threshold
    rows, starts, ends = _runs(mask)
    comp = _run_components(rows, starts, ends, mask.shape[1])
    if len(comp) == 0:
        return mask, []
    lengths = ends - starts
    n = int(comp.max()) + 1
    flat = np.flatnonzero(mask)
    pix = np.repeat(comp, lengths)
    values = amap.reshape(-1)[flat].astype(np.float64)
    area = np.bincount(pix, minlength=n)
    if min_area > 1 and (small := area < min_area).any():
        mask = mask.copy()
        mask.reshape(-1)[flat[small[pix]]] = False
    total = np.bincount(pix, weights=values, minlength=n)
    by = np.lexsort((-values, pix))  # per component, highest value first (stable: the first pixel on a tie)
    first = np.searchsorted(pix[by], np.arange(n))
    peak_pixel = flat[by[first]]
    w = mask.shape[1]
    x0 = np.full(n, w, np.int64)
    np.minimum.at(x0, comp, starts)
    x1 = np.zeros(n, np.int64)
    np.maximum.at(x1, comp, ends)
    y0 = np.full(n, mask.shape[0], np.int64)
    np.minimum.at(y0, comp, rows)
    y1 = np.zeros(n, np.int64)
    np.maximum.at(y1, comp, rows + 1)
    regions = []
    for c in range(n):
        if area[c] < min_area:
            continue
        peak = float(amap.reshape(-1)[peak_pixel[c]])
        regions.append(Region(
            box=(int(x0[c]), int(y0[c]), int(x1[c] - x0[c]), int(y1[c] - y0[c])), area=int(area[c]), peak=peak,
            peak_at=(int(peak_pixel[c] % w), int(peak_pixel[c] // w)), mean=float(total[c] / area[c]),
            peak_normalised=float(peak / threshold) if threshold else None))
    regions.sort(key=lambda r: (-r.area, -r.peak))  # stable: components are in row-major order
    return mask, regions


__all__ = ["Region", "label", "find_regions"]

"""Defect regions and the region verdict rule, held to a flood fill (no scipy here: the runtime's tests run
without it; ``tests/test_regions.py`` holds them to ``scipy.ndimage.label`` as well)."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from spade_ad_runtime.errors import SpadeError
from spade_ad_runtime.regions import find_regions, label
from spade_ad_runtime.result import ImageResult, check_min_area


def _flood(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Brute force: 8-connected flood fill from each unlabelled pixel in row-major order."""
    labels = np.zeros(mask.shape, np.int32)
    n = 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        todo = deque([(y0, x0)])
        while todo:
            y, x = todo.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < h and 0 <= u < w and mask[v, u] and not labels[v, u]:
                        labels[v, u] = n
                        todo.append((v, u))
    return labels, n


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = [np.zeros((0, 5), bool), np.zeros((4, 0), bool), np.zeros((3, 4), bool), np.ones((3, 4), bool),
           np.eye(6, dtype=bool), np.eye(6, dtype=bool)[::-1], np.ones((1, 9), bool), np.ones((9, 1), bool)]
    spiral = np.zeros((15, 15), bool)  # one long snake: many runs joined through many rows
    for i in range(0, 8, 2):
        spiral[i, i:15 - i] = spiral[i:15 - i, 14 - i] = spiral[14 - i, i:15 - i] = True
        spiral[i + 2:15 - i, i] = True
    out.append(spiral)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 25, 2))
        out.append(rng.random((h, w)) < rng.random())
    return out


def test_labels_are_a_flood_fills() -> None:
    for mask in _masks():
        got, n = label(mask)
        want, m = _flood(mask)
        assert n == m and np.array_equal(got, want), mask.astype(int)


def test_region_numbers_are_the_components_numbers() -> None:
    rng = np.random.default_rng(3)
    for mask in _masks()[8:80]:
        amap = rng.random(mask.shape).astype(np.float32)
        amap[~mask] = 0.0
        thr = float(amap[mask].min()) if mask.any() else 0.5
        for min_area in (0, 3):
            kept, regions = find_regions(amap, thr, min_area)
            labels, n = _flood(amap >= thr)
            want = []
            for c in range(1, n + 1):
                ys, xs = np.nonzero(labels == c)
                if len(ys) < min_area:
                    continue
                vals = amap[ys, xs]
                top = int(np.argmax(vals))  # the first in row-major order on a tie
                box = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
                want.append((box, len(ys), float(vals.max()), (int(xs[top]), int(ys[top])),
                             float(vals.astype(np.float64).mean())))
            want.sort(key=lambda r: (-r[1], -r[2]))
            got = [(r.box, r.area, r.peak, r.peak_at, r.mean) for r in regions]
            assert [g[:4] for g in got] == [w[:4] for w in want]
            assert np.allclose([g[4] for g in got], [w[4] for w in want], rtol=1e-12, atol=0)
            small = np.isin(labels, [c for c in range(1, n + 1) if (labels == c).sum() < min_area])
            assert np.array_equal(kept, (amap >= thr) & ~small)
            assert all(r.peak_normalised == pytest.approx(r.peak / thr) for r in regions)


def _result(amap: np.ndarray, score: float, min_area: int = 0, rule: str = "score",
            pthr: float | None = 1.0) -> ImageResult:
    return ImageResult("x", score, amap, amap, (0,), ("t",), 10.0, pthr, min_area, rule)


def test_the_regions_rule_judges_by_the_regions_that_survive() -> None:
    amap = np.zeros((20, 20), np.float32)
    amap[2:4, 2:4] = 3.0  # 4 pixels
    amap[10:15, 10:15] = 2.0  # 25 pixels
    r = _result(amap, 1.0, 5, "regions")
    assert r.verdict == "defective" and [g.area for g in r.regions or []] == [25]
    assert r.mask is not None and int(r.mask.sum()) == 25 and r.summary()["defect_pixels"] == 25
    assert r.summary()["regions"] == [{"box": [10, 10, 5, 5], "area": 25, "peak": 2.0, "peak_at": [10, 10],
                                       "mean": 2.0, "peak_normalised": 2.0}]
    assert _result(amap, 1.0, 26, "regions").verdict == "good"  # both too small: no region, the image is good
    assert _result(amap, 1.0, 26, "score").verdict == "good" and _result(amap, 11.0, 26, "score").verdict == "defective"
    assert _result(amap, float("nan"), 26, "regions").verdict == "defective"  # fails closed
    nan_map = amap.copy()
    nan_map[0, 0] = np.nan
    assert _result(nan_map, 1.0, 26, "regions").verdict == "defective"
    none = _result(amap, 1.0, 0, "regions", None)
    assert none.verdict is None and none.regions is None and none.summary()["regions"] is None


def test_min_area_is_a_whole_number_of_pixels() -> None:
    assert check_min_area(0) == 0 and check_min_area(np.int64(7)) == 7
    for bad in (-1, 2.5, True, "3", None):
        with pytest.raises(SpadeError, match="--min-area must be a whole number of pixels >= 0"):
            check_min_area(bad, "--min-area")


def test_a_zone_scales_fills_and_clears() -> None:
    from spade_ad_runtime.zone import FILL, Zone

    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    zone = Zone(mask)
    big = zone.at(8, 12)  # nearest neighbour: each zone pixel becomes a 2 x 2 block
    assert np.array_equal(big, np.repeat(np.repeat(mask, 2, 0), 2, 1)) and zone.at(8, 12) is big
    assert zone.at(4, 6) is zone.mask and zone.at(81, 120).shape == (81, 120)  # within the aspect tolerance
    img = np.full((8, 12, 3), 7, np.uint8)
    filled = zone.fill_outside(img)
    assert (filled[big] == 7).all() and (filled[~big] == FILL).all() and (img == 7).all()
    amap = np.ones((8, 12), np.float32)
    cleared = zone.clear_outside(amap)
    assert cleared.dtype == np.float32 and np.array_equal(cleared, big.astype(np.float32))
    with pytest.raises(SpadeError, match=r"^part.png: its aspect ratio \(12x12\) does not match the inspection "
                                         r"zone's \(6x4\)$"):
        zone.at(12, 12, "part.png")
    for bad, message in ((np.zeros((4, 6), bool), "all black"), (np.ones((2, 2, 3), bool), "2-D"),
                         (np.ones((3, 3), np.float32), "2-D")):
        with pytest.raises(SpadeError, match=message):
            Zone(bad)

"""Tests for spade_ad.metrics with closed-form and brute-force expectations."""

from __future__ import annotations

import gc
import os
import tempfile
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from spade_ad.metrics import (
    PixelMetrics,
    aupro,
    best_f1_threshold,
    image_auroc,
    pixel_auroc,
    precision_recall_f1,
    pro_curve,
)

# --------------------------------------------------------------------------- frozen reference
# The in-memory implementation of pixel_auroc / pro_curve / aupro before PixelMetrics (commit 24fc7cd),
# copied verbatim (names prefixed with _old): the streaming code must agree with it.


def _old_fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def _old_validated_pairs(
    masks: Sequence[npt.ArrayLike], maps: Sequence[npt.ArrayLike]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return (mask, map) arrays per image after checking counts, dimensionality and shapes."""
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} anomaly maps")
    if len(masks) == 0:
        raise ValueError("no images given")
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for i, (m, a) in enumerate(zip(masks, maps, strict=True)):
        mask = np.asarray(m)
        amap = np.asarray(a)
        if mask.ndim != 2:
            raise ValueError(f"image {i}: mask must be 2-D, got shape {_old_fmt_shape(mask.shape)}")
        if amap.shape != mask.shape:
            raise ValueError(
                f"image {i}: anomaly map shape {_old_fmt_shape(amap.shape)} "
                f"does not match mask shape {_old_fmt_shape(mask.shape)}"
            )
        pairs.append((mask, amap))
    return pairs


def _old_check_finite(scores: np.ndarray) -> None:
    if not np.isfinite(scores).all():
        raise ValueError("anomaly maps contain NaN or infinite values")


def _old_sort_desc_run_ends(scores: np.ndarray) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Descending sort order of ``scores`` and the last sorted index of each run of tied scores."""
    order = np.argsort(scores)[::-1]
    s_sorted = scores[order]
    ends = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])
    ends = np.append(ends, s_sorted.size - 1)
    return order, ends


def _old_pixel_auroc(masks: Sequence[npt.ArrayLike], maps: Sequence[npt.ArrayLike]) -> float:
    """Pixel-level ROC-AUC over all pixels of all images pooled together (exact, memory-lean)."""
    pairs = _old_validated_pairs(masks, maps)
    n = sum(mask.size for mask, _ in pairs)
    y = np.empty(n, dtype=bool)
    s = np.empty(n, dtype=np.float32)
    pos = 0
    for mask, amap in pairs:
        k = mask.size
        np.not_equal(mask.ravel(), 0, out=y[pos : pos + k])
        s[pos : pos + k] = amap.ravel()
        pos += k
    _old_check_finite(s)
    n_pos = int(np.count_nonzero(y))
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("pixel_auroc needs both defect and defect-free pixels; only one class present")
    # Exact trapezoidal ROC-AUC (same value as sklearn's roc_auc_score) with far less memory:
    # integer TP/FP counts at the end of each run of tied scores, area accumulated in int64.
    order, ends = _old_sort_desc_run_ends(s)
    del s
    count_dtype = np.int32 if n < 2**31 else np.int64
    tp = np.cumsum(y[order], dtype=count_dtype)[ends].astype(np.int64)
    del order, y
    fp = ends.astype(np.int64) + 1 - tp
    tp = np.concatenate(([0], tp))
    fp = np.concatenate(([0], fp))
    twice_area = int(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))
    return twice_area / (2.0 * n_pos * n_neg)


def _old_pro_curve(
    masks: Sequence[npt.ArrayLike], maps: Sequence[npt.ArrayLike]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Exact per-region-overlap curve ``(fpr, pro, thresholds)`` at every distinct score.

    Components are 8-connected regions of each mask. ``PRO(t)`` is the mean over all components of
    the fraction of their pixels with score ``>= t``; ``FPR(t)`` the fraction of defect-free pixels
    with score ``>= t``. Thresholds decrease; the first point is ``(0, 0)`` with threshold ``+inf``.
    """
    pairs = _old_validated_pairs(masks, maps)
    n = sum(mask.size for mask, _ in pairs)
    scores = np.empty(n, dtype=np.float32)
    comp = np.empty(n, dtype=np.int32)  # 0 = defect-free, k > 0 = global component id
    sizes_parts: list[npt.NDArray[np.int64]] = []
    n_comp = 0
    pos = 0
    for mask, amap in pairs:
        k = mask.size
        lab, n_lab = ndimage.label(mask != 0, structure=np.ones((3, 3), dtype=bool))
        flat = lab.ravel()
        if n_lab:
            sizes_parts.append(np.bincount(flat, minlength=n_lab + 1)[1:].astype(np.int64))
            flat = np.where(flat > 0, flat + n_comp, 0)
        comp[pos : pos + k] = flat
        scores[pos : pos + k] = amap.ravel()
        n_comp += n_lab
        pos += k
    _old_check_finite(scores)
    if n_comp == 0:
        raise ValueError("masks contain no defect pixels; AUPRO is undefined")
    sizes = np.concatenate(sizes_parts)
    n_normal = n - int(sizes.sum())
    if n_normal == 0:
        raise ValueError("masks contain no defect-free pixels; AUPRO is undefined")

    weights = np.zeros(n_comp + 1, dtype=np.float64)
    weights[1:] = 1.0 / (n_comp * sizes.astype(np.float64))

    order, ends = _old_sort_desc_run_ends(scores)
    thresholds = scores[order[ends]].astype(np.float64)
    del scores
    comp_sorted = comp[order]
    del order, comp

    pro_w = weights[comp_sorted]
    np.cumsum(pro_w, out=pro_w)
    pro = pro_w[ends]
    del pro_w
    count_dtype = np.int32 if n < 2**31 else np.int64
    normal_cum = np.cumsum(comp_sorted == 0, dtype=count_dtype)
    fpr = normal_cum[ends].astype(np.float64) / n_normal
    del normal_cum, comp_sorted

    pro = np.minimum(pro, 1.0)
    pro[-1] = 1.0  # the lowest threshold covers every pixel; remove accumulated rounding
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))
    thresholds = np.concatenate(([np.inf], thresholds))
    return fpr, pro, thresholds


def _old_partial_area(fpr: npt.NDArray[np.float64], pro: npt.NDArray[np.float64], max_fpr: float) -> float:
    """Trapezoid area under (fpr, pro) on [0, max_fpr], interpolating at max_fpr, normalised by max_fpr."""
    i = int(np.searchsorted(fpr, max_fpr, side="right"))  # fpr[i-1] <= max_fpr < fpr[i]
    if i >= fpr.size:
        x, y = fpr, pro
    else:
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        x = np.append(fpr[:i], max_fpr)
        y = np.append(pro[:i], y_cut)
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)
    return min(max(area / max_fpr, 0.0), 1.0)


def _old_aupro(masks: Sequence[npt.ArrayLike], maps: Sequence[npt.ArrayLike], max_fpr: float = 0.3) -> float:
    """Exact normalised area under the PRO curve for FPR in [0, max_fpr] (see :func:`pro_curve`)."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, pro, _ = _old_pro_curve(masks, maps)
    return _old_partial_area(fpr, pro, max_fpr)


# --------------------------------------------------------------------------- brute-force reference


def _reference_aupro(masks: list[np.ndarray], maps: list[np.ndarray], max_fpr: float) -> float:
    """Literal AUPRO: loop over every distinct threshold and every component."""
    components: list[tuple[int, np.ndarray]] = []  # (image index, boolean component mask)
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask.astype(bool), structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            components.append((i, lab == k))
    normal_scores = np.concatenate([m[~k.astype(bool)] for m, k in zip(maps, masks, strict=True)])
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    xs, ys = [0.0], [0.0]
    for t in thresholds:
        fracs = [float(np.mean(maps[i][c] >= t)) for i, c in components]
        ys.append(sum(fracs) / len(fracs))
        xs.append(float(np.mean(normal_scores >= t)))
    # trapezoid on [0, max_fpr] with linear interpolation at max_fpr
    area = 0.0
    for j in range(1, len(xs)):
        x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2.0
    return area / max_fpr


def _two_component_case() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """8x8 image: component A = 1 pixel (score 10), component B = 3 pixels (score 1).

    60 normal pixels: 12 have score 2, 48 have score 0.
    """
    mask = np.zeros((8, 8), dtype=bool)
    mask[0, 0] = True  # A
    mask[5, 4:7] = True  # B (3 pixels, far from A)
    amap = np.zeros((8, 8), dtype=np.float32)
    amap[0, 0] = 10.0
    amap[5, 4:7] = 1.0
    normal_idx = np.flatnonzero(~mask.ravel())
    amap.ravel()[normal_idx[:12]] = 2.0
    return [mask], [amap]


def _interpolation_case() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """1x14 image: A = pixels 0-1 (score 5), B = pixels 3-4 (score 1), 10 normal pixels.

    Normal scores: 2 pixels at 3, 2 pixels at 1 (tied with B), 6 pixels at 0.
    """
    mask = np.zeros((1, 14), dtype=bool)
    mask[0, 0:2] = True
    mask[0, 3:5] = True
    amap = np.array([[5, 5, 3, 1, 1, 3, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    return [mask], [amap]


# --------------------------------------------------------------------------- closed-form AUPRO


def test_perfect_map_gives_one() -> None:
    mask = np.zeros((16, 16), dtype=bool)
    mask[3:7, 4:9] = True
    mask[12:14, 12:15] = True
    good = np.zeros((16, 16), dtype=bool)
    maps = [mask.astype(np.float32), np.zeros((16, 16), dtype=np.float32)]
    assert aupro([mask, good], maps) == 1.0
    assert pixel_auroc([mask, good], maps) == 1.0


def test_constant_map() -> None:
    # All pixels tie, so the curve is (0,0) -> (1,1); area of y = x on [0, 0.3] is 0.045 -> 0.045/0.3 = 0.15.
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 2:5] = True
    amap = np.full((10, 10), 0.7, dtype=np.float32)
    fpr, pro, thr = pro_curve([mask], [amap])
    np.testing.assert_array_equal(fpr, [0.0, 1.0])
    np.testing.assert_array_equal(pro, [0.0, 1.0])
    np.testing.assert_array_equal(thr, [np.inf, np.float32(0.7)])
    assert aupro([mask], [amap]) == pytest.approx(0.15, abs=1e-12)
    assert aupro([mask], [amap], max_fpr=1.0) == pytest.approx(0.5, abs=1e-12)
    assert pixel_auroc([mask], [amap]) == 0.5


def test_two_components_hand_computed() -> None:
    # 2 components -> each contributes 1/2 to PRO; 60 normal pixels.
    # t=10: A fully in -> PRO 0.5, FPR 0.
    # t=2 : 12 normal pixels in -> PRO 0.5, FPR 12/60 = 0.2.
    # t=1 : B fully in -> PRO 1.0, FPR 0.2.
    # t=0 : everything -> PRO 1, FPR 1.
    # Curve: (0,0) (0,.5) (.2,.5) (.2,1) (1,1).
    # Area on [0, 0.3] = 0.2 * 0.5 + 0.1 * 1.0 = 0.2 -> AUPRO = 0.2 / 0.3 = 2/3.
    masks, maps = _two_component_case()
    fpr, pro, thr = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.2, 0.2, 1.0], atol=1e-15)
    np.testing.assert_allclose(pro, [0.0, 0.5, 0.5, 1.0, 1.0], atol=1e-15)
    np.testing.assert_array_equal(thr, [np.inf, 10.0, 2.0, 1.0, 0.0])
    assert aupro(masks, maps) == pytest.approx(2.0 / 3.0, abs=1e-12)
    assert aupro(masks, maps) == pytest.approx(_reference_aupro(masks, maps, 0.3), abs=1e-12)


def test_interpolation_at_max_fpr() -> None:
    # 2 components of size 2, 10 normal pixels.
    # t=5: A in            -> (FPR 0,   PRO .5)
    # t=3: 2 normal in      -> (FPR .2,  PRO .5)
    # t=1: B + 2 normal in  -> (FPR .4,  PRO 1)
    # t=0: everything       -> (FPR 1,   PRO 1)
    # FPR = 0.3 lies between (.2,.5) and (.4,1): interpolated PRO = .75.
    # Area = 0.2*0.5 + 0.1*(0.5+0.75)/2 = 0.1 + 0.0625 = 0.1625 -> AUPRO = 0.1625/0.3 = 13/24.
    masks, maps = _interpolation_case()
    fpr, pro, _ = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.2, 0.4, 1.0], atol=1e-15)
    np.testing.assert_allclose(pro, [0.0, 0.5, 0.5, 1.0, 1.0], atol=1e-15)
    assert aupro(masks, maps) == pytest.approx(13.0 / 24.0, abs=1e-12)
    # max_fpr = 0.2 hits a curve point exactly: area 0.1 -> 0.5.
    assert aupro(masks, maps, max_fpr=0.2) == pytest.approx(0.5, abs=1e-12)
    # max_fpr = 1: 0.1 + 0.2*(0.5+1)/2 + 0.6*1 = 0.85.
    assert aupro(masks, maps, max_fpr=1.0) == pytest.approx(0.85, abs=1e-12)


def test_good_images_count_as_normal_pixels() -> None:
    # Two-component case plus a 60-pixel good image whose pixels all score 2:
    # normal pixels = 120, FPR at t=2 and t=1 becomes (12 + 60)/120 = 0.6.
    # Curve: (0,0) (0,.5) (.6,.5) (.6,1) (1,1); area on [0,.3] = 0.3*0.5 -> AUPRO = 0.5.
    masks, maps = _two_component_case()
    masks = [*masks, np.zeros((6, 10), dtype=bool)]
    maps = [*maps, np.full((6, 10), 2.0, dtype=np.float32)]
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


def test_eight_connectivity() -> None:
    # (0,0) and (1,1) touch diagonally -> one component of size 2; (3,3) is a separate component.
    # Scoring only (0,0): PRO = (1/2 + 0) / 2 = 0.25 (it would be 1/3 with 4-connectivity).
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = True
    amap = np.zeros((5, 5), dtype=np.float32)
    amap[0, 0] = 1.0
    fpr, pro, _ = pro_curve([mask], [amap])
    assert fpr[1] == 0.0
    assert pro[1] == pytest.approx(0.25, abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_aupro_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = [rng.random((12, 12)) < 0.15 for _ in range(3)]
    masks.append(np.zeros((9, 7), dtype=bool))  # good image
    masks.append(np.zeros((9, 7), dtype=bool) | (rng.random((9, 7)) < 0.3))
    # quantised scores -> many ties between normal and anomalous pixels
    maps = [np.round(rng.random(m.shape) * 6 + m * rng.random() * 2).astype(np.float32) / 4 for m in masks]
    for max_fpr in (0.05, 0.3, 0.77, 1.0):
        expected = _reference_aupro(masks, maps, max_fpr)
        got = aupro(masks, maps, max_fpr=max_fpr)
        assert got == pytest.approx(expected, abs=1e-12)
        assert 0.0 <= got <= 1.0


@pytest.mark.parametrize("seed", range(10))
def test_aupro_bounded_on_random_maps(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    masks = [rng.random((32, 32)) < 0.1 for _ in range(4)]
    maps = [rng.random((32, 32)).astype(np.float32) for _ in range(4)]
    fpr, pro, thr = pro_curve(masks, maps)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0) and np.all(np.diff(thr) < 0)
    assert fpr[-1] == 1.0 and pro[-1] == 1.0
    for max_fpr in (0.01, 0.3, 1.0):
        assert 0.0 <= aupro(masks, maps, max_fpr=max_fpr) <= 1.0


# --------------------------------------------------------------------------- pixel AUROC


@pytest.mark.parametrize("quantise", [False, True])
def test_pixel_auroc_matches_sklearn(quantise: bool) -> None:
    rng = np.random.default_rng(7)
    masks = [rng.random((20, 15)) < 0.2 for _ in range(3)]
    maps = [(rng.random((20, 15)) + 0.3 * m).astype(np.float32) for m in masks]
    if quantise:  # many ties between defect and defect-free pixels
        maps = [np.round(a * 5).astype(np.float32) for a in maps]
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in maps])
    )
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # 0/1 integer masks behave like boolean masks
    assert pixel_auroc([m.astype(np.uint8) for m in masks], maps) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- errors


def test_pixel_auroc_single_class_raises() -> None:
    with pytest.raises(ValueError, match="one class"):
        pixel_auroc([np.zeros((3, 3), dtype=bool)], [np.zeros((3, 3))])


def test_shape_mismatch_names_image_index() -> None:
    masks = [np.zeros((4, 4), dtype=bool), np.ones((4, 5), dtype=bool)]
    maps = [np.zeros((4, 4)), np.zeros((5, 4))]
    msg = r"image 1: anomaly map shape \(5,4\) does not match mask shape \(4,5\)"
    with pytest.raises(ValueError, match=msg):
        aupro(masks, maps)
    with pytest.raises(ValueError, match=msg):
        pixel_auroc(masks, maps)
    with pytest.raises(ValueError, match=msg):
        pro_curve(masks, maps)


def test_aupro_degenerate_inputs_raise() -> None:
    amap = np.zeros((4, 4))
    with pytest.raises(ValueError, match="no defect pixels"):
        aupro([np.zeros((4, 4), dtype=bool)], [amap])
    with pytest.raises(ValueError, match="no defect-free pixels"):
        aupro([np.ones((4, 4), dtype=bool)], [amap])
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="max_fpr"):
            aupro([mask], [amap], max_fpr=bad)
    with pytest.raises(ValueError, match="masks but"):
        aupro([mask, mask], [amap])


def test_image_auroc() -> None:
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75, abs=1e-12)
    assert image_auroc([0, 1], [0.0, 1.0]) == 1.0
    with pytest.raises(ValueError, match="one class"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one class"):
        image_auroc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="different lengths"):
        image_auroc([0, 1, 1], [0.1, 0.2])


# --------------------------------------------------------------------------- F1


def test_precision_recall_f1_hand_example() -> None:
    labels = [1, 1, 0, 0]
    scores = [0.9, 0.4, 0.6, 0.1]
    # threshold 0.5 predicts [1, 0, 1, 0]: tp=1, fp=1, fn=1
    assert precision_recall_f1(labels, scores, 0.5) == pytest.approx((0.5, 0.5, 0.5))
    # threshold 0.4 predicts [1, 1, 1, 0]: tp=2, fp=1, fn=0 -> p=2/3, r=1, f1=0.8
    assert precision_recall_f1(labels, scores, 0.4) == pytest.approx((2 / 3, 1.0, 0.8))
    # nothing predicted: precision 0/0 := 0
    assert precision_recall_f1(labels, scores, 1.0) == (0.0, 0.0, 0.0)
    # no defective labels and nothing predicted: everything 0/0 := 0
    assert precision_recall_f1([0, 0], [0.1, 0.2], 0.5) == (0.0, 0.0, 0.0)


def test_best_f1_threshold_hand_example() -> None:
    labels = [0, 1, 1, 0, 1]
    scores = [0.1, 0.8, 0.4, 0.5, 0.9]
    # descending: .9(1) .8(1) .5(0) .4(1) .1(0), 3 positives
    # F1 = 2tp/(2tp+fp+fn): t=.9 -> 2/5, t=.8 -> 4/5, t=.5 -> 4/6, t=.4 -> 6/7, t=.1 -> 6/9
    thr, f1 = best_f1_threshold(labels, scores)
    assert thr == 0.4
    assert f1 == pytest.approx(6 / 7, abs=1e-12)
    with pytest.raises(ValueError, match="defective"):
        best_f1_threshold([0, 0], [0.1, 0.2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_f1_threshold_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.random(60) * 10 + labels * 3) / 10  # ties
    best = max(precision_recall_f1(labels, scores, t)[2] for t in np.unique(scores))
    thr, f1 = best_f1_threshold(labels, scores)
    assert f1 == pytest.approx(best, abs=1e-12)
    assert precision_recall_f1(labels, scores, thr)[2] == pytest.approx(f1, abs=1e-12)


# --------------------------------------------------------------------------- PixelMetrics (streaming)

AGREE = 1e-9  # required agreement with the frozen reference
CHUNKS = (1, 7, 100, 1 << 18)  # 1 and 7 force many chunks and one-score chunks larger than the chunk


def _feed(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], **kwargs: Any) -> PixelMetrics:
    acc = PixelMetrics(**kwargs)
    for mask, amap in zip(masks, maps, strict=True):
        acc.add(mask, amap)
    return acc


def _assert_agrees(
    masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], chunk_size: int, max_fprs: Sequence[float] = (0.3,)
) -> float:
    """PixelMetrics vs the frozen reference: AUROC identical, AUPRO and full PRO curve within AGREE.

    Returns the largest absolute difference seen.
    """
    worst = 0.0
    with _feed(masks, maps, chunk_size=chunk_size) as acc:
        assert acc.pixel_auroc() == _old_pixel_auroc(masks, maps)  # integer arithmetic: bit-identical
        for max_fpr in max_fprs:
            got, expected = acc.aupro(max_fpr), _old_aupro(masks, maps, max_fpr=max_fpr)
            worst = max(worst, abs(got - expected))
            assert got == pytest.approx(expected, abs=AGREE)
        fpr, pro, thr = acc.pro_curve(resolution=None)
        fpr0, pro0, thr0 = _old_pro_curve(masks, maps)
        np.testing.assert_array_equal(fpr, fpr0)
        np.testing.assert_array_equal(thr, thr0)
        worst = max(worst, float(np.abs(pro - pro0).max()))
        np.testing.assert_allclose(pro, pro0, rtol=0, atol=AGREE)
    return worst


def _random_case(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Several images of different sizes; blob masks with several components, good images, ties, constants."""
    rng = np.random.default_rng(seed)
    masks: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    for _ in range(int(rng.integers(2, 7))):
        h, w = (int(v) for v in rng.integers(1, 40, size=2))
        kind = rng.choice(["good", "blobs", "speckle", "full"], p=[0.3, 0.4, 0.25, 0.05])
        if kind == "good":
            mask = np.zeros((h, w), dtype=bool)
        elif kind == "blobs":
            mask = ndimage.binary_dilation(rng.random((h, w)) < 0.02, iterations=int(rng.integers(0, 3)))
        elif kind == "speckle":
            mask = rng.random((h, w)) < 0.2
        else:
            mask = np.ones((h, w), dtype=bool)
        style = rng.choice(["continuous", "quantised", "coarse", "constant"], p=[0.35, 0.3, 0.25, 0.1])
        amap = rng.normal(size=(h, w)) + mask * rng.random() * 2
        if style == "quantised":
            amap = np.round(amap * 4) / 4
        elif style == "coarse":
            amap = np.round(amap)  # very many ties between defect and defect-free pixels, -0.0 included
        elif style == "constant":
            amap = np.full((h, w), float(rng.choice([0.0, -0.0, 0.25, 3.0])))
        masks.append(mask.astype((bool, np.uint8, np.int64)[int(rng.integers(3))]))
        maps.append(amap.astype((np.float32, np.float64)[int(rng.integers(2))]))
    if not any(m.any() for m in masks):
        masks[0] = masks[0].copy()
        masks[0].flat[0] = 1
    if all(m.all() for m in masks):
        masks.append(np.zeros((3, 5), dtype=bool))
        maps.append(rng.normal(size=(3, 5)).astype(np.float32))
    return masks, maps


def test_pixel_metrics_existing_cases_agree() -> None:
    cases = [_two_component_case(), _interpolation_case()]
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 2:5] = True
    cases.append(([mask], [np.full((10, 10), 0.7, dtype=np.float32)]))  # constant map
    masks, maps = _two_component_case()
    cases.append(([*masks, np.zeros((6, 10), dtype=bool)], [*maps, np.full((6, 10), 2.0, dtype=np.float32)]))
    diag = np.zeros((5, 5), dtype=bool)
    diag[0, 0] = diag[1, 1] = diag[3, 3] = True
    diag_map = np.zeros((5, 5), dtype=np.float32)
    diag_map[0, 0] = 1.0
    cases.append(([diag], [diag_map]))
    for seed in range(5):  # the brute-force cases above
        rng = np.random.default_rng(seed)
        ms = [rng.random((12, 12)) < 0.15 for _ in range(3)]
        ms.append(np.zeros((9, 7), dtype=bool))
        ms.append(np.zeros((9, 7), dtype=bool) | (rng.random((9, 7)) < 0.3))
        mp = [np.round(rng.random(m.shape) * 6 + m * rng.random() * 2).astype(np.float32) / 4 for m in ms]
        cases.append((ms, mp))
    for case_masks, case_maps in cases:
        for chunk in CHUNKS:
            _assert_agrees(case_masks, case_maps, chunk, max_fprs=(0.05, 0.2, 0.3, 0.77, 1.0))


def test_pixel_metrics_closed_forms() -> None:
    masks, maps = _interpolation_case()
    with _feed(masks, maps, chunk_size=2) as acc:
        assert acc.aupro() == pytest.approx(13.0 / 24.0, abs=1e-12)
        assert acc.aupro(max_fpr=0.2) == pytest.approx(0.5, abs=1e-12)
        assert acc.aupro(max_fpr=1.0) == pytest.approx(0.85, abs=1e-12)
    mask = np.zeros((16, 16), dtype=bool)
    mask[3:7, 4:9] = True
    mask[12:14, 12:15] = True
    good = np.zeros((16, 16), dtype=bool)
    with _feed([mask, good], [mask.astype(np.float32), np.zeros((16, 16), dtype=np.float32)]) as acc:
        assert acc.aupro() == 1.0
        assert acc.pixel_auroc() == 1.0


@pytest.mark.parametrize("seed", range(40))
def test_pixel_metrics_random_agree(seed: int) -> None:
    masks, maps = _random_case(seed)
    n_pixels = sum(m.size for m in masks)
    small = (1, 7, 100)[seed % 3] if n_pixels <= 2000 else (20, 64, 300)[seed % 3]  # many chunks, not too many
    for chunk in (small, CHUNKS[3]):
        _assert_agrees(masks, maps, chunk, max_fprs=(0.01, 0.3, 1.0))


@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_long_runs_agree(seed: int) -> None:
    # Runs of many index blocks (1024 scores each), many chunks, ties across block and chunk boundaries.
    rng = np.random.default_rng(50 + seed)
    masks, maps = [], []
    for i in range(6):
        h, w = int(rng.integers(60, 160)), int(rng.integers(60, 160))
        mask = ndimage.binary_dilation(rng.random((h, w)) < 0.003, iterations=int(rng.integers(1, 6)))
        if i == 2:
            mask[:] = False
        amap = ndimage.gaussian_filter(rng.normal(size=(h, w)), 2) + mask * rng.random()
        if (seed + i) % 3 == 0:
            amap = np.round(amap * 20) / 20
        masks.append(mask)
        maps.append(amap.astype(np.float32))
    for chunk in (500, 5000):
        _assert_agrees(masks, maps, chunk, max_fprs=(0.05, 0.3, 1.0))
    with _feed(masks, maps, dtype=np.float64, chunk_size=3000) as acc:
        y = np.concatenate([m.ravel() for m in masks])
        s = np.concatenate([a.ravel() for a in maps])
        assert acc.pixel_auroc() == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_pixel_metrics_float64_storage_is_exact() -> None:
    # float64 storage keeps float64 maps unrounded: ROC-AUC equals sklearn's on the float64 scores and
    # AUPRO equals the brute-force definition; for float32 maps both storages give identical results.
    rng = np.random.default_rng(11)
    masks = [rng.random((15, 13)) < 0.15 for _ in range(3)] + [np.zeros((8, 9), dtype=bool)]
    base = [rng.random(m.shape) * 1e-3 + 0.5 for m in masks]
    maps = [b + (b * 2**-30) * (rng.random(b.shape) < 0.5) for b in base]  # differences lost in float32
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    with _feed(masks, maps, dtype=np.float64, chunk_size=50) as acc:
        assert acc.pixel_auroc() == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        for max_fpr in (0.1, 0.3, 1.0):
            assert acc.aupro(max_fpr) == pytest.approx(_reference_aupro(masks, maps, max_fpr), abs=1e-12)
    maps32 = [a.astype(np.float32) for a in maps]
    with _feed(masks, maps32, dtype=np.float64) as a64, _feed(masks, maps32) as a32:
        assert a64.pixel_auroc() == a32.pixel_auroc()
        assert a64.aupro() == pytest.approx(a32.aupro(), abs=1e-15)
    # default float32 storage rounds float64 maps exactly like the list functions always did
    _assert_agrees(masks, maps, chunk_size=40)


def test_pixel_metrics_pro_curve_subsampled() -> None:
    rng = np.random.default_rng(5)
    masks = [ndimage.binary_dilation(rng.random((60, 50)) < 0.01, iterations=2) for _ in range(4)]
    maps = [(rng.random(m.shape) + 0.5 * m).astype(np.float32) for m in masks]
    with _feed(masks, maps, chunk_size=500) as acc:
        full = acc.pro_curve(resolution=None)
        for res in (1, 7, 50):
            fpr, pro, thr = acc.pro_curve(resolution=res)
            assert fpr.size <= 2 * res + 2 < full[0].size
            assert (fpr[0], pro[0], thr[0]) == (0.0, 0.0, np.inf)
            assert (fpr[-1], pro[-1], thr[-1]) == (full[0][-1], full[1][-1], full[2][-1]) == (1.0, 1.0, thr[-1])
            idx = np.searchsorted(-full[2], -thr)  # kept points are vertices of the full curve
            np.testing.assert_array_equal(full[2][idx], thr)
            np.testing.assert_array_equal(full[0][idx], fpr)
            np.testing.assert_array_equal(full[1][idx], pro)
            # every omitted vertex is within 1/res of the kept vertex before it
            before = np.searchsorted(idx, np.arange(full[0].size), side="right") - 1
            assert np.all(np.abs(full[0] - fpr[before]) <= 1.0 / res)
            assert np.all(np.abs(full[1] - pro[before]) <= 1.0 / res)
        assert acc.pro_curve()[0].size <= 2 * 10_000 + 2


def test_pixel_metrics_add_after_evaluation_and_large_ties() -> None:
    masks, maps = _two_component_case()
    good, good_map = np.zeros((6, 10), dtype=bool), np.full((6, 10), 2.0, dtype=np.float32)
    with _feed(masks, maps, chunk_size=3) as acc:
        assert acc.aupro() == pytest.approx(2.0 / 3.0, abs=1e-12)
        first_auroc = acc.pixel_auroc()
        acc.add(good, good_map)  # clears the cached results
        assert acc.aupro() == pytest.approx(0.5, abs=1e-12)
        assert acc.pixel_auroc() == _old_pixel_auroc([*masks, good], [*maps, good_map]) != first_auroc
        assert (acc.n_images, acc.n_pixels, acc.n_components) == (2, 124, 2)


def test_pixel_metrics_errors() -> None:
    acc = PixelMetrics()
    with pytest.raises(ValueError, match="no images given"):
        acc.pixel_auroc()
    with pytest.raises(ValueError, match="no images given"):
        acc.aupro()
    acc.add(np.zeros((4, 4), dtype=bool), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="image 1: anomaly map shape \\(5,4\\) does not match mask shape \\(4,5\\)"):
        acc.add(np.ones((4, 5), dtype=bool), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="image 1: mask must be 2-D, got shape \\(2,2,2\\)"):
        acc.add(np.ones((2, 2, 2), dtype=bool), np.zeros((2, 2, 2)))
    for bad in (np.nan, np.inf, -np.inf, 1e39):  # 1e39 is finite in float64 but overflows float32
        amap = np.zeros((3, 3))
        amap[1, 2] = bad
        with pytest.raises(ValueError, match="image 1: anomaly map contains NaN or infinite values"):
            acc.add(np.ones((3, 3), dtype=bool), amap)
    assert acc.n_images == 1  # rejected images leave the accumulator unchanged
    with pytest.raises(ValueError, match="one class"):
        acc.pixel_auroc()
    with pytest.raises(ValueError, match="no defect pixels"):
        acc.aupro()
    with pytest.raises(ValueError, match="no defect pixels"):
        acc.pro_curve()
    acc.close()
    only_defects = _feed([np.ones((4, 4), dtype=bool)], [np.zeros((4, 4))])
    with pytest.raises(ValueError, match="one class"):
        only_defects.pixel_auroc()
    with pytest.raises(ValueError, match="no defect-free pixels"):
        only_defects.aupro()
    for bad_fpr in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="max_fpr"):
            only_defects.aupro(max_fpr=bad_fpr)
    only_defects.close()
    with pytest.raises(ValueError, match="closed"):
        only_defects.add(np.ones((4, 4), dtype=bool), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="closed"):
        only_defects.pixel_auroc()
    with pytest.raises(ValueError, match="dtype"):
        PixelMetrics(dtype=np.float16)
    with pytest.raises(ValueError, match="chunk_size"):
        PixelMetrics(chunk_size=0)
    with pytest.raises(ValueError, match="resolution"):
        _feed(*_two_component_case()).pro_curve(resolution=0)


def test_pixel_metrics_temp_files_removed(tmp_path: Path) -> None:
    masks, maps = _two_component_case()
    # close() and the context manager
    acc = _feed(masks, maps, tmp_dir=tmp_path)
    assert acc.storage_dir is not None and Path(acc.storage_dir).parent == tmp_path
    assert sorted(os.listdir(acc.storage_dir)) == ["sizes.bin", "values.bin"]
    acc.close()
    acc.close()  # idempotent
    assert list(tmp_path.iterdir()) == []
    # garbage collection
    acc = _feed(masks, maps, tmp_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    del acc
    gc.collect()
    assert list(tmp_path.iterdir()) == []
    # an exception escaping the with block
    with pytest.raises(RuntimeError, match="boom"), PixelMetrics(tmp_dir=tmp_path) as acc:
        acc.add(masks[0], maps[0])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # nothing is created before the first image
    with PixelMetrics(tmp_dir=tmp_path) as acc:
        assert acc.storage_dir is None and list(tmp_path.iterdir()) == []


class _FailingWrites:
    """File proxy whose next write fails after writing part of the data (like a full disk)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.fail = True

    def write(self, data: Any) -> int:
        if self.fail:
            self.fail = False
            self._f.write(bytes(memoryview(data))[:3])
            raise OSError(28, "No space left on device")
        return int(self._f.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def test_pixel_metrics_failed_write_leaves_consistent_state(tmp_path: Path) -> None:
    masks, maps = _random_case(3)
    with _feed(masks[:1], maps[:1], tmp_dir=tmp_path, chunk_size=5) as acc:
        real = acc._vals_file
        acc._vals_file = _FailingWrites(real)  # type: ignore[assignment]
        with pytest.raises(OSError, match="No space"):
            acc.add(masks[1], maps[1])
        acc._vals_file = real
        assert acc.n_images == 1
        for mask, amap in zip(masks[1:], maps[1:], strict=True):
            acc.add(mask, amap)
        assert acc.pixel_auroc() == _old_pixel_auroc(masks, maps)
        assert acc.aupro() == pytest.approx(_old_aupro(masks, maps), abs=AGREE)


def test_pixel_metrics_memory_does_not_grow_with_images() -> None:
    # 40 images of 1000x1000 (40 M pixels): flattening needs >= 40e6 * (4 + 4 + 8) bytes = 640 MB
    # (float32 scores, int32 component ids, int64 sort order). The accumulator's own traced allocations
    # must stay at one image's worth while adding and one chunk's worth while evaluating.
    n_images, side = 40, 1000
    flat_bytes = n_images * side * side * 16
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        acc = PixelMetrics()
        add_peak = 0
        held_after: list[int] = []
        for i in range(n_images):
            mask = np.zeros((side, side), dtype=bool)
            if i % 4:
                for _ in range(3):
                    y, x = rng.integers(0, side - 60, size=2)
                    mask[y : y + int(rng.integers(5, 60)), x : x + int(rng.integers(5, 60))] = True
            amap = rng.random((side, side), dtype=np.float32)
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            acc.add(mask, amap)
            current, peak = tracemalloc.get_traced_memory()
            add_peak = max(add_peak, peak - before)
            held_after.append(current - before)
            del mask, amap
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        auroc, pro = acc.pixel_auroc(), acc.aupro()
        eval_peak = tracemalloc.get_traced_memory()[1] - before
        acc.close()
    finally:
        tracemalloc.stop()
    assert 0.45 < auroc < 0.55 and 0.0 <= pro <= 1.0  # random maps
    assert max(held_after) < 64 * 1024  # bookkeeping per image: a few tuples
    assert add_peak < 24 * 2**20  # one 1000x1000 image: a few bytes per pixel
    assert eval_peak < 64 * 2**20  # one chunk (2**18 pixels by default)
    assert add_peak < flat_bytes / 25 and eval_peak < flat_bytes / 10


# --------------------------------------------------------------------------- list functions on PixelMetrics


@pytest.mark.parametrize("seed", range(0, 40, 4))
def test_list_functions_agree_with_frozen_reference(seed: int) -> None:
    masks, maps = _random_case(seed)
    assert pixel_auroc(masks, maps) == _old_pixel_auroc(masks, maps)
    for max_fpr in (0.02, 0.3, 1.0):
        assert aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(_old_aupro(masks, maps, max_fpr), abs=AGREE)
    fpr, pro, thr = pro_curve(masks, maps)
    fpr0, pro0, thr0 = _old_pro_curve(masks, maps)
    np.testing.assert_array_equal(fpr, fpr0)
    np.testing.assert_array_equal(thr, thr0)
    np.testing.assert_allclose(pro, pro0, rtol=0, atol=AGREE)


def test_list_functions_errors_and_no_leftover_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    masks, maps = _two_component_case()
    bad_map = maps[0].copy()
    bad_map[3, 3] = np.nan
    for fn in (pixel_auroc, aupro, pro_curve):
        fn(masks, maps)
        with pytest.raises(ValueError, match="image 1: anomaly map contains NaN or infinite values"):
            fn([masks[0], masks[0]], [maps[0], bad_map])
        # the lists are validated before any score is looked at, as before
        with pytest.raises(ValueError, match="image 1: anomaly map shape"):
            fn([masks[0], masks[0]], [bad_map, bad_map[:, :4]])
        with pytest.raises(ValueError, match="no images given"):
            fn([], [])
    assert list(tmp_path.iterdir()) == []


# AUPIMO as anomalib 2.7.0 computes it (anomalib.metrics.pimo.functional.aupimo_scores, float64 maps,
# num_thresholds=300_000, fpr_bounds=(1e-5, 1e-4), force=True), run on the data of _pimo_data(seed): the
# per-image scores of the anomalous images, in order. Computed with anomalib itself, outside this repository.
ANOMALIB_AUPIMO = {
    0: [0.16281444443850215, 0.0561288550930532, 0.002498774732165998, 0.47329165084094815, 0.05660763352999615],
    1: [0.0034705204613416528, 0.6614832732077827, 0.8574366976071373, 0.347083946188911, 0.8646690477913391],
    2: [0.21477716352827142, 0.00014300369183797702, 0.025085832971998432, 0.48560907678492893, 0.2929324547249114],
}


def _pimo_data(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """10 normal 128x128 maps (gamma noise) and 5 anomalous ones (a square raised by 4 to 14)."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(15):
        m = rng.gamma(2.0, 1.0, (128, 128))
        mask = np.zeros((128, 128), bool)
        if i >= 10:
            y, x = rng.integers(5, 108), rng.integers(5, 108)
            s = rng.integers(4, 15)
            mask[y : y + s, x : x + s] = True
            m[mask] += rng.uniform(4.0, 14.0)
        maps.append(m)
        masks.append(mask)
    return maps, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupimo_equals_anomalibs(seed: int) -> None:
    from spade_ad.metrics import Aupimo, aupimo

    maps, masks = _pimo_data(seed)
    acc = Aupimo()
    order = np.random.default_rng(seed).permutation(15)  # normal and anomalous images in any order
    for i in order:
        acc.add(masks[i], maps[i])
    want = np.array(ANOMALIB_AUPIMO[seed])
    got = acc.per_image()[np.argsort([i for i in order if i >= 10])]
    assert np.abs(got - want).max() < 1e-12
    assert aupimo(masks, maps) == pytest.approx(float(want.mean()), abs=1e-12)


def test_aupimo_is_undefined_without_enough_normal_pixels() -> None:
    from spade_ad.metrics import aupimo

    maps, masks = _pimo_data(0)
    assert aupimo(masks[:2] + masks[10:], maps[:2] + maps[10:]) is None  # 2 x 16384 pixels cannot reach 1e-5
    assert aupimo(masks[10:], maps[10:]) is None  # no normal image

"""Tests for spade_ad.metrics with closed-form and brute-force expectations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from spade_ad.metrics import (
    aupro,
    best_f1_threshold,
    image_auroc,
    pixel_auroc,
    precision_recall_f1,
    pro_curve,
)

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

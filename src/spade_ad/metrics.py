"""Evaluation metrics: image/pixel ROC-AUC, exact AUPRO and F1 helpers.

Conventions: label 1 (or ``True``) means defective; a higher score means more anomalous.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = [
    "aupro",
    "best_f1_threshold",
    "image_auroc",
    "pixel_auroc",
    "precision_recall_f1",
    "pro_curve",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- helpers


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def _binary_1d(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[BoolArray, FloatArray]:
    """Validate 1-D binary labels and finite scores of equal length."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"labels and scores have different lengths: {y.shape[0]} != {s.shape[0]}")
    if y.shape[0] == 0:
        raise ValueError("labels and scores are empty")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be binary (0 = good, 1 = defective)")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y.astype(bool), s


def _validated_pairs(
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
            raise ValueError(f"image {i}: mask must be 2-D, got shape {_fmt_shape(mask.shape)}")
        if amap.shape != mask.shape:
            raise ValueError(
                f"image {i}: anomaly map shape {_fmt_shape(amap.shape)} "
                f"does not match mask shape {_fmt_shape(mask.shape)}"
            )
        pairs.append((mask, amap))
    return pairs


def _check_finite(scores: np.ndarray) -> None:
    if not np.isfinite(scores).all():
        raise ValueError("anomaly maps contain NaN or infinite values")


def _sort_desc_run_ends(scores: np.ndarray) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Descending sort order of ``scores`` and the last sorted index of each run of tied scores."""
    order = np.argsort(scores)[::-1]
    s_sorted = scores[order]
    ends = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])
    ends = np.append(ends, s_sorted.size - 1)
    return order, ends


# --------------------------------------------------------------------------- image level


def image_auroc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Image-level ROC-AUC (label 1 = defective)."""
    y, s = _binary_1d(labels, scores)
    if y.all() or not y.any():
        raise ValueError("image_auroc needs both good (0) and defective (1) labels; only one class present")
    return float(roc_auc_score(y, s))


def precision_recall_f1(
    labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float
) -> tuple[float, float, float]:
    """Precision, recall and F1 when predicting defective for ``score >= threshold`` (0/0 := 0.0)."""
    y, s = _binary_1d(labels, scores)
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return precision, recall, f1


def best_f1_threshold(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[float, float]:
    """(threshold, F1) maximising F1 over all distinct score thresholds (ties: highest threshold)."""
    y, s = _binary_1d(labels, scores)
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0:
        raise ValueError("best_f1_threshold needs at least one defective (1) label")
    order, ends = _sort_desc_run_ends(s)
    tp = np.cumsum(y[order], dtype=np.int64)[ends]
    n_pred = ends + 1  # predicted positives at each threshold = tp + fp
    f1 = 2.0 * tp / (n_pred + n_pos)  # 2tp / (2tp + fp + fn)
    best = int(np.argmax(f1))
    return float(s[order[ends[best]]]), float(f1[best])


# --------------------------------------------------------------------------- pixel level


def pixel_auroc(masks: Sequence[npt.ArrayLike], maps: Sequence[npt.ArrayLike]) -> float:
    """Pixel-level ROC-AUC over all pixels of all images pooled together (exact, memory-lean)."""
    pairs = _validated_pairs(masks, maps)
    n = sum(mask.size for mask, _ in pairs)
    y = np.empty(n, dtype=bool)
    s = np.empty(n, dtype=np.float32)
    pos = 0
    for mask, amap in pairs:
        k = mask.size
        np.not_equal(mask.ravel(), 0, out=y[pos : pos + k])
        s[pos : pos + k] = amap.ravel()
        pos += k
    _check_finite(s)
    n_pos = int(np.count_nonzero(y))
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("pixel_auroc needs both defect and defect-free pixels; only one class present")
    # Exact trapezoidal ROC-AUC (same value as sklearn's roc_auc_score) with far less memory:
    # integer TP/FP counts at the end of each run of tied scores, area accumulated in int64.
    order, ends = _sort_desc_run_ends(s)
    del s
    count_dtype = np.int32 if n < 2**31 else np.int64
    tp = np.cumsum(y[order], dtype=count_dtype)[ends].astype(np.int64)
    del order, y
    fp = ends.astype(np.int64) + 1 - tp
    tp = np.concatenate(([0], tp))
    fp = np.concatenate(([0], fp))
    twice_area = int(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))
    return twice_area / (2.0 * n_pos * n_neg)


def pro_curve(
    masks: Sequence[npt.ArrayLike], maps: Sequence[npt.ArrayLike]
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Exact per-region-overlap curve ``(fpr, pro, thresholds)`` at every distinct score.

    Components are 8-connected regions of each mask. ``PRO(t)`` is the mean over all components of
    the fraction of their pixels with score ``>= t``; ``FPR(t)`` the fraction of defect-free pixels
    with score ``>= t``. Thresholds decrease; the first point is ``(0, 0)`` with threshold ``+inf``.
    """
    pairs = _validated_pairs(masks, maps)
    n = sum(mask.size for mask, _ in pairs)
    scores = np.empty(n, dtype=np.float32)
    comp = np.empty(n, dtype=np.int32)  # 0 = defect-free, k > 0 = global component id
    sizes_parts: list[npt.NDArray[np.int64]] = []
    n_comp = 0
    pos = 0
    for mask, amap in pairs:
        k = mask.size
        lab, n_lab = ndimage.label(mask != 0, structure=_STRUCTURE_8)
        flat = lab.ravel()
        if n_lab:
            sizes_parts.append(np.bincount(flat, minlength=n_lab + 1)[1:].astype(np.int64))
            flat = np.where(flat > 0, flat + n_comp, 0)
        comp[pos : pos + k] = flat
        scores[pos : pos + k] = amap.ravel()
        n_comp += n_lab
        pos += k
    _check_finite(scores)
    if n_comp == 0:
        raise ValueError("masks contain no defect pixels; AUPRO is undefined")
    sizes = np.concatenate(sizes_parts)
    n_normal = n - int(sizes.sum())
    if n_normal == 0:
        raise ValueError("masks contain no defect-free pixels; AUPRO is undefined")

    weights = np.zeros(n_comp + 1, dtype=np.float64)
    weights[1:] = 1.0 / (n_comp * sizes.astype(np.float64))

    order, ends = _sort_desc_run_ends(scores)
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


def _partial_area(fpr: FloatArray, pro: FloatArray, max_fpr: float) -> float:
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


def aupro(masks: Sequence[npt.ArrayLike], maps: Sequence[npt.ArrayLike], max_fpr: float = 0.3) -> float:
    """Exact normalised area under the PRO curve for FPR in [0, max_fpr] (see :func:`pro_curve`)."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, pro, _ = pro_curve(masks, maps)
    return _partial_area(fpr, pro, max_fpr)

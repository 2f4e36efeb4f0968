"""Evaluation metrics: image/pixel ROC-AUC, exact AUPRO and F1 helpers.

Conventions: label 1 (or ``True``) means defective; a higher score means more anomalous.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import weakref
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = [
    "Aupimo",
    "PixelMetrics",
    "aupimo",
    "aupro",
    "best_f1_threshold",
    "image_auroc",
    "pixel_auroc",
    "precision_recall_f1",
    "pro_curve",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
_Chunk = tuple[np.ndarray, IntArray, IntArray, FloatArray]  # thresholds, FP, TP, W of one chunk

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
    return [_checked_pair(i, m, a) for i, (m, a) in enumerate(zip(masks, maps, strict=True))]


def _checked_pair(i: int, mask: npt.ArrayLike, amap: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Image ``i``'s (mask, map) as arrays: a 2-D mask and a map of the same shape."""
    mask_a, amap_a = np.asarray(mask), np.asarray(amap)
    if mask_a.ndim != 2:
        raise ValueError(f"image {i}: mask must be 2-D, got shape {_fmt_shape(mask_a.shape)}")
    if amap_a.shape != mask_a.shape:
        raise ValueError(
            f"image {i}: anomaly map shape {_fmt_shape(amap_a.shape)} "
            f"does not match mask shape {_fmt_shape(mask_a.shape)}"
        )
    return mask_a, amap_a


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
# The list functions feed a PixelMetrics (see below): exact, with memory bounded by one image and one
# chunk on top of the caller's own lists (they used to flatten and sort every pixel of every image).


def _accumulate(masks: Sequence[npt.ArrayLike], maps: Sequence[npt.ArrayLike]) -> PixelMetrics:
    """Validate the whole lists first (counts, dimensionality, shapes), then feed a PixelMetrics."""
    pairs = _validated_pairs(masks, maps)
    acc = PixelMetrics()
    try:
        for mask, amap in pairs:
            acc.add(mask, amap)
    except BaseException:
        acc.close()
        raise
    return acc


def pixel_auroc(masks: Sequence[npt.ArrayLike], maps: Sequence[npt.ArrayLike]) -> float:
    """Pixel-level ROC-AUC over all pixels of all images pooled together (exact; maps are rounded to float32).

    Same value as sklearn's ``roc_auc_score`` on the flattened float32 scores; see :class:`PixelMetrics`
    to feed one image at a time.
    """
    with _accumulate(masks, maps) as acc:
        acc._check_counts("pixel_auroc")
        acc._evaluate(want_auroc=True, max_fprs=(), resolution=None, want_curve=False)
        assert acc._auroc is not None
        return acc._auroc


def pro_curve(
    masks: Sequence[npt.ArrayLike], maps: Sequence[npt.ArrayLike]
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Exact per-region-overlap curve ``(fpr, pro, thresholds)`` at every distinct score.

    Components are 8-connected regions of each mask. ``PRO(t)`` is the mean over all components of
    the fraction of their pixels with score ``>= t``; ``FPR(t)`` the fraction of defect-free pixels
    with score ``>= t``. Thresholds decrease; the first point is ``(0, 0)`` with threshold ``+inf``.
    Maps are rounded to float32. The arrays have one entry per distinct score; for a plot of a large
    test set, :meth:`PixelMetrics.pro_curve` returns a bounded subsample.
    """
    with _accumulate(masks, maps) as acc:
        return acc.pro_curve(resolution=None)


def aupro(masks: Sequence[npt.ArrayLike], maps: Sequence[npt.ArrayLike], max_fpr: float = 0.3) -> float:
    """Exact normalised area under the PRO curve for FPR in [0, max_fpr] (see :func:`pro_curve`)."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    with _accumulate(masks, maps) as acc:
        acc._check_counts("aupro")
        acc._evaluate(want_auroc=False, max_fprs=(float(max_fpr),), resolution=None, want_curve=False)
        return acc._aupro[float(max_fpr)]


# --------------------------------------------------------------------------- streaming pixel metrics

_DEFAULT_CHUNK = 1 << 18
_DEFAULT_RESOLUTION = 10_000
# In-memory index of each sorted run: every stride-th score, stride = ceil(length / 512) within [1024, 16384].
_INDEX_SAMPLES = 512
_INDEX_MIN_STRIDE = 1024
_INDEX_MAX_STRIDE = 16384
_STORE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _remove_storage(directory: str, files: list[io.BufferedRandom]) -> None:
    """Close the spill files and delete their directory (idempotent; used by close() and the GC finaliser)."""
    for f in files:
        try:
            f.close()
        except OSError:
            pass
    shutil.rmtree(directory, ignore_errors=True)


def _read_into(f: io.BufferedRandom, out: np.ndarray, offset: int) -> None:
    """Fill ``out`` with the bytes of ``f`` at ``offset`` (positioned reads, no memory mapping)."""
    view = out.data.cast("B")
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise OSError(f"unexpected end of the spill file {getattr(f, 'name', '')!r}")
        got += n


class _SortedRuns:
    """Read access to the ascending runs of a PixelMetrics spill file.

    Reads are positioned file reads, not a memory map: a mapped page-cache folio (up to the size of
    one ``write``, megabytes) would count towards the process's RSS for every run touched. A search
    first counts, in memory, the index samples below the value, then looks at one block of ``stride``
    scores per run, cached (one block per run) because successive searches move slowly.
    """

    def __init__(
        self, f: io.BufferedRandom, dtype: np.dtype[Any], runs: npt.NDArray[np.int64], samples: list[np.ndarray]
    ) -> None:
        self.f = f
        self.dtype = dtype
        self.base, self.end, self.stride = runs[:, 0], runs[:, 0] + runs[:, 1], runs[:, 4]
        self.samples = np.concatenate(samples)  # samples[off[r] + j] = score at base[r] + j * stride[r]
        self.off = np.concatenate(([0], np.cumsum([x.size for x in samples])[:-1])).astype(np.int64)
        self.blocks = np.full((runs.shape[0], int(self.stride.max())), np.inf, dtype=dtype)
        self.block_start = np.full(runs.shape[0], -1, dtype=np.int64)  # file position of the cached block

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=self.dtype)
        _read_into(self.f, out, start * self.dtype.itemsize)
        return out

    def _load(self, r: int, start: int) -> None:
        n = min(int(self.stride[r]), int(self.end[r]) - start)
        self.blocks[r, :n] = self.read(start, start + n)
        self.blocks[r, n:] = np.inf  # padding: never < a finite score
        self.block_start[r] = start

    def first_samples(self, rows: npt.NDArray[np.int64]) -> np.ndarray:
        """The smallest score of each run (its first sample)."""
        return self.samples[self.off[rows]]

    def lower_bounds(self, v: np.generic, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """For the runs ``rows``, the first position (in the whole run) whose score is ``>= v``."""
        j = np.add.reduceat(self.samples < v, self.off, dtype=np.int64)[rows]  # samples < v
        # the answer lies after sample j - 1 and at or before sample j (or the run's end)
        start = self.base[rows] + np.maximum(j - 1, 0) * self.stride[rows]
        stale = (j > 0) & (self.block_start[rows] != start)
        for r, s in zip(rows[stale].tolist(), start[stale].tolist(), strict=True):
            self._load(r, s)
        below = (self.blocks[rows] < v).sum(axis=1)
        return np.where(j > 0, start + below, self.base[rows])

    def values_at(self, rows: npt.NDArray[np.int64], pos: npt.NDArray[np.int64]) -> np.ndarray:
        """The score at position ``pos[i]`` of run ``rows[i]`` (loading its block when not cached)."""
        start = self.base[rows] + (pos - self.base[rows]) // self.stride[rows] * self.stride[rows]
        stale = self.block_start[rows] != start
        for r, s in zip(rows[stale].tolist(), start[stale].tolist(), strict=True):
            self._load(r, s)
        out: np.ndarray = self.blocks[rows, pos - start]
        return out


@dataclass
class _Walk:
    """Where one pass down the score axis stands (see :meth:`PixelMetrics._points`)."""

    reader: _SortedRuns
    sizes_file: io.BufferedRandom
    base: IntArray  # first position of each run
    is_def: BoolArray  # the run holds defect scores
    aux: IntArray  # the run's start in the sizes file
    cur: IntArray  # run r still holds positions [base[r], cur[r])
    tops: np.ndarray  # the largest remaining score of each run
    fp: int = 0
    tp: int = 0
    w: float = 0.0
    prev_density: float | None = None  # pixels per key unit in the previous chunk

    def read_sizes(self, start: int, stop: int) -> IntArray:
        out = np.empty(stop - start, dtype=np.int64)
        _read_into(self.sizes_file, out, start * 8)
        return out

    def advance(self, act: IntArray, lb: IntArray) -> None:
        """Drop the chunk ``[lb, cur)`` of the active runs ``act``."""
        moved = act[(lb < self.cur[act]) & (lb > self.base[act])]  # runs with scores left below this chunk: new top
        self.cur[act] = lb
        if moved.size:
            self.tops[moved] = self.reader.values_at(moved, self.cur[moved] - 1)


class PixelMetrics:
    """Bounded-memory, exact pixel ROC-AUC and AUPRO, fed one ``(mask, map)`` pair at a time.

    ``acc.add(mask, amap)`` per test image, then :meth:`pixel_auroc`, :meth:`aupro` and :meth:`pro_curve`.
    The list functions :func:`pixel_auroc`, :func:`aupro` and :func:`pro_curve` are thin wrappers. Use it
    as a context manager (or call :meth:`close`) to delete its temporary files; they are also deleted
    when the object is garbage collected, and at interpreter exit.

    Definitions: all pixels of all images are pooled. For every distinct score ``t``, in decreasing
    order, ``FP(t)`` counts the defect-free pixels ``>= t``, ``TP(t)`` the defect pixels ``>= t`` and
    ``W(t)`` sums ``1 / (n_components * size of its component)`` over the defect pixels ``>= t``
    (components: 8-connected regions of each mask), so ``FPR = FP / n_normal`` and ``PRO = W``. ROC-AUC
    is the trapezoid rule over ``(FP, TP)`` from ``(0, 0)``; AUPRO the trapezoid rule over ``(FPR, PRO)``
    from ``(0, 0)`` up to ``max_fpr``, interpolating linearly at ``max_fpr``, divided by ``max_fpr``.
    These numbers depend only on the pixels grouped by distinct score, in decreasing order of score,
    not on the order of the pixels inside a group (a tie). The former implementation flattened every
    pixel and sorted them all at once; this one obtains the same groups, in the same order, as follows.

    * ``add`` rounds the map to the storage dtype (``float32`` by default: the cast the list functions
      always made, so nothing they used is lost; ``dtype=np.float64`` keeps float64 maps unrounded),
      turns ``-0.0`` into ``0.0`` (equal scores, one bit pattern), labels the mask's components, and
      appends to a spill file the image's defect-free scores sorted ascending, then its defect scores
      sorted ascending ("runs"); a second file gets each defect pixel's component size, in the same
      order. In memory stay a few numbers per run (offsets, counts) and an index: every ``stride``-th
      score of the run (``stride = ceil(length / 512)``, clipped to [1024, 16384]).
    * The evaluation walks down the score axis in chunks ``[b, top]``: ``top`` is the largest score not
      yet processed and ``b`` is chosen so that the chunk holds at most ``chunk_size`` pixels (and at
      least half as many where possible). ``b`` is searched on the monotone integer key of the float bit
      pattern (interpolation steps, bisection whenever a step does not halve the bracket); the pixels
      ``>= b`` are counted exactly in every sorted run from the index and one block of ``stride``
      scores read from the file (positioned reads, not a memory map, so that page-cache pages do not
      count towards the process's RSS). Since chunks are bounded by score values, a tie is never split
      between two chunks, and every score lies in exactly one chunk. The chunk's slices of all runs
      are read and sorted, and each distinct score becomes one point, with the counts and the sum
      ``W`` carried over from the chunks above it. A single score shared by more than ``chunk_size``
      pixels is its own chunk, counted and summed in pieces.
    * ROC-AUC is accumulated in exact integer arithmetic, hence bit-identical to the former
      implementation. ``FPR`` is the same integer ratio; ``PRO`` and the AUPRO area differ only by the
      order of floating-point additions (about 1e-15). The tests check the agreement with a frozen copy
      of the former implementation, and with literal brute-force definitions.

    Memory: one image's arrays while adding, and O(``chunk_size``) while evaluating (about 120 bytes
    per chunk pixel: some 30 MB at the default ``2**18``), plus per run (two per image at most) a few
    numbers, the index (at most 512 scores below 8 M pixels per run) and, while evaluating, one cached
    block of ``stride`` scores: about 10 KB per image for 1130x460 maps. The component sizes go to
    disk with the scores. Disk: ``itemsize`` bytes per pixel plus 8 per defect pixel. Each metric call
    is one pass over the spilled data: the first computes all three metrics (AUPRO at 0.3 and at the
    requested ``max_fpr``, the curve at the default resolution) and caches them; adding another image
    clears the caches.

    Args:
        dtype: score storage type, ``np.float32`` (default, as the list functions) or ``np.float64``
            (exact for float64 maps; float32 maps give identical results with either).
        chunk_size: the most pixels held and sorted together in memory during an evaluation.
        tmp_dir: where to create the temporary directory (default: :func:`tempfile.gettempdir`).
    """

    def __init__(
        self,
        *,
        dtype: npt.DTypeLike = np.float32,
        chunk_size: int = _DEFAULT_CHUNK,
        tmp_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        dt = np.dtype(dtype)
        if dt not in _STORE_DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {dt}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._dtype = dt
        self._key_dtype = np.dtype(np.uint32) if dt.itemsize == 4 else np.dtype(np.uint64)
        self._sign_bit = 1 << (8 * dt.itemsize - 1)
        self._all_ones = (1 << (8 * dt.itemsize)) - 1
        self._chunk = int(chunk_size)
        self._tmp_parent = None if tmp_dir is None else os.fspath(tmp_dir)
        self._dir: str | None = None
        self._vals_file: io.BufferedRandom | None = None
        self._sizes_file: io.BufferedRandom | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._closed = False
        self._n_images = 0
        self._n_vals = 0  # scores written to values.bin
        self._n_sizes = 0  # component sizes written to sizes.bin
        self._runs: list[tuple[int, int, bool, int, int]] = []  # (start, length, is_defect, start in sizes, stride)
        self._samples: list[np.ndarray] = []  # per run: every stride-th score (at most _INDEX_SAMPLES)
        self._n_pos = 0  # defect pixels
        self._n_neg = 0  # defect-free pixels
        self._n_comp = 0  # ground-truth components over all images
        self._auroc: float | None = None
        self._aupro: dict[float, float] = {}
        self._curves: dict[int | None, tuple[FloatArray, FloatArray, FloatArray]] = {}

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> PixelMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the temporary files; the accumulator cannot be used afterwards. Safe to call twice."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()
        self._vals_file = self._sizes_file = None
        self._runs = []
        self._samples = []
        self._aupro.clear()
        self._curves.clear()
        self._auroc = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def n_images(self) -> int:
        """Number of images added so far."""
        return self._n_images

    @property
    def n_pixels(self) -> int:
        """Number of pixels added so far (defect and defect-free)."""
        return self._n_pos + self._n_neg

    @property
    def n_components(self) -> int:
        """Number of 8-connected ground-truth components added so far."""
        return self._n_comp

    @property
    def storage_dir(self) -> str | None:
        """The temporary directory holding the spilled scores (``None`` before the first image / after close)."""
        return None if self._closed else self._dir

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("PixelMetrics is closed (its temporary data were deleted)")

    def _files(self) -> tuple[io.BufferedRandom, io.BufferedRandom]:
        if self._vals_file is None or self._sizes_file is None:
            directory = tempfile.mkdtemp(prefix="spade_ad_pixel_metrics_", dir=self._tmp_parent)
            opened: list[io.BufferedRandom] = []
            try:
                for name in ("values.bin", "sizes.bin"):
                    opened.append(open(os.path.join(directory, name), "w+b"))  # noqa: SIM115 - closed by finaliser
            except BaseException:
                _remove_storage(directory, opened)
                raise
            self._dir = directory
            self._vals_file, self._sizes_file = opened
            self._finalizer = weakref.finalize(self, _remove_storage, directory, opened)
        return self._vals_file, self._sizes_file

    # ----------------------------------------------------------------- feeding

    def add(self, mask: npt.ArrayLike, amap: npt.ArrayLike) -> None:
        """Add one test image: ``mask`` (H, W), non-zero = defect; ``amap`` (H, W) scores, higher = more anomalous.

        Raises ValueError (naming the image's position, counted from 0) for a mask that is not 2-D, a
        map of another shape, or a map with NaN or infinite values (after rounding to the storage
        dtype); a rejected image leaves the accumulator unchanged.
        """
        self._check_open()
        i = self._n_images
        mask_a, amap_a = _checked_pair(i, mask, amap)
        with np.errstate(over="ignore", invalid="ignore"):
            scores = np.array(amap_a, dtype=self._dtype, order="C").ravel()
        if not np.isfinite(scores).all():
            raise ValueError(f"image {i}: anomaly map contains NaN or infinite values")
        scores += 0.0  # -0.0 -> 0.0: equal scores get one bit pattern (and one key)
        defect = np.not_equal(mask_a, 0)
        n_def = int(np.count_nonzero(defect))
        n_lab = 0
        if n_def:
            labels, n_lab = ndimage.label(defect, structure=_STRUCTURE_8)
            sizes = np.bincount(labels.ravel(), minlength=n_lab + 1)
            flat_def = defect.ravel()
            normal = scores[~flat_def]
            def_scores = scores[flat_def]
            def_sizes = sizes[labels.ravel()[flat_def]]
            del labels
            order = np.argsort(def_scores, kind="stable")
            def_scores = def_scores[order]
            def_sizes = np.ascontiguousarray(def_sizes[order], dtype=np.int64)
            del order
        else:
            normal = scores
            def_scores = np.empty(0, dtype=self._dtype)
            def_sizes = np.empty(0, dtype=np.int64)
        del defect
        normal.sort()
        vals_file, sizes_file = self._files()
        item = self._dtype.itemsize
        try:
            vals_file.seek(self._n_vals * item)
            sizes_file.seek(self._n_sizes * 8)
            if normal.size:
                vals_file.write(memoryview(normal).cast("B"))
            if def_scores.size:
                vals_file.write(memoryview(def_scores).cast("B"))
                sizes_file.write(memoryview(def_sizes).cast("B"))
        except BaseException:  # keep the files consistent with the bookkeeping (e.g. disk full)
            vals_file.truncate(self._n_vals * item)
            sizes_file.truncate(self._n_sizes * 8)
            raise
        for start, run, is_def, aux in (
            (self._n_vals, normal, False, 0),
            (self._n_vals + normal.size, def_scores, True, self._n_sizes),
        ):
            if run.size:
                stride = min(max(_INDEX_MIN_STRIDE, -(-run.size // _INDEX_SAMPLES)), _INDEX_MAX_STRIDE)
                self._runs.append((start, run.size, is_def, aux, stride))
                self._samples.append(run[::stride].copy())
        self._n_vals += normal.size + def_scores.size
        self._n_sizes += def_scores.size
        self._n_pos += n_def
        self._n_neg += normal.size
        self._n_comp += int(n_lab)
        self._n_images += 1
        self._auroc = None
        self._aupro.clear()
        self._curves.clear()

    # ----------------------------------------------------------------- metrics

    def pixel_auroc(self) -> float:
        """Pixel-level ROC-AUC over all pixels added (same value as :func:`pixel_auroc`)."""
        self._check_open()
        self._check_counts("pixel_auroc")
        if self._auroc is None:
            self._evaluate(want_auroc=True, max_fprs=(0.3,), resolution=_DEFAULT_RESOLUTION)
        assert self._auroc is not None
        return self._auroc

    def aupro(self, max_fpr: float = 0.3) -> float:
        """Exact normalised area under the PRO curve for FPR in [0, max_fpr] (same value as :func:`aupro`)."""
        if not 0.0 < max_fpr <= 1.0:
            raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
        self._check_open()
        self._check_counts("aupro")
        max_fpr = float(max_fpr)
        if max_fpr not in self._aupro:
            if self._auroc is None:  # first pass: compute everything at once
                self._evaluate(want_auroc=True, max_fprs=(max_fpr, 0.3), resolution=_DEFAULT_RESOLUTION)
            else:  # stops as soon as the curve passes max_fpr
                self._evaluate(want_auroc=False, max_fprs=(max_fpr,), resolution=None, want_curve=False)
        return self._aupro[max_fpr]

    def pro_curve(self, resolution: int | None = _DEFAULT_RESOLUTION) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Per-region-overlap curve ``(fpr, pro, thresholds)``, thresholds decreasing, from ``(0, 0, +inf)``.

        The points are exact vertices of the curve of :func:`pro_curve`. With ``resolution=None`` every
        vertex is returned (one per distinct score: as large as the data for continuous maps). With an
        integer ``resolution`` (default 10,000) the curve is subsampled for plotting: a vertex is kept when
        its FPR or PRO enters another interval ``[k / resolution, (k + 1) / resolution)`` than the
        previous vertex's, and the last vertex is always kept, so at most ``2 * resolution + 2`` points
        remain and every omitted vertex is within ``1 / resolution`` (in FPR and in PRO) of the kept vertex
        before it. :meth:`aupro` never uses the subsampled curve.
        """
        if resolution is not None and int(resolution) < 1:
            raise ValueError(f"resolution must be >= 1 or None, got {resolution}")
        self._check_open()
        self._check_counts("aupro")
        key = None if resolution is None else int(resolution)
        if key not in self._curves:
            self._evaluate(want_auroc=self._auroc is None, max_fprs=(0.3,), resolution=key)
        fpr, pro, thr = self._curves[key]
        return fpr.copy(), pro.copy(), thr.copy()

    def _check_counts(self, what: str) -> None:
        if self._n_images == 0:
            raise ValueError("no images given")
        if what == "pixel_auroc":
            if self._n_pos == 0 or self._n_neg == 0:
                raise ValueError("pixel_auroc needs both defect and defect-free pixels; only one class present")
        else:
            if self._n_comp == 0:
                raise ValueError("masks contain no defect pixels; AUPRO is undefined")
            if self._n_neg == 0:
                raise ValueError("masks contain no defect-free pixels; AUPRO is undefined")

    # ----------------------------------------------------------------- the pass

    def _key(self, v: np.generic) -> int:
        """Monotone integer key of a float: ``a < b`` iff ``key(a) < key(b)`` for finite, non-(-0.0) values."""
        bits = int(np.asarray(v, dtype=self._dtype).view(self._key_dtype))
        return bits ^ self._all_ones if bits & self._sign_bit else bits | self._sign_bit

    def _from_key(self, key: int) -> np.generic:
        bits = key ^ self._sign_bit if key & self._sign_bit else key ^ self._all_ones
        value: np.generic = np.array([bits], dtype=self._key_dtype).view(self._dtype)[0]
        return value

    def _points(self) -> Generator[tuple[np.ndarray, IntArray, IntArray, FloatArray, bool], None, None]:
        """Yield, chunk by chunk in decreasing score order, ``(thresholds, FP, TP, W, is_last)`` per distinct score.

        FP, TP and W are cumulative from the highest score (see the class docstring).
        """
        walk = self._start_walk()
        while (act := np.flatnonzero(walk.cur > walk.base)).size:
            top = walk.tops[act].max()
            c_act = walk.cur[act]
            lb = np.minimum(walk.reader.lower_bounds(top, act), c_act)
            n_top = int((c_act - lb).sum())
            if n_top > self._chunk:  # one score shared by more than a chunk of pixels: sum it up in pieces
                out = self._tie_point(walk, act, lb, top, n_top)
            else:
                lb = self._chunk_bound(walk, act, lb, top, n_top)
                out = self._chunk_points(walk, act, lb)
            walk.advance(act, lb)
            yield (*out, not bool((walk.cur > walk.base).any()))

    def _start_walk(self) -> _Walk:
        """The pass's start: every run whole, with its largest score."""
        vals_file, sizes_file = self._files()
        vals_file.flush()
        sizes_file.flush()
        runs = np.array(self._runs, dtype=np.int64).reshape(-1, 5)
        reader = _SortedRuns(vals_file, self._dtype, runs, self._samples)
        cur = reader.end.copy()  # run r still holds positions [base[r], cur[r])
        every = np.arange(runs.shape[0], dtype=np.int64)
        tops = reader.values_at(every, cur - 1)  # the largest remaining score of each run
        return _Walk(reader, sizes_file, runs[:, 0], runs[:, 2].astype(bool), runs[:, 3], cur, tops)

    def _tie_point(self, walk: _Walk, act: IntArray, lb: IntArray, top: np.generic, n_top: int) -> _Chunk:
        """The one point of score ``top``: the ``n_top`` pixels ``[lb, cur)`` of the active runs, W summed in pieces."""
        chunk = self._chunk
        b_act, c_act, d_act = walk.base[act], walk.cur[act], walk.is_def[act]
        counts = c_act - lb
        n_normal = int(counts[~d_act].sum())
        w_parts = [np.array([walk.w])]
        budget = 0
        for r in np.flatnonzero(d_act & (counts > 0)):
            start = int(walk.aux[act[r]] + (lb[r] - b_act[r]))
            stop = int(walk.aux[act[r]] + (c_act[r] - b_act[r]))
            for s in range(start, stop, chunk):
                part = 1.0 / (self._n_comp * walk.read_sizes(s, min(s + chunk, stop)).astype(np.float64))
                w_parts.append(part)
                budget += part.size
                if budget >= chunk:
                    w_parts = [np.cumsum(np.concatenate(w_parts))[-1:]]
                    budget = 0
        walk.w = float(np.cumsum(np.concatenate(w_parts))[-1])
        walk.fp += n_normal
        walk.tp += n_top - n_normal
        thr = np.array([top], dtype=self._dtype)
        return thr, np.array([walk.fp], dtype=np.int64), np.array([walk.tp], dtype=np.int64), np.array([walk.w])

    def _chunk_bound(self, walk: _Walk, act: IntArray, lb: IntArray, top: np.generic, n_top: int) -> IntArray:
        """The chunk's lower end in each active run: all that is left when it fits in a chunk, else searched."""
        b_act, c_act = walk.base[act], walk.cur[act]
        n_all = int((c_act - b_act).sum())
        if n_all <= self._chunk:
            return b_act
        return self._search_bound(walk, act, lb, top, n_top, n_all)

    def _search_bound(
        self, walk: _Walk, act: IntArray, lb: IntArray, top: np.generic, n_top: int, n_all: int
    ) -> IntArray:
        """The first position ``>= b`` in each active run (``lb``, ``n_top``: those of ``top``; ``n_all``: all left)."""
        # Search the key axis for a lower bound b with chunk / 2 <= count(>= b) <= chunk, keeping the
        # bracket count(>= key(hi)) <= chunk < count(>= key(lo)). Trial points interpolate the
        # counts (first guess: the previous chunk's density), falling back to bisection whenever
        # a step fails to halve the bracket, so it takes O(log key range) steps at worst.
        chunk, c_act = self._chunk, walk.cur[act]
        k_top = self._key(top)
        k_hi, lb_hi, n_hi = k_top, lb, n_top
        k_lo, n_lo = self._key(walk.reader.first_samples(act).min()), n_all
        target = (3 * chunk) // 4
        guess = None if walk.prev_density is None else k_top - int(target / walk.prev_density)
        bisect = False
        while k_hi - k_lo > 1 and n_hi < chunk // 2:
            if guess is not None:
                k_mid, guess = guess, None
            elif bisect:
                k_mid = (k_lo + k_hi) // 2
            else:
                k_mid = k_hi - int((k_hi - k_lo) * ((target - n_hi) / (n_lo - n_hi)))
            k_mid = min(max(k_mid, k_lo + 1), k_hi - 1)
            lb_mid = np.minimum(walk.reader.lower_bounds(self._from_key(k_mid), act), c_act)
            n_mid = int((c_act - lb_mid).sum())
            width = k_hi - k_lo
            if n_mid <= chunk:
                k_hi, lb_hi, n_hi = k_mid, lb_mid, n_mid
            else:
                k_lo, n_lo = k_mid, n_mid
            bisect = 2 * (k_hi - k_lo) > width
        walk.prev_density = max(n_hi, 1) / max(k_top - k_hi, 1)
        return lb_hi

    def _chunk_points(self, walk: _Walk, act: IntArray, lb: IntArray) -> _Chunk:
        """Read the scores (and defect component sizes) ``[lb, cur)`` of the active runs; one point per score."""
        b_act, c_act, d_act = walk.base[act], walk.cur[act], walk.is_def[act]
        normal_parts: list[np.ndarray] = []
        def_parts: list[np.ndarray] = []
        size_parts: list[np.ndarray] = []
        for r in np.flatnonzero(c_act > lb):
            lo_r, hi_r = int(lb[r]), int(c_act[r])
            if d_act[r]:
                def_parts.append(walk.reader.read(lo_r, hi_r))
                shift = int(walk.aux[act[r]] - b_act[r])
                size_parts.append(walk.read_sizes(shift + lo_r, shift + hi_r))
            else:
                normal_parts.append(walk.reader.read(lo_r, hi_r))
        out = self._reduce_chunk(normal_parts, def_parts, size_parts, walk.fp, walk.tp, walk.w)
        del normal_parts, def_parts, size_parts
        walk.fp, walk.tp, walk.w = int(out[1][-1]), int(out[2][-1]), float(out[3][-1])
        return out

    def _reduce_chunk(
        self,
        normal_parts: list[np.ndarray],
        def_parts: list[np.ndarray],
        size_parts: list[np.ndarray],
        fp: int,
        tp: int,
        w: float,
    ) -> tuple[np.ndarray, npt.NDArray[np.int64], npt.NDArray[np.int64], FloatArray]:
        """Reduce one chunk to one cumulative point per distinct score, in decreasing score order.

        Only the scores are sorted (no argsort of the chunk): with ``u`` all scores sorted ascending and
        ``s`` the first index of a distinct score ``t`` in ``u``, ``len(u) - s`` pixels are ``>= t``; the
        defect pixels ``>= t`` are counted in the (short) sorted defect scores, and the defect-free ones
        are the difference.
        """
        empty = np.empty(0, dtype=self._dtype)
        u = np.concatenate([empty, *normal_parts, *def_parts])
        u.sort()
        starts = np.flatnonzero(np.concatenate(([True], u[1:] != u[:-1])))
        thresholds = u[starts]  # ascending here, reversed at the end
        n_ge = u.size - starts  # pixels >= threshold in this chunk
        del u, starts
        if def_parts:
            d_scores = np.concatenate(def_parts)
            d_weights = 1.0 / (self._n_comp * np.concatenate(size_parts).astype(np.float64))
            order = np.argsort(d_scores, kind="stable")
            d_scores = d_scores[order]
            d_weights = d_weights[order[::-1]]  # descending score order
            del order
            d_weights[0] += w  # sequential sum continued from the previous chunk
            np.cumsum(d_weights, out=d_weights)  # d_weights[k - 1] = W after the k highest defect pixels
            k_def = d_scores.size - np.searchsorted(d_scores, thresholds, side="left")  # defect pixels >= t
            w_cum = np.where(k_def > 0, d_weights[np.maximum(k_def - 1, 0)], w)
        else:
            k_def = np.zeros(thresholds.size, dtype=np.int64)
            w_cum = np.full(thresholds.size, w)
        fp_cum = (n_ge - k_def).astype(np.int64)[::-1] + fp
        tp_cum = k_def.astype(np.int64)[::-1] + tp
        return thresholds[::-1], fp_cum, tp_cum, w_cum[::-1]

    def _evaluate(
        self,
        *,
        want_auroc: bool,
        max_fprs: tuple[float, ...],
        resolution: int | None,
        want_curve: bool = True,
    ) -> None:
        """One pass over the spilled scores; fills the caches for what was asked."""
        n_pos, n_neg = self._n_pos, self._n_neg
        exact_int64 = 2 * n_pos * n_neg < 2**63
        twice_area = 0
        fp_prev, tp_prev = 0, 0
        x_prev, y_prev = 0.0, 0.0
        areas = {m: 0.0 for m in max_fprs}
        open_fprs = set(max_fprs)
        gx_prev = gy_prev = 0
        curve_x: list[FloatArray] = [np.zeros(1)]
        curve_y: list[FloatArray] = [np.zeros(1)]
        curve_t: list[FloatArray] = [np.full(1, np.inf)]
        points = self._points()
        try:
            for thr, fp_c, tp_c, w_c, is_last in points:
                if want_auroc:
                    fp_p = np.concatenate(([fp_prev], fp_c[:-1]))
                    tp_p = np.concatenate(([tp_prev], tp_c[:-1]))
                    if exact_int64:
                        twice_area += int(np.sum((fp_c - fp_p) * (tp_c + tp_p)))
                    else:  # beyond int64: Python integers (exact, slow; > 3e9 pixels)
                        twice_area += int(
                            np.sum((fp_c - fp_p).astype(object) * (tp_c + tp_p).astype(object))
                        )
                    fp_prev, tp_prev = int(fp_c[-1]), int(tp_c[-1])
                fpr = fp_c.astype(np.float64) / n_neg
                pro = np.minimum(w_c, 1.0)
                if is_last:
                    pro[-1] = 1.0  # the lowest threshold covers every pixel; remove accumulated rounding
                for m in sorted(open_fprs):
                    x = np.concatenate(([x_prev], fpr))
                    y = np.concatenate(([y_prev], pro))
                    i = int(np.searchsorted(x, m, side="right"))  # x[i-1] <= m < x[i]
                    if i < x.size:
                        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
                        y_cut = y0 + (y1 - y0) * (m - x0) / (x1 - x0)
                        x = np.append(x[:i], m)
                        y = np.append(y[:i], y_cut)
                        open_fprs.discard(m)
                    areas[m] += float(np.sum(np.diff(x) * (y[1:] + y[:-1])))
                if want_curve:
                    if resolution is None:
                        keep = slice(None)
                    else:
                        gx = np.floor(fpr * resolution).astype(np.int64)
                        gy = np.floor(pro * resolution).astype(np.int64)
                        moved = gx != np.concatenate(([gx_prev], gx[:-1]))
                        moved |= gy != np.concatenate(([gy_prev], gy[:-1]))
                        if is_last:
                            moved[-1] = True
                        keep = np.flatnonzero(moved)  # type: ignore[assignment]
                        gx_prev, gy_prev = int(gx[-1]), int(gy[-1])
                    curve_x.append(fpr[keep])
                    curve_y.append(pro[keep])
                    curve_t.append(thr[keep].astype(np.float64))
                x_prev, y_prev = float(fpr[-1]), float(pro[-1])
                if not want_auroc and not want_curve and not open_fprs:
                    break
        finally:
            points.close()
        if want_auroc:
            self._auroc = twice_area / (2.0 * n_pos * n_neg)
        for m in max_fprs:
            self._aupro[m] = min(max(areas[m] / 2.0 / m, 0.0), 1.0)
        if want_curve:
            self._curves[resolution] = (np.concatenate(curve_x), np.concatenate(curve_y), np.concatenate(curve_t))


# --------------------------------------------------------------------------- AUPIMO
AUPIMO_FPR_BOUNDS = (1e-5, 1e-4)  # the shared-FPR range AUPIMO integrates over (anomalib's default)
AUPIMO_THRESHOLDS = 300_000  # thresholds, evenly spaced over the normal images' scores (anomalib's default)


class Aupimo:
    """AUPIMO (Bertoldo et al. 2024, "AUPIMO: Redefining Visual Anomaly Detection Benchmarks with High Speed and
    Low Tolerance"), computed as anomalib's ``aupimo_scores`` computes it, fed one ``(mask, map)`` at a time.

    An image whose mask is empty is *normal*, any other *anomalous* (as anomalib decides from the masks).
    ``thresholds`` are ``AUPIMO_THRESHOLDS`` values evenly spaced from the lowest to the highest score of the
    normal images; at each, the *shared FPR* is the mean over the normal images of their fraction of pixels
    ``>= threshold``, and each anomalous image's TPR is its fraction of defect pixels ``>= threshold``. The
    integration range runs between the thresholds whose shared FPR is closest to the bounds (1e-4 and 1e-5);
    an image's AUPIMO is the trapezoid area under its TPR over ``ln(shared FPR)`` there, divided by
    ``ln(1e-4 / 1e-5)`` and clipped to [0, 1]. :meth:`score` is their mean over the anomalous images.

    Memory: each normal image's scores, sorted (float32), and each anomalous image's defect-pixel scores.
    """

    def __init__(self, num_thresholds: int = AUPIMO_THRESHOLDS,
                 fpr_bounds: tuple[float, float] = AUPIMO_FPR_BOUNDS) -> None:
        self.num_thresholds, self.fpr_bounds = num_thresholds, fpr_bounds
        self._normal: list[np.ndarray] = []
        self._defect: list[np.ndarray] = []
        self._cache: tuple[float | None, FloatArray] | None = None

    def add(self, mask: npt.ArrayLike, amap: npt.ArrayLike) -> None:
        m, a = _checked_pair(len(self._normal) + len(self._defect), mask, amap)
        m = m.astype(bool)
        if m.any():
            self._defect.append(np.sort(a[m].astype(np.float64)))
        else:
            self._normal.append(np.sort(a.ravel()))
        self._cache = None

    def per_image(self) -> FloatArray:
        """Each anomalous image's AUPIMO, in the order added (``nan`` for all where it is undefined)."""
        return self._compute()[1]

    def score(self) -> float | None:
        """The mean AUPIMO over the anomalous images; ``None`` without normal or anomalous images, or when
        the shared FPR does not span the integration range."""
        return self._compute()[0]

    def _compute(self) -> tuple[float | None, FloatArray]:
        if self._cache is None:
            self._cache = self._evaluate()
        return self._cache

    def _evaluate(self) -> tuple[float | None, FloatArray]:
        none = (None, np.full(len(self._defect), np.nan))
        if not self._normal or not self._defect:
            return none
        lo = min(float(v[0]) for v in self._normal)
        hi = max(float(v[-1]) for v in self._normal)
        if not hi > lo:
            return none
        thresholds = np.linspace(lo, hi, self.num_thresholds)
        shared = np.zeros(self.num_thresholds)
        for v in self._normal:  # fraction of the image's pixels >= each threshold
            shared += (len(v) - np.searchsorted(v.astype(np.float64), thresholds, side="left")) / len(v)
        shared /= len(self._normal)
        low_fpr, high_fpr = self.fpr_bounds
        if shared.min() > low_fpr or shared.max() < high_fpr:  # too few normal pixels to reach the bounds
            return none
        top = int(np.argmin(np.abs(shared - low_fpr)))  # the higher threshold: FPR closest to the lower bound
        bottom = int(np.argmin(np.abs(shared - high_fpr)))
        if bottom >= top:
            return none
        fpr = shared[bottom : top + 1][::-1]
        with np.errstate(divide="ignore"):
            log_fpr = np.log(fpr)
        ok = np.isfinite(log_fpr)
        if ok.sum() < 2:
            return none
        span = thresholds[bottom : top + 1][::-1][ok]
        areas = []
        for v in self._defect:
            tpr = (len(v) - np.searchsorted(v, span, side="left")) / len(v)
            areas.append(np.trapezoid(tpr, x=log_fpr[ok]) / np.log(high_fpr / low_fpr))
        per = np.clip(np.asarray(areas, np.float64), 0.0, 1.0)
        return float(per.mean()), per


def aupimo(masks: Sequence[npt.ArrayLike], maps: Sequence[npt.ArrayLike], **kwargs: Any) -> float | None:
    """Mean AUPIMO over the anomalous images of ``(mask, map)`` pairs (see :class:`Aupimo`)."""
    acc = Aupimo(**kwargs)
    for m, a in _validated_pairs(masks, maps):
        acc.add(m, a)
    return acc.score()

"""Images into the network input and maps back to the image, in numpy: the same operations as spade-ad's
``preprocess`` and ``correspondence.maps`` (torch's bilinear interpolation with and without antialiasing,
Pillow's resize for the paper's crop, the reflect-padded Gaussian), to float32 rounding.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PAPER_RATIO = 256 / 224


def _aa_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Torch's antialiased bilinear resize along one axis (align_corners=False) as taps: (n_out, K) source
    indices and float32 weights (computed as torch does, in float32; unused taps: weight 0 on a valid index)."""
    f = np.float32
    scale = f(n_in) / f(n_out)
    support = scale if scale >= 1.0 else f(1.0)
    inv = f(1.0) / scale if scale >= 1.0 else f(1.0)
    lo_hi, weights = [], []
    for i in range(n_out):
        centre = scale * f(i + 0.5)
        lo = max(int(centre - support + f(0.5)), 0)
        hi = min(int(centre + support + f(0.5)), n_in)
        j = np.arange(lo, hi)
        t = np.maximum(f(0), f(1) - np.abs(((j - lo).astype(f) + f(lo) - centre + f(0.5)) * inv))
        total = f(0)
        for v in t:
            total += v
        lo_hi.append(lo)
        weights.append(t / total if total != 0 else t)
    k = max(len(w) for w in weights)
    idx = np.minimum(np.asarray(lo_hi)[:, None] + np.arange(k)[None], n_in - 1)
    w = np.zeros((n_out, k), np.float32)
    for i, wi in enumerate(weights):
        w[i, : len(wi)] = wi
    return idx, w


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Torch's bilinear resize along one axis (align_corners=False, no antialias) as two taps per output."""
    f = np.float32
    scale = f(n_in) / f(n_out)  # as torch computes it: in float32
    # scale * (i + 0.5) - 0.5 rounded once (torch's kernel contracts it into a fused multiply-add)
    src = np.maximum((np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(f), f(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = np.minimum(src - i0.astype(f), f(1)) if n_in > 1 else np.zeros(n_out, f)
    return np.stack([i0, i1], axis=1), np.stack([f(1) - lam, lam], axis=1).astype(f)


def _along(x: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The first axis of ``x`` resampled by taps: each output row the sum, tap by tap in order, of source rows
    times weights, in float32 (one rounding per operation: the same bits on every machine)."""
    shape = (idx.shape[0],) + (1,) * (x.ndim - 1)
    acc = x[idx[:, 0]] * w[:, 0].reshape(shape)  # (uint8 rows become float32 here, exactly)
    for j in range(1, idx.shape[1]):
        acc += x[idx[:, j]] * w[:, j].reshape(shape)
    return acc


def resample(x: np.ndarray, shape: tuple[int, int], antialias: bool) -> np.ndarray:
    """``x`` (H, W[, C]) resized to ``shape`` by torch's bilinear interpolation (align_corners=False; with
    ``antialias`` its antialiased form), in float32 (torch's values to float32 rounding): the height first,
    then the width, each by taps over whole rows."""
    x = np.asarray(x)
    x = x if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
    taps = _aa_taps if antialias else _linear_taps
    if x.shape[0] != shape[0]:
        x = _along(x, *taps(x.shape[0], shape[0]))
    if x.shape[1] != shape[1]:
        x = np.ascontiguousarray(np.swapaxes(_along(np.ascontiguousarray(np.swapaxes(x, 0, 1)),
                                                    *taps(x.shape[1], shape[1])), 0, 1))
    return x.astype(np.float32, copy=False)


def rescale(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``image`` (H, W[, C]) resized to ``shape`` (bilinear, antialiased when shrinking either axis); same dtype
    (uint8: rounded to the nearest, ties to even, and clipped). The identity (the same array) when the size
    already matches. The one definition for spade-ad's tiles and the runtime's: the same bytes in both."""
    if image.shape[:2] == tuple(shape):
        return image
    out = resample(image, shape, shape[0] < image.shape[0] or shape[1] < image.shape[1])
    if image.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(image.dtype, copy=False)


def to_input(image: np.ndarray, mode: str, size: int, shape: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 -> (3, *shape) float32 in [0, 255]: spade-ad's ``Preprocessor.to_input``."""
    if mode == "paper":
        r = round(size * PAPER_RATIO)
        o = (r - size) // 2
        pil = Image.fromarray(np.ascontiguousarray(image)).resize((r, r), Image.Resampling.BILINEAR)
        crop = np.asarray(pil)[o : o + size, o : o + size]
        return np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32)
    x = resample(image, shape, antialias=True)
    return np.ascontiguousarray(np.clip(x, 0, 255).transpose(2, 0, 1))


def crop_box(mode: str, size: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1): the part of an image that the network sees (the paper's centre crop, or all)."""
    if mode != "paper":
        return 0, 0, height, width
    r = round(size * PAPER_RATIO)
    o = (r - size) // 2
    return (round(o * height / r), round(o * width / r), round((o + size) * height / r),
            round((o + size) * width / r))


def resize_map(amap: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D map (torch's ``interpolate``, align_corners=False, no antialias)."""
    return resample(amap, (height, width), antialias=False)


def map_to_image(amap: np.ndarray, mode: str, size: int, height: int, width: int) -> np.ndarray:
    """An input-frame map -> the image frame (height, width), 0 outside the paper's crop."""
    y0, x0, y1, x1 = crop_box(mode, size, height, width)
    inner = resize_map(amap, y1 - y0, x1 - x0)
    if (y0, x0, y1, x1) == (0, 0, height, width):
        return inner
    out = np.zeros((height, width), np.float32)
    out[y0:y1, x0:x1] = inner
    return out


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _reflect_index(n: int, r: int) -> np.ndarray:
    j = np.arange(-r, n + r) % (2 * n)
    return np.where(j >= n, 2 * n - 1 - j, j)


def gaussian_blur(amap: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D map (scipy.ndimage.gaussian_filter, mode='reflect', truncate=4)."""
    if sigma <= 0:
        return amap
    k = gaussian_kernel1d(sigma)
    r = (k.size - 1) // 2
    h, w = amap.shape
    x = np.asarray(amap, np.float32)[:, _reflect_index(w, r)]
    x = np.lib.stride_tricks.sliding_window_view(x, k.size, axis=1) @ k
    x = x[_reflect_index(h, r), :]
    return np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(x, k.size, axis=0) @ k, np.float32)


def combine_levels(level_maps: list[np.ndarray], shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Per-level (h, w) maps -> one (H, W) map: bilinear upsampling, equal-weight mean, Gaussian smoothing."""
    up = [resize_map(m, *shape) for m in level_maps]
    mean = np.asarray(np.mean(np.stack(up), axis=0, dtype=np.float32))
    return gaussian_blur(mean, sigma)


__all__ = ["to_input", "map_to_image", "resize_map", "resample", "rescale", "combine_levels", "gaussian_blur",
           "crop_box"]

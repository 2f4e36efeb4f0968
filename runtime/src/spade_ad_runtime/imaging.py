"""Images into the network input and maps back to the image, in numpy: the same operations as spade-ad's
``preprocess`` and ``correspondence.maps`` (torch's bilinear interpolation with and without antialiasing,
Pillow's resize for the paper's crop, the reflect-padded Gaussian), to float32 rounding.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PAPER_RATIO = 256 / 224


def _aa_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's antialiased bilinear resize along one axis (align_corners=False),
    computed as torch does, in float32."""
    f = np.float32
    scale = f(n_in) / f(n_out)
    support = scale if scale >= 1.0 else f(1.0)
    inv = f(1.0) / scale if scale >= 1.0 else f(1.0)
    w = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        centre = scale * f(i + 0.5)
        lo = max(int(centre - support + f(0.5)), 0)
        hi = min(int(centre + support + f(0.5)), n_in)
        j = np.arange(lo, hi)
        t = np.maximum(f(0), f(1) - np.abs(((j - lo).astype(f) + f(lo) - centre + f(0.5)) * inv))
        total = f(0)
        for v in t:
            total += v
        w[i, lo:hi] = t / total if total != 0 else t
    return w


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's bilinear resize along one axis (align_corners=False, no antialias)."""
    f = np.float32
    scale = f(n_in) / f(n_out)  # as torch computes it: in float32
    # scale * (i + 0.5) - 0.5 rounded once (torch's kernel contracts it into a fused multiply-add)
    src = np.maximum((np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(f), f(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = np.minimum(src - i0.astype(f), f(1)) if n_in > 1 else np.zeros(n_out, f)
    w = np.zeros((n_out, n_in), np.float32)
    np.add.at(w, (np.arange(n_out), i0), f(1) - lam)
    np.add.at(w, (np.arange(n_out), i1), lam)
    return w


def _separable(x: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """``wy @ x @ wx.T`` over the first two axes of ``x`` (H, W[, C]), in float32."""
    wy32, wx32 = wy.astype(np.float32), wx.astype(np.float32)
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        return (wy32 @ x) @ wx32.T
    planes = np.ascontiguousarray(x.transpose(2, 0, 1))  # (C, H, W): one BLAS product per side and channel
    return np.ascontiguousarray((wy32 @ planes @ wx32.T).transpose(1, 2, 0))


def to_input(image: np.ndarray, mode: str, size: int, shape: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 -> (3, *shape) float32 in [0, 255]: spade-ad's ``Preprocessor.to_input``."""
    if mode == "paper":
        r = round(size * PAPER_RATIO)
        o = (r - size) // 2
        pil = Image.fromarray(np.ascontiguousarray(image)).resize((r, r), Image.Resampling.BILINEAR)
        crop = np.asarray(pil)[o : o + size, o : o + size]
        return np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32)
    h, w = image.shape[:2]
    x = np.asarray(image, np.float32)
    if (h, w) != tuple(shape):
        x = _separable(x, _aa_weights(h, shape[0]), _aa_weights(w, shape[1]))
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
    if amap.shape == (height, width):
        return np.asarray(amap, np.float32)
    return _separable(amap, _linear_weights(amap.shape[0], height), _linear_weights(amap.shape[1], width))


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


__all__ = ["to_input", "map_to_image", "resize_map", "combine_levels", "gaussian_blur", "crop_box"]

"""Heatmaps with one fixed, documented colour scale per model.

A map value is first normalised by the model's pixel threshold (1.0 = exactly at the threshold), then
coloured on a fixed scale from 0 to 2: dark (normal) through red to yellow-white, with the threshold at
the middle of the scale. The same value always gets the same colour in every image of a model. Without
a threshold (a model fitted on a single image) the scale falls back to [0, max of the map].
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

SCALE_MAX = 2.0  # normalised score at the top of the colour scale

# Anchor colours of matplotlib's "inferno" colour map (perceptually uniform, colour-blind friendly).
_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)], 1
).round().astype(np.uint8)


def normalise(amap: np.ndarray, threshold: float | None) -> np.ndarray:
    """Map -> normalised score (1.0 = at the threshold)."""
    if threshold is None or threshold <= 0:
        top = float(amap.max()) if amap.size else 1.0
        return amap / (top / SCALE_MAX if top > 0 else 1.0)
    return amap / threshold


def colourise(norm: np.ndarray) -> np.ndarray:
    """Normalised map -> HxWx3 uint8 using the fixed scale [0, SCALE_MAX]."""
    return _LUT[scale_index(norm)]


def scale_index(norm: np.ndarray) -> np.ndarray:
    """Normalised map -> uint8 position on the colour scale (0 at 0, 255 at ``SCALE_MAX`` and above)."""
    return np.clip(norm * (255.0 / SCALE_MAX), 0, 255).astype(np.uint8)


# Per scale position: the heatmap's opacity in the overlay, 0.35 (normal) rising to 0.8 (SCALE_MAX), in 1/255.
_ALPHA = [round(255 * (0.35 + 0.45 * i / 255)) for i in range(256)]
_PALETTE = _LUT.reshape(-1).tolist()


def overlay(image: np.ndarray, amap: np.ndarray, threshold: float | None, mask: np.ndarray | None) -> np.ndarray:
    """Image blended with its heatmap (more opaque where the score is high), mask outlined in cyan.

    The blend runs in Pillow's C code (palette lookup and alpha composite): a few milliseconds for a
    900x900 image, so writing overlays does not hold up ``spade-ad predict``.
    """
    idx = Image.fromarray(scale_index(normalise(amap, threshold)))
    alpha = idx.point(_ALPHA)
    idx.putpalette(_PALETTE)  # (the index picture becomes a palette image coloured by the scale)
    out = np.array(Image.composite(idx.convert("RGB"), Image.fromarray(np.ascontiguousarray(image)), alpha))
    if mask is not None and mask.any():
        out[mask_edge(mask, max(1, min(image.shape[:2]) // 200))] = (0, 255, 255)
    return out


def mask_edge(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels of ``mask`` within ``width`` pixels (4-connected steps) of its outside or the image border.

    Computed on the mask's bounding box grown by ``width + 1``: outside it everything is outside the mask,
    so the result equals eroding the whole picture.
    """
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    edge = np.zeros_like(mask, dtype=bool)
    if not len(ys):
        return edge
    pad = width + 1
    y0, y1 = max(0, ys[0] - pad), min(mask.shape[0], ys[-1] + 1 + pad)
    x0, x1 = max(0, xs[0] - pad), min(mask.shape[1], xs[-1] + 1 + pad)
    box = mask[y0:y1, x0:x1].astype(bool)
    edge[y0:y1, x0:x1] = box & ~_erode(box, width)
    return edge


def _erode(box: np.ndarray, width: int) -> np.ndarray:
    """Binary erosion by the 4-connected cross, ``width`` times, outside the array counted as background
    (``scipy.ndimage.binary_erosion(box, iterations=width)``; the runtime does without scipy)."""
    e = box.copy()
    for _ in range(width):
        p = np.pad(e, 1)
        e = e & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return e


def colour_bar(height: int = 256, width: int = 60, threshold: float | None = None) -> np.ndarray:
    """A vertical colour bar for the fixed scale, labelled 0, threshold (1.0) and SCALE_MAX."""
    ramp = np.linspace(SCALE_MAX, 0, height)[:, None].repeat(16, 1)
    bar = Image.new("RGB", (width, height), (255, 255, 255))
    bar.paste(Image.fromarray(colourise(ramp)), (0, 0))
    draw = ImageDraw.Draw(bar)
    for v in (0.0, 1.0, SCALE_MAX):
        y = int(round((1 - v / SCALE_MAX) * (height - 1)))
        draw.line([(16, y), (20, y)], fill=(0, 0, 0))
        label = f"{v:g}" if threshold is None else f"{v * threshold:.3g}"
        draw.text((22, max(0, min(height - 10, y - 5))), label, fill=(0, 0, 0))
    return np.asarray(bar)


# --------------------------------------------------------------------------- pictures for pages
# (shared by the HTML report and the inspector)


def small_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) scaled down so that the longer side is at most ``side`` (never up)."""
    s = min(1.0, side / max(height, width))
    return max(1, round(height * s)), max(1, round(width * s))


def resize_rgb(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 -> hw (bilinear)."""
    if image.shape[:2] == hw:
        return image
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


def resize_map(amap: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A float map -> hw (bilinear), float32."""
    if amap.shape == hw:
        return amap.astype(np.float32)
    img = Image.fromarray(amap.astype(np.float32), mode="F").resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A bool mask -> hw; area-average then threshold at a quarter keeps thin regions visible."""
    if mask.shape == hw:
        return mask.astype(bool)
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.Resampling.BOX)
    return np.asarray(small) >= 64


def mask_picture(mask: np.ndarray) -> np.ndarray:
    """A bool mask as a white-on-black RGB picture."""
    return np.where(mask[..., None], np.uint8(255), np.uint8(0)).repeat(3, axis=2)


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    """An image array as PNG or JPEG bytes (bool arrays become 1-bit PNGs)."""
    buf = io.BytesIO()
    img = Image.fromarray(array)
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=88)
    else:
        (img.convert("1") if array.dtype == np.bool_ else img).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(array: np.ndarray, fmt: str = "PNG") -> str:
    """An image array as a ``data:`` URI (for self-contained pages)."""
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(encode(array, fmt)).decode('ascii')}"


__all__ = ["SCALE_MAX", "normalise", "colourise", "scale_index", "overlay", "mask_edge", "colour_bar", "small_size",
           "resize_rgb", "resize_map", "resize_mask", "mask_picture", "encode", "data_uri"]

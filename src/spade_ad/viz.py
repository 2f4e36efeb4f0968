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
from scipy import ndimage

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
    idx = np.clip(norm / SCALE_MAX * 255.0, 0, 255).astype(np.uint8)
    return _LUT[idx]


def overlay(image: np.ndarray, amap: np.ndarray, threshold: float | None, mask: np.ndarray | None) -> np.ndarray:
    """Image blended with its heatmap (more opaque where the score is high), mask outlined in cyan."""
    norm = normalise(amap, threshold)
    heat = colourise(norm).astype(np.float32)
    alpha = (0.35 + 0.45 * np.clip(norm / SCALE_MAX, 0, 1))[..., None]
    out = image.astype(np.float32) * (1 - alpha) + heat * alpha
    if mask is not None and mask.any():
        edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, min(image.shape[:2]) // 200))
        out[edge] = (0, 255, 255)
    return np.clip(out, 0, 255).astype(np.uint8)


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

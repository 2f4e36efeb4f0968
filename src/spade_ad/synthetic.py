"""Deterministic synthetic inspection data set in the MVTec-AD folder layout.

``spade-ad demo`` must run end to end with nothing to download, so this module paints a small
industrial-inspection set: a brushed metal cap with a printed pattern (rings, tick marks, a
logo and text-like bars) lying on a woven conveyor belt.  Normal images differ by small
nuisance changes (a shift of a few pixels, a small rotation, lighting, texture and sensor
noise); defect images carry a thin scratch or an irregular stain, and their ground-truth
mask is exactly the set of pixels the defect paints (its coverage thresholded at 0.5).

Everything is vectorised numpy/scipy and every image draws from its own generator seeded by
``(seed, split, index)``, so the same arguments always give byte-identical PNG files.

Layout written by :func:`make_dataset`::

    root/category/train/good/000.png ...
    root/category/test/good/000.png ...
    root/category/test/scratch/000.png ...      root/category/test/blob/000.png ...
    root/category/ground_truth/scratch/000_mask.png ...  (mode "L", values 0 or 255)
"""

from __future__ import annotations

import io
import math
import os
import re
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

__all__ = ["DEFECT_KINDS", "DefectKind", "add_defect", "make_dataset", "render_good"]

DefectKind = Literal["scratch", "blob"]
DEFECT_KINDS: tuple[DefectKind, ...] = ("scratch", "blob")

_OBJECT_RADIUS = 0.36  # radius of the metal cap, as a fraction of the image size
_DEFECT_ZONE = 0.6  # defects are centred within this fraction of the cap radius
_STREAMS = {"train": 0, "test_good": 1, "scratch": 2, "blob": 3}

_BELT_RGB = np.array([66.0, 72.0, 84.0], dtype=np.float32)
_METAL_RGB = np.array([188.0, 187.0, 181.0], dtype=np.float32)
_INK_RGB = np.array([34.0, 46.0, 86.0], dtype=np.float32)
# Stain colours: rust, oil, verdigris, dried white residue.
_STAIN_RGB = np.array(
    [[152.0, 80.0, 34.0], [42.0, 34.0, 26.0], [64.0, 142.0, 112.0], [240.0, 234.0, 214.0]], dtype=np.float32
)

F32 = NDArray[np.float32]


# --------------------------------------------------------------------------------------------
# Canonical (pose-free) layers, computed once per image size.
# --------------------------------------------------------------------------------------------


def _cov(signed_dist: F32) -> F32:
    """Pixel coverage of a shape from its signed distance (positive inside), 1 px anti-aliasing."""
    return np.clip(signed_dist + 0.5, 0.0, 1.0).astype(np.float32)


def _box(u: F32, v: F32, cu: float, cv: float, hu: float, hv: float) -> F32:
    return _cov(hu - np.abs(u - cu)) * _cov(hv - np.abs(v - cv))


@lru_cache(maxsize=8)
def _template(size: int) -> F32:
    """Layers ``[disc, ink, shade, shadow]`` of the cap in its canonical pose, shape (4, S, S)."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = xx - c, yy - c
    r = _OBJECT_RADIUS * size
    d = np.hypot(u, v)
    theta = np.arctan2(v, u)

    disc = _cov(r - d)

    # Lighting from the top left: gentle gradient on the face, a lit/shadowed bevel on the rim
    # and a thin dark groove where the face meets the bevel.
    light = -(u + v) / (math.sqrt(2.0) * r)
    face = 1.0 + 0.07 * light - 0.06 * (d / r) ** 2
    bevel_light = -(u + v) / (math.sqrt(2.0) * np.maximum(d, 1.0))
    bevel = 0.86 + 0.2 * bevel_light
    rim = _cov(d - 0.91 * r)
    shade = face * (1.0 - rim) + bevel * rim
    shade *= 1.0 - 0.35 * _cov(max(0.6, 0.006 * size) - np.abs(d - 0.91 * r))

    # Printed pattern.
    ink = np.zeros((size, size), dtype=np.float32)
    ink = np.maximum(ink, _cov(0.022 * r - np.abs(d - 0.80 * r)))  # bold ring
    ink = np.maximum(ink, _cov(max(0.5, 0.008 * r) - np.abs(d - 0.70 * r)))  # fine ring
    step = 2.0 * math.pi / 36.0  # tick marks every 10 degrees
    ang = theta - np.round(theta / step) * step
    ticks = _cov(max(0.6, 0.012 * r) - np.abs(d * ang)) * _cov(0.025 * r - np.abs(d - 0.75 * r))
    ink = np.maximum(ink, ticks)

    # Logo: hexagon outline with a filled triangle, above the centre.
    lu, lv = u, v + 0.30 * r
    hexa = np.maximum(np.abs(lu) * (math.sqrt(3.0) / 2.0) + np.abs(lv) / 2.0, np.abs(lv)) - 0.19 * r
    ink = np.maximum(ink, _cov(0.025 * r - np.abs(hexa)))
    tri = np.full((size, size), -np.inf, dtype=np.float32)
    for k in range(3):
        a = -math.pi / 2.0 + k * 2.0 * math.pi / 3.0
        tri = np.maximum(tri, lu * math.cos(a) + lv * math.sin(a) - 0.06 * r)
    ink = np.maximum(ink, _cov(-tri))

    # Text-like bars: two lines of "characters" below the centre, fixed layout.
    layout = np.random.default_rng(20240611)
    for line_v, height, half_span in ((0.14, 0.10, 0.50), (0.32, 0.065, 0.36)):
        pos = -half_span
        while True:
            if layout.random() < 0.18 and pos > -half_span:
                pos += 0.07  # word gap
            width = float(layout.uniform(0.035, 0.085))
            if pos + width > half_span:
                break
            h = height * (1.25 if layout.random() < 0.2 else 1.0)
            cu, cv = (pos + width / 2.0) * r, (line_v + (height - h) / 2.0) * r
            char = _box(u, v, cu, cv, width * r / 2.0, h * r / 2.0)
            if layout.random() < 0.35:  # a counter ("o"-like hole)
                char = char * (1.0 - _box(u, v, cu, cv, width * r / 5.0, h * r / 5.0))
            ink = np.maximum(ink, char)
            pos += width + 0.028
    ink *= disc

    # Soft drop shadow towards the bottom right.
    shifted = _cov(r - np.hypot(u - 0.035 * r, v - 0.05 * r))
    shadow = ndimage.gaussian_filter(shifted, sigma=0.035 * size)

    layers = np.stack([disc, ink, shade, shadow]).astype(np.float32)
    layers.setflags(write=False)
    return layers


@lru_cache(maxsize=8)
def _weave(size: int) -> F32:
    """Woven-belt texture in about [-0.5, 0.5], with a two-period margin for random offsets."""
    p = max(4, round(size / 42))
    n = size + 2 * p
    yy, xx = np.mgrid[0:n, 0:n]
    across = np.sin(np.pi * (xx % p + 0.5) / p)  # vertical thread profile
    along = np.sin(np.pi * (yy % p + 0.5) / p)  # horizontal thread profile
    checker = ((xx // p + yy // p) % 2).astype(bool)
    weave = np.where(checker, across, along).astype(np.float32) - 0.6
    weave.setflags(write=False)
    return weave


@lru_cache(maxsize=16)
def _upsampler(size: int, cell: int) -> F32:
    """Matrix (size, g) that smoothly interpolates a coarse grid of ``g`` nodes ``cell`` px apart."""
    g = size // cell + 4
    pos = (np.arange(size) + 0.5) / cell + 1.5
    weights = np.exp(-0.5 * ((pos[:, None] - np.arange(g)[None, :]) / 0.75) ** 2)
    up = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    up.setflags(write=False)
    return up


def _low_freq(rng: np.random.Generator, size: int, cell: int) -> F32:
    """Smooth noise with unit standard deviation and features about ``cell`` pixels large."""
    up = _upsampler(size, cell)
    coarse = rng.standard_normal((up.shape[1], up.shape[1]), dtype=np.float32)
    # Plain einsum (no ``optimize``) never calls BLAS: no thread pool to oversubscribe a busy
    # CPU, and a fixed summation order, so the result is reproducible.
    field = np.einsum("ik,lk->il", np.einsum("ij,jk->ik", up, coarse), up)
    return field / (float(field.std()) + 1e-6)


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[F32, F32]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _warp(layers: F32, rot: NDArray[np.float64], offset: NDArray[np.float64]) -> F32:
    """Bilinear resampling of (n, S, S) layers at ``rot @ (y, x) + offset`` (edges clamped)."""
    n, size = layers.shape[0], layers.shape[1]
    yy, xx = _pixel_grid(size)
    m, o = rot.astype(np.float32), offset.astype(np.float32)
    sy = np.clip(m[0, 0] * yy + m[0, 1] * xx + o[0], 0.0, size - 1.001).ravel()
    sx = np.clip(m[1, 0] * yy + m[1, 1] * xx + o[1], 0.0, size - 1.001).ravel()
    fy, fx = np.floor(sy), np.floor(sx)
    idx = fy.astype(np.intp) * size + fx.astype(np.intp)
    fy, fx = sy - fy, sx - fx
    flat = layers.reshape(n, -1)
    a, b = np.take(flat, idx, axis=1), np.take(flat, idx + 1, axis=1)
    c, d = np.take(flat, idx + size, axis=1), np.take(flat, idx + size + 1, axis=1)
    b -= a
    b *= fx
    a += b  # top row
    d -= c
    d *= fx
    c += d  # bottom row
    c -= a
    c *= fy
    a += c
    return a.reshape(n, size, size)


# --------------------------------------------------------------------------------------------
# Public helpers.
# --------------------------------------------------------------------------------------------


def render_good(rng: np.random.Generator, size: int) -> NDArray[np.uint8]:
    """Paint one defect-free image (``size`` x ``size`` x 3, uint8) with random nuisance variation."""
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    scale = size / 256.0

    # Pose: a shift of a few pixels and a small rotation of the whole cap.
    angle = math.radians(rng.uniform(-3.0, 3.0))
    sy, sx = rng.uniform(-2.5, 2.5, size=2) * scale
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    rot = np.array([[cos_a, -sin_a], [sin_a, cos_a]])
    c = (size - 1) / 2.0
    py, px = c + sy, c + sx  # offset = c - rot @ (c + shift), written out
    offset = np.array([c - (cos_a * py - sin_a * px), c - (sin_a * py + cos_a * px)])
    disc, ink, shade, shadow = _warp(_template(size), rot, offset)

    # Everything below is channel-first (3, S, S) float32, which keeps numpy's inner loops long.
    # Conveyor belt: woven threads, slow brightness variation, a drop shadow.
    p = max(4, round(size / 42))
    oy, ox = rng.integers(0, 2 * p, size=2)
    belt_tone = _low_freq(rng, size, max(8, size // 8))
    belt_tone *= 0.1
    belt_tone += 1.0
    belt_tone *= 1.0 - 0.5 * shadow
    img = _BELT_RGB[:, None, None] * belt_tone
    img += 16.0 * _weave(size)[oy : oy + size, ox : ox + size]

    # Brushed metal: noise smeared along the rows (two box passes ~ a Gaussian), lit by ``shade``.
    streak = max(3, round(11 * scale) | 1)
    brushed = rng.standard_normal((size, size), dtype=np.float32)
    brushed = ndimage.uniform_filter1d(ndimage.uniform_filter1d(brushed, streak, axis=1), streak, axis=1)
    brushed = ndimage.gaussian_filter1d(brushed, 0.6, axis=0, truncate=2.0)
    brushed *= 6.0 / (float(brushed.std()) + 1e-6)
    metal = _METAL_RGB[:, None, None] * shade
    metal += brushed

    # Composite: belt, cap (coverage ``disc``), printed ink.
    metal -= img
    metal *= disc
    img += metal
    ink *= 0.9
    img *= 1.0 - ink
    img += _INK_RGB[:, None, None] * ink

    # Lighting and camera: global gain, slight white-balance drift, sensor noise (triangular,
    # standard deviation about 2 grey levels).
    gain = (1.0 + rng.uniform(-0.04, 0.04)) * (1.0 + rng.uniform(-0.015, 0.015, size=3))
    img *= gain.astype(np.float32)[:, None, None]
    noise = rng.random((2, 3, size, size), dtype=np.float32)
    noise[0] -= noise[1]
    noise[0] *= 4.9
    img += noise[0]
    np.rint(img, out=img)
    np.clip(img, 0.0, 255.0, out=img)
    return np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0))


def _defect_centre(rng: np.random.Generator, shape: tuple[int, int]) -> NDArray[np.float64]:
    h, w = shape
    zone = _DEFECT_ZONE * _OBJECT_RADIUS * min(h, w)
    rho = zone * math.sqrt(rng.uniform())
    phi = rng.uniform(0.0, 2.0 * math.pi)
    return np.array([(h - 1) / 2.0 + rho * math.sin(phi), (w - 1) / 2.0 + rho * math.cos(phi)])


def _crop(lo: NDArray[np.float64], hi: NDArray[np.float64], shape: tuple[int, int]) -> tuple[slice, slice]:
    y0, x0 = (max(0, int(math.floor(a))) for a in lo)
    y1 = min(shape[0], int(math.ceil(hi[0])) + 1)
    x1 = min(shape[1], int(math.ceil(hi[1])) + 1)
    return slice(y0, y1), slice(x0, x1)


def _scratch(rng: np.random.Generator, img: F32) -> tuple[tuple[slice, slice], F32, F32]:
    """A thin, tapered, straight or gently curved line; returns (crop, alpha, target colour)."""
    h, w = img.shape[:2]
    size = min(h, w)
    length = rng.uniform(0.15, 0.35) * size
    thickness = rng.uniform(2.0, 4.0)
    mid = _defect_centre(rng, (h, w))
    a = rng.uniform(0.0, math.pi)
    direction = np.array([math.sin(a), math.cos(a)])
    normal = np.array([-direction[1], direction[0]])
    bend = 0.0 if rng.random() < 0.3 else rng.uniform(-0.22, 0.22) * length
    p0, p2 = mid - 0.5 * length * direction, mid + 0.5 * length * direction
    p1 = mid + 2.0 * bend * normal  # quadratic Bezier control point (curve bulges by ``bend``)
    t = np.linspace(0.0, 1.0, max(8, int(length / 3.0) + 2))[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    half_width = 0.5 * thickness * (0.75 + 0.25 * np.sin(np.pi * 0.5 * (t[:-1, 0] + t[1:, 0])))

    sl = _crop(pts.min(axis=0) - thickness - 2, pts.max(axis=0) + thickness + 2, (h, w))
    yy, xx = np.mgrid[sl[0], sl[1]].astype(np.float64)
    reach = np.full(yy.shape, -np.inf)  # max over segments of (half width - distance)
    for (ay, ax), (by, bx), hw in zip(pts[:-1], pts[1:], half_width, strict=True):
        ey, ex = by - ay, bx - ax
        ry, rx = yy - ay, xx - ax
        tt = np.clip((ry * ey + rx * ex) / (ey * ey + ex * ex), 0.0, 1.0)
        np.maximum(reach, hw - np.hypot(ry - tt * ey, rx - tt * ex), out=reach)
    alpha = _cov(reach.astype(np.float32))

    local = img[sl]
    inside = alpha >= 0.5
    dark = local * 0.3
    bright = local * 0.25 + 0.75 * np.array([246.0, 246.0, 240.0], dtype=np.float32)
    change_dark = float(np.abs(dark - local)[inside].mean())
    change_bright = float(np.abs(bright - local)[inside].mean())
    use_dark = rng.random() < 0.65
    if (change_dark if use_dark else change_bright) < 40.0:
        use_dark = change_dark >= change_bright
    return sl, alpha, (dark if use_dark else bright)


def _blob(rng: np.random.Generator, img: F32) -> tuple[tuple[slice, slice], F32, F32]:
    """An irregular smooth stain with its own colour and mottled texture."""
    h, w = img.shape[:2]
    size = min(h, w)
    radius = 0.5 * rng.uniform(0.04, 0.10) * size
    centre = _defect_centre(rng, (h, w))
    ks = np.arange(2, 6)
    amps = rng.uniform(0.0, 0.16, size=ks.size) / np.sqrt(ks - 1.0)
    phases = rng.uniform(0.0, 2.0 * math.pi, size=ks.size)

    reach = radius * (1.0 + amps.sum()) + 3.0
    sl = _crop(centre - reach, centre + reach, (h, w))
    yy, xx = np.mgrid[sl[0], sl[1]].astype(np.float32)
    dy, dx = yy - centre[0], xx - centre[1]
    d = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    edge = radius * (1.0 + (amps[:, None, None] * np.cos(ks[:, None, None] * theta + phases[:, None, None])).sum(0))
    inside_dist = (edge - d).astype(np.float32)
    alpha = _cov(inside_dist)

    local = img[sl]
    inside = alpha >= 0.5
    mean_rgb = local[inside].mean(axis=0) if inside.any() else local.reshape(-1, 3).mean(axis=0)
    far = np.linalg.norm(_STAIN_RGB - mean_rgb, axis=1)
    choices = np.flatnonzero(far > 90.0)
    colour = _STAIN_RGB[rng.choice(choices) if choices.size else int(far.argmax())]
    mottle = ndimage.gaussian_filter(rng.standard_normal(alpha.shape).astype(np.float32), sigma=1.2)
    mottle /= float(mottle.std()) + 1e-6
    ring = np.exp(-((inside_dist / 1.5) ** 2))  # darker "coffee ring" edge
    stain = colour * (1.0 + 0.1 * mottle - 0.25 * ring)[..., None]
    target = 0.12 * local + 0.88 * stain
    return sl, alpha, target.astype(np.float32)


def add_defect(
    image: NDArray[np.uint8], rng: np.random.Generator, kind: str
) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """Paint a ``"scratch"`` or ``"blob"`` on the object in ``image``.

    Returns the new image (the input is not modified) and a boolean mask of the defect: the
    pixels whose defect coverage is at least 0.5.
    """
    if kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {DEFECT_KINDS}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    img = image.astype(np.float32)
    sl, alpha, target = (_scratch if kind == "scratch" else _blob)(rng, img)
    local = img[sl]
    local += alpha[..., None] * (target - local)
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[sl] = alpha >= 0.5
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


# --------------------------------------------------------------------------------------------
# Data set writer.
# --------------------------------------------------------------------------------------------


def _write_png(path: Path, array: NDArray[np.uint8]) -> None:
    """Write ``array`` as a PNG atomically (temporary file in the same folder, then rename)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _prune(folder: Path, pattern: re.Pattern[str], keep: set[str]) -> None:
    """Remove files a previous, larger run generated (our naming pattern only) that this run did not."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.is_file() and pattern.fullmatch(entry.name) and entry.name not in keep:
            entry.unlink()


def make_dataset(
    root: str | Path,
    category: str = "widget",
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 20,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a synthetic MVTec-AD style category under ``root`` and return ``root/category``.

    ``n_test_defect`` images are split evenly between scratches and blobs (scratches get the
    odd one).  Existing files of the same names are overwritten; numbered images left over from
    an earlier run with larger counts are removed so the folder always matches the arguments.
    """
    for name, n in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not category or category in {".", ".."} or "/" in category or "\\" in category:
        raise ValueError(f"category must be a plain folder name, got {category!r}")

    base = Path(root) / category
    width = max(3, len(str(max(n_train, n_test_good, n_test_defect) - 1)))
    image_re = re.compile(r"\d+\.png")
    mask_re = re.compile(r"\d+_mask\.png")
    n_scratch = (n_test_defect + 1) // 2
    counts: dict[str, int] = {"scratch": n_scratch, "blob": n_test_defect - n_scratch}

    for folder, stream, n in (
        (base / "train" / "good", "train", n_train),
        (base / "test" / "good", "test_good", n_test_good),
    ):
        folder.mkdir(parents=True, exist_ok=True)
        names = {f"{i:0{width}d}.png" for i in range(n)}
        _prune(folder, image_re, names)
        for i in range(n):
            rng = np.random.default_rng((seed, _STREAMS[stream], i))
            _write_png(folder / f"{i:0{width}d}.png", render_good(rng, size))

    for kind in DEFECT_KINDS:
        n = counts[kind]
        img_dir, gt_dir = base / "test" / kind, base / "ground_truth" / kind
        _prune(img_dir, image_re, {f"{i:0{width}d}.png" for i in range(n)})
        _prune(gt_dir, mask_re, {f"{i:0{width}d}_mask.png" for i in range(n)})
        if n == 0:
            continue
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng((seed, _STREAMS[kind], i))
            image, mask = add_defect(render_good(rng, size), rng, kind)
            _write_png(img_dir / f"{i:0{width}d}.png", image)
            _write_png(gt_dir / f"{i:0{width}d}_mask.png", mask.astype(np.uint8) * 255)
    return base

"""Reading images and masks robustly, listing folders, and writing files atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import SpadeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name. Errors if none."""
    folder = Path(folder)
    if not folder.exists():
        raise SpadeError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise SpadeError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SpadeError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise SpadeError(f"{path}: file does not exist")
    try:
        img = Image.open(path)
        img.load()
    except UnidentifiedImageError:
        raise SpadeError(f"{path}: not an image file (cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise SpadeError(f"{path}: corrupt or truncated image ({exc})") from None
    return img


def to_rgb_uint8(img: Image.Image | np.ndarray, name: str = "image") -> np.ndarray:
    """Any PIL image or array (gray, gray+alpha, RGB, RGBA, palette, 16-bit, float) -> HxWx3 uint8."""
    if isinstance(img, Image.Image):
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img)
        elif img.mode == "P":
            arr = np.asarray(img.convert("RGBA" if "transparency" in img.info else "RGB"))
        elif img.mode in ("L", "LA", "RGB", "RGBA"):
            arr = np.asarray(img)
        else:  # CMYK, YCbCr, 1, ...
            arr = np.asarray(img.convert("RGB"))
    else:
        arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[2] in (2, 4):  # drop alpha
        arr = arr[..., : arr.shape[2] - 1]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise SpadeError(f"{name}: unsupported image shape {tuple(np.shape(img))}; expected HxW, HxWx3 or HxWx4")
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise SpadeError(f"{name}: image is too small ({arr.shape[1]}x{arr.shape[0]} pixels)")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        top = 65535.0 if arr.max(initial=0) > 255 or arr.dtype in (np.uint16, np.int32) else 255.0
        return np.clip(np.rint(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise SpadeError(f"{name}: image contains NaN or infinite values")
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    raise SpadeError(f"{name}: unsupported pixel type {arr.dtype}")


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB (grayscale, RGBA, palette and 16-bit are converted)."""
    path = Path(path)
    return to_rgb_uint8(_open(path), str(path))


def load_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as a bool HxW array (non-zero = defect). ``shape`` must match if given."""
    path = Path(path)
    img = _open(path)
    arr = np.asarray(img.convert("L") if img.mode not in ("L", "1", "I;16", "I", "F") else img)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    mask = arr > 0
    if shape is not None and mask.shape != tuple(shape):
        raise SpadeError(
            f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} does not match its image "
            f"({shape[1]}x{shape[0]})"
        )
    return mask


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write via ``write(tmp_path)`` to a temporary file beside ``path``, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Save a uint8 (gray or RGB) or uint16 (gray) array as PNG, atomically."""
    img = Image.fromarray(array)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG", compress_level=1))  # fast, still lossless


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    def _w(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    return atomic_write(path, _w)


def save_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


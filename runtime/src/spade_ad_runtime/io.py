"""Reading images and masks robustly, listing folders, and writing files atomically.

Every image becomes HxWx3 uint8 RGB (``to_rgb_uint8``); alpha is dropped, gray is repeated.

Integer pixel scaling - one rule
--------------------------------
Integer pixels are scaled by the bit depth of their source, never by guessing from an array's dtype
alone: 8-bit values are kept as they are, 16-bit values become ``round(v * 255 / 65535)``.

* Files, by the bit depth the file declares (Pillow mode): ``L``, ``LA``, ``P``, ``PA``, ``RGB``,
  ``RGBA``, ``1`` (and CMYK, YCbCr, ... which are converted to RGB) are 8-bit; ``I;16*`` is 16-bit;
  ``I`` (32-bit integer, how TIFF and some PNG readers deliver 16-bit gray) uses the bits the file
  declares where Pillow exposes them (TIFF BitsPerSample of 16 or fewer); otherwise values within
  0..255 mean 8-bit and values within 0..65535 mean 16-bit, and larger values are an error naming the
  file; ``F`` (float) follows the float rule below.
* Arrays, by dtype: ``uint8`` is 8-bit, ``uint16`` is 16-bit, ``bool`` is 0/1 (black/white). Other
  integer dtypes (int8, int16, int32, int64, uint32, uint64) are 8-bit: their values must lie within
  0..255, otherwise pass ``bit_depth=16`` to ``to_rgb_uint8`` (or convert the array to uint8/uint16).
  So the same picture held as uint8, int16, int32 or int64 gives the same result.
* Floats (arrays and mode ``F``): values within [0, 1] are scaled by 255; if the maximum is above 1
  the values are taken as 0..255. Results are rounded and clipped to 0..255; NaN and infinity are errors.
* Negative integer values are an error naming the image.

Reading files
-------------
``load_image``, ``load_mask`` and ``decode_image`` (bytes of an upload) share these rules:

* EXIF orientation: the Orientation tag is applied (``PIL.ImageOps.exif_transpose``), so the pixels are
  upright as image viewers show them; a photo stored sideways with orientation 6 comes back turned
  clockwise, height and width swapped. Unreadable EXIF data leaves the pixels as stored.
* Pixel cap: images with more than ``max_pixels`` pixels (default: the module constant ``MAX_PIXELS``,
  100 million) are refused from the header, before any pixel is decoded:
  ``<file>: image is too large (WxH pixels; at most N pixels)``. Pillow's own decompression-bomb
  limit is lifted while this module opens an image (under a lock, one image at a time; the pixels of
  PNG, JPEG, TIFF, BMP, WebP and PPM files are then decoded outside it, so threads decode in parallel),
  so its DecompressionBombWarning/Error never escape; Pillow keeps guarding every other caller.
* Only regular files (or symbolic links to them) are read: a named pipe, device, socket or folder is
  refused at once with ``<path>: not a regular file (...)``, never opened in a way that could block;
  ``list_images`` skips such entries.
* Errors are one-line ``SpadeError`` messages naming the file: ``file does not exist``, ``broken
  symbolic link``, ``symbolic link loop``, ``permission denied``, ``the file is empty``, ``not an image
  file``, ``corrupt or truncated image (...)``, and ``cannot read (<OS error text>)`` for any other
  operating-system error.

Writing files
-------------
``atomic_write`` (and ``save_png``, ``save_npy``, ``save_json``) write to a temporary file beside the
target, fsync it, rename it over the target and fsync the folder, so a crash leaves the old or the new
content, never a mix; on any exception the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import secrets
import stat
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import SpadeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MAX_PIXELS = 100_000_000  # larger images are refused from their header, before decoding (memory)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _os_error(path: str | Path, exc: OSError, what: str = "file") -> SpadeError:
    """One honest line for an OSError met while reaching or reading ``path``."""
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return SpadeError(f"{path}: permission denied")
    if exc.errno == errno.ELOOP:
        return SpadeError(f"{path}: symbolic link loop")
    if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOENT:
        if os.path.islink(path):
            return SpadeError(f"{path}: broken symbolic link")
        return SpadeError(f"{path}: {what} does not exist")
    return SpadeError(f"{path}: cannot read ({exc.strerror or exc})")


def _is_regular(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()  # follows symbolic links; False for pipes, devices, sockets, folders
    except OSError:  # a symbolic link loop or an unreadable entry: not an image we can read
        return False


def _is_broken_link(entry: os.DirEntry[str]) -> bool:
    """A symbolic link whose target cannot be reached (missing, or a loop)."""
    if not entry.is_symlink():
        return False
    try:
        os.stat(entry.path)
    except OSError as exc:
        return exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR)
    return False


def list_images(folder: str | Path, *, broken_links: bool = False) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name. Errors if none.

    Only regular files (or symbolic links to them) count: named pipes, devices, sockets, sub-folders and
    broken links with an image suffix are skipped, so listing never blocks on them. With ``broken_links``,
    symbolic links with an image suffix that lead nowhere (a missing target, a loop) are listed too, so that
    reading them says which and why (``predict`` reports them instead of skipping them silently).
    """
    folder = Path(folder)
    try:
        if not stat.S_ISDIR(os.stat(folder).st_mode):
            raise SpadeError(f"{folder}: not a folder")
        with os.scandir(folder) as it:
            files = sorted(Path(e.path) for e in it if Path(e.name).suffix.lower() in IMAGE_SUFFIXES
                           and (_is_regular(e) or broken_links and _is_broken_link(e)))
    except OSError as exc:
        raise _os_error(folder, exc, "folder") from None
    if not files:
        raise SpadeError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def _open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading if it is a non-empty regular file; never blocks on pipes or devices.

    The type is checked with ``os.stat`` before opening and again with ``fstat`` on the opened descriptor
    (opened non-blocking), so a file swapped for a named pipe in between cannot hang the reader either.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise _os_error(path, exc) from None
    if not stat.S_ISREG(mode):
        raise SpadeError(f"{path}: not a regular file ({_kind(mode)})")
    nonblock = getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, os.O_RDONLY | nonblock | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _os_error(path, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpadeError(f"{path}: not a regular file ({_kind(st.st_mode)})")
        if st.st_size == 0:
            raise SpadeError(f"{path}: the file is empty")
        if nonblock:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except OSError as exc:
        os.close(fd)
        raise _os_error(path, exc) from None
    except BaseException:
        os.close(fd)
        raise


def _read_error(name: str | Path, exc: BaseException) -> SpadeError:
    """One line for an exception raised by Pillow while identifying or decoding an image."""
    if isinstance(exc, UnidentifiedImageError):
        return SpadeError(f"{name}: not an image file (cannot identify its format)")
    if isinstance(exc, OSError) and exc.errno is not None:  # from the operating system, not the decoder
        return _os_error(name, exc)
    if isinstance(exc, PermissionError):
        return SpadeError(f"{name}: permission denied")
    return SpadeError(f"{name}: corrupt or truncated image ({exc})")


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
_METADATA_ERRORS = (*_DECODE_ERRORS, KeyError, IndexError, TypeError)  # what damaged EXIF/TIFF tags raise
_PILLOW_LIMIT_LOCK = threading.Lock()
# Formats whose Pillow plugins check the decompression-bomb limit only in Image.open, never while loading
# the pixels: those are loaded outside the lock below. (Pillow 10-13 check during loading only in BLP, DCX,
# GBR, GD, GIF, ICNS, ICO and EPS; a future check elsewhere would still give our one-line refusal.)
_LOADS_UNCHECKED = frozenset({"PNG", "JPEG", "TIFF", "BMP", "WEBP", "PPM"})


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Lift Pillow's global decompression-bomb limit while we decode; our ``max_pixels`` check replaces it.

    Pillow warns (DecompressionBombWarning) above ``Image.MAX_IMAGE_PIXELS`` and raises above twice that,
    both with messages that name no file and ignore ``max_pixels``. The limit is a module global, so it is
    changed and restored under a lock: images are opened one at a time through this module (and the pixels
    of most formats then decoded in parallel, see ``_LOADS_UNCHECKED``).
    """
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _too_large(name: str | Path, size: tuple[int, int], cap: int) -> SpadeError:
    return SpadeError(f"{name}: image is too large ({size[0]}x{size[1]} pixels; at most {cap:,} pixels)")


def _decode(fh: BinaryIO, name: str | Path, max_pixels: int | None) -> Image.Image:
    """Identify, size-check (from the header, before any pixel is decoded) and decode the image in ``fh``."""
    cap = MAX_PIXELS if max_pixels is None else max_pixels
    if cap < 1:
        raise SpadeError(f"{name}: max_pixels must be at least 1, not {cap}")
    size: tuple[int, int] | None = None
    try:
        with _own_pixel_limit():
            img = Image.open(fh)  # lazy: reads the header only
            size = img.size
            if size[0] * size[1] > cap:
                raise _too_large(name, size, cap)
            if img.format not in _LOADS_UNCHECKED:
                img.load()
        img.load()  # (the common formats decode outside the lock, several images at once)
        size = img.size  # a few formats (ICO, ICNS) settle their size only when loading
        if size[0] * size[1] > cap:
            raise _too_large(name, size, cap)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # someone else's limit
        if size is not None:
            raise _too_large(name, size, cap) from None
        raise SpadeError(f"{name}: image is too large ({exc})") from None
    except MemoryError:
        shown = f"{size[0]}x{size[1]} pixels" if size else "unknown size"
        raise SpadeError(f"{name}: not enough memory to decode this image ({shown})") from None
    except _DECODE_ERRORS as exc:
        raise _read_error(name, exc) from None
    _upright(img)
    return img


_ORIENTATION = 0x0112  # EXIF Orientation: 1 = as stored, 2..8 = mirrored and/or rotated


def _upright(img: Image.Image) -> None:
    """Apply the EXIF Orientation tag in place (PIL.ImageOps.exif_transpose), as image viewers do.

    Unreadable EXIF data leaves the pixels as stored (viewers ignore it too); the image itself is fine.
    """
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            ImageOps.exif_transpose(img, in_place=True)
    except _METADATA_ERRORS:
        return


def _open(path: Path, max_pixels: int | None) -> Image.Image:
    """Open, check and fully decode the image file at ``path`` (the file is closed again)."""
    with _open_regular(path) as fh:
        return _decode(fh, path, max_pixels)


def _declared_bits(img: Image.Image) -> int | None:
    """Bits per sample the file declares, where Pillow exposes them (TIFF BitsPerSample), else None."""
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return None
    try:
        bits = tags.get(258)  # BitsPerSample
    except _METADATA_ERRORS:  # a damaged tag directory: no declared depth
        return None
    if isinstance(bits, tuple):
        bits = max(bits) if bits else None
    return bits if isinstance(bits, int) and bits > 0 else None


def _mode_i_bits(arr: np.ndarray, declared: int | None, name: str) -> int:
    """Bit depth of a mode-'I' (32-bit integer) picture: the declared bits when 16 or fewer, else by value."""
    if declared is not None and declared <= 16:
        return 8 if declared <= 8 else 16
    top = int(arr.max(initial=0))
    if top <= 255:
        return 8
    if top <= 65535:
        return 16
    raise SpadeError(f"{name}: pixel values up to {top} do not fit 16 bits; convert the image to 8 or 16 bits")


def _pil_to_array(img: Image.Image, name: str) -> tuple[np.ndarray, int | None]:
    """Pixels of ``img`` as an array and their bit depth (8, 16, or None for floats and booleans)."""
    mode = img.mode
    if mode.startswith("I;16"):
        return np.asarray(img), 16
    if mode == "I":
        arr = np.asarray(img)
        return arr, _mode_i_bits(arr, _declared_bits(img), name)  # negative values: refused when scaling
    if mode == "F":
        return np.asarray(img), None
    if mode in ("P", "PA"):
        rgba = mode == "PA" or "transparency" in img.info
        return np.asarray(img.convert("RGBA" if rgba else "RGB")), 8
    if mode in ("L", "LA", "RGB", "RGBA"):
        return np.asarray(img), 8
    return np.asarray(img.convert("RGB")), 8  # 1, CMYK, YCbCr, LAB, HSV, RGBX, ...: 8-bit


def _dtype_bits(dtype: np.dtype[Any]) -> int | None:
    """Bit depth an array dtype implies: uint16 -> 16, other integers -> 8, bool and floats -> None."""
    if dtype.kind == "u" and dtype.itemsize == 2:
        return 16
    return 8 if dtype.kind in "iu" else None


def _check_non_negative(arr: np.ndarray, name: str) -> None:
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.size and int(arr.min()) < 0:
        raise SpadeError(f"{name}: negative pixel values (down to {int(arr.min())}); pixels must be 0 or more")


def _integer_to_uint8(arr: np.ndarray, bit_depth: int, name: str) -> np.ndarray:
    _check_non_negative(arr, name)
    top = int(arr.max(initial=0))
    if bit_depth == 8:
        if top > 255:
            raise SpadeError(
                f"{name}: pixel values up to {top} do not fit 8 bits; pass bit_depth=16 for 16-bit pixels "
                "(or convert the array to uint8/uint16)"
            )
        return arr.astype(np.uint8)
    if top > 65535:
        raise SpadeError(f"{name}: pixel values up to {top} do not fit 16 bits; convert the image to 8 or 16 bits")
    # round(v * 255 / 65535) == round(v / 257), never a tie for integers, so this is exact
    return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)


def to_rgb_uint8(img: Image.Image | np.ndarray, name: str = "image", *, bit_depth: int | None = None) -> np.ndarray:
    """Any PIL image or array (gray, gray+alpha, RGB, RGBA, palette, 16-bit, float) -> HxWx3 uint8.

    Alpha is dropped and gray is repeated into three channels. Integer pixels are scaled by their
    bit depth: 8-bit values are kept, 16-bit values become ``round(v * 255 / 65535)``. The bit depth is
    (see the module docstring for the full rule):

    * PIL images: by mode. ``L``, ``LA``, ``P``, ``RGB``, ``RGBA``, ``1`` (and other 8-bit modes) are 8-bit;
      ``I;16*`` is 16-bit; ``I`` (32-bit integer) uses the bits the file declares (TIFF BitsPerSample) when
      they are 16 or fewer, otherwise values within 0..255 mean 8-bit and within 0..65535 mean 16-bit;
      ``F`` follows the float rule.
    * Arrays: by dtype. ``uint8`` is 8-bit, ``uint16`` is 16-bit, ``bool`` is 0/255. Other integer
      dtypes (int8..int64, uint32, uint64) are 8-bit and must hold values within 0..255 unless
      ``bit_depth=16`` is passed.
    * Floats (arrays, mode ``F``): values in [0, 1] are scaled by 255, otherwise taken as 0..255; clipped.

    ``bit_depth`` (8 or 16), when given, overrides the depth of integer pixels; values must fit it.
    Negative integer values, NaN and infinity are errors naming ``name``. EXIF orientation is not applied
    here (``load_image`` and ``decode_image`` do it).
    """
    if bit_depth not in (None, 8, 16):
        raise SpadeError(f"{name}: bit_depth must be 8 or 16, not {bit_depth!r}")
    if isinstance(img, Image.Image):
        arr, depth = _pil_to_array(img, name)
    else:
        arr = np.asarray(img)
        depth = _dtype_bits(arr.dtype)
    return _finish(arr, name, bit_depth if bit_depth is not None else depth, explicit=bit_depth is not None)


def _finish(arr: np.ndarray, name: str, depth: int | None, explicit: bool = False) -> np.ndarray:
    """Shape checks, scaling by ``depth`` and gray -> RGB for an array from ``_pil_to_array`` or a caller."""
    shape = tuple(arr.shape)
    if arr.ndim == 3 and arr.shape[2] in (2, 4):  # drop alpha
        arr = arr[..., : arr.shape[2] - 1]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise SpadeError(f"{name}: unsupported image shape {shape}; expected HxW, HxWx3 or HxWx4")
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise SpadeError(f"{name}: image is too small ({arr.shape[1]}x{arr.shape[0]} pixels)")
    if explicit and not np.issubdtype(arr.dtype, np.integer):
        raise SpadeError(f"{name}: bit_depth applies to integer pixels only, not {arr.dtype}")
    if arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * np.uint8(255)
    elif np.issubdtype(arr.dtype, np.integer):
        out = arr if arr.dtype == np.uint8 and depth == 8 else _integer_to_uint8(arr, depth or 8, name)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise SpadeError(f"{name}: image contains NaN or infinite values")
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        out = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    else:
        raise SpadeError(f"{name}: unsupported pixel type {arr.dtype}")
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return np.ascontiguousarray(out)


def load_image(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB (grayscale, RGBA, palette and 16-bit are converted).

    The EXIF Orientation tag is applied, so the pixels are upright as image viewers show them (a photo
    stored sideways with orientation 6 comes back rotated, height and width swapped). Only regular files
    are read; images with more than ``max_pixels`` pixels (default ``MAX_PIXELS``) are refused from their
    header, before decoding. Errors are one-line SpadeErrors naming the file (see the module docstring).
    """
    path = Path(path)
    return to_rgb_uint8(_open(path, max_pixels), str(path))


def image_shape(path: str | Path, *, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) that :func:`load_image` gives for ``path`` (upright), read from the header alone.

    A file whose header cannot be read this way is decoded in full, so that its error is the usual one.
    """
    try:
        with _open_regular(Path(path)) as fh, _own_pixel_limit():
            img = Image.open(fh)  # lazy: reads the header only
            width, height = img.size
            orientation = img.getexif().get(_ORIENTATION, 1)
        return (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    except Exception:  # noqa: BLE001 - any trouble: decode it, which names the problem in one line
        arr = load_image(path, max_pixels=max_pixels)
        return int(arr.shape[0]), int(arr.shape[1])


def decode_image(data: bytes, name: str = "upload", max_pixels: int | None = None) -> np.ndarray:
    """Image file bytes (an upload) -> HxWx3 uint8 RGB, or a SpadeError naming ``name``.

    The same checks and conversions as ``load_image``: the EXIF Orientation tag is applied (pixels come
    back upright as viewers show them) and at most ``max_pixels`` pixels (default ``MAX_PIXELS``) are
    accepted, checked from the header before decoding.
    """
    if not data:
        raise SpadeError(f"{name}: the file is empty")
    return to_rgb_uint8(_decode(io.BytesIO(data), name, max_pixels), name)


def load_mask(path: str | Path, shape: tuple[int, int] | None = None, *, max_pixels: int | None = None) -> np.ndarray:
    """Read a ground-truth mask as a bool HxW array (non-zero = defect). ``shape`` must match if given.

    The same file checks as ``load_image``, including the ``max_pixels`` cap and the EXIF orientation
    (a mask with its own Orientation tag is turned upright like its image).
    """
    path = Path(path)
    img = _open(path, max_pixels)
    keep = img.mode in ("L", "1", "I", "F") or img.mode.startswith("I;16")
    arr = np.asarray(img if keep else img.convert("L"))
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    mask = arr > 0
    if shape is not None and mask.shape != tuple(shape):
        raise SpadeError(
            f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} does not match its image ({shape[1]}x{shape[0]})"
        )
    return mask


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the storage device (errors propagate: the data would not be durable)."""
    flags = (os.O_RDWR if os.name == "nt" else os.O_RDONLY) | getattr(os, "O_BINARY", 0)  # Windows needs write
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Best effort: flush ``folder``'s entries (makes a rename durable). Skipped where folders cannot be
    opened or fsynced (Windows, some network file systems)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write via ``write(tmp_path)`` to a temporary file beside ``path``, then rename it over ``path``.

    Durable: the temporary file is fsynced before the rename and the folder after it (best effort where a
    folder cannot be fsynced), so after a crash ``path`` holds either the old or the complete new content.
    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    tmp = Path(name)
    try:
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # keep the original exception
            pass
        if isinstance(exc, OSError) and exc.errno is not None:
            raise write_error(path, exc) from None
        raise
    fsync_dir(path.parent)
    return path


def write_error(path: Path, exc: OSError) -> SpadeError:
    """One line for a failed write: the file and the system's reason (disk full, permission denied, ...)."""
    return SpadeError(f"{path}: cannot write ({exc.strerror or exc})")


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Save a uint8 (gray or RGB) or uint16 (gray) array as PNG (:func:`png_bytes`), atomically."""
    data = png_bytes(array)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def printable(text: str) -> str:
    """``text`` safe to show on a terminal or in an answer: every character that is not printable (control
    and format characters such as escape sequences, carriage returns and bidi overrides, as in a file name
    ``evil\\x1b[31m.png``; unusual separators) is shown as a Python escape instead of acting."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 (HxW gray or HxWx3 RGB) or uint16 (HxW gray) array as the bytes of a lossless PNG file.

    Pillow reads these files (and every PNG reader does: one IHDR, one IDAT, IEND), but they are not
    written with Pillow: its encoder tries four filters on every row to pick the best, which costs about as
    much as compressing, and ``spade-ad predict`` writes two or three pictures per image. Here every row
    uses one filter (Up: each byte minus the byte above it, which turns the smooth overlays and the masks
    into mostly zeros) and zlib's run-length strategy: the same pixels, written faster and smaller (measured
    in docs/performance.md).
    """
    a = np.asarray(array)
    if a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        depth, colour = 8, (0 if a.ndim == 2 else 2)  # PNG colour types: 0 gray, 2 RGB
    elif a.dtype == np.uint16 and a.ndim == 2:
        depth, colour, a = 16, 0, a.astype(">u2")  # PNG samples are big-endian
    else:
        raise ValueError(f"png_bytes: expected uint8 HxW or HxWx3, or uint16 HxW; got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"png_bytes: empty picture {a.shape}")
    rows = np.ascontiguousarray(a).view(np.uint8).reshape(h, -1)
    filtered = np.empty((h, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2  # each row's filter type: Up
    filtered[0, 1:] = rows[0]  # (above the first row is zero)
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG specifies
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = z.compress(filtered.reshape(-1).data) + z.flush()
    header = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)  # no interlacing
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    def _w(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    return atomic_write(path, _w)


def save_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)  # NaN/inf are not JSON
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


# --------------------------------------------------------------------------- staging files
# A writer stages a file it will rename or remove as ``.staging-<pid>-<random><suffix>`` in the target folder;
# one whose process is gone was killed, and the next writer removes it.
_STAGING = re.compile(r"^\.staging-(\d+)-")


def staging_path(folder: Path, suffix: str) -> Path:
    """A fresh staging file name in ``folder``, owned by this process."""
    return folder / f".staging-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def is_staging(path: Path) -> bool:
    return bool(_STAGING.match(path.name))


def staging_owner_gone(path: Path) -> bool:
    """True if ``path`` is a staging file whose writing process is no longer running."""
    m = _STAGING.match(path.name)
    return bool(m) and not _alive(int(m.group(1)))  # type: ignore[union-attr]


def remove_own_staging(folder: Path) -> None:
    """Remove this process's own staging files from ``folder`` (a command interrupted while writing them)."""
    for f in folder.iterdir() if folder.is_dir() else []:
        m = _STAGING.match(f.name)
        if m and int(m.group(1)) == os.getpid():
            with contextlib.suppress(OSError):
                f.unlink()


def clean_staging(folder: Path) -> None:
    """Remove the staging files of writers that are no longer running from ``folder``."""
    for f in folder.iterdir() if folder.is_dir() else []:
        if staging_owner_gone(f):
            with contextlib.suppress(OSError):
                f.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- checksums
def file_sha256(path: Path, chunk: int = 16 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks (model and deploy folders record one per data file)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def header_digest(header: dict[str, Any]) -> str:
    """SHA-256 of a header without its own checksum (canonical JSON: sorted keys, no spaces); model headers
    (``model.json``) and deploy headers (``deploy.json``) are checked by this one rule."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "list_images", "to_rgb_uint8", "load_image", "image_shape",
           "decode_image", "load_mask", "fsync_dir", "atomic_write", "save_png", "printable", "write_error",
           "png_bytes", "save_npy", "save_json", "staging_path", "is_staging", "staging_owner_gone", "clean_staging",
           "remove_own_staging",
           "file_sha256", "header_digest"]

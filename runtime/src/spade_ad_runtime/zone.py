"""Inspection zones: the part of every image a model inspects (white in the zone picture), and what is ignored.

A zone is a bool array at its own resolution, scaled to each image by nearest neighbour (the image must
have the zone's aspect ratio, within ``ASPECT_TOLERANCE``). Outside it, the image's pixels are replaced by
``FILL`` grey before the network sees them (training, calibration and test images alike, so nothing there
can move a feature, a global vector or a score), and the anomaly map is 0. Shared by spade-ad and the
runtime, so both prepare an image and its map the same way.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import SpadeError

FILL = 128  # the grey that replaces an image's pixels outside the zone (uint8, every channel)
ASPECT_TOLERANCE = 0.02  # an image's aspect ratio may differ from the zone's by this fraction


def read_zone(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """A zone picture (white: inspect, black: ignore; any image format spade-ad reads, grey levels at or above
    128 count as white) as a bool array; one line when it cannot be read or inspects nothing."""
    from .io import load_image

    rgb = load_image(path, max_pixels=max_pixels)
    return check_zone(rgb.mean(axis=2) >= 127.5, str(path))


def check_zone(zone: np.ndarray, name: str = "zone") -> np.ndarray:
    """``zone`` as a 2-D bool array, refused with one line when it is not one or inspects nothing."""
    z = np.asarray(zone)
    if z.ndim != 2 or 0 in z.shape or not (z.dtype == bool or np.issubdtype(z.dtype, np.integer)):
        raise SpadeError(f"{name}: an inspection zone is a 2-D picture or bool array, got shape {z.shape} "
                         f"({z.dtype})")
    z = z.astype(bool)
    if not z.any():
        raise SpadeError(f"{name}: the inspection zone is all black (it would inspect nothing)")
    return z


class Zone:
    """A model's inspection zone (``mask``: bool, True = inspect) and its scaled copies, one per image size."""

    def __init__(self, mask: np.ndarray, name: str = "zone") -> None:
        self.mask = check_zone(mask, name)
        self.mask.flags.writeable = False
        self._sizes: dict[tuple[int, int], np.ndarray] = {}
        self.derived: dict[object, np.ndarray] = {}  # other frames of the zone, computed once by their users
        self._lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, int]:
        h, w = self.mask.shape
        return int(h), int(w)

    def at(self, height: int, width: int, name: str = "image") -> np.ndarray:
        """The zone at an image's size (nearest neighbour); one line naming the image when its aspect ratio
        is not the zone's."""
        zh, zw = self.shape
        if abs(zh * width - zw * height) > ASPECT_TOLERANCE * zw * height:
            raise SpadeError(f"{name}: its aspect ratio ({width}x{height}) does not match the inspection zone's "
                             f"({zw}x{zh})")
        if (zh, zw) == (height, width):
            return self.mask
        with self._lock:  # (server threads share a model's zone)
            found = self._sizes.get((height, width))
            if found is None:
                pil = Image.fromarray(self.mask.astype(np.uint8) * 255).resize((width, height),
                                                                                Image.Resampling.NEAREST)
                found = np.asarray(pil) > 127
                found.flags.writeable = False
                while len(self._sizes) >= 8:  # bounded: the oldest size goes first
                    self._sizes.pop(next(iter(self._sizes)))
                self._sizes[(height, width)] = found
        return found

    def fill_outside(self, image: np.ndarray, name: str = "image") -> np.ndarray:
        """An HxWx3 uint8 image with its pixels outside the zone replaced by ``FILL``."""
        inside = self.at(image.shape[0], image.shape[1], name)
        return image if inside.all() else np.where(inside[..., None], image, np.uint8(FILL))

    def clear_outside(self, amap: np.ndarray) -> np.ndarray:
        """A map at an image's size with 0 outside the zone."""
        return np.where(self.at(amap.shape[0], amap.shape[1]), amap, amap.dtype.type(0))


__all__ = ["FILL", "ASPECT_TOLERANCE", "Zone", "read_zone", "check_zone"]

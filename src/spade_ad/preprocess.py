"""How an image becomes the network input, and how a map comes back to the image: part of the model.

The mode is the ``preprocess`` setting, stored in the model, so ``fit``, ``predict``, the inspector,
the report and the benchmark all prepare images the same way:

* ``resize`` - the whole image, resized (antialiased bilinear) to a ``image_size`` square. The map is
  resized back to the image's own resolution (bilinear).
* ``aspect`` - keeps the aspect ratio: the shorter side becomes ``image_size`` and the longer side
  grows in proportion, rounded to a multiple of 32 (the backbones' largest stride) and at most
  ``MAX_ASPECT`` times the shorter. Gallery images of one model must share one grid, so the shape is
  fixed once, at ``fit``, from the median aspect ratio of the training images (:func:`aspect_shape`),
  and every image (training and test) is resized to it; the map is resized back to each image's own
  resolution. Parts photographed at one aspect ratio (the usual line camera) keep it exactly.
* ``paper`` - the paper's protocol: resize to ``round(image_size * 8 / 7)`` (256 for 224, bilinear,
  Pillow) and keep the centred ``image_size`` square. The map covers that crop, resized back to the
  crop's place in the image; outside the crop the map is 0 (that border is not inspected).

With an inspection zone (``fit --roi``, :mod:`spade_ad_runtime.zone`), an image's pixels outside it become
grey before any of this, and the map is 0 outside it in both frames.

Coordinates: the *input frame* is the ``input_shape`` (the ``image_size`` square, except ``aspect``) the
network sees; the *image frame* is the
image's own pixels. Masks move into the input frame with :meth:`Preprocessor.mask_to_input` (for
metrics computed on the crop, as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spade_ad_runtime.zone import Zone

from .settings import PREPROCESS_MODES

PAPER_RATIO = 256 / 224  # the paper resizes to 256 and crops 224
MAX_ASPECT = 4.0  # ``aspect``: the longer side is at most this many times the shorter
ALIGN = 32  # ``aspect``: the longer side is a multiple of the backbones' largest stride


def aspect_shape(size: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The ``aspect`` input shape for training images of (height, width) ``sizes``: the shorter side
    ``size``, the longer one at their median aspect ratio (clipped to ``MAX_ASPECT``), a multiple of ``ALIGN``."""
    ratio = float(np.median([h / w for h, w in sizes]))
    long_over_short = min(MAX_ASPECT, max(ratio, 1.0 / ratio))
    long = max(size, round(size * long_over_short / ALIGN) * ALIGN)
    return (long, size) if ratio > 1.0 else (size, long)


def is_aspect_shape(size: int, shape: tuple[int, int] | list[int]) -> bool:
    """Whether :func:`aspect_shape` can give ``shape`` for ``size`` (checks a stored input shape)."""
    short, long = min(shape), max(shape)
    cap = max(size, round(size * MAX_ASPECT / ALIGN) * ALIGN)
    return short == size and size <= long <= cap and (long == size or long % ALIGN == 0)


@dataclass(frozen=True)
class Preprocessor:
    """One preprocessing mode at one input size (``shape``: the fitted input shape of ``aspect``; ``zone``: the
    model's inspection zone, if any)."""

    mode: str
    size: int
    shape: tuple[int, int] | None = None
    zone: Zone | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        assert self.mode in PREPROCESS_MODES, self.mode

    @property
    def input_shape(self) -> tuple[int, int]:
        """(height, width) of the network input."""
        if self.mode == "aspect":
            assert self.shape is not None, "the aspect input shape is fixed by fit"
            return self.shape
        return self.size, self.size

    @property
    def resize_to(self) -> int:
        """Side of the resized square before the crop (the input size itself without a crop)."""
        return round(self.size * PAPER_RATIO) if self.mode == "paper" else self.size

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1): the part of an image of this size that the network sees, in its pixels."""
        if self.mode != "paper":
            return 0, 0, height, width
        r, o = self.resize_to, (self.resize_to - self.size) // 2
        return (round(o * height / r), round(o * width / r), round((o + self.size) * height / r),
                round((o + self.size) * width / r))

    def input_view(self, image: np.ndarray) -> np.ndarray:
        """The input-frame picture (``input_shape`` x 3 uint8) the network sees, before normalisation."""
        return self.to_input(image).round().byte().permute(1, 2, 0).numpy()

    def to_input(self, image: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
        """HxWx3 uint8 -> (3, *input_shape) float tensor in [0, 255] on ``device`` (outside the zone: grey)."""
        dev = device or torch.device("cpu")
        if self.zone is not None:
            image = self.zone.fill_outside(image)
        if self.mode == "paper":
            r, o = self.resize_to, (self.resize_to - self.size) // 2
            pil = Image.fromarray(np.ascontiguousarray(image)).resize((r, r), Image.Resampling.BILINEAR)
            crop = np.asarray(pil)[o : o + self.size, o : o + self.size]
            return torch.from_numpy(np.require(crop, np.uint8, ["C", "W"])).to(dev).permute(2, 0, 1).float()
        t = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).to(dev).permute(2, 0, 1)[None].float()
        if t.shape[-2:] != self.input_shape:
            t = F.interpolate(t, size=self.input_shape, mode="bilinear", align_corners=False, antialias=True)
        return t[0].clamp_(0, 255)

    def map_to_image(self, amap: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """An input-frame map (``input_shape``) -> the image frame (height, width), 0 outside the crop and the
        zone."""
        y0, x0, y1, x1 = self.crop_box(height, width)
        inner = _resize_map(amap, y1 - y0, x1 - x0)
        if (y0, x0, y1, x1) == (0, 0, height, width):
            out = inner
        else:
            out = torch.zeros(height, width, dtype=amap.dtype, device=amap.device)
            out[y0:y1, x0:x1] = inner
        if self.zone is None:
            return out
        inside = torch.from_numpy(np.array(self.zone.at(height, width))).to(amap.device)
        return torch.where(inside, out, torch.zeros((), dtype=out.dtype, device=out.device))

    @property
    def input_zone(self) -> np.ndarray | None:
        """The zone in the input frame (``mask_to_input``: nearest neighbour, the crop), ``None`` without one."""
        if self.zone is None:
            return None
        key = ("input", self.mode, self.size, self.input_shape)
        if key not in self.zone.derived:
            self.zone.derived[key] = self.mask_to_input(self.zone.mask)
        return self.zone.derived[key]

    def mask_to_input(self, mask: np.ndarray) -> np.ndarray:
        """A ground-truth mask (image frame) -> the input frame (nearest neighbour), for metrics on the crop."""
        pil = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255)
        if self.mode == "aspect":
            return np.asarray(pil.resize(self.input_shape[::-1], Image.Resampling.NEAREST)) > 127
        r = self.resize_to
        small = np.asarray(pil.resize((r, r), Image.Resampling.NEAREST)) > 127
        o = (r - self.size) // 2
        return small[o : o + self.size, o : o + self.size]


def _resize_map(amap: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(amap.shape) == (height, width):
        return amap
    return F.interpolate(amap[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]


__all__ = ["Preprocessor", "PAPER_RATIO", "PREPROCESS_MODES", "MAX_ASPECT", "aspect_shape", "is_aspect_shape"]

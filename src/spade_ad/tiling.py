"""Tiles at native resolution: the grid, cutting images into tiles, stitching tile maps back.

A model that resizes every image to one small square loses defects of a few dozen pixels. The tiled
mode (the tiled-ensemble idea, Rolih et al., arXiv 2403.04932, adapted to SPADE) instead scales the
image by a stated factor (1.0: native resolution), cuts it into overlapping square tiles on a grid
fixed at fit time, scores each tile as an image, and stitches the tile maps back into one map with
the overlaps blended. This module holds the geometry only (numpy and torch, no model):

* :func:`make_grid` -> :class:`TileGrid`: the tile origins for an image size, tile side, overlap and
  scale. Deterministic; the tiles cover every pixel; the first and last tiles of each axis are flush
  with the borders, the others evenly spaced, so every overlap is at least the requested one.
* :func:`cut_tiles`: an image -> its tiles (N, T, T[, C]), in the grid's row-major order.
* :func:`stitch`: tile maps (N, T, T) -> one map at the scaled size, overlaps blended by
  :func:`blend_weights` (a separable sin^2 ramp across each overlap, flat elsewhere: positive
  everywhere, a partition of unity where two tiles overlap, so there are no seams);
  :func:`to_native` resizes a stitched map back to the image's own size.

An axis shorter than the tile (after scaling) is padded by edge replication up to the tile side
(:attr:`TileGrid.padded_shape`); :func:`stitch` crops the padding off again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

__all__ = ["TileGrid", "axis_starts", "blend_weights", "cut_tiles", "make_grid", "rescale", "stitch", "to_native"]


def axis_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile origins along one axis of ``length`` pixels for tiles of ``tile`` pixels.

    The number of tiles is the fewest whose stride is at most ``tile * (1 - overlap)`` (rounded down,
    at least 1); the origins are spread evenly from 0 to ``length - tile`` (the last tile is flush with
    the border) and rounded, so consecutive tiles overlap by at least ``overlap`` of a tile. An axis no
    longer than the tile has one tile at 0 (the caller pads it to the tile side).
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if length <= tile:
        return [0]
    max_stride = max(1, math.floor(tile * (1.0 - overlap) + 1e-9))
    n = math.ceil((length - tile) / max_stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one image size lie (fixed at fit time, stored with a tiled model).

    Attributes:
        height, width: the native image size the grid was made for.
        scale: factor from native to tiled pixels (1.0: native resolution).
        tile: tile side, in scaled pixels (the network's input side).
        overlap: the requested minimum overlap, as a fraction of ``tile``.
        scaled_shape: ``(round(height * scale), round(width * scale))``.
        ys, xs: tile origins in the padded scaled frame, per axis.
    """

    height: int
    width: int
    scale: float
    tile: int
    overlap: float
    scaled_shape: tuple[int, int]
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def padded_shape(self) -> tuple[int, int]:
        """The scaled shape, each axis raised to at least the tile side (edge-padded)."""
        return max(self.scaled_shape[0], self.tile), max(self.scaled_shape[1], self.tile)

    @property
    def origins(self) -> list[tuple[int, int]]:
        """``(y, x)`` of every tile, row-major (the order of :func:`cut_tiles` and :func:`stitch`)."""
        return [(y, x) for y in self.ys for x in self.xs]

    @property
    def shape(self) -> tuple[int, int]:
        """Tiles per column and per row."""
        return len(self.ys), len(self.xs)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def to_dict(self) -> dict[str, object]:
        """A JSON-able description (what a tiled model stores to rebuild the grid)."""
        return {"height": self.height, "width": self.width, "scale": self.scale, "tile": self.tile,
                "overlap": self.overlap, "scaled_shape": list(self.scaled_shape), "ys": list(self.ys),
                "xs": list(self.xs)}


def make_grid(height: int, width: int, tile: int, overlap: float = 0.25, scale: float = 1.0) -> TileGrid:
    """The tile grid of a ``height`` x ``width`` image cut at ``scale`` into ``tile``-pixel tiles.

    Example:
        >>> g = make_grid(460, 1130, tile=224, overlap=0.5, scale=0.5)
        >>> g.scaled_shape, g.ys, g.xs
        ((230, 565), (0, 6), (0, 85, 170, 256, 341))
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not 0.0 < scale <= 16.0:
        raise ValueError(f"scale must be in (0, 16], got {scale}")
    sh, sw = max(1, round(height * scale)), max(1, round(width * scale))
    return TileGrid(height, width, float(scale), int(tile), float(overlap), (sh, sw),
                    tuple(axis_starts(sh, tile, overlap)), tuple(axis_starts(sw, tile, overlap)))


def _as_nchw(a: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32)
    return t[None, None] if a.ndim == 2 else t.permute(2, 0, 1)[None]


def _from_nchw(t: torch.Tensor, like: np.ndarray) -> np.ndarray:
    out = t[0, 0] if like.ndim == 2 else t[0].permute(1, 2, 0)
    arr = out.numpy()
    if like.dtype == np.uint8:
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr.astype(like.dtype, copy=False)


def rescale(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``image`` (H, W[, C]) resized to ``shape`` (bilinear, antialiased when shrinking); same dtype.

    The identity (the same array) when the size already matches.
    """
    if image.shape[:2] == tuple(shape):
        return image
    t = F.interpolate(_as_nchw(image), size=tuple(shape), mode="bilinear", align_corners=False,
                      antialias=shape[0] < image.shape[0] or shape[1] < image.shape[1])
    return _from_nchw(t, image)


def cut_tiles(image: np.ndarray, grid: TileGrid) -> np.ndarray:
    """The tiles of ``image`` (H, W[, C]), as one array (N, T, T[, C]) in ``grid.origins`` order.

    The image is resized to the grid's scaled size (an image of another native size than the grid's
    is resized to it too, as a model resizes test images to its input shape), edge-padded to
    :attr:`TileGrid.padded_shape`, and cut.
    """
    img = rescale(image, grid.scaled_shape)
    ph, pw = grid.padded_shape
    if (ph, pw) != img.shape[:2]:
        pad = [(0, ph - img.shape[0]), (0, pw - img.shape[1])] + [(0, 0)] * (img.ndim - 2)
        img = np.pad(img, pad, mode="edge")
    t = grid.tile
    return np.stack([img[y : y + t, x : x + t] for y, x in grid.origins])


def _ramp(n: int) -> npt.NDArray[np.float64]:
    """sin^2 rising from near 0 to near 1 over ``n`` samples (sample centres), so that a rising and a
    falling ramp over the same ``n`` samples sum to exactly 1."""
    return np.sin(0.5 * np.pi * (np.arange(n) + 0.5) / n) ** 2


def _axis_weights(starts: Sequence[int], tile: int) -> list[npt.NDArray[np.float64]]:
    """Per tile of one axis: 1 in the middle, a rising ramp over the overlap with the previous tile and
    a falling one over the overlap with the next (none at the image's borders)."""
    out = []
    for i, s in enumerate(starts):
        w = np.ones(tile)
        if i > 0:
            ov = starts[i - 1] + tile - s
            if ov > 0:
                w[:ov] *= _ramp(ov)
        if i + 1 < len(starts):
            ov = s + tile - starts[i + 1]
            if ov > 0:
                w[tile - ov :] *= _ramp(ov)[::-1]
        out.append(w)
    return out


def blend_weights(grid: TileGrid) -> npt.NDArray[np.float64]:
    """Blending weights (N, T, T) of the grid's tiles, row-major: the outer product of the per-axis
    ramps. Every weight is positive; where exactly two tiles overlap along an axis their weights sum to 1.
    """
    wy, wx = _axis_weights(grid.ys, grid.tile), _axis_weights(grid.xs, grid.tile)
    return np.stack([np.outer(a, b) for a in wy for b in wx])


def stitch(tile_maps: Sequence[np.ndarray] | np.ndarray, grid: TileGrid) -> npt.NDArray[np.float32]:
    """One map at the grid's scaled size from the tiles' maps (N, T, T), in ``grid.origins`` order.

    Each pixel is the weighted mean of the tiles covering it, with :func:`blend_weights`; padding (an
    axis shorter than the tile) is cropped off.
    """
    maps = np.asarray(tile_maps, dtype=np.float64)
    t = grid.tile
    if maps.shape != (len(grid), t, t):
        raise ValueError(f"expected tile maps of shape {(len(grid), t, t)}, got {maps.shape}")
    ph, pw = grid.padded_shape
    acc = np.zeros((ph, pw))
    tot = np.zeros((ph, pw))
    for (y, x), w, m in zip(grid.origins, blend_weights(grid), maps, strict=True):
        acc[y : y + t, x : x + t] += w * m
        tot[y : y + t, x : x + t] += w
    sh, sw = grid.scaled_shape
    return (acc / tot)[:sh, :sw].astype(np.float32)


def to_native(amap: np.ndarray, grid: TileGrid, size: tuple[int, int] | None = None) -> npt.NDArray[np.float32]:
    """A stitched map (at the grid's scaled size) resized to ``size`` (default: the grid's native size)."""
    target = (grid.height, grid.width) if size is None else size
    return rescale(np.asarray(amap, dtype=np.float32), target)

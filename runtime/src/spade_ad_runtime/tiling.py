"""Tiles at native resolution: the grid, cutting images into tiles, stitching tile maps back.

A model that resizes every image to one small square loses defects of a few dozen pixels. The tiled
mode (the tiled-ensemble idea, Rolih et al., arXiv 2403.04932, adapted to SPADE) instead scales the
image by a stated factor (1.0: native resolution), cuts it into overlapping square tiles on a grid
fixed at fit time, scores each tile as an image, and stitches the tile maps back into one map with
the overlaps blended. This module holds the geometry only (numpy, no model; spade-ad's ``spade_ad.tiling``
is this module, so both packages cut and stitch the same way, to the byte):

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from .imaging import rescale
from .zone import Zone

__all__ = ["Stitcher", "TileGrid", "axis_starts", "blend_weights", "cut_tiles", "iter_tiles", "fit_grid",
           "grid_from_dict", "make_grid", "mosaic", "rescale", "stitch", "tile_at", "tile_zones", "to_native"]


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

    def box_frac(self, t: int) -> tuple[float, float, float, float]:
        """Tile ``t``'s extent (y0, x0, y1, x1) as fractions of the image (padding left out)."""
        (oy, ox), (sh, sw) = self.origins[t], self.scaled_shape
        return (oy / sh, ox / sw, min(1.0, (oy + self.tile) / sh), min(1.0, (ox + self.tile) / sw))

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


def fit_grid(sizes: Sequence[tuple[int, int]], tile: int, overlap: float, scale: float, span: float) -> TileGrid:
    """The grid a tiled model fixes at fit from its training images' (height, width) ``sizes``: made for
    their median size; the scale is ``scale``, or with ``span > 0`` the one at which the shorter side
    spans ``span`` tiles, at most 1 (native resolution holds all there is to see).

    Example:
        >>> g = fit_grid([(460, 1130)], tile=224, overlap=0.25, scale=1.0, span=1.5)
        >>> round(g.scale, 4), g.shape
        (0.7304, (2, 5))
    """
    if not sizes:
        raise ValueError("a grid needs at least one image size")
    h = int(np.median([s[0] for s in sizes]))
    w = int(np.median([s[1] for s in sizes]))
    if span > 0:
        scale = min(1.0, span * tile / min(h, w))
    return make_grid(h, w, tile, overlap, scale)


def grid_from_dict(d: object) -> TileGrid:
    """The grid :meth:`TileGrid.to_dict` described, rebuilt with :func:`make_grid` and checked against the
    description (a ``ValueError`` names what disagrees)."""
    if not isinstance(d, dict):
        raise ValueError("tile grid must be a mapping")
    try:
        g = make_grid(int(d["height"]), int(d["width"]), int(d["tile"]), float(d["overlap"]), float(d["scale"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"tile grid lacks or mangles {exc}") from None
    if g.to_dict() != d:
        raise ValueError("tile grid disagrees with the grid its size, tile, overlap and scale give")
    return g


def cut_tiles(image: np.ndarray, grid: TileGrid) -> np.ndarray:
    """The tiles of ``image`` (H, W[, C]), as one array (N, T, T[, C]) in ``grid.origins`` order.

    The image is resized to the grid's scaled size (an image of another native size than the grid's
    is resized to it too, as a model resizes test images to its input shape), edge-padded to
    :attr:`TileGrid.padded_shape`, and cut.
    """
    return np.stack(list(iter_tiles(image, grid)))


def iter_tiles(image: np.ndarray, grid: TileGrid) -> Iterator[np.ndarray]:
    """:func:`cut_tiles` one tile at a time, as views of the scaled, padded image (no copy of every tile)."""
    img = rescale(image, grid.scaled_shape)
    ph, pw = grid.padded_shape
    if (ph, pw) != img.shape[:2]:
        pad = [(0, ph - img.shape[0]), (0, pw - img.shape[1])] + [(0, 0)] * (img.ndim - 2)
        img = np.pad(img, pad, mode="edge")
    t = grid.tile
    for y, x in grid.origins:
        yield img[y : y + t, x : x + t]


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


def _axis_sum(starts: Sequence[int], weights: list[npt.NDArray[np.float64]], length: int) -> npt.NDArray[np.float32]:
    """The per-axis weights of all tiles added up along an axis of ``length`` (padded) pixels."""
    total = np.zeros(length)
    for s, w in zip(starts, weights, strict=True):
        total[s : s + len(w)] += w
    return total.astype(np.float32)


def blend_weights(grid: TileGrid) -> npt.NDArray[np.float64]:
    """Blending weights (N, T, T) of the grid's tiles, row-major: the outer product of the per-axis
    ramps. Every weight is positive; where exactly two tiles overlap along an axis their weights sum to 1.
    """
    wy, wx = _axis_weights(grid.ys, grid.tile), _axis_weights(grid.xs, grid.tile)
    return np.stack([np.outer(a, b) for a in wy for b in wx])


class Stitcher:
    """Tile maps added one at a time (any order) into one map at the grid's scaled size: memory is the map
    (and its weight sum), not the tiles. :func:`stitch` is the same for all tiles at once."""

    def __init__(self, grid: TileGrid) -> None:
        self.grid = grid
        self.acc = np.zeros(grid.padded_shape, dtype=np.float32)  # 4 bytes a pixel: the map's own size
        self.wy, self.wx = _axis_weights(grid.ys, grid.tile), _axis_weights(grid.xs, grid.tile)
        # every tile's weight is an outer product and the grid is complete, so the weight sum is separable
        self.ty, self.tx = _axis_sum(grid.ys, self.wy, grid.padded_shape[0]), _axis_sum(grid.xs, self.wx,
                                                                                       grid.padded_shape[1])
        self.seen = np.zeros(len(grid), dtype=bool)

    def add(self, index: int, tile_map: np.ndarray) -> None:
        """Tile ``index``'s map (T, T) (``grid.origins`` order)."""
        t = self.grid.tile
        if tile_map.shape != (t, t):
            raise ValueError(f"expected a tile map of shape {(t, t)}, got {tile_map.shape}")
        r, c = divmod(index, len(self.grid.xs))
        y, x = self.grid.ys[r], self.grid.xs[c]
        w = np.outer(self.wy[r], self.wx[c]).astype(np.float32)
        self.acc[y : y + t, x : x + t] += w * np.asarray(tile_map, dtype=np.float32)
        self.seen[index] = True

    def result(self) -> npt.NDArray[np.float32]:
        """The stitched map (every tile must have been added); the stitcher is spent afterwards."""
        if not self.seen.all():
            raise ValueError(f"tile {int(np.argmin(self.seen))} was not added")
        sh, sw = self.grid.scaled_shape
        out = self.acc[:sh, :sw]
        out /= self.ty[:sh, None]  # in place: no map-sized temporaries
        out /= self.tx[None, :sw]
        self.seen[:] = False
        return np.ascontiguousarray(out)


def stitch(tile_maps: Sequence[np.ndarray] | np.ndarray, grid: TileGrid) -> npt.NDArray[np.float32]:
    """One map at the grid's scaled size from the tiles' maps (N, T, T), in ``grid.origins`` order.

    Each pixel is the weighted mean of the tiles covering it, with :func:`blend_weights`; padding (an
    axis shorter than the tile) is cropped off.
    """
    maps = np.asarray(tile_maps, dtype=np.float64)
    t = grid.tile
    if maps.shape != (len(grid), t, t):
        raise ValueError(f"expected tile maps of shape {(len(grid), t, t)}, got {maps.shape}")
    st = Stitcher(grid)
    for i, m in enumerate(maps):
        st.add(i, m)
    return st.result()


def tile_at(grid: TileGrid, y: float, x: float) -> tuple[int, float, float]:
    """The tile that weighs most at point (y, x) of the scaled frame (the one whose map it mostly shows),
    and the point's position in that tile (pixels from its origin)."""
    wy, wx = _axis_weights(grid.ys, grid.tile), _axis_weights(grid.xs, grid.tile)
    t = grid.tile
    best = (-1.0, 0, 0.0, 0.0)
    for r, oy in enumerate(grid.ys):
        for c, ox in enumerate(grid.xs):
            iy, ix = int(y) - oy, int(x) - ox
            if 0 <= iy < t and 0 <= ix < t and wy[r][iy] * wx[c][ix] > best[0]:
                best = (wy[r][iy] * wx[c][ix], r * len(grid.xs) + c, y - oy, x - ox)
    if best[0] < 0:
        raise ValueError(f"point ({y}, {x}) is outside the grid")
    return best[1], best[2], best[3]


def mosaic(tiles: np.ndarray, grid: TileGrid, size: int) -> np.ndarray:
    """A ``size`` x ``size`` picture of a whole image from small pictures of its tiles (N, s, s, 3) uint8,
    pasted at their places (the image squashed to a square, as a ``resize`` model sees it)."""
    s = tiles.shape[1]
    f = s / grid.tile
    ph, pw = grid.padded_shape
    canvas = np.zeros((max(s, round(ph * f)), max(s, round(pw * f)), 3), np.uint8)
    for (y, x), t in zip(grid.origins, tiles, strict=True):
        yy, xx = min(round(y * f), canvas.shape[0] - s), min(round(x * f), canvas.shape[1] - s)
        canvas[yy : yy + s, xx : xx + s] = t
    sh, sw = grid.scaled_shape
    return rescale(canvas[: max(1, round(sh * f)), : max(1, round(sw * f))], (size, size))


def tile_zones(zone: Zone, grid: TileGrid, input_shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """A zone cut like an image into the grid's tiles, each at the network input's shape (nearest neighbour):
    (T, H, W) bool, True = inspected. Computed once per zone and grid."""
    key = ("tiles", grid.scaled_shape, grid.tile, tuple(grid.origins), tuple(input_shape))
    found = zone.derived.get(key)
    if found is None:
        tiles = [np.asarray(Image.fromarray(t.astype(np.uint8) * 255).resize(
            (input_shape[1], input_shape[0]), Image.Resampling.NEAREST)) > 127
            for t in iter_tiles(zone.at(*grid.scaled_shape), grid)]
        found = zone.derived[key] = np.stack(tiles)
    return found


def to_native(amap: np.ndarray, grid: TileGrid, size: tuple[int, int] | None = None) -> npt.NDArray[np.float32]:
    """A stitched map (at the grid's scaled size) resized to ``size`` (default: the grid's native size)."""
    target = (grid.height, grid.width) if size is None else size
    return rescale(np.asarray(amap, dtype=np.float32), target)

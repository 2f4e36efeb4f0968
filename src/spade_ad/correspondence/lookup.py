"""Stage 3, correspondences: which normal image, and which cell of it, a pixel of a test image was matched to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SpadeError
from ..preprocess import Preprocessor
from ..state import FittedState
from ..tiling import tile_at


@dataclass(frozen=True)
class Correspondence:
    """Why a pixel got its score: the closest normal feature, in which training image and where.

    Positions are fractions of the neighbour's whole image (so they apply to its thumbnail too).
    """

    neighbour: int  # training image index
    neighbour_name: str
    level: int  # pyramid level used (0 = finest, stride 4)
    distance: float  # feature distance at that level (the level map's value before upsampling/smoothing)
    y_frac: float  # centre of the matched feature cell in the neighbour image, fraction of its height
    x_frac: float  # ... and of its width
    box_frac: tuple[float, float, float, float]  # (y0, x0, y1, x1) of the matched cell, fractions
    tile: int | None = None  # a tiled model: the neighbour's tile (grid position) that holds the match
    tile_box_frac: tuple[float, float, float, float] | None = None  # ... and that tile's extent, fractions

    def box_pixels(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The matched cell as integer pixel bounds (y0, x0, y1, x1) in an image of the given size."""
        y0, x0, y1, x1 = self.box_frac
        return (int(y0 * height), int(x0 * width), max(int(y0 * height) + 1, round(y1 * height)),
                max(int(x0 * width) + 1, round(x1 * width)))


def find_correspondence(
    state: FittedState,
    feats: np.ndarray,
    neighbours: np.ndarray,
    size: tuple[int, int],
    y: int,
    x: int,
    level: int,
) -> Correspondence:
    """The gallery feature nearest (float64, direct differences) to the test feature under pixel (y, x).

    ``feats``: the test image's (h*w, C) features at ``level``; ``neighbours``: its gallery (stage 2);
    ``size``: its (height, width). A tiled model's: ``feats`` (tiles, h*w, C), ``neighbours`` (tiles, k) bank
    rows; the pixel's tile is the one whose map weighs most there, its match is in a training tile, and
    the position is given as a fraction of that training image.
    """
    shapes, prep, bank, train_names = state.level_shapes, state.prep, state.bank, state.train_names
    height, width = size
    if not (0 <= y < height and 0 <= x < width):
        raise SpadeError(f"pixel ({y}, {x}) is outside the image ({height}x{width})")
    if not (0 <= level < len(shapes)):
        raise SpadeError(f"level must be in 0..{len(shapes) - 1}, got {level}")
    if state.grid is not None:
        return _tiled(state, feats, neighbours, size, y, x, level)
    y0, x0, y1, x1 = prep.crop_box(height, width)
    if not (y0 <= y < y1 and x0 <= x < x1):
        raise SpadeError(f"pixel ({y}, {x}) is outside the inspected crop (rows {y0}..{y1 - 1}, "
                         f"columns {x0}..{x1 - 1})")
    h, w = shapes[level]
    r = min(h - 1, int((y - y0 + 0.5) / (y1 - y0) * h))
    c = min(w - 1, int((x - x0 + 0.5) / (x1 - x0) * w))
    q = torch.from_numpy(np.asarray(feats[r * w + c], np.float64))
    gal = torch.from_numpy(np.asarray(bank.gather(level, neighbours), np.float64)).reshape(-1, q.numel())
    d = ((gal - q) ** 2).sum(1)
    j = int(torch.argmin(d))
    n_idx = int(neighbours[j // (h * w)])
    rr, cc = divmod(j % (h * w), w)
    # cell fractions of the neighbour's input frame -> of its whole image (they differ with a crop)
    fy = _input_to_image_frac(prep, [rr / h, (rr + 0.5) / h, (rr + 1) / h])
    fx = _input_to_image_frac(prep, [cc / w, (cc + 0.5) / w, (cc + 1) / w])
    return Correspondence(
        neighbour=n_idx,
        neighbour_name=train_names[n_idx] if n_idx < len(train_names) else str(n_idx),
        level=level,
        distance=float(d[j].sqrt()),
        y_frac=fy[1],
        x_frac=fx[1],
        box_frac=(fy[0], fx[0], fy[2], fx[2]),
    )


def _tiled(state: FittedState, feats: np.ndarray, rows: np.ndarray, size: tuple[int, int], y: int, x: int,
           level: int) -> Correspondence:
    grid = state.grid
    assert grid is not None
    sh, sw = grid.scaled_shape
    t, ty, tx = tile_at(grid, (y + 0.5) * sh / size[0] - 0.5, (x + 0.5) * sw / size[1] - 0.5)
    h, w = state.level_shapes[level]
    r = min(h - 1, max(0, int((ty + 0.5) / grid.tile * h)))
    c = min(w - 1, max(0, int((tx + 0.5) / grid.tile * w)))
    q = torch.from_numpy(np.asarray(feats[t][r * w + c], np.float64))
    gallery = [int(i) for i in rows[t]]
    gal = torch.from_numpy(np.asarray(state.bank.gather(level, gallery), np.float64)).reshape(-1, q.numel())
    d = ((gal - q) ** 2).sum(1)
    j = int(torch.argmin(d))
    row = gallery[j // (h * w)]
    n_idx, tn = divmod(row, state.rows_per_image)
    rr, cc = divmod(j % (h * w), w)
    oy, ox = grid.origins[tn]
    fy = [min(1.0, (oy + f * grid.tile) / sh) for f in (rr / h, (rr + 0.5) / h, (rr + 1) / h)]
    fx = [min(1.0, (ox + f * grid.tile) / sw) for f in (cc / w, (cc + 0.5) / w, (cc + 1) / w)]
    return Correspondence(neighbour=n_idx, neighbour_name=state.train_names[n_idx], level=level,
                          distance=float(d[j].sqrt()), y_frac=fy[1], x_frac=fx[1],
                          box_frac=(fy[0], fx[0], fy[2], fx[2]), tile=tn, tile_box_frac=grid.box_frac(tn))


def _input_to_image_frac(prep: Preprocessor, fracs: list[float]) -> list[float]:
    r = prep.resize_to
    o = (r - prep.size) // 2
    return [(o + f * prep.size) / r for f in fracs]


__all__ = ["Correspondence", "find_correspondence"]

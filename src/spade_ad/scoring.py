"""Stages 2 and 3 for extracted features: image scores, anomaly maps and galleries, with a fitted state.

The one path from features to scores: :meth:`spade_ad.Spade.predict` and the leave-one-out calibration
(:mod:`spade_ad.calibration`) both take it, so a good image is calibrated exactly as it would be scored.

A tiled model (``tile`` setting) scores each tile as an image (:func:`score_features` with the tiles'
grid positions), stitches the tile maps into one map with blended overlaps (:func:`score_tiles`) and
takes the image score from its tiles (:func:`tiled_image_score`, rule in :func:`spade_ad.retrieval.tile_image_scores`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .correspondence import anomaly_maps
from .correspondence.runtime import COMPUTE_LOCK
from .retrieval import image_knn, image_scores, tile_image_scores, tile_knn
from .state import FittedState
from .tiling import Stitcher, tile_zones


def score_features(state: FittedState, levels: list[torch.Tensor], gvec: torch.Tensor,
                   exclude: torch.Tensor | None = None, positions: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 2 (image kNN over the global vectors ``gvec``) then stage 3 (the maps of ``levels``, (B, h*w, C)
    per level, against each image's gallery).

    Returns the global kNN scores (B,), the maps in the input frame (B, H, W; 0 outside the inspection zone)
    and the galleries (B, k) of bank rows. ``exclude`` (B,) leaves one training image out per query
    (calibration). In a tiled model the queries are tiles and ``positions`` (B,) their grid positions (see
    :func:`spade_ad.retrieval.tile_knn`).
    """
    s = state.settings
    with COMPUTE_LOCK:
        if state.grid is None:
            knn, neigh = image_knn(gvec, state.global_, s.k_image, s.k, exclude)
        else:
            assert positions is not None, "a tiled model's queries need their grid positions"
            knn, neigh = tile_knn(gvec, positions, state.global_, state.rows_per_image, s.tile_retrieval,
                                  s.k_image, s.k, exclude)
        maps = zoned(state, anomaly_maps(state, levels, neigh), positions)
    return knn, maps, neigh


def zoned(state: FittedState, maps: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Input-frame maps (B, H, W) with 0 outside the model's inspection zone (a tiled model's queries are tiles
    at grid ``positions``: each its part of the zone)."""
    if state.zone is None:
        return maps
    if state.grid is None:
        inside = state.prep.input_zone
        assert inside is not None
    else:
        assert positions is not None
        shape = (int(maps.shape[-2]), int(maps.shape[-1]))
        inside = tile_zones(state.zone, state.grid, shape)[positions.cpu().numpy()]
    return torch.where(torch.tensor(inside, device=maps.device), maps, torch.zeros((), dtype=maps.dtype,
                                                                                   device=maps.device))


def image_score(state: FittedState, knn: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """The image scores (the ``image_score`` setting) of maps ``maps`` with global kNN scores ``knn``."""
    scales = state.calibration.get("score_scales", (1.0, 1.0))  # (1, 1): fitted without calibration
    return image_scores(state.settings.image_score, (float(scales[0]), float(scales[1])), knn,
                        maps.amax(dim=(1, 2)).to(knn))


class TiledImage(NamedTuple):
    """One image scored by a tiled model (:func:`score_tiles`)."""

    map: np.ndarray  # (H, W) float32 stitched map at the grid's scaled size
    knn: np.ndarray  # (T,) each tile's kNN score
    maxima: np.ndarray  # (T,) each tile's map maximum
    neighbours: np.ndarray  # (T, k) each tile's gallery (bank rows)
    features: list[np.ndarray] | None  # per level, (T, h*w, C) (when kept)


def score_tiles(state: FittedState, chunks: Iterable[tuple[list[torch.Tensor], torch.Tensor]],
                exclude: int | None = None, keep_features: bool = False) -> TiledImage:
    """Score one image's tiles, given as consecutive chunks of (levels, global vectors) in grid order, and
    stitch their maps; memory holds a chunk and the stitched map, not every tile's features.
    ``exclude``: a training image left out (calibration)."""
    grid = state.grid
    assert grid is not None
    st = Stitcher(grid)
    knns, maxima, neighs = [], [], []
    kept: list[list[np.ndarray]] = []
    at = 0
    for levels, gvec in chunks:
        n = gvec.shape[0]
        pos = torch.arange(at, at + n)
        ex = None if exclude is None else torch.full((n,), int(exclude))
        knn, maps, neigh = score_features(state, levels, gvec, ex, pos)
        if maps.shape[-1] != grid.tile:
            maps = F.interpolate(maps[:, None], size=(grid.tile, grid.tile), mode="bilinear",
                                 align_corners=False)[:, 0]
        for j in range(n):
            st.add(at + j, maps[j].cpu().numpy())
        knns.append(knn.cpu().numpy())
        maxima.append(maps.amax(dim=(1, 2)).cpu().numpy())
        neighs.append(neigh.cpu().numpy())
        if keep_features:
            kept.append([lv.cpu().numpy() for lv in levels])
        at += n
    feats = [np.concatenate([c[li] for c in kept]) for li in range(len(kept[0]))] if keep_features else None
    return TiledImage(st.result(), np.concatenate(knns).astype(np.float32),
                      np.concatenate(maxima).astype(np.float32), np.concatenate(neighs), feats)


def position_scales(state: FittedState) -> np.ndarray:
    """A tiled model's per-position calibration medians (T, 2) of tile kNN scores and map maxima (ones before
    calibration)."""
    return np.asarray(state.calibration.get("position_scales", np.ones((state.rows_per_image, 2))),
                      dtype=np.float64)


def tiled_image_score(state: FittedState, knn: np.ndarray, maxima: np.ndarray) -> float:
    """A tiled model's image score from its tiles' kNN scores and map maxima (T,) (the rule:
    :func:`spade_ad.retrieval.tile_image_scores`, with the positions' calibration medians)."""
    s = state.settings
    return float(tile_image_scores(s.image_score, s.tile_pool, position_scales(state), knn[None], maxima[None])[0])


__all__ = ["score_features", "zoned", "image_score", "score_tiles", "tiled_image_score", "position_scales",
           "TiledImage"]

"""Stage 3's entry point: test features and their galleries (stage 2) -> anomaly maps in the input frame."""

from __future__ import annotations

import torch

from ..state import FittedState
from .gallery import level_maps
from .maps import combine_levels


def anomaly_maps(state: FittedState, levels: list[torch.Tensor], neighbours: torch.Tensor) -> torch.Tensor:
    """(B, H, W) maps at the network input's shape: each position's mean distance to its ``kappa`` nearest
    features among all positions of its gallery's pyramids at the same level (:func:`.gallery.level_maps`,
    exact), per level upsampled, averaged and smoothed with the Gaussian ``sigma`` (:func:`.maps.combine_levels`).

    ``levels``: per pyramid level, (B, h*w, C) test features; ``neighbours``: (B, k) training indices.
    """
    s = state.settings
    grids = level_maps(levels, neighbours, state.bank, state.level_shapes, s.kappa, s.tile_bytes)
    return combine_levels(grids, state.prep.input_shape, s.sigma)


__all__ = ["anomaly_maps"]

"""Stage 3, first steps: gather the retrieved training images' pyramids (the gallery) from the bank and
score every test position against all gallery positions of the same level (exact search)."""

from __future__ import annotations

import numpy as np
import torch

from ..bank import Bank
from .search import nn_distances


def level_maps(
    levels: list[torch.Tensor],
    neighbours: torch.Tensor,
    bank: Bank,
    shapes: list[tuple[int, int]],
    kappa: int,
    tile_bytes: int,
) -> list[torch.Tensor]:
    """Per level, (B, h, w): the mean distance of each test feature to its ``kappa`` nearest gallery features.

    ``levels``: per level, (B, h*w, C) test features; ``neighbours``: (B, k) training indices (stage 2).
    The gallery of image b is every position of its k neighbours at the same level, read from ``bank``.
    """
    dev = levels[0].device
    out = []
    for li, (h, w) in enumerate(shapes):
        grid = torch.empty(len(neighbours), h * w, device=dev)
        for b in range(len(neighbours)):
            gallery = torch.from_numpy(bank.gather(li, np.asarray(neighbours[b])))
            gallery = gallery.to(dev).float().reshape(-1, gallery.shape[-1])
            grid[b] = nn_distances(levels[li][b], gallery, kappa, tile_bytes, query_hw=(h, w), gallery_hw=(h, w))
        out.append(grid.view(-1, h, w))
    return out


__all__ = ["level_maps"]

"""Tiles at native resolution: the grid, cutting images into tiles, stitching tile maps back.

The geometry lives in the runtime package (:mod:`spade_ad_runtime.tiling`), so that a tiled model and its
deploy folder cut the same tiles, to the byte, and stitch them the same way; this module is its name in
spade-ad.
"""

from spade_ad_runtime.tiling import (
    Stitcher,
    TileGrid,
    axis_starts,
    blend_weights,
    cut_tiles,
    fit_grid,
    grid_from_dict,
    iter_tiles,
    make_grid,
    mosaic,
    rescale,
    stitch,
    tile_at,
    tile_zones,
    to_native,
)

__all__ = ["Stitcher", "TileGrid", "axis_starts", "blend_weights", "cut_tiles", "iter_tiles", "fit_grid",
           "grid_from_dict", "make_grid", "mosaic", "rescale", "stitch", "tile_at", "tile_zones", "to_native"]

"""Stage 3: pixel-level correspondence. Every position of the test image's feature pyramid is matched
against all positions of the gallery images' pyramids at the same level.

* :mod:`.gallery` - gathers the gallery (the k training images of stage 2) from the bank and scores
  each level with the exact search;
* :mod:`.cells` - the search index built at fit time (cells, shells, shared rows) and the galleries
  merged from it at predict time;
* :mod:`.search` - the exact search itself (mean distance to the kappa nearest gallery features);
  :mod:`.pruning` (CPU cells and bounds) and :mod:`.runtime` (threads, buffers) speed it up without
  changing a result; :mod:`.reference` holds the brute-force ground truth and the naive baselines;
* :mod:`.maps` - upsamples the level maps, averages them and smooths the result;
* :mod:`.lookup` - for any pixel, the normal image and cell it was matched to (its correspondence);
* :func:`anomaly_maps` (:mod:`.stage`) - the stage's entry point: test features and their galleries -> maps.
"""

from __future__ import annotations

from .gallery import level_maps, release_galleries
from .lookup import Correspondence, find_correspondence
from .maps import combine_levels, gaussian_blur
from .reference import cdist_baseline, nn_distances_reference, relative_error
from .runtime import release_scratch
from .search import nn_distances, nn_distances_merged
from .stage import anomaly_maps

__all__ = [
    "Correspondence",
    "anomaly_maps",
    "cdist_baseline",
    "combine_levels",
    "gaussian_blur",
    "level_maps",
    "find_correspondence",
    "nn_distances",
    "nn_distances_merged",
    "nn_distances_reference",
    "relative_error",
    "release_galleries",
    "release_scratch",
]

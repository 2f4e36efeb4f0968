"""Stage 2 in numpy: the kNN over the training images' (or training tiles') global vectors.

The same rule as spade-ad's ``spade_ad.retrieval``: float64 direct differences, ties to the lowest index;
the score is the mean distance to the ``k_image`` nearest, the gallery the ``k`` nearest. A tiled model's
image score from its tiles (:func:`tile_image_scores`) is defined here once, for both packages.
"""

from __future__ import annotations

import numpy as np


def knn(query: np.ndarray, train: np.ndarray, k_image: int, k: int) -> tuple[float, np.ndarray]:
    """The kNN score of one global vector ``query`` (D,) among ``train`` (N, D) float64, and the indices of
    the ``k`` nearest rows, nearest first."""
    d = np.sqrt(((train - np.asarray(query, np.float64)[None]) ** 2).sum(1))
    n = d.shape[0]
    idx = np.argsort(d, kind="stable")[: min(max(k, k_image), n)]
    return float(np.float32(d[idx[: min(k_image, n)]].mean())), idx[: min(k, n)]


def tile_knn(query: np.ndarray, position: int, train: np.ndarray, per_image: int, retrieval: str, k_image: int,
             k: int) -> tuple[float, np.ndarray]:
    """:func:`knn` for one tile at grid ``position``: among the training tiles at that position
    (``retrieval="position"``) or all of them (``"all"``); ``train``: the bank's rows, image by image,
    ``per_image`` tiles each. Returns the score and the gallery as bank rows."""
    if retrieval == "all":
        return knn(query, train, k_image, k)
    score, nearest = knn(query, train[position::per_image], k_image, k)
    return score, nearest * per_image + position


def tile_image_scores(rule: str, pool: str, scales: np.ndarray, knn: np.ndarray, maxima: np.ndarray) -> np.ndarray:
    """The image scores of tiled images from their tiles' kNN scores and map maxima (B, T): each tile's
    kNN score and maximum are divided by their position's calibration medians ``scales`` (T, 2) (a tile
    is judged against what that part of a good image looks like), the tile's score follows ``rule``
    (the ``image_score`` setting: ``knn``, ``max`` or ``combined``, their sum), and the image's pools its
    tiles' by ``pool`` (the ``tile_pool`` setting: ``max``, ``mean`` or ``max_mean``, the two added)."""
    k = knn / scales[None, :, 0]
    m = maxima / scales[None, :, 1]
    per_tile = k if rule == "knn" else m if rule == "max" else k + m
    top, mean = per_tile.max(axis=1), per_tile.mean(axis=1)
    pooled = top if pool == "max" else mean if pool == "mean" else top + mean
    return np.asarray(pooled, dtype=np.float64)


def best_tile(maxima: np.ndarray, scales: np.ndarray) -> int:
    """The tile whose map maximum (T,) stands highest over its position's calibration median (``scales``
    (T, 2)): the tile whose gallery gives a tiled image's neighbours."""
    return int(np.argmax(maxima / scales[:, 1]))


__all__ = ["knn", "tile_knn", "tile_image_scores", "best_tile"]

"""Stage 2: image retrieval. kNN on global vectors gives the image score and the gallery of nearest training
images that stage 3 matches against; :func:`image_scores` is the one image-score rule."""

from __future__ import annotations

import math

import numpy as np
import torch


def image_knn(
    queries: torch.Tensor,
    train: torch.Tensor,
    k_image: int,
    k: int,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B,) = mean Euclidean distance to the ``k_image`` nearest training vectors, and the indices
    (B, min(k, N)) of the ``k`` nearest training images, nearest first.

    Computed in float64 with direct differences (N is small: one vector per training image).
    ``exclude`` (B,) or (B, m) optionally removes training indices per query (leave-one-out calibration).
    """
    q = queries.double().cpu()
    t = train.double().cpu()
    d = torch.cdist(q, t, compute_mode="donot_use_mm_for_euclid_dist")
    n = t.shape[0]
    if exclude is not None:
        ex = exclude.long().cpu().reshape(q.shape[0], -1)
        d[torch.arange(q.shape[0])[:, None], ex] = float("inf")
        n -= ex.shape[1]
    if n < 1:
        raise ValueError("image kNN needs at least one training image")
    kk = min(max(k, k_image), n)
    idx = d.argsort(dim=1, stable=True)[:, :kk]  # ties: lowest training index first
    vals = d.gather(1, idx)
    scores = vals[:, : min(k_image, n)].mean(1)
    return scores.float(), idx[:, : min(k, n)]


def tile_knn(
    queries: torch.Tensor,
    positions: torch.Tensor,
    train: torch.Tensor,
    per_image: int,
    retrieval: str,
    k_image: int,
    k: int,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`image_knn` for the tiles of a tiled model: ``queries`` (B, D) are tiles at grid ``positions``
    (B,), ``train`` the bank's rows (image by image, ``per_image`` tiles each in grid order).

    With ``retrieval="position"`` a tile's candidates are the training tiles at its grid position, with
    ``"all"`` every training tile. Returns each tile's score (mean distance to its ``k_image`` nearest
    candidates) and its gallery: the bank rows of its ``k`` nearest. ``exclude`` (B,): per query, a
    training image all of whose tiles are left out.
    """
    t = per_image
    pos = positions.long().cpu()
    if retrieval == "all":
        ex = None
        if exclude is not None:
            ex = exclude.long().cpu()[:, None] * t + torch.arange(t)[None, :]
        return image_knn(queries, train, k_image, k, ex)
    scores = torch.empty(queries.shape[0])
    idx = torch.empty(queries.shape[0], min(k, train.shape[0] // t - (exclude is not None)), dtype=torch.long)
    for p in pos.unique().tolist():
        rows = (pos == p).nonzero()[:, 0]
        sc, nb = image_knn(queries[rows], train[p::t], k_image, k, None if exclude is None else exclude[rows])
        scores[rows] = sc
        idx[rows] = nb * t + p
    return scores, idx


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


def image_scores(rule: str, scales: tuple[float, float], knn: torch.Tensor, map_max: torch.Tensor) -> torch.Tensor:
    """The image score under the ``image_score`` setting ``rule``, from the global kNN scores and the maps'
    maxima: ``knn`` (the paper's), ``max`` (the map's worst place) or ``combined`` (each divided by its
    median over the calibration images, ``scales``, then added)."""
    if rule == "knn":
        return knn
    if rule == "max":
        return map_max
    sk, sm = scales
    return knn / float(sk) + map_max / float(sm)


def positive_median(values: list[float]) -> float:
    """A score's scale for ``image_score=combined``: its median over the calibration images (1 if not positive)."""
    med = float(np.median(values))
    return med if math.isfinite(med) and med > 0 else 1.0


__all__ = ["image_knn", "tile_knn", "image_scores", "tile_image_scores", "positive_median"]

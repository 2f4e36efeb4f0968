"""Stage 2: image retrieval. kNN on global vectors gives the image score and the gallery of nearest training
images that stage 3 matches against; :func:`image_scores` is the one image-score rule."""

from __future__ import annotations

import math

import numpy as np
import torch

from spade_ad_runtime.retrieval import tile_image_scores


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

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
    ``exclude`` (B,) optionally removes one training index per query (leave-one-out calibration).
    """
    q = queries.double().cpu()
    t = train.double().cpu()
    d = torch.cdist(q, t, compute_mode="donot_use_mm_for_euclid_dist")
    n = t.shape[0]
    if exclude is not None:
        d[torch.arange(q.shape[0]), exclude.long().cpu()] = float("inf")
        n -= 1
    if n < 1:
        raise ValueError("image kNN needs at least one training image")
    kk = min(max(k, k_image), n)
    idx = d.argsort(dim=1, stable=True)[:, :kk]  # ties: lowest training index first
    vals = d.gather(1, idx)
    scores = vals[:, : min(k_image, n)].mean(1)
    return scores.float(), idx[:, : min(k, n)]


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


__all__ = ["image_knn", "image_scores", "positive_median"]

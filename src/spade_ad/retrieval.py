"""Stage 2: image retrieval. kNN on global vectors gives the image score and the gallery of nearest training
images that stage 3 matches against."""

from __future__ import annotations

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

"""Stages 2 and 3 for extracted features: image scores, anomaly maps and galleries, with a fitted state.

The one path from features to scores: :meth:`spade_ad.Spade.predict` and the leave-one-out calibration
(:mod:`spade_ad.calibration`) both take it, so a good image is calibrated exactly as it would be scored.
"""

from __future__ import annotations

import torch

from .correspondence import anomaly_maps
from .correspondence.runtime import COMPUTE_LOCK
from .retrieval import image_knn, image_scores
from .state import FittedState


def score_features(state: FittedState, levels: list[torch.Tensor], gvec: torch.Tensor,
                   exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 2 (image kNN over the global vectors ``gvec``) then stage 3 (the maps of ``levels``, (B, h*w, C)
    per level, against each image's gallery).

    Returns the global kNN scores (B,), the maps in the input frame (B, H, W) and the galleries (B, k).
    ``exclude`` (B,) leaves one training image out per query (calibration).
    """
    s = state.settings
    with COMPUTE_LOCK:
        knn, neigh = image_knn(gvec, state.global_, s.k_image, s.k, exclude)
        maps = anomaly_maps(state, levels, neigh)
    return knn, maps, neigh


def image_score(state: FittedState, knn: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """The image scores (the ``image_score`` setting) of maps ``maps`` with global kNN scores ``knn``."""
    scales = state.calibration.get("score_scales", (1.0, 1.0))  # (1, 1): fitted without calibration
    return image_scores(state.settings.image_score, (float(scales[0]), float(scales[1])), knn,
                        maps.amax(dim=(1, 2)).to(knn))


__all__ = ["score_features", "image_score"]

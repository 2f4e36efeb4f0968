"""Thresholds from good images alone: leave-one-out on an even sample of the training images.

Each sampled image is scored against the other training images exactly as a test image would be
(:func:`spade_ad.scoring.score_features`, its own bank row left out). The image threshold is the
``1 - false_alarm_rate`` quantile of their image scores; the pixel threshold the same quantile of their
maps' maxima, so about that fraction of good images shows any flagged pixel. Fewer than two training
images leave a model without thresholds (no verdicts, no masks).

In a tiled model the left-out unit is still the image (all its tiles), never a tile: a tile is not
compared with its neighbours in the same picture. Each grid position's tile scores over the sampled
images also give that position's medians (``position_scales``), by which the image score rule
(:func:`spade_ad.retrieval.tile_image_scores`) divides the tiles' scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from .features import TILE_CHUNK, batches
from .retrieval import image_scores, positive_median, tile_image_scores
from .scoring import score_features, score_tiles
from .state import FittedState

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def good_threshold(values: list[float], false_alarm_rate: float) -> float:
    """The good-image rule: the ``1 - false_alarm_rate`` quantile of good images' scores (the higher value
    between two), so at most about that fraction of them reaches it."""
    return float(np.quantile(values, 1.0 - false_alarm_rate, method="higher"))


def calibration_sample(n_train: int, n_images: int) -> np.ndarray:
    """The training indices scored for calibration: ``n_images`` spread evenly over ``n_train``."""
    return np.unique(np.linspace(0, n_train - 1, min(n_images, n_train)).round().astype(int))


def calibrate(state: FittedState, device: torch.device, progress: Progress | None = None) -> None:
    """Set ``state``'s thresholds and calibration record (see the module docstring)."""
    s = state.settings
    state.image_threshold = state.pixel_threshold = None
    state.calibration = {"method": "none"}
    if state.n_train < 2 or s.calibration_images < 1:
        return
    idx = calibration_sample(state.n_train, s.calibration_images)
    if state.grid is not None:
        _calibrate_tiled(state, idx, device, progress)
        return
    knn, maxima = _leave_one_out(state, idx, device, progress)
    state.calibration = {"method": "leave-one-out on training images", "n_images": len(idx),
                         "false_alarm_rate": s.false_alarm_rate}
    scales = (positive_median(knn), positive_median(maxima))
    if s.image_score == "combined":
        state.calibration["score_scales"] = list(scales)
    scores = image_scores(s.image_score, scales, torch.tensor(knn, dtype=torch.float32),
                          torch.tensor(maxima, dtype=torch.float32)).tolist()
    state.image_threshold = good_threshold(scores, s.false_alarm_rate)
    state.pixel_threshold = good_threshold(maxima, s.false_alarm_rate)
    state.calibration.update({"image_scores": scores, "map_maxima": maxima})


def _calibrate_tiled(state: FittedState, idx: np.ndarray, device: torch.device, progress: Progress | None) -> None:
    s = state.settings
    t = state.rows_per_image
    tile_knn, tile_max, maxima = [], [], []
    for j, i in enumerate(idx):
        rows = state.image_rows([int(i)])

        def chunks(rows: list[int] = rows) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
            for a, b in batches(len(rows), TILE_CHUNK):
                part = rows[a:b]
                yield ([torch.from_numpy(state.bank.gather(li, part).astype(np.float32)).to(device)
                        for li in range(state.bank.n_levels)], state.global_[part])

        res = score_tiles(state, chunks(), exclude=int(i))
        tile_knn.append(res.knn.tolist())
        tile_max.append(res.maxima.tolist())
        maxima.append(float(res.map.max()))
        if progress:
            progress("calibrate", j + 1, len(idx))
    k_arr, m_arr = np.asarray(tile_knn), np.asarray(tile_max)
    scales = np.array([[positive_median(list(k_arr[:, p])), positive_median(list(m_arr[:, p]))] for p in range(t)])
    scores = tile_image_scores(s.image_score, s.tile_pool, scales, k_arr, m_arr).tolist()
    state.calibration = {"method": "leave-one-out on training images (all tiles of an image left out)",
                         "n_images": len(idx), "false_alarm_rate": s.false_alarm_rate,
                         "position_scales": scales.tolist(), "image_scores": scores, "map_maxima": maxima,
                         "tile_knn": tile_knn, "tile_max": tile_max}
    state.image_threshold = good_threshold(scores, s.false_alarm_rate)
    state.pixel_threshold = good_threshold(maxima, s.false_alarm_rate)


def _leave_one_out(state: FittedState, idx: np.ndarray, device: torch.device,
                   progress: Progress | None) -> tuple[list[float], list[float]]:
    """Each sampled training image's global kNN score and map maximum, scored without itself."""
    knn, maxima = [], []
    for j, i in enumerate(idx):
        levels = [torch.from_numpy(state.bank.gather(li, [i]).astype(np.float32)).to(device)
                  for li in range(state.bank.n_levels)]
        sc, maps, _ = score_features(state, levels, state.global_[i : i + 1], exclude=torch.tensor([int(i)]))
        knn.append(float(sc[0]))
        maxima.append(float(maps[0].max()))
        if progress:
            progress("calibrate", j + 1, len(idx))
    return knn, maxima


__all__ = ["calibrate", "calibration_sample", "good_threshold"]

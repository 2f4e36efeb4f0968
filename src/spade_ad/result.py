"""What a prediction means: :class:`Prediction` of N images, yielding one ``ImageResult`` per image.

``ImageResult`` and the one verdict rule (:func:`verdict`) live in :mod:`spade_ad_runtime.result`, shared
with the runtime; they are re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from spade_ad_runtime.result import DEFECTIVE, GOOD, ImageResult, Region, check_min_area, normalised, verdict

from .correspondence import Correspondence, find_correspondence
from .errors import SpadeError

if TYPE_CHECKING:
    from .state import FittedState

@dataclass
class Prediction:
    """What :meth:`Spade.predict <spade_ad.Spade.predict>` returns for N images.

    Index it (``pred[i]``) or iterate over it for one :class:`ImageResult` per image; the arrays below
    hold the same numbers for all images at once.

    Attributes:
        scores: (N,) image anomaly scores.
        maps: N float32 maps, each at its image's own resolution.
        input_maps: N float32 maps in the network's input frame.
        neighbours: (N, k) indices of the retrieved training images, nearest first (a tiled model: the
            gallery of the image's worst tile).
        names: the images' names; sizes: their (height, width).
        image_threshold / pixel_threshold: the thresholds in force.
        min_area / verdict_rule: the model's settings in force (``min_area`` as given to ``predict``): see
            :class:`ImageResult`.
        train_names: names of the model's training images.
        features: per image, per level, (H*W, C) features (with ``keep_features=True``; a tiled model:
            (tiles, H*W, C)).
        tile_knn, tile_max, tile_neighbours: a tiled model's per-tile kNN scores, map maxima and galleries
            (bank rows: image ``row // tiles``, tile ``row % tiles``), per image.

    Example:
        >>> pred = model.predict(["a.png", "b.png"])        # doctest: +SKIP
        >>> [(r.name, r.verdict) for r in pred]               # doctest: +SKIP
        [('a.png', 'good'), ('b.png', 'defective')]
    """

    scores: np.ndarray
    maps: list[np.ndarray]
    input_maps: list[np.ndarray]
    neighbours: np.ndarray
    names: list[str] = field(default_factory=list)
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    train_names: list[str] = field(default_factory=list)
    features: list[list[np.ndarray]] | None = None
    sizes: list[tuple[int, int]] = field(default_factory=list)
    state: FittedState | None = field(default=None, repr=False)  # the model that scored them
    tile_knn: list[np.ndarray] | None = None  # tiled models: per image, each tile's kNN score (T,)
    tile_max: list[np.ndarray] | None = None  # ... each tile's map maximum (T,)
    tile_neighbours: list[np.ndarray] | None = None  # ... each tile's gallery, bank rows (T, k)
    min_area: int = 0
    verdict_rule: str = "score"

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, i: int) -> ImageResult:
        neigh = tuple(int(j) for j in self.neighbours[i])
        return ImageResult(
            name=self.names[i] if i < len(self.names) else f"array[{i}]",
            score=float(self.scores[i]),
            map=self.maps[i],
            input_map=self.input_maps[i],
            neighbours=neigh,
            neighbour_names=tuple(self.train_names[j] if j < len(self.train_names) else str(j) for j in neigh),
            image_threshold=self.image_threshold,
            pixel_threshold=self.pixel_threshold,
            min_area=self.min_area,
            verdict_rule=self.verdict_rule,
        )

    def __iter__(self) -> Iterator[ImageResult]:
        return (self[i] for i in range(len(self)))

    @property
    def masks(self) -> list[np.ndarray] | None:
        """N bool masks (see :attr:`ImageResult.mask`), ``None`` without a threshold."""
        if self.pixel_threshold is None:
            return None
        return [m for m in (r.mask for r in self) if m is not None]

    @property
    def verdicts(self) -> np.ndarray | None:
        """True = defective (see :attr:`ImageResult.verdict`), ``None`` without the threshold the rule needs."""
        found = [r.verdict for r in self]
        if any(v is None for v in found):
            return None
        return np.array([v == DEFECTIVE for v in found], dtype=bool)

    @property
    def normalised_scores(self) -> np.ndarray | None:
        """Image scores divided by the image threshold (1.0 = at the threshold)."""
        if not self.image_threshold:
            return None
        return self.scores / self.image_threshold

    def neighbour_names(self, i: int) -> list[str]:
        return list(self[i].neighbour_names)

    def correspondence(self, i: int, y: int, x: int, level: int = 0) -> Correspondence:
        """The normal feature that pixel (y, x) of image i was matched to (needs ``keep_features=True``)."""
        if self.features is None or self.state is None:
            raise SpadeError("correspondence needs predict(..., keep_features=True)")
        if not (0 <= level < len(self.features[i])):
            raise SpadeError(f"level must be in 0..{len(self.features[i]) - 1}, got {level}")
        feats = self.features[i][level]
        if self.tile_neighbours is not None:
            return find_correspondence(self.state, feats, self.tile_neighbours[i], self.sizes[i], y, x, level)
        return find_correspondence(self.state, feats, self.neighbours[i], self.sizes[i], y, x, level)


__all__ = ["ImageResult", "Prediction", "Region", "verdict", "normalised", "check_min_area", "DEFECTIVE",
           "GOOD"]

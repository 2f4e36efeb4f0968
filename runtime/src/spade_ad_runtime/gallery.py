"""Stage 3's search state: the bank's rows and fit-time index, and the galleries prepared from them.

:class:`PixelSearch` opens ``bank.safetensors`` of a deploy folder and answers, for one test image's pyramid
features and its gallery (bank rows retrieved by stage 2), each level's map of distances to the ``kappa``
nearest gallery features (:mod:`.search`). It is the whole of stage 3's state, so that it can run in the
detector's process or in a worker process (:mod:`.workers`) with the same answer.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from .deploy import DeployError
from .search import Grouped, group_gallery, grouped_nn_distances, nn_distances, position_bound


class PixelSearch:
    """The bank of a deploy folder, read row by row (positioned reads of the safetensors file), and the last
    few galleries prepared for the grouped search (with k at least the training images, every test image
    has the same gallery)."""

    def __init__(self, bank: Path, level_shapes: list[tuple[int, int]], kappa: int) -> None:
        self.path = bank
        self.level_shapes = level_shapes
        self.kappa = kappa
        self._bank = safe_open(str(bank), framework="numpy")
        self._levels = [self._bank.get_slice(f"level{i}") for i in range(len(level_shapes))]
        keys = set(self._bank.keys())
        self.index = [self._read_index(i, keys) for i in range(len(level_shapes))]
        self._galleries: dict[tuple[int, tuple[int, ...]], tuple[Grouped, np.ndarray]] = {}
        self._lock = threading.Lock()

    def reset_lock(self) -> None:
        """A fresh lock for the gallery cache (a forked worker's copy of the lock may be held forever)."""
        self._lock = threading.Lock()

    def _read_index(self, level: int, keys: set[str]) -> tuple[Any, np.ndarray] | None:
        """The bank's fit-time search index of ``level``, if it has one: each training image's unit per position
        (read per gallery image) and the units' centres (unit = cell * shells + shell; a cell's centroid)."""
        names = (f"cells{level}.unit", f"codebook{level}.centroids", f"codebook{level}.cuts")
        if not all(k in keys for k in names):
            return None
        centroids = np.asarray(self._bank.get_tensor(names[1]), np.float32)
        shells = int(self._bank.get_slice(names[2]).get_shape()[1]) + 1
        return self._bank.get_slice(names[0]), np.repeat(centroids, shells, axis=0)

    def level_maps(self, levels: list[np.ndarray], gallery: np.ndarray) -> list[np.ndarray]:
        """Per level, each position's mean distance to its ``kappa`` nearest features of the ``gallery``'s bank
        rows (grouped by the bank's index where it has one, with a first bound from each position's own rows:
        the same answer, fewer pairs computed)."""
        out = []
        rows = sorted(int(i) for i in gallery)
        for li, (h, w) in enumerate(self.level_shapes):
            if self.index[li] is None:
                out.append(nn_distances(levels[li], self.rows(li, rows), self.kappa).reshape(h, w))
            else:
                grouped, positions = self.grouped(li, rows)
                ub = position_bound(levels[li], positions, self.kappa)  # the rows at each query's own position
                out.append(grouped_nn_distances(levels[li], grouped, kappa=self.kappa, first_ub=ub).reshape(h, w))
        return out

    def rows(self, level: int, rows: list[int]) -> np.ndarray:
        g = np.concatenate([self._levels[level][r : r + 1] for r in rows])  # positioned reads, one image each
        return g.reshape(-1, g.shape[-1]).astype(np.float32)

    def grouped(self, level: int, rows: list[int]) -> tuple[Grouped, np.ndarray]:
        """The gallery of bank rows ``rows`` at ``level``, grouped by the index, and its rows laid out by image
        and position (k, h*w, C); kept for the next images (bounded: the oldest goes first)."""
        key = (level, tuple(rows))
        with self._lock:  # (threads: one prepares a gallery, the others wait for it)
            if key not in self._galleries:
                found = self._prepare(level, rows)
                while len(self._galleries) >= 2 * len(self.level_shapes):
                    self._galleries.pop(next(iter(self._galleries)))
                self._galleries[key] = found
            return self._galleries[key]

    def _prepare(self, level: int, rows: list[int]) -> tuple[Grouped, np.ndarray]:
        index = self.index[level]
        assert index is not None
        g = self.rows(level, rows)
        units = np.concatenate([index[0][r : r + 1] for r in rows]).reshape(-1).astype(np.int64)
        if units.shape[0] != g.shape[0] or units.min() < 0 or units.max() >= index[1].shape[0]:
            raise DeployError(f"{self.path}: damaged search index (level {level})")
        return group_gallery(g, units, index[1]), g.reshape(len(rows), -1, g.shape[-1])


__all__ = ["PixelSearch"]

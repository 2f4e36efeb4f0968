"""A fitted model's state, as one object: what ``fit`` learns, what a model folder stores, what a
prediction is explained with.

:class:`FittedState` holds the settings, the network input shape and pyramid layout, the training
images' global vectors, their feature bank (on disk), their names and identities, the calibrated
thresholds and the model's history. The estimator (:class:`spade_ad.Spade`) computes it; storage
(:mod:`spade_ad.persistence`) writes and reads it without knowing the estimator; a
:class:`~spade_ad.Prediction` explains its pixels through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

import torch

from spade_ad_runtime.zone import Zone

from .bank import Bank
from .defects import DefectSet
from .errors import NotFittedError
from .preprocess import Preprocessor
from .settings import SpadeSettings
from .tiling import TileGrid

T = TypeVar("T")


@dataclass
class FittedState:
    """Everything a fitted model is (the estimator's fitted attributes, ``Spade.global_`` etc., read it).

    Attributes:
        settings: the validated settings the model was fitted with (runtime ones as loaded).
        input_shape: (height, width) of the network input.
        level_shapes: (h, w) of each pyramid level at that input.
        weights_id: checksum of the backbone weights.
        global_: (N, D) float32 global vectors of the bank's rows (stage 2's index).
        bank: the feature bank on disk (per row: pyramid, thumbnail, search-index cells). A row is a
            training image, or in a tiled model one tile of one: image i's tiles are rows
            ``i * rows_per_image ...`` in the grid's order.
        train_names: the training images' names (paths as given to ``fit``).
        train_ids: each training image's identity (SHA-256 of its pixels; ``None`` in models saved before).
        image_threshold, pixel_threshold: calibrated thresholds (``None``: not calibrated).
        calibration: how the thresholds were set (method, scores, score scales).
        history: one entry per generation (fit, add, remove, rollback); its length is the generation.
        lineage: identifies the fit that the model's generations descend from.
        base_sha256: checksum of the saved header this state was read from or saved as (``None``: unsaved).
        grid: a tiled model's tile grid, fixed at fit (``None``: not tiled).
        zone: the inspection zone (``None``: the whole image is inspected).
        defects: the known defects kept with the model (``None``: none).
    """

    settings: SpadeSettings
    input_shape: tuple[int, int]
    level_shapes: list[tuple[int, int]]
    weights_id: str
    global_: torch.Tensor
    bank: Bank
    train_names: list[str]
    train_ids: list[str | None]
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    calibration: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    history: list[dict[str, Any]] = field(default_factory=list)
    lineage: str = ""
    base_sha256: str | None = None
    grid: TileGrid | None = None
    zone: Zone | None = None
    defects: DefectSet | None = None

    @property
    def rows_per_image(self) -> int:
        """Bank rows per training image: its tiles, or 1."""
        return len(self.grid) if self.grid is not None else 1

    def image_rows(self, images: list[int]) -> list[int]:
        """The bank rows of training images ``images``, in order."""
        t = self.rows_per_image
        return [i * t + j for i in images for j in range(t)]

    @property
    def prep(self) -> Preprocessor:
        """How images become this model's network input."""
        # a tiled model's zone applies to the whole image before it is cut (features.network_inputs), not per tile
        return Preprocessor(self.settings.preprocess, self.settings.image_size, self.input_shape,
                            self.zone if self.grid is None else None)

    @property
    def generation(self) -> int:
        return len(self.history)

    @property
    def n_train(self) -> int:
        return int(self.bank.n) // self.rows_per_image

    def numbers(self) -> dict[str, Any]:
        """Training-image count and thresholds (what the history records before and after a change)."""
        return {"n_train": self.n_train, "image_threshold": self.image_threshold,
                "pixel_threshold": self.pixel_threshold}


class Fitted(Generic[T]):
    """A fitted attribute of the estimator (``Spade.bank_``), read from and written to its
    :class:`FittedState`; before ``fit`` or ``load`` reading it raises :class:`~spade_ad.errors.NotFittedError`
    (an ``AttributeError``, so ``hasattr`` says whether a model is fitted)."""

    def __init__(self, state_field: str) -> None:
        self.field = state_field

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> Fitted[T]: ...

    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> T: ...

    def __get__(self, obj: object | None, objtype: type | None = None) -> T | Fitted[T]:
        if obj is None:
            return self
        state = obj.__dict__.get("_state")
        if state is None:
            raise NotFittedError(f"{self.name} is not set: this model is not fitted yet (call fit(...) or "
                                 "Spade.load(...) first)")
        value: T = getattr(state, self.field)
        return value

    def __set__(self, obj: object, value: T) -> None:
        state = obj.__dict__.get("_state")
        if state is None:
            raise NotFittedError(f"{self.name} cannot be set on a model that is not fitted")
        setattr(state, self.field, value)


__all__ = ["FittedState", "Fitted"]

"""The estimator: ``Spade(...).fit(good_images)`` then ``predict(images)``; ``save`` / ``load``.

API and wiring only. The stages live in their own modules: :mod:`.features` (stage 1, and the bank's
rows), :mod:`.retrieval` (stage 2 and the image-score rule), :mod:`.correspondence` (stage 3),
:mod:`.calibration` (thresholds), with :mod:`.scoring` joining stages 2 and 3 for extracted features.
What ``fit`` learns is one :class:`~spade_ad.state.FittedState` (``Spade.state_``), which
:mod:`.persistence` writes and reads; the fitted attributes (``global_``, ``bank_``, ...) read it.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spade_ad_runtime.retrieval import best_tile
from spade_ad_runtime.zone import Zone, read_zone

from .backbones import FeatureExtractor, build_backbone
from .bank import Bank
from .calibration import calibrate
from .correspondence import Correspondence
from .correspondence.runtime import COMPUTE_LOCK
from .defects import Defect, DefectSet, write_defects
from .errors import NotFittedError, SpadeError
from .features import (
    THUMB,
    TILE_CHUNK,
    BankRows,
    OldRows,
    bank_rows,
    batches,
    extract,
    image_id,
    level_shapes,
    network_inputs,
    write_bank,
)
from .io import image_shape, is_staging, list_images, load_image, staging_path, to_rgb_uint8
from .operating import Evidence, check_rule, costs, thresholds
from .persistence import clean_stale, utc_now
from .preprocess import Preprocessor, aspect_shape
from .result import GOOD, Prediction, check_min_area
from .scoring import image_score, position_scales, score_features, score_tiles, tiled_image_score
from .settings import SpadeSettings
from .state import Fitted, FittedState
from .tiling import TileGrid, fit_grid, mosaic, to_native

ImageInput = str | Path | np.ndarray
Images = str | Path | Sequence[ImageInput]
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def resolve_images(images: Images) -> tuple[list[ImageInput], list[str]]:
    """A folder, one path, or a sequence of paths/arrays -> (items, display names)."""
    if isinstance(images, (str, Path)):
        p = Path(images)
        items: list[ImageInput] = list(list_images(p)) if p.is_dir() else [p]
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, np.ndarray):
        items = [images]
    else:
        items = list(images)
    if not items:
        raise SpadeError("no images given")
    names = [str(x) if isinstance(x, (str, Path)) else f"array[{i}]" for i, x in enumerate(items)]
    return items, names


def read_item(item: ImageInput, name: str, max_pixels: int | None = None) -> np.ndarray:
    """A path or an array -> HxWx3 uint8 (files over ``max_pixels`` are refused before decoding)."""
    if isinstance(item, (str, Path)):
        return load_image(item, max_pixels=max_pixels)
    return to_rgb_uint8(item, name)


def as_zone(zone: str | Path | np.ndarray | Zone | None, settings: SpadeSettings) -> Zone | None:
    """An inspection zone from a picture's path or a bool array (``None``: none)."""
    if zone is None:
        return None
    if isinstance(zone, Zone):
        return zone
    if isinstance(zone, (str, Path)):
        return Zone(read_zone(zone, settings.max_pixels), str(zone))
    return Zone(np.asarray(zone), "zone")


def read_items(items: Sequence[ImageInput], names: Sequence[str], max_pixels: int | None = None) -> list[np.ndarray]:
    """:func:`read_item` for each item, files decoded on up to one thread per core (torch's thread count;
    Pillow decodes outside Python's lock): the same arrays in the same order, the first error raised."""
    threads = min(torch.get_num_threads(), sum(isinstance(x, (str, Path)) for x in items))
    if threads < 2:
        return [read_item(x, n, max_pixels) for x, n in zip(items, names, strict=True)]
    with ThreadPoolExecutor(threads, "spade-read") as pool:
        return list(pool.map(read_item, items, names, [max_pixels] * len(items)))


def _check_unique(names: list[str], new: list[str] | None = None) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen and not n.startswith("array["):
            raise SpadeError(f"{n}: {'already a training image of this model' if new else 'given twice'}")
        seen.add(n)


def _change(state: FittedState, action: str, before: dict[str, Any] | None, added: list[str] | None = None,
            removed: list[str] | None = None, source: str | None = None, generation: int = 1) -> dict[str, Any]:
    """One history entry: what changed, and the counts and thresholds before and after (``state``'s)."""
    return {"generation": generation, "time": utc_now(), "action": action, "added": added or [],
            "removed": removed or [], "source": source, "before": before, "after": state.numbers()}


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def pick_device(device: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` -> a torch device that exists here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SpadeError(f"unknown device {device!r}; use cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpadeError(f"device {device!r} requested but no CUDA GPU is available (use --device cpu)")
    return torch.device(device)


class Spade:
    """SPADE anomaly detector (Cohen & Hoshen 2020), learned from good images only.

    Args:
        settings: a :class:`~spade_ad.SpadeSettings` (default: the paper's settings).
        **overrides: individual settings by name (``k=20``, ``device="cuda"``), applied over
            ``settings``; see :class:`~spade_ad.SpadeSettings` for each one's meaning and bounds.
            Without ``settings``, ``preset="accurate"`` (or ``"fast"``) starts from that preset's
            settings and the other overrides apply over it.

    Attributes (after ``fit`` or ``load``):
        settings: the validated settings.
        global_: (N, D) float32 global vectors of the training images (stage 2's index).
        bank_: the feature bank on disk (per training image: pyramid and thumbnail).
        input_shape_: (height, width) of the network input (see the ``preprocess`` setting).
        level_shapes_: (h, w) of each pyramid level.
        train_names_: the training images' names (paths as given to ``fit``).
        train_ids_: each training image's identity (:func:`spade_ad.features.image_id`; ``None`` in models
            saved before ids).
        weights_id_: checksum of the backbone weights.
        image_threshold_, pixel_threshold_: calibrated thresholds (``None`` if not calibrated).
        calibration_: how the thresholds were set (method, scores).
        history_: one entry per generation (fit, add, remove, rollback) with counts and thresholds
            before and after; ``len(history_)`` is the generation.
        lineage_: identifies the fit that this model's generations descend from.
        state_: all of the above as one :class:`~spade_ad.state.FittedState` (what a model folder stores).
        offset_: the image threshold: :meth:`decision_function` is the image score minus it.

    Example:
        >>> from spade_ad import Spade
        >>> model = Spade(k=50, kappa=1).fit("good_images/")          # doctest: +SKIP
        >>> accurate = Spade(preset="accurate")                       # doctest: +SKIP
        >>> pred = model.predict(["part1.png"])                       # doctest: +SKIP
        >>> pred[0].verdict, pred[0].map.shape                        # doctest: +SKIP
        ('defective', (900, 900))
    """

    global_ = Fitted[torch.Tensor]("global_")
    bank_ = Fitted[Bank]("bank")
    input_shape_ = Fitted[tuple[int, int]]("input_shape")
    level_shapes_ = Fitted[list[tuple[int, int]]]("level_shapes")
    train_names_ = Fitted[list[str]]("train_names")
    train_ids_ = Fitted[list[str | None]]("train_ids")
    weights_id_ = Fitted[str]("weights_id")
    image_threshold_ = Fitted[float | None]("image_threshold")
    pixel_threshold_ = Fitted[float | None]("pixel_threshold")
    calibration_ = Fitted[dict[str, Any]]("calibration")
    history_ = Fitted[list[dict[str, Any]]]("history")
    lineage_ = Fitted[str]("lineage")
    base_sha256_ = Fitted[str | None]("base_sha256")  # the saved header this model was read from or saved as
    offset_ = Fitted[float | None]("image_threshold")  # scikit-learn's name: decision_function = score - offset_

    def __init__(self, settings: SpadeSettings | None = None, **overrides: Any) -> None:
        if settings is None:
            base = SpadeSettings.from_preset(overrides.pop("preset", "paper"))
        elif "preset" in overrides:
            raise SpadeError("preset= starts from a preset's settings; with settings= given, use "
                             "SpadeSettings.from_preset(...) instead")
        elif isinstance(settings, SpadeSettings):
            base = settings
        else:
            raise SpadeError(f"settings must be a SpadeSettings, got {type(settings).__name__}")
        self.settings = base.replace(**overrides) if overrides else base
        self._net_lock = threading.Lock()
        self._net_cache: FeatureExtractor | None = None
        self._input_shape: tuple[int, int] | None = None  # fixed before fitting (fix_input_shape)
        self._grid: TileGrid | None = None  # a tiled model's grid, fixed before fitting (fix_input_shape)
        self._zone: Zone | None = None  # the inspection zone given to fit

    # ------------------------------------------------------------------ settings
    @property
    def prep(self) -> Preprocessor:
        """How images become the network input (the ``preprocess`` and ``image_size`` settings, and for
        ``aspect`` the input shape fixed by ``fit``)."""
        state = self.__dict__.get("_state")
        if state is not None:
            return state.prep
        return Preprocessor(self.settings.preprocess, self.settings.image_size, self._input_shape,
                            self._zone if self._grid is None else None)

    @property
    def zone(self) -> Zone | None:
        """The inspection zone (the fitted model's, or the one given before fitting)."""
        state = self.__dict__.get("_state")
        return state.zone if state is not None else self._zone

    def set_zone(self, zone: str | Path | np.ndarray | Zone | None) -> None:
        """Before fitting: the inspection zone (a picture's path, white = inspect; a bool array; ``None``: the
        whole image). Outside it images are grey to the network and maps are 0 (:mod:`spade_ad_runtime.zone`)."""
        self._zone = as_zone(zone, self.settings)

    def fix_input_shape(self, items: Sequence[ImageInput] = (), shape: tuple[int, int] | None = None,
                        grid: TileGrid | None = None) -> None:
        """Before fitting: the network input shape of the training images ``items`` (``input_shape_`` once
        fitted), and for a tiled model its tile grid (``grid_``).

        A square of ``image_size`` except with ``preprocess="aspect"``, where the training images'
        median aspect ratio decides it (read from the files' headers), or ``shape`` when it was computed
        so elsewhere (a Ray worker takes the driver's). A tiled model's grid is made for the training
        images' median size (:func:`spade_ad.tiling.fit_grid`), or is ``grid`` (the driver's).
        """
        s = self.settings
        sizes: list[tuple[int, int]] | None = None
        if s.tile and grid is None or s.preprocess == "aspect" and shape is None:
            sizes = [image_shape(x, max_pixels=s.max_pixels) if isinstance(x, (str, Path))
                     else (int(np.shape(x)[0]), int(np.shape(x)[1])) for x in items]
        if s.tile:
            self._grid = grid if grid is not None else fit_grid(sizes or [], s.tile, s.tile_overlap, s.tile_scale,
                                                                s.tile_span)
        if s.preprocess != "aspect":
            self._input_shape = (s.image_size, s.image_size)
        elif shape is not None:
            self._input_shape = (int(shape[0]), int(shape[1]))
        else:
            self._input_shape = aspect_shape(s.image_size, sizes or [])

    @property
    def grid(self) -> TileGrid | None:
        """The tile grid (a tiled model's, fixed by ``fit``; ``None`` when not tiled)."""
        state = self.__dict__.get("_state")
        return state.grid if state is not None else self._grid

    @property
    def device(self) -> torch.device:
        return pick_device(self.settings.device)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Every setting by name, runtime ones included (as scikit-learn's ``get_params``)."""
        return self.settings.as_dict()

    def set_params(self, **params: Any) -> Spade:
        """Change settings (validated); returns ``self``.

        Before ``fit`` any setting; on a fitted model only runtime ones (``device``, ``batch_size``, ...):
        a model setting decides what was fitted, so changing it needs a new ``fit`` (refused with one line).
        """
        state = self.__dict__.get("_state")
        if state is not None:
            stored = [k for k in params if k in self.settings.model_dict() or k == "preset"]
            if stored:
                raise SpadeError(f"set_params: {', '.join(stored)} decide(s) what the model learnt; fit a new model "
                                 "to change them (only runtime settings change on a fitted model)")
        self.settings = self.settings.replace(**params)
        if state is not None:
            state.settings = self.settings
        self._net_cache = None
        return self

    def _net(self) -> FeatureExtractor:
        with self._net_lock:
            if self._net_cache is None:
                s = self.settings
                self._net_cache = build_backbone(s.backbone, s.weights, s.level_indices, s.aggregate).to(self.device)
            return self._net_cache

    @property
    def state_(self) -> FittedState:
        """What the model learnt, as one object (see :class:`~spade_ad.state.FittedState`)."""
        state = self.__dict__.get("_state")
        if state is None:
            raise NotFittedError("this Spade model is not fitted yet: call fit(...) or Spade.load(...) first")
        return state

    @state_.setter
    def state_(self, state: FittedState) -> None:
        self.__dict__["_state"] = state

    def _check_fitted(self) -> None:
        self.state_  # noqa: B018 - raises NotFittedError before fit

    # ------------------------------------------------------------------ fit
    def fit(self, images: Images, progress: Progress | None = None, workdir: str | Path | None = None,
            zone: str | Path | np.ndarray | None = None) -> Spade:
        """Learn from good images: store their global vectors and feature pyramids, calibrate thresholds.

        Args:
            images: a folder, a list of paths, or a list of HxW[x3|4] arrays (sizes may differ).
            progress: optional callback ``(stage, done, total)``.
            workdir: where the bank is written while fitting (default: a temporary folder). Give the
                model folder you will ``save`` to, and saving moves the bank instead of copying it.
            zone: an inspection zone (see :meth:`set_zone`); stored with the model.

        Returns:
            ``self``, fitted.

        Example:
            >>> model = Spade().fit("bottle/train/good")                # doctest: +SKIP
        """
        pick_device(self.settings.device)
        items, names = resolve_images(images)
        if zone is not None:
            self.set_zone(zone)
        self.fix_input_shape(items)
        return self.fit_rows(names, self._rows(items, names), progress, workdir)

    def bank_rows(self, arrays: Sequence[np.ndarray], start: int) -> BankRows:
        """What the bank stores for training images ``start, start+1, ...`` (decoded ``arrays``).

        The one definition of a bank row: ``fit`` and ``add`` call it here, and :mod:`spade_ad.distributed`
        calls it on Ray workers, so all write the same bytes.
        """
        return bank_rows(self._net(), self.prep, self.device, arrays, start, self.grid, self.zone)

    def _rows(self, items: list[ImageInput], names: list[str]) -> Iterator[BankRows]:
        s = self.settings
        # a tiled model holds a batch's tile features at once: as many images as fill a chunk of tiles
        per_batch = s.batch_size if self.grid is None else max(1, min(s.batch_size, TILE_CHUNK // len(self.grid)))
        for a, b in batches(len(items), per_batch):
            yield self.bank_rows(self._read(items[a:b], names[a:b]), a)

    def _read(self, items: list[ImageInput], names: list[str]) -> list[np.ndarray]:
        """Decoded images, each checked against the inspection zone's aspect ratio (one line naming it)."""
        arrays = read_items(items, names, self.settings.max_pixels)
        for arr, name in zip(arrays, names, strict=True):
            self.check_image(arr, name)
        return arrays

    def check_image(self, image: np.ndarray, name: str) -> None:
        """Refuse, with one line naming it, an image this model cannot take (the inspection zone's aspect ratio)."""
        if self.zone is not None:
            self.zone.at(image.shape[0], image.shape[1], name)

    def fit_rows(self, names: Sequence[str], rows: Iterable[BankRows], progress: Progress | None = None,
                 workdir: str | Path | None = None) -> Spade:
        """The rest of ``fit`` once features are computed: ``rows`` (from :meth:`bank_rows`) are written into
        the bank at their images' indices, in whatever order they come (on Ray workers they finish in any
        order; a repeated row is written again, identically), then the thresholds are calibrated.

        Args:
            names: the training images' names, one per bank row (stored in the model).
            rows: :class:`BankRows` covering every index ``0 .. len(names)-1``.
            progress, workdir: as for :meth:`fit`.
        """
        pick_device(self.settings.device)
        names = list(names)
        if not names:
            raise SpadeError("no images given")
        _check_unique(names)
        if self.settings.tile and self._grid is None:
            raise SpadeError("tiled model: call fix_input_shape(training images) before fit_rows")
        if self.settings.preprocess != "aspect":
            self.fix_input_shape([], grid=self._grid)
        elif self._input_shape is None:
            raise SpadeError("preprocess=aspect: call fix_input_shape(training images) before fit_rows")
        assert self._input_shape is not None
        net, prep, grid = self._net(), self.prep, self._grid
        shapes = level_shapes(net, prep)
        glob, bank, ids = write_bank(self._new_bank_path(workdir), net, shapes, self.settings.k, None, rows, names,
                                     progress, len(grid) if grid is not None else 1)
        # a new model (base_sha256 None): saved over a folder, it becomes that folder's next generation
        state = FittedState(self.settings, self._input_shape, shapes, net.weights_id, glob, bank, names, ids,
                            lineage=secrets.token_hex(8), grid=grid, zone=self._zone)
        calibrate(state, self.device, progress)
        state.history = [_change(state, "fit", added=names, before=None)]
        self.state_ = state
        return self

    # ------------------------------------------------------------------ keeping the model up to date
    def add(self, images: Images, progress: Progress | None = None, source: str | None = None,
            names: Sequence[str] | None = None) -> Spade:
        """Add good images to a fitted model: exactly as if it had been fitted on the old images, then these.

        Only the new images' features are extracted; the bank is rewritten row by row (never loaded
        whole) and the thresholds are recalibrated as ``fit`` would. Afterwards the model predicts bit
        for bit what a model fitted from scratch on the resulting list of images predicts.

        Args:
            images: a folder, paths or arrays (names must not already be in the model).
            progress: optional callback ``(stage, done, total)``.
            source: who asked (recorded in the history, e.g. ``"cli"`` or an inspector client).
            names: names to record for the images (default: their paths, or ``array[i]``).

        Returns:
            ``self``, updated (one more generation in ``history_``).

        Example:
            >>> model = Spade.load("model_dir").add(["new_good_1.png", "new_good_2.png"])   # doctest: +SKIP
            >>> model.save("model_dir")                                                     # doctest: +SKIP
        """
        self._check_fitted()
        items, found = resolve_images(images)
        if names is not None and len(names) != len(items):
            raise SpadeError(f"got {len(names)} names for {len(items)} images")
        names = list(found if names is None else names)
        _check_unique(self.train_names_ + names, new=names)
        self._rewrite(list(range(self.state_.n_train)), self._rows(items, names), names, "add", progress, source)
        return self

    def remove(self, which: str | int | Sequence[str | int], progress: Progress | None = None,
               source: str | None = None, force: bool = False) -> Spade:
        """Remove training images (no feature extraction): exactly as if they had never been fitted.

        Args:
            which: indices, image ids, or names (a training image's path as given to ``fit``, or its file
                name where that is unambiguous); each image named once.
            progress: optional callback ``(stage, done, total)``.
            source: who asked (recorded in the history).
            force: allow leaving a single training image (the model then has no thresholds: calibration
                scores each image against the others, and there are none).

        Returns:
            ``self``, updated.

        Example:
            >>> Spade.load("model_dir").remove(["017.png"]).save("model_dir")        # doctest: +SKIP
        """
        self._check_fitted()
        drop = self.resolve_names([which] if isinstance(which, (str, int)) else list(which))
        dropped = set(drop)
        n_train = self.state_.n_train
        keep = [i for i in range(n_train) if i not in dropped]
        if not keep:
            raise SpadeError("cannot remove every training image: a model needs at least one")
        if len(keep) < 2 <= n_train and not force:
            raise SpadeError(f"removing {len(drop)} of {n_train} training images would leave one: the model "
                             "would have no thresholds (no verdicts, no masks); add images first, or force it "
                             "(--force, force=True)")
        self._rewrite(keep, [], [], "remove", progress, source)
        return self

    def change_zone(self, zone: str | Path | np.ndarray | None, progress: Progress | None = None,
                    source: str | None = None) -> Spade:
        """A new inspection zone for a fitted model (``None``: inspect the whole image), as a new generation.

        The features of every training image depend on the zone (outside it the network sees grey), so the
        training images are read again from their paths as given to ``fit``, each checked to be the same
        pixels as then (its identity), and the model becomes exactly what ``fit`` with the new zone gives.
        A training image that is missing, changed or given as an array is refused with one line naming it.
        """
        self._check_fitted()
        old = self.state_
        new = as_zone(zone, self.settings)
        prep = replace(old.prep, zone=new if old.grid is None else None)
        names = list(old.train_names)

        def rows() -> Iterator[BankRows]:
            for a, b in batches(len(names), self.settings.batch_size):
                arrays = []
                for i in range(a, b):
                    if names[i].startswith("array[") and not Path(names[i]).exists():
                        raise SpadeError(f"{names[i]}: a training image given as an array cannot be read again "
                                         "to change the zone; fit a new model with the zone instead")
                    arr = read_item(names[i], names[i], self.settings.max_pixels)
                    if old.train_ids[i] is not None and image_id(arr) != old.train_ids[i]:
                        raise SpadeError(f"{names[i]}: not the image this model was fitted on (its pixels changed); "
                                         "the zone can only change with the same training images")
                    if new is not None:
                        new.at(arr.shape[0], arr.shape[1], names[i])
                    arrays.append(arr)
                yield bank_rows(self._net(), prep, self.device, arrays, a, old.grid, new)

        self._rewrite([], rows(), names, "zone", progress, source, zone=new)
        return self

    def _rewrite(self, keep: list[int], rows: Iterable[BankRows], names: list[str], action: str,
                 progress: Progress | None, source: str | None, zone: Zone | None | bool = True) -> None:
        """The bank's rows ``keep``, then ``rows`` for the new images ``names``: a new bank, recalibrated,
        one more generation (with inspection zone ``zone``; ``True``: the old one). An unsaved intermediate bank
        (a staging file of ours) is deleted at once (readers still holding it keep reading: the file stays open)."""
        old = self.state_
        before = old.numbers()
        olds = OldRows(old.bank, old.global_, old.train_names, old.train_ids, keep)
        glob, bank, ids = write_bank(self._new_bank_path(None), self._net(), old.level_shapes, self.settings.k,
                                     olds, rows, names, progress, old.rows_per_image)
        kept = set(keep)
        removed = [n for i, n in enumerate(old.train_names) if i not in kept]
        state = FittedState(old.settings, old.input_shape, old.level_shapes, old.weights_id, glob, bank,
                            [old.train_names[i] for i in keep] + names, ids, lineage=old.lineage,
                            base_sha256=old.base_sha256, grid=old.grid,
                            zone=old.zone if zone is True else zone if isinstance(zone, Zone) else None,
                            defects=old.defects)
        calibrate(state, self.device, progress)
        self.state_ = state
        self._keep_operating_point(old.calibration.get("operating_point"))
        change = _change(state, action, before=before, added=names, removed=removed, source=source,
                         generation=old.generation + 1)
        if action == "zone":  # the same images: neither added nor removed
            change.update(added=[], removed=[], zone=None if state.zone is None else list(state.zone.shape))
        state.history = [*old.history, change]
        if is_staging(old.bank.path) and old.bank.path != bank.path:
            _unlink(old.bank.path)

    def resolve_names(self, which: Sequence[str | int]) -> list[int]:
        """Training-image indices (sorted) for indices, image ids, paths as given to ``fit``, or unambiguous
        file names; an image named twice (say by index and by name) is refused."""
        self._check_fitted()
        out: dict[int, str | int] = {}
        for w in which:
            i = self._resolve_one(w)
            if i in out:
                raise SpadeError(f"{out[i]!s} and {w!s} name the same training image ({self.train_names_[i]}); "
                                 "name each image once")
            out[i] = w
        return sorted(out)

    def _resolve_one(self, w: str | int) -> int:
        if isinstance(w, (int, np.integer)) and not isinstance(w, bool):
            if not 0 <= int(w) < self.state_.n_train:
                raise SpadeError(f"training image index {w} is out of range (0..{self.state_.n_train - 1})")
            return int(w)
        name = str(w)
        hits = [i for i, n in enumerate(self.train_names_) if n == name] or [
            i for i, x in enumerate(self.train_ids_) if x is not None and x == name]
        if not hits:
            hits = [i for i, n in enumerate(self.train_names_) if Path(n).name == Path(name).name]
            if len(hits) > 1:
                raise SpadeError(f"{name}: several training images have this file name; give the path "
                                 f"({self.train_names_[hits[0]]}, {self.train_names_[hits[1]]}, ...)")
        if not hits:
            raise SpadeError(f"{name}: not a training image of this model")
        return hits[0]

    def thresholds_summary(self) -> dict[str, Any]:
        """Training-image count and thresholds (what the history records before and after a change)."""
        return self.state_.numbers()

    def _new_bank_path(self, workdir: str | Path | None) -> Path:
        """Where a new bank is written: a staging file in ``workdir``, else beside the current bank (a model
        folder: saving there renames instead of copying), else a temporary folder."""
        if workdir is None and "_state" in self.__dict__:
            workdir = self.bank_.path.parent
        if workdir is None:
            tmp = Path(tempfile.mkdtemp(prefix="spade-ad-"))
            weakref.finalize(self, shutil.rmtree, tmp, True)
            return tmp / "bank.safetensors"
        Path(workdir).mkdir(parents=True, exist_ok=True)
        clean_stale(Path(workdir))
        path = staging_path(Path(workdir), ".bank.safetensors")
        weakref.finalize(self, _unlink, path)  # unless saved (then renamed) before
        return path

    @torch.no_grad()
    def predict(
        self,
        images: Images,
        progress: Progress | None = None,
        pixel_threshold: float | None = None,
        keep_features: bool = False,
        min_area: int | None = None,
    ) -> Prediction:
        """Score images: image scores, anomaly maps at each image's own size, masks, neighbours.

        Args:
            images: a folder, one path, a list of paths, or a list of arrays.
            progress: optional callback ``(stage, done, total)``.
            pixel_threshold: threshold for the masks (default: the calibrated one).
            keep_features: keep each image's feature pyramid so that ``result.correspondence(i, y, x)``
                can give any pixel's correspondence.
            min_area: defect regions of fewer pixels are dropped from the masks and regions (default: the
                model's ``min_area`` setting).

        Returns:
            A :class:`~spade_ad.Prediction`: ``pred[i]`` is image i's :class:`~spade_ad.ImageResult`.

        Example:
            >>> pred = model.predict("bottle/test/broken_large")   # doctest: +SKIP
            >>> pred.scores.shape                                   # doctest: +SKIP
            (20,)
        """
        state = self.state_
        items, names = resolve_images(images)
        area = self.settings.min_area if min_area is None else check_min_area(min_area)
        if state.grid is not None:
            return self._predict_tiled(items, names, progress, pixel_threshold, keep_features, area)
        net, dev, prep = self._net(), self.device, state.prep
        thr = state.pixel_threshold if pixel_threshold is None else pixel_threshold
        all_scores, all_maps, all_inputs, all_neigh = [], [], [], []
        kept: list[list[np.ndarray]] = []
        sizes: list[tuple[int, int]] = []
        for a, b in batches(len(items), self.settings.batch_size):
            arrays = self._read(items[a:b], names[a:b])
            with COMPUTE_LOCK:
                levels, gvec = extract(net, arrays, prep, dev)
                knn, maps, neigh = score_features(state, levels, gvec)
                scores = image_score(state, knn, maps)
            for j, arr in enumerate(arrays):
                all_maps.append(prep.map_to_image(maps[j], arr.shape[0], arr.shape[1]).cpu().numpy())
                all_inputs.append(maps[j].cpu().numpy())
                sizes.append((arr.shape[0], arr.shape[1]))
                if keep_features:
                    kept.append([lv[j].cpu().numpy() for lv in levels])
            all_scores.append(scores.cpu())
            all_neigh.append(neigh)
            if progress:
                progress("predict", b, len(items))
        return Prediction(
            scores=torch.cat(all_scores).numpy(),
            maps=all_maps,
            input_maps=all_inputs,
            neighbours=torch.cat(all_neigh).numpy(),
            names=names,
            image_threshold=state.image_threshold,
            pixel_threshold=thr,
            train_names=state.train_names,
            features=kept if keep_features else None,
            sizes=sizes,
            state=state,
            min_area=area,
            verdict_rule=self.settings.verdict_rule,
        )

    def _predict_tiled(self, items: list[ImageInput], names: list[str], progress: Progress | None,
                       pixel_threshold: float | None, keep_features: bool, min_area: int) -> Prediction:
        """:meth:`predict` for a tiled model: each image's tiles are scored a chunk at a time and their maps
        stitched (:func:`spade_ad.scoring.score_tiles`); memory holds one image, its map and a chunk."""
        state = self.state_
        grid = state.grid
        assert grid is not None
        net, dev, prep = self._net(), self.device, state.prep
        t = state.rows_per_image
        thr = state.pixel_threshold if pixel_threshold is None else pixel_threshold
        scores, maps, inputs, neigh, sizes = [], [], [], [], []
        kept: list[list[np.ndarray]] = []
        tile_knn, tile_max, tile_neigh = [], [], []
        long = t > 64  # long images report progress per chunk of tiles
        for a, b in batches(len(items), self.settings.batch_size):
            arrays = self._read(items[a:b], names[a:b])
            for j, arr in enumerate(arrays):

                def chunks(arr: np.ndarray = arr, at: int = a + j) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
                    done = 0
                    for tiles in network_inputs([arr], grid, state.zone):
                        with COMPUTE_LOCK:
                            levels, gvec = extract(net, tiles, prep, dev)
                        yield levels, gvec
                        done += len(tiles)
                        if progress and long:
                            progress(f"tiles of image {at + 1}", done, t)

                res = score_tiles(state, chunks(), keep_features=keep_features)
                scores.append(tiled_image_score(state, res.knn, res.maxima))
                native = to_native(res.map, grid, (arr.shape[0], arr.shape[1]))
                maps.append(native if state.zone is None else state.zone.clear_outside(native))
                inputs.append(res.map if state.zone is None else state.zone.clear_outside(res.map))
                sizes.append((arr.shape[0], arr.shape[1]))
                neigh.append(res.neighbours[best_tile(res.maxima, position_scales(state))] // t)
                tile_knn.append(res.knn)
                tile_max.append(res.maxima)
                tile_neigh.append(res.neighbours)
                if keep_features:
                    assert res.features is not None
                    kept.append(res.features)
            if progress:
                progress("predict", b, len(items))
        return Prediction(
            scores=np.asarray(scores, dtype=np.float32), maps=maps, input_maps=inputs, neighbours=np.stack(neigh),
            names=names, image_threshold=state.image_threshold, pixel_threshold=thr,
            train_names=state.train_names, features=kept if keep_features else None, sizes=sizes, state=state,
            tile_knn=tile_knn, tile_max=tile_max, tile_neighbours=tile_neigh, min_area=min_area,
            verdict_rule=self.settings.verdict_rule)

    def score_samples(self, images: Images) -> np.ndarray:
        """The images' anomaly scores (higher: more anomalous; the ``image_score`` setting)."""
        return self.predict(images).scores

    def decision_function(self, images: Images) -> np.ndarray:
        """The image scores minus the image threshold (``offset_``): ``>= 0`` is judged defective, as the
        verdict rule says (scikit-learn's convention, with the sign of an anomaly score: positive = defective).

        A model without a threshold (fewer than two training images) has no decision: one line says so.
        """
        thr = self.state_.image_threshold
        if thr is None:
            raise SpadeError("decision_function needs an image threshold; this model has none (it was calibrated "
                             "on fewer than two training images): use score_samples")
        return self.score_samples(images) - thr

    # ------------------------------------------------------------------ operating points and known defects
    def evidence(self, defects: DefectSet | None = None) -> Evidence | None:
        """The known defects (the model's, or ``defects``) as this model scores them (``None``: none known)."""
        ds = self.state_.defects if defects is None else defects
        if ds is None or not len(ds):
            return None
        scores, pixels = [], []
        for d in ds.read():
            pred = self.predict([d.image])
            scores.append(float(pred.scores[0]))
            if d.mask is not None:  # the defect pixels the model inspects (in its zone and, for paper, its crop)
                pixels.append(pred.maps[0][d.mask & self.inspected(*d.mask.shape)])
        return Evidence(ds.names, np.asarray(scores, np.float64),
                        np.concatenate(pixels).astype(np.float64) if pixels else None)

    def inspected(self, height: int, width: int) -> np.ndarray:
        """Which pixels of an image of this size the model inspects: its zone, and for ``paper`` its crop."""
        inside = np.zeros((height, width), bool)
        y0, x0, y1, x1 = self.prep.crop_box(height, width)
        inside[y0:y1, x0:x1] = True
        return inside if self.zone is None else inside & self.zone.at(height, width)

    def missed_defects(self) -> list[str]:
        """The known defects this model judges good (the defect gate: a change that misses one is refused
        unless forced); empty without known defects or thresholds."""
        ds = self.state_.defects
        if ds is None:
            return []
        return [d.name for d in ds.read() if self.predict([d.image])[0].verdict == GOOD]

    def calibrate(self, defects: Sequence[tuple[str | Path | np.ndarray, np.ndarray | None]] = (),
                  target_recall: float | None = None, false_alarm_rate: float | None = None,
                  source: str | None = None, names: Sequence[str] | None = None
                  ) -> tuple[dict[str, float | None], dict[str, float | None]]:
        """Set the operating point, as a new generation (see :mod:`spade_ad.operating`).

        Args:
            defects: labelled defective images to keep with the model as known defects: (image, mask or
                ``None``) pairs, the image a path or an array, the mask bool at the image's size (any non-zero
                pixel a defect). They join the known defects already kept.
            target_recall: the thresholds for this recall on the known defects (image level; pixel level
                with masks).
            false_alarm_rate: the thresholds for this false-alarm rate on the good calibration images (also
                becomes the model's ``false_alarm_rate`` setting). Neither: the model's operating point as it
                is (a target recall chosen before is measured again, with the new defects).
            source: who asked (recorded in the history); names: the new defects' names (default: paths).

        Returns:
            What the thresholds before and after cost (:func:`spade_ad.operating.costs`).
        """
        self._check_fitted()
        if target_recall is not None and false_alarm_rate is not None:
            raise SpadeError("--target-recall and --false-alarm-rate: give one")
        current = self.state_.calibration.get("operating_point") or {"rule": "false_alarm_rate",
                                                                       "value": self.settings.false_alarm_rate}
        rule, value = (("recall", target_recall) if target_recall is not None
                       else ("false_alarm_rate", false_alarm_rate) if false_alarm_rate is not None
                       else (current["rule"], current["value"]))
        check_rule(rule, value)
        old = self.state_
        known = self._known_defects(defects, names)
        ev = self.evidence(known)
        before = costs(old.calibration, old.image_threshold, old.pixel_threshold, ev)
        settings = old.settings if false_alarm_rate is None else old.settings.replace(false_alarm_rate=value)
        image_thr, pixel_thr = thresholds(old.calibration, rule, value, ev, settings.false_alarm_rate)
        calibration = {**old.calibration, "false_alarm_rate": settings.false_alarm_rate,
                       "operating_point": {"rule": rule, "value": value}}
        after = costs(calibration, image_thr, pixel_thr, ev)
        state = replace(old, settings=settings, image_threshold=image_thr, pixel_threshold=pixel_thr,
                        calibration=calibration, defects=known)
        change = _change(state, "calibrate", old.numbers(), source=source, generation=old.generation + 1)
        change.update(defects_added=[] if known is None else list(known.names[len(old.defects or ()):]),
                      operating_point={"rule": rule, "value": value}, costs={"before": before, "after": after})
        state.history = [*old.history, change]
        self.settings = settings
        self.state_ = state
        return before, after

    def _keep_operating_point(self, point: dict[str, Any] | None) -> None:
        """After a recalibration: the operating point chosen before applies again (a target recall is measured
        again on the known defects with the changed model; a false-alarm rate is the model's setting)."""
        state = self.state_
        if point is None or state.image_threshold is None:
            return
        if point["rule"] == "recall":
            state.image_threshold, state.pixel_threshold = thresholds(
                state.calibration, "recall", point["value"], self.evidence(), self.settings.false_alarm_rate)
        state.calibration["operating_point"] = dict(point)

    def _known_defects(self, given: Sequence[tuple[str | Path | np.ndarray, np.ndarray | None]],
                       names: Sequence[str] | None) -> DefectSet | None:
        """The known defects plus ``given`` (written to a new file; the model's own when nothing is given):
        an image already known, or one of the model's good training images, is refused by name."""
        old = self.state_.defects
        if not given:
            return old
        items = [g[0] for g in given]
        _, found = resolve_images(items) if all(isinstance(x, (str, Path)) for x in items) else (None, [
            f"array[{i}]" for i in range(len(items))])
        names = list(found if names is None else names)
        images = read_items(items, names, self.settings.max_pixels)
        ids = [image_id(x) for x in images]
        known = dict(zip(old.ids, old.names, strict=True)) if old is not None else {}
        train = {x: n for x, n in zip(self.state_.train_ids, self.state_.train_names, strict=True) if x}
        new: list[Defect] = []
        for (_, mask), img, x, name in zip(given, images, ids, names, strict=True):
            if x in train:
                raise SpadeError(f"{name}: it is the model's good training image {train[x]}; a known defect cannot "
                                 "be both (remove it from the training images first)")
            if x in known:
                raise SpadeError(f"{name}: already a known defect of this model ({known[x]})")
            known[x] = name
            m = None if mask is None else np.asarray(mask, bool)
            if m is not None and m.shape != img.shape[:2]:
                raise SpadeError(f"{name}: its mask is {m.shape[1]}x{m.shape[0]}, the image {img.shape[1]}x"
                                 f"{img.shape[0]}; a mask must have its image's size")
            self.check_image(img, name)
            new.append(Defect(name, img, m))
        previous = list(old.read()) if old is not None else []
        path = staging_path(self.bank_.path.parent, ".defects.safetensors")
        weakref.finalize(self, _unlink, path)  # a staging file: save copies it into the folder
        return write_defects(path, previous + new, [*(old.ids if old is not None else ()), *ids])

    # ------------------------------------------------------------------ correspondences
    def correspondence(self, image: ImageInput, y: int, x: int, level: int = 0) -> Correspondence:
        """Which normal image, and where in it, pixel (y, x) of ``image`` was matched to (see
        :meth:`Prediction.correspondence <spade_ad.Prediction.correspondence>`)."""
        self._check_fitted()
        return self.predict([image], keep_features=True).correspondence(0, y, x, level)

    def thumbnail(self, index: int) -> np.ndarray:
        """A small (THUMB x THUMB x 3 uint8) picture of training image ``index``, kept in the model."""
        state = self.state_
        if not (0 <= index < state.n_train):
            raise SpadeError(f"training image index {index} is out of range (0..{state.n_train - 1})")
        if state.grid is None:
            return state.bank.rows("thumbnails", [index])[0]
        return mosaic(state.bank.rows("thumbnails", state.image_rows([index])), state.grid, THUMB)

    # ------------------------------------------------------------------ persistence
    def save(self, model_dir: str | Path) -> Path:
        """Write the model folder: ``model.json`` and two content-addressed safetensors files (no pickle).

        Replacing a model in ``model_dir`` is atomic as a unit: the folder always loads as the complete
        old or the complete new model (see :mod:`spade_ad.persistence`).

        Args:
            model_dir: the folder (created if needed).

        Returns:
            The folder's path.

        Example:
            >>> Spade().fit("good_images/").save("model_dir")      # doctest: +SKIP
        """
        from .persistence import save_state

        return save_state(self.state_, Path(model_dir))

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", weights: str | None = None, verify: bool = True,
             generation: int | None = None, **runtime: Any) -> Spade:
        """Load a model folder written by ``save``; validated and (``verify``) checksummed.

        Args:
            model_dir: the folder.
            device: where to compute (runtime setting).
            weights: the backbone's weights file, for backbones whose weights are not bundled.
            verify: check every file's SHA-256 (recommended).
            generation: an earlier generation kept in the folder (see ``history``) instead of the current one.
            **runtime: other runtime settings (``batch_size``, ``max_pixels``, ``tile_bytes``).

        Example:
            >>> model = Spade.load("model_dir")            # doctest: +SKIP
        """
        from .persistence import generation_file, read_header, read_state

        folder = Path(model_dir)
        header_file = None
        if generation is not None:
            current = read_header(folder)
            header_file = generation_file(folder, current["lineage"], generation)
            if not header_file.is_file():
                raise SpadeError(f"{folder}: generation {generation} is not kept in this folder")
        return cls.from_state(read_state(folder, {"device": device, "weights": weights, **runtime}, verify,
                                         header_file), folder)

    @classmethod
    def from_state(cls, state: FittedState, folder: Path) -> Spade:
        """The estimator of a fitted state read from ``folder`` (:func:`spade_ad.persistence.read_state`), once
        its backbone is checked: the weights it was fitted with, the same level shapes at its input shape."""
        model = cls(state.settings)
        model.state_ = state
        net = model._net()
        if net.weights_id != state.weights_id:
            raise SpadeError(f"{folder}: backbone weights differ from those the model was fitted with "
                             f"({net.weights_id} != {state.weights_id})")
        if level_shapes(net, state.prep) != [tuple(x) for x in state.level_shapes]:
            raise SpadeError(f"{folder / 'model.json'}: level_shapes disagree with the backbone at input shape "
                             f"{state.input_shape}")
        return model


__all__ = ["Spade", "resolve_images", "read_item", "read_items", "pick_device"]

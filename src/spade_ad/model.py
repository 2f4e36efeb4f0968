"""The estimator: ``Spade(...).fit(good_images)`` then ``predict(images)``; ``save`` / ``load``.

It wires the three stages together: :mod:`.features` (stage 1), :mod:`.retrieval` (stage 2) and
:mod:`.correspondence` (stage 3), with the model's :class:`~spade_ad.preprocess.Preprocessor` in front
and the memory :mod:`.bank` behind. Thresholds are calibrated here; files are written by
:mod:`.persistence`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import secrets
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .backbones import FeatureExtractor, build_backbone
from .bank import Bank, BankWriter
from .correspondence import Correspondence, combine_levels, level_maps, match_pixel
from .correspondence.cells import index_spec, write_index
from .correspondence.runtime import COMPUTE_LOCK
from .errors import NotFittedError, SpadeError
from .features import batches, extract, level_shapes
from .io import image_shape, list_images, load_image, to_rgb_uint8
from .persistence import clean_stale, crash_point, is_staging, staging_path, utc_now
from .preprocess import Preprocessor, aspect_shape
from .result import Prediction
from .retrieval import image_knn
from .settings import SpadeSettings

THUMB = 128  # side of the training-image thumbnails kept in the model (for explanations)
ImageInput = str | Path | np.ndarray
Images = str | Path | Sequence[ImageInput]
Progress = Callable[[str, int, int], None]  # (stage, done, total)
_THUMB_PREP = Preprocessor("resize", THUMB)


class BankRows(NamedTuple):
    """Feature-bank rows of consecutive training images ``start .. start+B-1`` (:meth:`Spade.bank_rows`)."""

    start: int
    levels: list[np.ndarray]  # per pyramid level, (B, H*W, C) float16: what the bank stores
    global_: np.ndarray  # (B, D) float32 global vectors
    thumbnails: np.ndarray  # (B, THUMB, THUMB, 3) uint8
    ids: list[str] | None = None  # the images' identities (image_id); None: unknown


def image_id(image: np.ndarray) -> str:
    """A training image's identity: the SHA-256 of its decoded pixels (HxWx3 uint8) and their shape.

    It does not depend on how a path is spelled, on the file's name or format (a PNG and a lossless copy
    are the same image), or on whether it came as a file or an array; a model never holds one image twice.
    """
    a = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)
    return h.hexdigest()


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


def _check_distinct(old_names: list[str], old_ids: list[str | None], names: list[str],
                    ids: list[str | None]) -> None:
    """Refuse new images (``names``, ``ids``) that are already among the old ones or come twice: one line
    naming each such image and its twin."""
    first = {x: n for x, n in zip(old_ids, old_names, strict=True) if x is not None}
    twins = []
    for x, name in zip(ids, names, strict=True):
        if x is None:
            continue
        if x in first:
            twins.append(f"{name} (= {first[x]}{', already a training image' if first[x] in old_names else ''})")
        else:
            first[x] = name
    if twins:
        raise SpadeError(f"the same image (identical pixels) may be a training image only once: {'; '.join(twins)}")


def _positive_median(values: list[float]) -> float:
    """A score's scale for ``image_score=combined``: its median over the calibration images (1 if not positive)."""
    med = float(np.median(values))
    return med if math.isfinite(med) and med > 0 else 1.0


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
        train_ids_: each training image's identity (:func:`image_id`; ``None`` in models saved before ids).
        weights_id_: checksum of the backbone weights.
        image_threshold_, pixel_threshold_: calibrated thresholds (``None`` if not calibrated).
        calibration_: how the thresholds were set (method, scores).
        history_: one entry per generation (fit, add, remove, rollback) with counts and thresholds
            before and after; ``len(history_)`` is the generation.
        lineage_: identifies the fit that this model's generations descend from.

    Example:
        >>> from spade_ad import Spade
        >>> model = Spade(k=50, kappa=1).fit("good_images/")          # doctest: +SKIP
        >>> accurate = Spade(preset="accurate")                       # doctest: +SKIP
        >>> pred = model.predict(["part1.png"])                       # doctest: +SKIP
        >>> pred[0].verdict, pred[0].map.shape                        # doctest: +SKIP
        ('defective', (900, 900))
    """

    base_sha256_: str | None = None  # checksum of the saved header this model was read from or saved as

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

    # ------------------------------------------------------------------ settings
    @property
    def prep(self) -> Preprocessor:
        """How images become the network input (the ``preprocess`` and ``image_size`` settings, and for
        ``aspect`` the input shape fixed by ``fit``)."""
        return Preprocessor(self.settings.preprocess, self.settings.image_size, getattr(self, "input_shape_", None))

    def fix_input_shape(self, items: Sequence[ImageInput]) -> None:
        """Before fitting: the network input shape of the training images ``items`` (``input_shape_``).

        A square of ``image_size`` except with ``preprocess="aspect"``, where the training images'
        median aspect ratio decides it (read from the files' headers).
        """
        s = self.settings
        if s.preprocess != "aspect":
            self.input_shape_ = (s.image_size, s.image_size)
            return
        sizes = [image_shape(x, max_pixels=s.max_pixels) if isinstance(x, (str, Path))
                 else (int(np.shape(x)[0]), int(np.shape(x)[1])) for x in items]
        self.input_shape_ = aspect_shape(s.image_size, sizes)

    @property
    def device(self) -> torch.device:
        return pick_device(self.settings.device)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Every setting by name, runtime ones included (scikit-learn's convention)."""
        return self.settings.as_dict()

    def set_params(self, **params: Any) -> Spade:
        """Change settings before ``fit`` (validated); returns ``self``."""
        self.settings = self.settings.replace(**params)
        self._net_cache = None
        return self

    def _net(self) -> FeatureExtractor:
        with self._net_lock:
            if self._net_cache is None:
                s = self.settings
                self._net_cache = build_backbone(s.backbone, s.weights, s.level_indices, s.aggregate).to(self.device)
            return self._net_cache

    def _check_fitted(self) -> None:
        if not hasattr(self, "bank_"):
            raise NotFittedError("this Spade model is not fitted yet: call fit(...) or Spade.load(...) first")

    # ------------------------------------------------------------------ fit
    def fit(self, images: Images, progress: Progress | None = None, workdir: str | Path | None = None) -> Spade:
        """Learn from good images: store their global vectors and feature pyramids, calibrate thresholds.

        Args:
            images: a folder, a list of paths, or a list of HxW[x3|4] arrays (sizes may differ).
            progress: optional callback ``(stage, done, total)``.
            workdir: where the bank is written while fitting (default: a temporary folder). Give the
                model folder you will ``save`` to, and saving moves the bank instead of copying it.

        Returns:
            ``self``, fitted.

        Example:
            >>> model = Spade().fit("bottle/train/good")                # doctest: +SKIP
        """
        pick_device(self.settings.device)
        items, names = resolve_images(images)
        self.fix_input_shape(items)
        return self.fit_rows(names, self._rows(items, names), progress, workdir)

    def bank_rows(self, arrays: Sequence[np.ndarray], start: int) -> BankRows:
        """What the bank stores for training images ``start, start+1, ...`` (decoded ``arrays``).

        The one definition of a bank row: ``fit`` and ``add`` call it here, and :mod:`spade_ad.distributed`
        calls it on Ray workers, so all write the same bytes.
        """
        with COMPUTE_LOCK:
            levels, gvec = extract(self._net(), arrays, self.prep, self.device)
        small = torch.stack([_THUMB_PREP.to_input(x) for x in arrays]).round().byte().permute(0, 2, 3, 1)
        return BankRows(start, [lv.cpu().numpy().astype(np.float16) for lv in levels], gvec.cpu().numpy(),
                        small.numpy(), [image_id(x) for x in arrays])

    def _rows(self, items: list[ImageInput], names: list[str]) -> Iterator[BankRows]:
        s = self.settings
        for a, b in batches(len(items), s.batch_size):
            yield self.bank_rows(read_items(items[a:b], names[a:b], s.max_pixels), a)

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
        if self.settings.preprocess != "aspect":
            self.fix_input_shape([])
        elif not hasattr(self, "input_shape_"):
            raise SpadeError("preprocess=aspect: call fix_input_shape(training images) before fit_rows")
        net = self._net()
        self.level_shapes_ = level_shapes(net, self.prep)
        self.weights_id_ = net.weights_id
        self.global_, self.bank_, self.train_ids_ = self._write_bank(self._new_bank_path(workdir), [], rows, names,
                                                                     progress)
        self.train_names_ = names
        self._calibrate(progress)
        self.history_ = [self._change("fit", added=names, before=None)]
        self.lineage_ = secrets.token_hex(8)
        self.base_sha256_ = None  # a new model: saved over a folder, it becomes that folder's next generation
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
        before = self.thresholds_summary()
        keep = list(range(self.bank_.n))
        glob, bank, ids = self._write_bank(self._new_bank_path(None), keep, self._rows(items, names), names,
                                           progress)
        self._replace_bank(bank)
        self.global_ = glob
        self.train_names_ = self.train_names_ + names
        self.train_ids_ = ids
        self._calibrate(progress)
        self.history_ = [*self.history_, self._change("add", added=names, before=before, source=source)]
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
        keep = [i for i in range(self.bank_.n) if i not in set(drop)]
        if not keep:
            raise SpadeError("cannot remove every training image: a model needs at least one")
        if len(keep) < 2 <= self.bank_.n and not force:
            raise SpadeError(f"removing {len(drop)} of {self.bank_.n} training images would leave one: the model "
                             "would have no thresholds (no verdicts, no masks); add images first, or force it "
                             "(--force, force=True)")
        before = self.thresholds_summary()
        removed = [self.train_names_[i] for i in drop]
        _, bank, ids = self._write_bank(self._new_bank_path(None), keep, [], [], progress)
        self._replace_bank(bank)
        self.global_ = self.global_[keep].clone()
        self.train_names_ = [self.train_names_[i] for i in keep]
        self.train_ids_ = ids
        self._calibrate(progress)
        self.history_ = [*self.history_, self._change("remove", removed=removed, before=before, source=source)]
        return self

    def _replace_bank(self, bank: Bank) -> None:
        """Switch to a new bank; an unsaved intermediate one (a staging file of ours) is deleted at once
        (readers still holding it keep reading: the file stays open)."""
        old = self.bank_.path
        self.bank_ = bank
        if is_staging(old) and old != bank.path:
            _unlink(old)

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
            if not 0 <= int(w) < self.bank_.n:
                raise SpadeError(f"training image index {w} is out of range (0..{self.bank_.n - 1})")
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
        return {"n_train": int(self.bank_.n), "image_threshold": self.image_threshold_,
                "pixel_threshold": self.pixel_threshold_}

    def _change(self, action: str, before: dict[str, Any] | None, added: list[str] | None = None,
                removed: list[str] | None = None, source: str | None = None) -> dict[str, Any]:
        """One history entry: what changed, and the counts and thresholds before and after."""
        history = getattr(self, "history_", [])
        return {"generation": len(history) + 1 if action != "fit" else 1, "time": utc_now(), "action": action,
                "added": added or [], "removed": removed or [], "source": source,
                "before": before, "after": self.thresholds_summary()}

    def _new_bank_path(self, workdir: str | Path | None) -> Path:
        """Where a new bank is written: a staging file in ``workdir``, else beside the current bank (a model
        folder: saving there renames instead of copying), else a temporary folder."""
        if workdir is None and hasattr(self, "bank_"):
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

    def _write_bank(self, path: Path, keep: list[int], rows: Iterable[BankRows], names: Sequence[str],
                    progress: Progress | None) -> tuple[torch.Tensor, Bank, list[str | None]]:
        """A new bank: rows ``keep`` of the current bank, then ``rows`` for the images ``names`` (at their
        indices, in any order), streamed to ``path``. An image that is already among the kept ones, or that
        comes twice (identical pixels, :func:`image_id`), is refused before the bank is finished.

        Returns the global vectors of all its rows (kept ones from ``global_``), the bank and the images' ids.
        """
        net = self._net()
        shapes = [(h * w, c) for (h, w), c in zip(self.level_shapes_, net.channels, strict=True)]
        spec: dict[str, tuple[tuple[int, ...], str]] = {f"level{i}": (sh, "F16") for i, sh in enumerate(shapes)}
        spec["thumbnails"] = ((THUMB, THUMB, 3), "U8")
        copied = list(spec)  # the index is rebuilt from the rows (it depends on the whole bank)
        spec.update(index_spec(shapes))
        k, n = len(keep), len(names)
        writer = BankWriter(path, k + n, spec)
        global_ = np.zeros((k + n, net.global_dim), dtype=np.float32)
        seen = np.zeros(n, dtype=bool)
        kept_ids = [self.train_ids_[i] for i in keep] if keep else []
        new_ids: list[str | None] = [None] * n
        try:
            for a, b in batches(k, 256):  # kept rows are copied, never recomputed
                writer.write(a, {name: self.bank_.rows(name, keep[a:b]) for name in copied})
                global_[a:b] = self.global_[keep[a:b]].numpy()
                if progress:
                    progress("copy", b, k)
            for r in rows:
                b = len(r.global_)
                writer.write(k + r.start, {**{f"level{i}": lv for i, lv in enumerate(r.levels)},
                                           "thumbnails": r.thumbnails})
                crash_point("fit-bank")
                global_[k + r.start : k + r.start + b] = r.global_
                seen[r.start : r.start + b] = True
                if r.ids is not None:
                    new_ids[r.start : r.start + b] = r.ids
                if progress:
                    progress("fit", int(seen.sum()), n)
            if not seen.all():
                raise SpadeError(f"{names[int(np.argmin(seen))]}: no features were computed for this image")
            _check_distinct([self.train_names_[i] for i in keep], kept_ids, list(names), new_ids)
            write_index(writer, self.settings.k)
        except BaseException:
            with contextlib.suppress(SpadeError, OSError):  # the first error is the one reported
                writer.close()
            _unlink(path)
            raise
        writer.close()
        return torch.from_numpy(global_), Bank(path), kept_ids + new_ids

    def _calibrate(self, progress: Progress | None) -> None:
        """Thresholds from good images alone: leave-one-out on an even sample of the training images.

        Each sampled image is scored against the other training images exactly as a test image would
        be. The image threshold is the (1 - false_alarm_rate) quantile of their scores; the pixel
        threshold the same quantile of their maps' maxima (so about that fraction of good images shows
        any flagged pixel).
        """
        s = self.settings
        n = self.bank_.n
        m = min(s.calibration_images, n)
        self.image_threshold_: float | None = None
        self.pixel_threshold_: float | None = None
        self.calibration_: dict[str, Any] = {"method": "none"}
        if n < 2 or m < 1:
            return
        idx = np.unique(np.linspace(0, n - 1, m).round().astype(int))
        knn, maxima = [], []
        for j, i in enumerate(idx):
            levels = [torch.from_numpy(self.bank_.gather(li, [i]).astype(np.float32)).to(self.device)
                      for li in range(self.bank_.n_levels)]
            sc, maps, _ = self._score(levels, self.global_[i : i + 1], exclude=torch.tensor([int(i)]), raw=True)
            knn.append(float(sc[0]))
            maxima.append(float(maps[0].max()))
            if progress:
                progress("calibrate", j + 1, len(idx))
        self.calibration_ = {"method": "leave-one-out on training images", "n_images": len(idx),
                             "false_alarm_rate": s.false_alarm_rate}
        if s.image_score == "combined":
            self.calibration_["score_scales"] = [_positive_median(knn), _positive_median(maxima)]
        scores = self._image_scores(torch.tensor(knn, dtype=torch.float32),
                                    torch.tensor(maxima, dtype=torch.float32)).tolist()
        q = 1.0 - s.false_alarm_rate
        self.image_threshold_ = float(np.quantile(scores, q, method="higher"))
        self.pixel_threshold_ = float(np.quantile(maxima, q, method="higher"))
        self.calibration_.update({"image_scores": scores, "map_maxima": maxima})

    def _image_scores(self, knn: torch.Tensor, map_max: torch.Tensor) -> torch.Tensor:
        """The image score (the ``image_score`` setting) from the global kNN scores and the maps' maxima."""
        rule = self.settings.image_score
        if rule == "knn":
            return knn
        if rule == "max":
            return map_max
        sk, sm = self.calibration_.get("score_scales", (1.0, 1.0))  # (1, 1): fitted without calibration
        return knn / float(sk) + map_max / float(sm)

    # ------------------------------------------------------------------ predict
    def _score(
        self, levels: list[torch.Tensor], gvec: torch.Tensor, exclude: torch.Tensor | None = None,
        raw: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stages 2 and 3 for features ``levels`` (B, H*W, C per level) and global vectors ``gvec``.

        Returns image scores (B,) (``raw``: the global kNN scores), input-frame maps (B, S, S) and
        neighbours (B, k).
        """
        s = self.settings
        with COMPUTE_LOCK:
            scores, neigh = image_knn(gvec, self.global_, s.k_image, s.k, exclude)
            grids = level_maps(levels, neigh, self.bank_, self.level_shapes_, s.kappa, s.tile_bytes)
            maps = combine_levels(grids, self.prep.input_shape, s.sigma)
        if not raw:
            scores = self._image_scores(scores, maps.amax(dim=(1, 2)).to(scores))
        return scores, maps, neigh

    @torch.no_grad()
    def predict(
        self,
        images: Images,
        progress: Progress | None = None,
        pixel_threshold: float | None = None,
        keep_features: bool = False,
    ) -> Prediction:
        """Score images: image scores, anomaly maps at each image's own size, masks, neighbours.

        Args:
            images: a folder, one path, a list of paths, or a list of arrays.
            progress: optional callback ``(stage, done, total)``.
            pixel_threshold: threshold for the masks (default: the calibrated one).
            keep_features: keep each image's feature pyramid so that ``result.correspondence(i, y, x)``
                can explain any pixel.

        Returns:
            A :class:`~spade_ad.Prediction`: ``pred[i]`` is image i's :class:`~spade_ad.ImageResult`.

        Example:
            >>> pred = model.predict("bottle/test/broken_large")   # doctest: +SKIP
            >>> pred.scores.shape                                   # doctest: +SKIP
            (20,)
        """
        self._check_fitted()
        items, names = resolve_images(images)
        net, dev, prep = self._net(), self.device, self.prep
        thr = self.pixel_threshold_ if pixel_threshold is None else pixel_threshold
        all_scores, all_maps, all_inputs, all_neigh = [], [], [], []
        kept: list[list[np.ndarray]] = []
        sizes: list[tuple[int, int]] = []
        for a, b in batches(len(items), self.settings.batch_size):
            arrays = read_items(items[a:b], names[a:b], self.settings.max_pixels)
            with COMPUTE_LOCK:
                levels, gvec = extract(net, arrays, prep, dev)
                scores, maps, neigh = self._score(levels, gvec)
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
            image_threshold=self.image_threshold_,
            pixel_threshold=thr,
            train_names=self.train_names_,
            features=kept if keep_features else None,
            sizes=sizes,
            model=self,
        )

    def decision_function(self, images: Images) -> np.ndarray:
        """Image scores only."""
        return self.predict(images).scores

    # ------------------------------------------------------------------ explanations
    def explain(self, image: ImageInput, y: int, x: int, level: int = 0) -> Correspondence:
        """Which normal image, and where in it, pixel (y, x) of ``image`` was matched to."""
        self._check_fitted()
        return self.predict([image], keep_features=True).correspondence(0, y, x, level)

    def match(self, feats: np.ndarray, neigh: np.ndarray, size: tuple[int, int], y: int, x: int,
              level: int) -> Correspondence:
        """Stage 3's explanation for kept features (see :func:`spade_ad.correspondence.match_pixel`)."""
        self._check_fitted()
        return match_pixel(feats, neigh, self.bank_, self.level_shapes_, self.prep, size, y, x, level,
                           self.train_names_)

    def thumbnail(self, index: int) -> np.ndarray:
        """A small (THUMB x THUMB x 3 uint8) picture of training image ``index``, kept in the model."""
        self._check_fitted()
        if not (0 <= index < self.bank_.n):
            raise SpadeError(f"training image index {index} is out of range (0..{self.bank_.n - 1})")
        return self.bank_.rows("thumbnails", [index])[0]

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
        from .persistence import save_model

        self._check_fitted()
        return save_model(self, Path(model_dir))

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", weights: str | None = None, verify: bool = True,
             **runtime: Any) -> Spade:
        """Load a model folder written by ``save``; validated and (``verify``) checksummed.

        Args:
            model_dir: the folder.
            device: where to compute (runtime setting).
            weights: the backbone's weights file, for backbones whose weights are not bundled.
            verify: check every file's SHA-256 (recommended).
            **runtime: other runtime settings (``batch_size``, ``max_pixels``, ``tile_bytes``).

        Example:
            >>> model = Spade.load("model_dir")            # doctest: +SKIP
        """
        from .persistence import load_model

        return load_model(cls, Path(model_dir), {"device": device, "weights": weights, **runtime}, verify)


__all__ = ["Spade", "BankRows", "resolve_images", "read_item", "read_items", "pick_device", "THUMB"]

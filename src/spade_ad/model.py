"""The estimator: ``Spade(...).fit(good_images)`` then ``predict(images)``; ``save`` / ``load``.

It wires the three stages together: :mod:`.features` (stage 1), :mod:`.retrieval` (stage 2) and
:mod:`.correspondence` (stage 3), with the model's :class:`~spade_ad.preprocess.Preprocessor` in front
and the memory :mod:`.bank` behind. Thresholds are calibrated here; files are written by
:mod:`.persistence`.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones import FeatureExtractor, build_backbone
from .bank import Bank, BankWriter
from .correspondence import Correspondence, combine_levels, level_maps, match_pixel
from .correspondence.cells import index_spec, write_index
from .correspondence.runtime import COMPUTE_LOCK
from .errors import NotFittedError, SpadeError
from .features import batches, extract, level_shapes
from .io import list_images, load_image, to_rgb_uint8
from .persistence import clean_stale, crash_point, staging_path
from .preprocess import Preprocessor
from .result import Prediction
from .retrieval import image_knn
from .settings import SpadeSettings

THUMB = 128  # side of the training-image thumbnails kept in the model (for explanations)
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

    Attributes (after ``fit`` or ``load``):
        settings: the validated settings.
        global_: (N, D) float32 global vectors of the training images (stage 2's index).
        bank_: the feature bank on disk (per training image: pyramid and thumbnail).
        level_shapes_: (h, w) of each pyramid level.
        train_names_: the training images' names (paths as given to ``fit``).
        weights_id_: checksum of the backbone weights.
        image_threshold_, pixel_threshold_: calibrated thresholds (``None`` if not calibrated).
        calibration_: how the thresholds were set (method, scores).

    Example:
        >>> from spade_ad import Spade
        >>> model = Spade(k=50, kappa=1).fit("good_images/")          # doctest: +SKIP
        >>> pred = model.predict(["part1.png"])                       # doctest: +SKIP
        >>> pred[0].verdict, pred[0].map.shape                        # doctest: +SKIP
        ('defective', (900, 900))
    """

    def __init__(self, settings: SpadeSettings | None = None, **overrides: Any) -> None:
        base = settings if settings is not None else SpadeSettings()
        if not isinstance(base, SpadeSettings):
            raise SpadeError(f"settings must be a SpadeSettings, got {type(base).__name__}")
        self.settings = base.replace(**overrides) if overrides else base
        self._net_lock = threading.Lock()
        self._net_cache: FeatureExtractor | None = None

    # ------------------------------------------------------------------ settings
    @property
    def prep(self) -> Preprocessor:
        """How images become the network input (the ``preprocess`` and ``image_size`` settings)."""
        return Preprocessor(self.settings.preprocess, self.settings.image_size)

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
                self._net_cache = build_backbone(self.settings.backbone, self.settings.weights).to(self.device)
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
        s = self.settings
        pick_device(s.device)
        items, names = resolve_images(images)
        net = self._net()
        dev, prep = self.device, self.prep
        shapes_hw = level_shapes(net, prep)
        shapes = [(h * w, c) for (h, w), c in zip(shapes_hw, net.channels, strict=True)]
        if workdir is None:
            tmp = Path(tempfile.mkdtemp(prefix="spade-ad-"))
            weakref.finalize(self, shutil.rmtree, tmp, True)
            bank_path = tmp / "bank.safetensors"
        else:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            clean_stale(Path(workdir))
            bank_path = staging_path(Path(workdir), ".bank.safetensors")
            weakref.finalize(self, _unlink, bank_path)  # unless saved (then renamed) before
        spec: dict[str, tuple[tuple[int, ...], str]] = {f"level{i}": (sh, "F16") for i, sh in enumerate(shapes)}
        spec["thumbnails"] = ((THUMB, THUMB, 3), "U8")
        spec.update(index_spec(shapes))  # the search index (stage 3), built after the features
        writer = BankWriter(bank_path, len(items), spec)
        thumb = Preprocessor("resize", THUMB)
        globals_: list[torch.Tensor] = []
        try:
            for a, b in batches(len(items), s.batch_size):
                arrays = [read_item(items[i], names[i], s.max_pixels) for i in range(a, b)]
                with COMPUTE_LOCK:
                    levels, gvec = extract(net, arrays, prep, dev)
                small = torch.stack([thumb.to_input(x) for x in arrays]).round().byte().permute(0, 2, 3, 1)
                rows = {f"level{i}": lv.cpu().numpy() for i, lv in enumerate(levels)}
                writer.write(a, {**rows, "thumbnails": small.numpy()})
                crash_point("fit-bank")
                globals_.append(gvec.cpu())
                if progress:
                    progress("fit", b, len(items))
            write_index(writer, s.k)
        except BaseException:
            writer.close()
            _unlink(bank_path)
            raise
        writer.close()
        self.global_ = torch.cat(globals_)
        self.level_shapes_ = shapes_hw
        self.train_names_ = names
        self.weights_id_ = net.weights_id
        self.bank_ = Bank(bank_path)
        self.image_threshold_: float | None = None
        self.pixel_threshold_: float | None = None
        self.calibration_: dict[str, Any] = {"method": "none"}
        self._calibrate(progress)
        return self

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
        if n < 2 or m < 1:
            return
        idx = np.unique(np.linspace(0, n - 1, m).round().astype(int))
        scores, maxima = [], []
        for j, i in enumerate(idx):
            levels = [torch.from_numpy(self.bank_.gather(li, [i]).astype(np.float32)).to(self.device)
                      for li in range(self.bank_.n_levels)]
            sc, maps, _ = self._score(levels, self.global_[i : i + 1], exclude=torch.tensor([int(i)]))
            scores.append(float(sc[0]))
            maxima.append(float(maps[0].max()))
            if progress:
                progress("calibrate", j + 1, len(idx))
        q = 1.0 - s.false_alarm_rate
        self.image_threshold_ = float(np.quantile(scores, q, method="higher"))
        self.pixel_threshold_ = float(np.quantile(maxima, q, method="higher"))
        self.calibration_ = {
            "method": "leave-one-out on training images",
            "n_images": len(idx),
            "false_alarm_rate": s.false_alarm_rate,
            "image_scores": scores,
            "map_maxima": maxima,
        }

    # ------------------------------------------------------------------ predict
    def _score(
        self, levels: list[torch.Tensor], gvec: torch.Tensor, exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stages 2 and 3 for features ``levels`` (B, H*W, C per level) and global vectors ``gvec``.

        Returns scores (B,), input-frame maps (B, S, S) and neighbours (B, k).
        """
        s = self.settings
        with COMPUTE_LOCK:
            scores, neigh = image_knn(gvec, self.global_, s.k_image, s.k, exclude)
            grids = level_maps(levels, neigh, self.bank_, self.level_shapes_, s.kappa, s.tile_bytes)
            maps = combine_levels(grids, s.image_size, s.sigma)
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
            arrays = [read_item(items[i], names[i], self.settings.max_pixels) for i in range(a, b)]
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
        """Write the model folder (``model.json``, ``index.safetensors``, ``bank.safetensors``; no pickle).

        Returns:
            The folder's path.
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


__all__ = ["Spade", "resolve_images", "read_item", "pick_device", "THUMB"]

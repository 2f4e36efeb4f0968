"""The estimator: ``Spade(...).fit(good_images)`` then ``predict(images)``; ``save`` / ``load``."""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .backbones import BACKBONES, FeatureExtractor, build_backbone
from .bank import Bank, BankWriter, file_sha256
from .correspondence import DEFAULT_TILE_BYTES, nn_distances
from .errors import NotFittedError, SpadeError
from .features import batches, extract, level_shapes, resize_batch
from .io import atomic_write, list_images, load_image, save_json, to_rgb_uint8
from .knn import image_knn
from .maps import combine_levels, to_original_size

FORMAT_VERSION = 1
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


def read_item(item: ImageInput, name: str) -> np.ndarray:
    return load_image(item) if isinstance(item, (str, Path)) else to_rgb_uint8(item, name)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SpadeError(f"unknown device {device!r}; use cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpadeError(f"device {device!r} requested but no CUDA GPU is available (use --device cpu)")
    return torch.device(device)


@dataclass(frozen=True)
class Correspondence:
    """Why a pixel got its score: the closest normal feature, in which training image and where."""

    neighbour: int  # training image index
    neighbour_name: str
    level: int  # pyramid level used (0 = finest, stride 4)
    distance: float  # feature distance at that level (the level map's value before upsampling/smoothing)
    y_frac: float  # centre of the matched feature cell in the neighbour image, fraction of its height
    x_frac: float  # ... and of its width
    box_frac: tuple[float, float, float, float]  # (y0, x0, y1, x1) of the matched cell, fractions

    def box_pixels(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The matched cell as integer pixel bounds (y0, x0, y1, x1) in an image of the given size."""
        y0, x0, y1, x1 = self.box_frac
        return (int(y0 * height), int(x0 * width), max(int(y0 * height) + 1, round(y1 * height)),
                max(int(x0 * width) + 1, round(x1 * width)))


@dataclass
class Prediction:
    """What ``Spade.predict`` returns for N images."""

    scores: np.ndarray  # (N,) image anomaly scores
    maps: list[np.ndarray]  # N float32 maps, each at its image's own resolution
    masks: list[np.ndarray] | None  # N bool masks (map >= pixel threshold), None without a threshold
    neighbours: np.ndarray  # (N, k) indices of the retrieved training images, nearest first
    names: list[str] = field(default_factory=list)
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    train_names: list[str] = field(default_factory=list)
    features: list[list[np.ndarray]] | None = None  # per image, per level (H*W, C); with keep_features
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) of each image
    model: Spade | None = field(default=None, repr=False)

    @property
    def normalised_scores(self) -> np.ndarray | None:
        """Image scores divided by the image threshold (1.0 = at the threshold)."""
        if not self.image_threshold:
            return None
        return self.scores / self.image_threshold

    def correspondence(self, i: int, y: int, x: int, level: int = 0) -> Correspondence:
        """The normal feature that pixel (y, x) of image i was matched to (needs ``keep_features=True``)."""
        if self.features is None or self.model is None:
            raise SpadeError("correspondence needs predict(..., keep_features=True)")
        return self.model._correspond(self.features[i][level], self.neighbours[i], self.sizes[i], y, x, level)

    @property
    def verdicts(self) -> np.ndarray | None:
        """True = defective (score >= image threshold)."""
        if self.image_threshold is None:
            return None
        return self.scores >= self.image_threshold

    def neighbour_names(self, i: int) -> list[str]:
        return [self.train_names[j] for j in self.neighbours[i]] if self.train_names else []


class Spade:
    """SPADE anomaly detector (Cohen & Hoshen 2020).

    Parameters follow the paper: ``k`` nearest training images form the gallery for the pixel stage,
    ``k_image`` nearest give the image score, ``kappa`` nearest gallery features give a pixel's score,
    ``sigma`` is the Gaussian smoothing of the map (pixels at ``image_size``).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        k: int = 50,
        k_image: int = 5,
        kappa: int = 1,
        sigma: float = 4.0,
        image_size: int = 224,
        device: str = "cpu",
        weights: str | None = None,
        batch_size: int = 16,
        calibration_images: int = 16,
        false_alarm_rate: float = 0.01,
        tile_bytes: int = DEFAULT_TILE_BYTES,
    ) -> None:
        self.backbone = backbone
        self.k = k
        self.k_image = k_image
        self.kappa = kappa
        self.sigma = sigma
        self.image_size = image_size
        self.device = device
        self.weights = weights
        self.batch_size = batch_size
        self.calibration_images = calibration_images
        self.false_alarm_rate = false_alarm_rate
        self.tile_bytes = tile_bytes

    # ------------------------------------------------------------------ settings
    def _check_params(self) -> None:
        if self.backbone not in BACKBONES:
            raise SpadeError(f"unknown backbone {self.backbone!r}; choose one of: {', '.join(BACKBONES)}")
        for name in ("k", "k_image", "kappa", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise SpadeError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.calibration_images, (int, np.integer)) or self.calibration_images < 0:
            raise SpadeError(f"calibration_images must be >= 0, got {self.calibration_images!r}")
        if not (self.sigma >= 0):
            raise SpadeError(f"sigma must be >= 0, got {self.sigma!r}")
        if not isinstance(self.image_size, (int, np.integer)) or not (32 <= self.image_size <= 2048):
            raise SpadeError(f"image_size must be an integer between 32 and 2048, got {self.image_size!r}")
        if not (0.0 < self.false_alarm_rate < 1.0):
            raise SpadeError(f"false_alarm_rate must be in (0, 1), got {self.false_alarm_rate!r}")
        pick_device(self.device)

    def get_params(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "k": self.k,
            "k_image": self.k_image,
            "kappa": self.kappa,
            "sigma": self.sigma,
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "calibration_images": self.calibration_images,
            "false_alarm_rate": self.false_alarm_rate,
        }

    def _net(self) -> FeatureExtractor:
        net = getattr(self, "_net_cache", None)
        if net is None:
            net = build_backbone(self.backbone, self.weights).to(pick_device(self.device))
            self._net_cache = net
        return net

    def _check_fitted(self) -> None:
        if not hasattr(self, "bank_"):
            raise NotFittedError("this Spade model is not fitted yet: call fit(...) or Spade.load(...) first")

    # ------------------------------------------------------------------ fit
    def fit(self, images: Images, progress: Progress | None = None) -> Spade:
        """Store global vectors and feature pyramids of the good ``images`` (folder, paths or arrays)."""
        self._check_params()
        items, names = resolve_images(images)
        net = self._net()
        dev = pick_device(self.device)
        shapes_hw = level_shapes(net, self.image_size)
        shapes = [(h * w, c) for (h, w), c in zip(shapes_hw, net.channels, strict=True)]
        workdir = Path(tempfile.mkdtemp(prefix="spade-ad-"))
        weakref.finalize(self, shutil.rmtree, workdir, True)
        spec: dict[str, tuple[tuple[int, ...], str]] = {f"level{i}": (sh, "F16") for i, sh in enumerate(shapes)}
        spec["thumbnails"] = ((THUMB, THUMB, 3), "U8")
        writer = BankWriter(workdir / "bank.safetensors", len(items), spec)
        globals_: list[torch.Tensor] = []
        try:
            for s, e in batches(len(items), self.batch_size):
                arrays = [read_item(items[i], names[i]) for i in range(s, e)]
                levels, gvec = extract(net, arrays, self.image_size, dev)
                small = resize_batch(arrays, THUMB, torch.device("cpu")).round().byte().permute(0, 2, 3, 1)
                rows = {f"level{i}": lv.cpu().numpy() for i, lv in enumerate(levels)}
                writer.write(s, {**rows, "thumbnails": small.numpy()})
                globals_.append(gvec.cpu())
                if progress:
                    progress("fit", e, len(items))
        finally:
            writer.close()
        self.global_ = torch.cat(globals_)
        self.level_shapes_ = shapes_hw
        self.train_names_ = names
        self.weights_id_ = net.weights_id
        self.workdir_ = workdir
        self.bank_ = Bank(workdir / "bank.safetensors")
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
        n = self.bank_.n
        m = min(self.calibration_images, n)
        if n < 2 or m < 1:
            return
        idx = np.unique(np.linspace(0, n - 1, m).round().astype(int))
        scores, maxima = [], []
        for j, i in enumerate(idx):
            s, maps, _ = self._score_from_features(
                [torch.from_numpy(self.bank_.gather(li, [i]).astype(np.float32)) for li in range(self.bank_.n_levels)],
                self.global_[i : i + 1],
                exclude=torch.tensor([int(i)]),
            )
            scores.append(float(s[0]))
            maxima.append(float(maps[0].max()))
            if progress:
                progress("calibrate", j + 1, len(idx))
        q = 1.0 - self.false_alarm_rate
        self.image_threshold_ = float(np.quantile(scores, q, method="higher"))
        self.pixel_threshold_ = float(np.quantile(maxima, q, method="higher"))
        self.calibration_ = {
            "method": "leave-one-out on training images",
            "n_images": len(idx),
            "false_alarm_rate": self.false_alarm_rate,
            "image_scores": scores,
            "map_maxima": maxima,
        }

    # ------------------------------------------------------------------ predict
    def _score_from_features(
        self,
        levels: list[torch.Tensor],
        gvec: torch.Tensor,
        exclude: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """levels: (B, H*W, C) per level; -> scores (B,), maps (B, S, S) at image_size, neighbours (B, k)."""
        dev = pick_device(self.device)
        scores, neigh = image_knn(gvec, self.global_, self.k_image, self.k, exclude)
        level_maps = []
        for li, (h, w) in enumerate(self.level_shapes_):
            out = torch.empty(len(gvec), h * w, device=dev)
            for b in range(len(gvec)):
                gallery = torch.from_numpy(self.bank_.gather(li, neigh[b].numpy()))
                gallery = gallery.to(dev).float().reshape(-1, gallery.shape[-1])
                out[b] = nn_distances(
                    levels[li][b].to(dev), gallery, self.kappa, self.tile_bytes, query_hw=(h, w), gallery_hw=(h, w)
                )
            level_maps.append(out.view(-1, h, w))
        maps = combine_levels(level_maps, self.image_size, self.sigma)
        return scores, maps, neigh

    @torch.no_grad()
    def predict(
        self,
        images: Images,
        progress: Progress | None = None,
        pixel_threshold: float | None = None,
        keep_features: bool = False,
    ) -> Prediction:
        """Score ``images``: image scores, anomaly maps at each image's own size, masks, neighbours.

        ``keep_features`` keeps each image's feature pyramid so that ``result.correspondence(i, y, x)``
        can explain any pixel.
        """
        self._check_fitted()
        items, names = resolve_images(images)
        net = self._net()
        dev = pick_device(self.device)
        thr = self.pixel_threshold_ if pixel_threshold is None else pixel_threshold
        all_scores, all_maps, all_neigh = [], [], []
        kept: list[list[np.ndarray]] = []
        sizes: list[tuple[int, int]] = []
        for s, e in batches(len(items), self.batch_size):
            arrays = [read_item(items[i], names[i]) for i in range(s, e)]
            levels, gvec = extract(net, arrays, self.image_size, dev)
            scores, maps, neigh = self._score_from_features(levels, gvec)
            for b, arr in enumerate(arrays):
                all_maps.append(to_original_size(maps[b], arr.shape[0], arr.shape[1]).cpu().numpy())
                sizes.append((arr.shape[0], arr.shape[1]))
                if keep_features:
                    kept.append([lv[b].cpu().numpy() for lv in levels])
            all_scores.append(scores.cpu())
            all_neigh.append(neigh)
            if progress:
                progress("predict", e, len(items))
        masks = [m >= thr for m in all_maps] if thr is not None else None
        return Prediction(
            scores=torch.cat(all_scores).numpy(),
            maps=all_maps,
            masks=masks,
            neighbours=torch.cat(all_neigh).numpy(),
            names=names,
            image_threshold=self.image_threshold_,
            pixel_threshold=thr,
            train_names=self.train_names_,
            features=kept if keep_features else None,
            sizes=sizes,
            model=self,
        )

    def explain(self, image: ImageInput, y: int, x: int, level: int = 0) -> Correspondence:
        """Which normal image, and where in it, pixel (y, x) of ``image`` was matched to."""
        self._check_fitted()
        res = self.predict([image], keep_features=True)
        return res.correspondence(0, y, x, level)

    def _correspond(
        self, feats: np.ndarray, neigh: np.ndarray, size: tuple[int, int], y: int, x: int, level: int
    ) -> Correspondence:
        height, width = size
        if not (0 <= y < height and 0 <= x < width):
            raise SpadeError(f"pixel ({y}, {x}) is outside the image ({height}x{width})")
        if not (0 <= level < len(self.level_shapes_)):
            raise SpadeError(f"level must be in 0..{len(self.level_shapes_) - 1}, got {level}")
        h, w = self.level_shapes_[level]
        r = min(h - 1, int((y + 0.5) / height * h))
        c = min(w - 1, int((x + 0.5) / width * w))
        q = torch.from_numpy(np.asarray(feats[r * w + c], np.float64))
        gal = torch.from_numpy(np.asarray(self.bank_.gather(level, neigh), np.float64)).reshape(-1, q.numel())
        d = ((gal - q) ** 2).sum(1)
        j = int(torch.argmin(d))
        n_idx = int(neigh[j // (h * w)])
        pos = j % (h * w)
        rr, cc = divmod(pos, w)
        return Correspondence(
            neighbour=n_idx,
            neighbour_name=self.train_names_[n_idx] if self.train_names_ else str(n_idx),
            level=level,
            distance=float(d[j].sqrt()),
            y_frac=(rr + 0.5) / h,
            x_frac=(cc + 0.5) / w,
            box_frac=(rr / h, cc / w, (rr + 1) / h, (cc + 1) / w),
        )

    def thumbnail(self, index: int) -> np.ndarray:
        """A small (THUMB x THUMB x 3 uint8) picture of training image ``index``, kept in the model."""
        self._check_fitted()
        if not (0 <= index < self.bank_.n):
            raise SpadeError(f"training image index {index} is out of range (0..{self.bank_.n - 1})")
        return self.bank_.rows("thumbnails", [index])[0]

    def decision_function(self, images: Images) -> np.ndarray:
        """Image scores only."""
        return self.predict(images).scores

    # ------------------------------------------------------------------ persistence
    def save(self, model_dir: str | Path) -> Path:
        """Write the model folder: model.json (header), index.safetensors, bank.safetensors. No pickle."""
        from safetensors.torch import save_file

        self._check_fitted()
        out = Path(model_dir)
        out.mkdir(parents=True, exist_ok=True)
        bank_src = self.bank_.path
        if bank_src.resolve() != (out / "bank.safetensors").resolve():
            atomic_write(out / "bank.safetensors", lambda tmp: shutil.copyfile(bank_src, tmp))
        atomic_write(
            out / "index.safetensors",
            lambda tmp: save_file(
                {"global": self.global_.float().contiguous()}, str(tmp)
            ),
        )
        header = {
            "format": "spade-ad",
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "backbone": self.backbone,
            "weights": self.weights_id_,
            "weights_src": None if self.weights in (None, "imagenet", "random") else str(self.weights),
            "settings": self.get_params(),
            "level_shapes": [list(s) for s in self.level_shapes_],
            "bank_dtype": "float16",
            "n_train": int(self.bank_.n),
            "train_names": self.train_names_,
            "image_threshold": self.image_threshold_,
            "pixel_threshold": self.pixel_threshold_,
            "calibration": self.calibration_,
            "files": {
                "bank.safetensors": file_sha256(out / "bank.safetensors"),
                "index.safetensors": file_sha256(out / "index.safetensors"),
            },
        }
        save_json(out / "model.json", header)
        return out

    @classmethod
    def load(
        cls, model_dir: str | Path, device: str = "cpu", weights: str | None = None, verify: bool = True
    ) -> Spade:
        """Load a model folder written by ``save``. ``verify`` checks the files' checksums."""
        from safetensors.torch import load_file

        d = Path(model_dir)
        if not d.is_dir():
            raise SpadeError(f"{d}: model folder does not exist")
        hpath = d / "model.json"
        if not hpath.is_file():
            raise SpadeError(f"{hpath}: model file is missing (not a spade-ad model folder?)")
        try:
            header = json.loads(hpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SpadeError(f"{hpath}: damaged model header ({exc})") from None
        if not isinstance(header, dict) or header.get("format") != "spade-ad":
            raise SpadeError(f"{hpath}: not a spade-ad model header")
        if header.get("format_version") != FORMAT_VERSION:
            raise SpadeError(
                f"{hpath}: model format version {header.get('format_version')} is not supported by "
                f"spade-ad {__version__} (expects {FORMAT_VERSION}); refit the model"
            )
        try:
            files = header["files"]
            settings = header["settings"]
            for name in ("bank.safetensors", "index.safetensors"):
                path = d / name
                if not path.is_file():
                    raise SpadeError(f"{path}: model file is missing")
                if verify and file_sha256(path) != files[name]:
                    raise SpadeError(f"{path}: checksum mismatch (file is damaged or was modified)")
            try:
                index = load_file(str(d / "index.safetensors"))
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise SpadeError(f"{d / 'index.safetensors'}: damaged model file ({exc})") from None
            model = cls(
                backbone=settings["backbone"],
                k=settings["k"],
                k_image=settings["k_image"],
                kappa=settings["kappa"],
                sigma=settings["sigma"],
                image_size=settings["image_size"],
                batch_size=settings["batch_size"],
                calibration_images=settings["calibration_images"],
                false_alarm_rate=settings["false_alarm_rate"],
                device=device,
                weights=weights if weights is not None else _weights_arg(header["weights"], header.get("weights_src")),
            )
            model.global_ = index["global"]
            model.level_shapes_ = [tuple(s) for s in header["level_shapes"]]
            model.train_names_ = list(header["train_names"])
            model.weights_id_ = header["weights"]
            model.image_threshold_ = header["image_threshold"]
            model.pixel_threshold_ = header["pixel_threshold"]
            model.calibration_ = header["calibration"]
        except (KeyError, TypeError) as exc:
            raise SpadeError(f"{hpath}: damaged model header (missing or bad field {exc})") from None
        model.bank_ = Bank(d / "bank.safetensors")
        if model.bank_.n != int(header["n_train"]) or len(model.global_) != model.bank_.n:
            raise SpadeError(f"{d}: model files disagree on the number of training images")
        net = model._net()
        if net.weights_id != model.weights_id_:
            raise SpadeError(
                f"{d}: backbone weights differ from those the model was fitted with "
                f"({net.weights_id} != {model.weights_id_})"
            )
        return model


def _weights_arg(weights_id: str, source: str | None) -> str | None:
    """How to rebuild the backbone the model was fitted with (its checksum is verified after)."""
    if weights_id.startswith("random"):
        return "random"
    return source

"""The model folder: ``model.json`` (header), ``index.safetensors`` (global vectors) and
``bank.safetensors`` (feature pyramids and thumbnails). No pickle: loading never executes code, and
never reads a file outside the folder (backbone weights that are not bundled are given by the caller).

The header carries the format version, the settings (:class:`~spade_ad.SpadeSettings`, model part),
the thresholds, the training names, a SHA-256 of every other file and a SHA-256 of itself; loading
checks all of them and validates every field against the settings' bounds and against the arrays.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from .bank import Bank, file_sha256
from .errors import SpadeError
from .io import atomic_write, save_json
from .settings import SpadeSettings

if TYPE_CHECKING:
    from .model import Spade

FORMAT_VERSION = 2
FILES = ("bank.safetensors", "index.safetensors")


def _header_digest(header: dict[str, Any]) -> str:
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_model(model: Spade, out: Path) -> Path:
    """Write ``model`` to the folder ``out`` (each file atomically; the header last)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    bank_src = model.bank_.path
    if bank_src.resolve() != (out / "bank.safetensors").resolve():
        atomic_write(out / "bank.safetensors", lambda tmp: shutil.copyfile(bank_src, tmp))
    atomic_write(out / "index.safetensors",
                 lambda tmp: save_file({"global": model.global_.float().contiguous()}, str(tmp)))
    header: dict[str, Any] = {
        "format": "spade-ad",
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "weights": model.weights_id_,
        "settings": model.settings.model_dict(),
        "level_shapes": [list(s) for s in model.level_shapes_],
        "bank_dtype": "float16",
        "n_train": int(model.bank_.n),
        "train_names": model.train_names_,
        "image_threshold": model.image_threshold_,
        "pixel_threshold": model.pixel_threshold_,
        "calibration": model.calibration_,
        "files": {name: file_sha256(out / name) for name in FILES},
    }
    header["header_sha256"] = _header_digest(header)
    save_json(out / "model.json", header)
    return out


def read_header(folder: Path) -> dict[str, Any]:
    """``model.json``, integrity-checked (format, version, self-checksum)."""
    if not folder.is_dir():
        raise SpadeError(f"{folder}: model folder does not exist")
    hpath = folder / "model.json"
    if not hpath.is_file():
        raise SpadeError(f"{hpath}: model file is missing (not a spade-ad model folder?)")
    try:
        header = json.loads(hpath.read_text(), parse_constant=_no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise SpadeError(f"{hpath}: damaged model header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != "spade-ad":
        raise SpadeError(f"{hpath}: not a spade-ad model header")
    if header.get("format_version") != FORMAT_VERSION:
        raise SpadeError(
            f"{hpath}: model format version {header.get('format_version')} is not supported by "
            f"spade-ad {__version__} (expects {FORMAT_VERSION}); refit the model"
        )
    if header.get("header_sha256") != _header_digest(header):
        raise SpadeError(f"{hpath}: checksum mismatch (the header is damaged or was modified)")
    return header


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a valid number here")


def load_model(cls: type[Spade], folder: Path, runtime: dict[str, Any], verify: bool) -> Spade:
    """Read, check and validate a model folder (see the module docstring)."""
    from safetensors.torch import load_file

    header = read_header(folder)
    hpath = folder / "model.json"
    try:
        settings = SpadeSettings.from_model_dict(header["settings"], runtime, where=str(hpath))
        files = header["files"]
        for name in FILES:
            path = folder / name
            if not path.is_file():
                raise SpadeError(f"{path}: model file is missing")
            if verify and file_sha256(path) != files[name]:
                raise SpadeError(f"{path}: checksum mismatch (file is damaged or was modified)")
        n_train = _int(header["n_train"], "n_train", hpath, low=1)
        names = header["train_names"]
        if not isinstance(names, list) or len(names) != n_train or not all(isinstance(x, str) for x in names):
            raise SpadeError(f"{hpath}: train_names must be a list of {n_train} names")
        shapes = header["level_shapes"]
        if not isinstance(shapes, list) or not all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s) for s in shapes
        ):
            raise SpadeError(f"{hpath}: level_shapes must be a list of [height, width] pairs")
        thresholds = {k: _threshold(header[k], k, hpath) for k in ("image_threshold", "pixel_threshold")}
        calibration = header["calibration"]
        if not isinstance(calibration, dict):
            raise SpadeError(f"{hpath}: calibration must be a mapping")
        weights_id = header["weights"]
        if not isinstance(weights_id, str):
            raise SpadeError(f"{hpath}: weights must be a checksum string")
    except KeyError as exc:
        raise SpadeError(f"{hpath}: damaged model header (missing field {exc})") from None
    try:
        index = load_file(str(folder / "index.safetensors"))
        glob = index["global"]
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise SpadeError(f"{folder / 'index.safetensors'}: damaged model file ({exc})") from None
    bank = Bank(folder / "bank.safetensors")
    if bank.n != n_train or glob.ndim != 2 or len(glob) != n_train:
        raise SpadeError(f"{folder}: model files disagree on the number of training images")
    if bank.n_levels != len(shapes) or any(
        bank.meta[f"level{i}"][1][1] != h * w for i, (h, w) in enumerate(shapes)
    ):
        raise SpadeError(f"{folder}: level_shapes in model.json disagree with the feature bank")
    if not bool(torch.isfinite(glob).all()):
        raise SpadeError(f"{folder / 'index.safetensors'}: global vectors contain NaN or infinite values")

    model = cls(settings)
    model.global_ = glob
    model.level_shapes_ = [(int(h), int(w)) for h, w in shapes]
    model.train_names_ = list(names)
    model.weights_id_ = weights_id
    model.image_threshold_ = thresholds["image_threshold"]
    model.pixel_threshold_ = thresholds["pixel_threshold"]
    model.calibration_ = calibration
    model.bank_ = bank
    net = model._net()
    if net.weights_id != weights_id:
        raise SpadeError(
            f"{folder}: backbone weights differ from those the model was fitted with "
            f"({net.weights_id} != {weights_id})"
        )
    if [tuple(s) for s in model.level_shapes_] != [(h, w) for h, w in _shapes_of(model)]:
        raise SpadeError(f"{hpath}: level_shapes disagree with the backbone at image_size {settings.image_size}")
    return model


def _shapes_of(model: Spade) -> list[tuple[int, int]]:
    from .features import level_shapes

    return level_shapes(model._net(), model.prep)


def _int(value: Any, name: str, where: Path, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpadeError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
    return value


def _threshold(value: Any, name: str, where: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SpadeError(f"{where}: {name} must be a finite number >= 0 or null, got {value!r}")
    return float(value)


__all__ = ["save_model", "load_model", "read_header", "FORMAT_VERSION"]

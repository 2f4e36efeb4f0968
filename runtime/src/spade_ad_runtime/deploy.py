"""The deploy folder: what ``spade-ad export`` writes and :class:`~spade_ad_runtime.Detector` reads.

    deploy.json          the header: format and version, the model's settings, input and pyramid shapes,
                         thresholds and calibration scales, training-image names, the backbone graph's
                         input and outputs, and the SHA-256 of every data file (and of itself)
    backbone.onnx        the backbone (normalisation included): a (1, 3, H, W) float32 image in [0, 255]
                         -> the pyramid levels (1, C, h, w) and the global vector (1, D); weights inside
    bank.safetensors     the model's feature bank as it is (fp16 rows, read row by row)
    global.safetensors   the training images' global vectors (stage 2's index)

Loading checks the header's own checksum, its format version, that every file it names is a plain file
directly in the folder (no paths, no links) and that its SHA-256 matches; nothing else is read, nothing in
the folder is executed (ONNX graphs are data: onnxruntime runs standard operators only).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import SpadeError
from .io import file_sha256, header_digest

FORMAT = "spade-ad-deploy"
FORMAT_VERSION = 1
HEADER = "deploy.json"
FILES = ("backbone.onnx", "bank.safetensors", "global.safetensors")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class DeployError(SpadeError):
    """A deploy folder or an input cannot be used; the message is one line naming the file and the problem."""


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a valid number here")


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "settings": dict, "input_shape": list, "level_shapes": list, "train_names": list, "calibration": dict,
    "model": dict, "image_threshold": (int, float, type(None)), "pixel_threshold": (int, float, type(None))}
_SETTINGS = ("preprocess", "image_size", "k", "k_image", "kappa", "sigma", "image_score")  # what the detector reads
_MODEL = ("lineage", "generation", "header_sha256")


def _check_fields(header: dict[str, Any], hpath: Path) -> None:
    """Every field the runtime reads is there with its type: a partial header is refused with one line."""
    for key, kind in _FIELDS.items():
        if key not in header or not isinstance(header[key], kind) or isinstance(header[key], bool):
            raise DeployError(f"{hpath}: missing or invalid field {key!r} (a partial deploy header)")
    for key in _SETTINGS:
        if key not in header["settings"]:
            raise DeployError(f"{hpath}: missing setting {key!r} (a partial deploy header)")
    for key in _MODEL:
        if key not in header["model"]:
            raise DeployError(f"{hpath}: missing model field {key!r} (a partial deploy header)")
    shapes = [header["input_shape"], *header["level_shapes"]]
    if not header["level_shapes"] or not all(isinstance(s, list) and len(s) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s) for s in shapes):
        raise DeployError(f"{hpath}: invalid input or level shapes")


def read_header(folder: Path, verify: bool = True) -> dict[str, Any]:
    """The checked header of deploy folder ``folder`` (and, with ``verify``, every data file's checksum)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DeployError(f"{folder}: deploy folder does not exist")
    hpath = folder / HEADER
    if not hpath.is_file() or hpath.is_symlink():
        raise DeployError(f"{hpath}: missing (not a spade-ad deploy folder?)")
    try:
        header = json.loads(hpath.read_text(encoding="utf-8"), parse_constant=_no_constants)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DeployError(f"{hpath}: damaged deploy header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DeployError(f"{hpath}: not a spade-ad deploy header")
    version = header.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise DeployError(f"{hpath}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise DeployError(f"{hpath}: deploy format {version} is newer than this runtime reads ({FORMAT_VERSION}); "
                          "upgrade spade-ad-runtime")
    if header.get("header_sha256") != header_digest(header):
        raise DeployError(f"{hpath}: checksum mismatch (the header is damaged or was modified)")
    _check_fields(header, hpath)
    files = header.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(FILES):
        raise DeployError(f"{hpath}: 'files' must name exactly {', '.join(FILES)}")
    for name, digest in files.items():
        path = folder / name
        if not _PLAIN_NAME.match(name) or path.is_symlink() or not path.is_file():
            raise DeployError(f"{path}: missing or not a plain file in the deploy folder")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise DeployError(f"{hpath}: invalid checksum for {name}")
        if verify and file_sha256(path) != digest:
            raise DeployError(f"{path}: checksum mismatch (the file is damaged or was replaced)")
    return header


__all__ = ["FORMAT", "FORMAT_VERSION", "HEADER", "FILES", "DeployError", "header_digest", "file_sha256",
           "read_header"]

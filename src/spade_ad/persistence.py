"""The model folder: ``model.json`` (the header) and two content-addressed data files,
``index-<sha>.safetensors`` (global vectors) and ``bank-<sha>.safetensors`` (feature pyramids and
thumbnails). No pickle: loading never executes code, and never reads a file outside the folder
(backbone weights that are not bundled are given by the caller, never taken from the header).

The header carries the format version, the settings (:class:`~spade_ad.SpadeSettings`, model part),
the thresholds, the training names, the name and SHA-256 of each data file and a SHA-256 of itself;
loading checks all of them and validates every field against the settings' bounds and the arrays.

Replacing a model is atomic as a unit: new data files get new names (their content's hash), are
written and fsynced beside the old ones, and the new ``model.json`` is renamed over the old one (the
commit point) before unreferenced files are removed. A writer killed at any point leaves the folder
loading as either the complete old model or the complete new one; files it leaves behind are named
``.staging-<pid>-*`` and are removed by the next writer once that process is gone.

Writers take turns: :func:`folder_lock` (an advisory lock on ``.lock``) is held by every save and
rollback, and a change that reads the model first holds it across the whole read -> change -> save
(``with folder_lock(folder): Spade.load(folder) ... .save(folder)``; the lock is reentrant within a
thread). A save also checks that the folder still holds the generation its model was read from, so a
change computed from an out-of-date model is refused instead of silently undoing another writer's.
A fresh fit saved over a folder holding another model becomes that folder's next generation: the
earlier generations stay reachable by rollback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spade_ad_runtime.zone import Zone

from .backbones import BACKBONES
from .bank import Bank
from .defects import defects_from_header
from .errors import SpadeError
from .io import (
    atomic_write,
    file_sha256,
    fsync_dir,
    header_digest,
    is_staging,
    save_json,
    staging_owner_gone,
    staging_path,
    write_error,
)
from .preprocess import is_aspect_shape
from .settings import SpadeSettings, check_operating_point
from .tiling import TileGrid, grid_from_dict
from .version import __version__

if TYPE_CHECKING:
    from .state import FittedState

FORMAT_VERSION = 2
GENERATIONS = "generations"  # copies of the last headers, for rollback
KEEP_GENERATIONS = 5  # generations whose files a folder keeps (the current one included)
DATA = ("bank", "index")  # the data files of a model, each ``<kind>-<sha256 prefix>.safetensors``
OPTIONAL_DATA = ("defects",)  # data files a model may have (its known defects: spade_ad.defects)
_DATA_NAME = re.compile(r"^(bank|index|defects)-[0-9a-f]{16}\.safetensors$")
_IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")  # a training image's identity: model.image_id
_ATOMIC_TMP = re.compile(r"^\..+\.tmp$")  # io.atomic_write's temporary files (only written under the lock)
_held = threading.local()  # folders whose lock this thread holds (folder_lock is reentrant per thread)


def utc_now() -> str:
    """The time recorded in a model's history (UTC, to the second)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def crash_point(name: str) -> None:
    """Fault injection for tests: ``SPADE_AD_CRASH_AT=name:KILL|INT`` kills this process here."""
    spec = os.environ.get("SPADE_AD_CRASH_AT", "")
    if spec.split(":")[0] == name:
        os.kill(os.getpid(), signal.SIGKILL if spec.endswith(":KILL") else signal.SIGINT)


def clean_stale(folder: Path, locked: bool = False) -> None:
    """Remove staging files left by writers that are no longer running; with ``locked`` (the caller holds
    the folder's lock, so no writer is between its steps) also the temporary files of killed writers'
    atomic writes, in the folder and in its generations."""
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        staged = is_staging(f)
        if (staged and staging_owner_gone(f)) or (locked and not staged and _ATOMIC_TMP.match(f.name)):
            with contextlib.suppress(OSError):
                f.unlink()
    gdir = folder / GENERATIONS
    for f in gdir.iterdir() if locked and gdir.is_dir() else []:
        if _ATOMIC_TMP.match(f.name):
            with contextlib.suppress(OSError):
                f.unlink()


def _commit_data(out: Path, kind: str, staged: Path) -> tuple[str, str]:
    """Give a finished, fsynced staging file its content-addressed name; returns (name, sha256)."""
    digest = file_sha256(staged)
    name = f"{kind}-{digest[:16]}.safetensors"
    try:
        os.replace(staged, out / name)
    except OSError as exc:
        raise write_error(out / name, exc) from None
    return name, digest


def save_state(model: FittedState, out: Path) -> Path:
    """Write a fitted model's state to the folder ``out`` (see the module docstring for the order of the steps)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out, exc) from None
    with folder_lock(out):
        return _save_locked(model, out)


@contextlib.contextmanager
def folder_lock(folder: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """One writer at a time per model folder: an advisory lock on ``folder/.lock``, across processes and
    threads, reentrant within a thread (a save inside ``with folder_lock(folder):`` does not wait for itself).

    Hold it across a whole change (load, change, save). ``on_wait`` is called once if another writer holds
    the lock (then this one waits for it). A folder that cannot be locked is one line naming it.
    """
    import fcntl

    key = os.path.realpath(folder)
    held: set[str] = _held.__dict__.setdefault("folders", set())
    if key in held:
        yield
        return
    lock = folder / ".lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if not folder.is_dir():
            raise SpadeError(f"{folder}: model folder does not exist") from None
        raise SpadeError(f"{lock}: cannot lock the model folder ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise SpadeError(f"{lock}: cannot lock the model folder ({exc.strerror or exc})") from None
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
    finally:
        os.close(fd)


def _current_header(out: Path) -> dict[str, Any] | None:
    """The folder's current header, or None where there is none or it cannot be read (a save replaces it)."""
    if not (out / "model.json").is_file():
        return None
    try:
        return read_header(out)
    except SpadeError:
        return None


def _numbers(header: dict[str, Any]) -> dict[str, Any]:
    """Training-image count and thresholds of a header (what the history records before and after)."""
    return {"n_train": header["n_train"], "image_threshold": header["image_threshold"],
            "pixel_threshold": header["pixel_threshold"]}


def _adopt(model: FittedState, out: Path, current: dict[str, Any] | None) -> tuple[list[dict[str, Any]], str]:
    """The history and lineage to save ``model`` under in ``out``, checking that saving it loses nothing.

    * the folder holds no (readable) model, or the generation ``model`` was read from (or last saved as):
      the model's own;
    * ``model`` is a fresh fit (one history entry, its own lineage): the folder's next generation, so the
      earlier ones stay in the history and reachable by rollback;
    * otherwise (the folder moved on since ``model`` was read, or holds an unrelated model): refused.
    """
    if current is None or current["header_sha256"] == model.base_sha256:
        return model.history, model.lineage
    fresh = len(model.history) == 1 and model.history[0].get("action") == "fit"
    if fresh and model.lineage != current["lineage"]:
        entry = {**model.history[0], "generation": current["generation"] + 1, "before": _numbers(current)}
        return [*current["history"], entry], current["lineage"]
    if model.lineage == current["lineage"]:
        raise SpadeError(f"{out}: the model folder changed since this model was read (it is now at generation "
                         f"{current['generation']}); saving would undo that change: load it again and redo yours")
    raise SpadeError(f"{out}: holds another model (generation {current['generation']}); save this one into an "
                     "empty folder")


def _save_locked(model: FittedState, out: Path) -> Path:
    current = _current_header(out)
    history, lineage = _adopt(model, out, current)
    clean_stale(out, locked=True)
    bank_path = model.bank.path
    moved = bank_path.parent.resolve() == out.resolve() and is_staging(bank_path)
    try:
        model.base_sha256 = _write_locked(model, out, history, lineage)
    except BaseException:
        if moved and model.bank.path != bank_path:  # give the bank back its staging name: a retry finds it
            with contextlib.suppress(OSError):
                os.replace(model.bank.path, bank_path)
                model.bank = Bank(bank_path)
        if current is not None:  # data files committed for a header that was never written are not kept
            _remove_unreferenced(out, _kept_files(out, current))
        elif not (out / "model.json").exists():
            _remove_unreferenced(out, set())
        raise
    model.history, model.lineage = history, lineage
    return out


def _write_locked(model: FittedState, out: Path, history: list[dict[str, Any]], lineage: str) -> str:
    """Data files, then the header (the commit point); returns the header's checksum."""
    from safetensors.torch import save_file

    files: dict[str, dict[str, str]] = {}
    bank_path = model.bank.path
    if bank_path.parent.resolve() == out.resolve() and _DATA_NAME.match(bank_path.name):
        files["bank"] = {"name": bank_path.name, "sha256": file_sha256(bank_path)}
    else:
        moved = bank_path.parent.resolve() == out.resolve() and is_staging(bank_path)
        if moved:
            staged = bank_path  # fit wrote the bank right here: rename it, no copy
        else:
            staged = staging_path(out, ".bank.safetensors")
            atomic_write(staged, lambda tmp: _copy(bank_path, tmp))
        name, digest = _commit_data(out, "bank", staged)
        files["bank"] = {"name": name, "sha256": digest}
        if moved:
            model.bank = Bank(out / name)
    crash_point("save-bank")
    staged = staging_path(out, ".index.safetensors")
    arrays = {"global": model.global_.float().contiguous()}
    if model.zone is not None:
        arrays["zone"] = torch.from_numpy(model.zone.mask.astype("uint8"))
    atomic_write(staged, lambda tmp: save_file(arrays, str(tmp)))
    name, digest = _commit_data(out, "index", staged)
    files["index"] = {"name": name, "sha256": digest}
    if model.defects is not None:
        files["defects"] = _commit_defects(model, out)
    fsync_dir(out)
    crash_point("save-index")
    header: dict[str, Any] = {
        "format": "spade-ad",
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "weights": model.weights_id,
        "settings": model.settings.model_dict(),
        "input_shape": list(model.input_shape),
        "level_shapes": [list(s) for s in model.level_shapes],
        "bank_dtype": "float16",
        "n_train": model.n_train,
        "tile_grid": model.grid.to_dict() if model.grid is not None else None,
        "zone": list(model.zone.shape) if model.zone is not None else None,
        "train_names": model.train_names,
        "train_ids": model.train_ids,
        "image_threshold": model.image_threshold,
        "pixel_threshold": model.pixel_threshold,
        "calibration": model.calibration,
        "defects": model.defects.as_header() if model.defects is not None else None,
        "files": files,
        "lineage": lineage,
        "generation": len(history),
        "history": history,
    }
    return _commit_header(out, header)


def _commit_defects(model: FittedState, out: Path) -> dict[str, str]:
    """The known defects' data file in ``out`` (already there under its name, or copied in)."""
    assert model.defects is not None
    path = model.defects.path
    if path.parent.resolve() == out.resolve() and _DATA_NAME.match(path.name):
        return {"name": path.name, "sha256": file_sha256(path)}
    staged = staging_path(out, ".defects.safetensors")
    atomic_write(staged, lambda tmp: _copy(path, tmp))
    name, digest = _commit_data(out, "defects", staged)
    model.defects = replace(model.defects, path=out / name)
    return {"name": name, "sha256": digest}


def _commit_header(out: Path, header: dict[str, Any]) -> str:
    """Keep a copy for rollbacks, rename the header over ``model.json`` (the commit point), then remove
    what no kept generation references. Returns the header's checksum."""
    header["header_sha256"] = header_digest(header)
    save_json(generation_file(out, header["lineage"], header["generation"]), header)
    crash_point("save-generation")
    save_json(out / "model.json", header)  # the commit point
    crash_point("save-header")
    _collect_garbage(out, header)
    return str(header["header_sha256"])


def generation_file(out: Path, lineage: str, generation: int) -> Path:
    """Where folder ``out`` keeps the header of ``generation`` of ``lineage`` (for rollbacks and pinned runs)."""
    return out / GENERATIONS / f"{lineage}-{generation}.json"


def _collect_garbage(out: Path, header: dict[str, Any]) -> None:
    """Remove data files and generation copies that neither the current model nor the last
    ``KEEP_GENERATIONS`` generations of its lineage reference (best effort)."""
    keep_gen = _kept_generations(out, header)
    gdir = out / GENERATIONS
    for f in sorted(gdir.iterdir()) if gdir.is_dir() else []:
        if f.name not in keep_gen:
            with contextlib.suppress(OSError):
                f.unlink()
    _remove_unreferenced(out, _kept_files(out, header))


def _kept_generations(out: Path, header: dict[str, Any]) -> set[str]:
    return {generation_file(out, header["lineage"], g).name
            for g in range(header["generation"], max(0, header["generation"] - KEEP_GENERATIONS), -1)}


def _kept_files(out: Path, header: dict[str, Any]) -> set[str]:
    """The data files that ``header`` and the generations kept with it reference."""
    keep = {f["name"] for f in header["files"].values()}
    for name in _kept_generations(out, header):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            keep |= {e["name"] for e in json.loads((out / GENERATIONS / name).read_text())["files"].values()}
    return keep


def _copy(src: Path, dst: Path, chunk: int = 16 << 20) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(chunk):
            fo.write(block)


def _remove_unreferenced(out: Path, keep: set[str]) -> None:
    for f in out.iterdir():
        if (_DATA_NAME.match(f.name) or f.name in ("bank.safetensors", "index.safetensors")) and f.name not in keep:
            with contextlib.suppress(OSError):
                f.unlink()


def read_header(folder: Path, header_file: Path | None = None) -> dict[str, Any]:
    """``model.json`` (or ``header_file``, a generation's copy in the folder), integrity-checked (format,
    version, self-checksum)."""
    if not folder.is_dir():
        raise SpadeError(f"{folder}: model folder does not exist")
    hpath = header_file or folder / "model.json"
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
    if header.get("header_sha256") != header_digest(header):
        raise SpadeError(f"{hpath}: checksum mismatch (the header is damaged or was modified)")
    return header


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a valid number here")


def read_state(folder: Path, runtime: dict[str, Any], verify: bool,
               header_file: Path | None = None) -> FittedState:
    """Read, check and validate a model folder (see the module docstring); ``runtime``: the runtime settings
    to run it with; ``header_file``: an earlier generation's header kept in the folder (:func:`generation_file`)
    instead of ``model.json``. The backbone itself is checked by the caller (:meth:`spade_ad.Spade.load`)."""
    from .state import FittedState

    header = read_header(folder, header_file)
    hpath = header_file or folder / "model.json"
    try:  # every field the header lacks is named the same way, whichever step reads it
        settings = SpadeSettings.from_model_dict(header["settings"], runtime, where=str(hpath))
        paths = _checked_data_files(header["files"], folder, hpath, verify)
        fields = _header_fields(header, settings, hpath)
    except KeyError as exc:
        raise SpadeError(f"{hpath}: damaged model header (missing field {exc})") from None
    glob, bank, zone = _read_arrays(paths, folder, len(fields.train_names) * (len(fields.grid) if fields.grid else 1),
                                    fields.level_shapes, _zone_shape(header.get("zone"), settings, hpath))
    _check_weights_given(settings, fields.weights_id, folder)
    return FittedState(
        settings=settings, input_shape=fields.input_shape, level_shapes=fields.level_shapes,
        weights_id=fields.weights_id, global_=glob, bank=bank, train_names=fields.train_names,
        train_ids=fields.train_ids, image_threshold=fields.image_threshold, pixel_threshold=fields.pixel_threshold,
        calibration=fields.calibration, history=fields.history, lineage=fields.lineage,
        base_sha256=header["header_sha256"], grid=fields.grid, zone=zone,
        defects=defects_from_header(header.get("defects"), paths["defects"][0], hpath) if "defects" in paths else None)


@dataclass
class _HeaderFields:
    """The header's fields as :func:`read_state` validated them (settings and files apart)."""

    train_names: list[str]
    train_ids: list[str | None]
    level_shapes: list[tuple[int, int]]
    input_shape: tuple[int, int]
    image_threshold: float | None
    pixel_threshold: float | None
    calibration: dict[str, Any]
    weights_id: str
    history: list[dict[str, Any]]
    lineage: str
    grid: TileGrid | None


def _checked_data_files(files: Any, folder: Path, hpath: Path, verify: bool) -> dict[str, tuple[Path, str]]:
    """The data files the header names, each present and (with ``verify``) matching its checksum."""
    paths = _data_paths(files, folder, hpath)
    for path, digest in paths.values():
        if not path.is_file():
            raise SpadeError(f"{path}: model file is missing")
        if verify and file_sha256(path) != digest:
            raise SpadeError(f"{path}: checksum mismatch (file is damaged or was modified)")
    return paths


def _header_fields(header: dict[str, Any], settings: SpadeSettings, hpath: Path) -> _HeaderFields:
    """Every other header field checked, in the header's order (a missing one raises KeyError)."""
    n_train = _int(header["n_train"], "n_train", hpath, low=1)
    names, ids = _train_names(header, n_train, hpath)
    shapes = _level_shapes(header["level_shapes"], hpath)
    input_shape = _input_shape(header.get("input_shape", [settings.image_size] * 2), settings, hpath)
    thresholds = {k: _threshold(header[k], k, hpath) for k in ("image_threshold", "pixel_threshold")}
    grid = _tile_grid(header.get("tile_grid"), settings, hpath)  # written since models can be tiled
    calibration = _calibration(header["calibration"], hpath, len(grid) if grid is not None else None)
    weights_id = header["weights"]
    if not isinstance(weights_id, str):
        raise SpadeError(f"{hpath}: weights must be a checksum string")
    history, lineage = header["history"], header["lineage"]
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history) or not history:
        raise SpadeError(f"{hpath}: history must be a non-empty list of changes")
    if header["generation"] != len(history) or not isinstance(lineage, str):
        raise SpadeError(f"{hpath}: generation {header['generation']!r} disagrees with its history")
    return _HeaderFields(
        train_names=list(names), train_ids=list(ids), level_shapes=[(int(h), int(w)) for h, w in shapes],
        input_shape=(int(input_shape[0]), int(input_shape[1])), image_threshold=thresholds["image_threshold"],
        pixel_threshold=thresholds["pixel_threshold"], calibration=calibration, weights_id=weights_id,
        history=history, lineage=lineage, grid=grid)


def _train_names(header: dict[str, Any], n_train: int, hpath: Path) -> tuple[list[str], list[str | None]]:
    """The training images' names and ids, one each; ids (SHA-256 hex, or nulls in older models) unique."""
    names = header["train_names"]
    if not isinstance(names, list) or len(names) != n_train or not all(isinstance(x, str) for x in names):
        raise SpadeError(f"{hpath}: train_names must be a list of {n_train} names")
    ids = header.get("train_ids", [None] * n_train)  # written since images have an identity
    if not isinstance(ids, list) or len(ids) != n_train or not all(
            x is None or isinstance(x, str) and _IMAGE_ID.match(x) for x in ids):
        raise SpadeError(f"{hpath}: train_ids must be a list of {n_train} image ids (SHA-256 hex) or nulls")
    if len({x for x in ids if x is not None}) != sum(x is not None for x in ids):
        raise SpadeError(f"{hpath}: train_ids lists an image twice")
    return names, ids


def _level_shapes(shapes: Any, hpath: Path) -> list[list[int]]:
    """The pyramid levels' [height, width], positive integers."""
    if not isinstance(shapes, list) or not all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s) for s in shapes
    ):
        raise SpadeError(f"{hpath}: level_shapes must be a list of [height, width] pairs")
    return shapes


def _input_shape(input_shape: Any, settings: SpadeSettings, hpath: Path) -> list[int]:
    """The network input's [height, width]: the image_size square, or an aspect shape (preprocess=aspect)."""
    if not (isinstance(input_shape, list) and len(input_shape) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in input_shape)
            and (input_shape == [settings.image_size] * 2
                 or settings.preprocess == "aspect" and is_aspect_shape(settings.image_size, input_shape))):
        raise SpadeError(f"{hpath}: input_shape must be [height, width] of the network input "
                         f"(the image_size square unless preprocess is aspect), got {input_shape!r}")
    return input_shape


def _positive_pair(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in v)


def _calibration(calibration: Any, hpath: Path, tiles: int | None) -> dict[str, Any]:
    """How the thresholds were set: a mapping whose score scales (if any) are two positive numbers, and a
    tiled model's position scales (if any) two per tile."""
    if not isinstance(calibration, dict):
        raise SpadeError(f"{hpath}: calibration must be a mapping")
    if not _positive_pair(calibration.get("score_scales", [1.0, 1.0])):
        raise SpadeError(f"{hpath}: calibration.score_scales must be two positive numbers")
    pos = calibration.get("position_scales")
    if pos is not None and (tiles is None or not isinstance(pos, list) or len(pos) != tiles
                            or not all(_positive_pair(v) for v in pos)):
        raise SpadeError(f"{hpath}: calibration.position_scales must be two positive numbers per tile")
    point = calibration.get("operating_point")
    if point is not None:
        if not isinstance(point, dict):
            raise SpadeError(f"{hpath}: calibration.operating_point must be a mapping")
        try:
            check_operating_point(point.get("rule"), point.get("value"))
        except SpadeError as exc:
            raise SpadeError(f"{hpath}: calibration.operating_point: {exc}") from None
    return calibration


def _tile_grid(d: Any, settings: SpadeSettings, hpath: Path) -> TileGrid | None:
    """A tiled model's grid (``None`` for others), checked against itself and the tile settings."""
    if not settings.tile:
        if d is not None:
            raise SpadeError(f"{hpath}: tile_grid given for a model that is not tiled")
        return None
    try:
        grid = grid_from_dict(d)
    except ValueError as exc:
        raise SpadeError(f"{hpath}: tile_grid: {exc}") from None
    if grid.tile != settings.tile or grid.overlap != settings.tile_overlap:
        raise SpadeError(f"{hpath}: tile_grid disagrees with the tile settings")
    return grid


def _zone_shape(value: Any, settings: SpadeSettings, hpath: Path) -> tuple[int, int] | None:
    """The header's ``zone`` (the inspection zone's [height, width], or null; written since models have zones)."""
    if value is None:
        return None
    if not _positive_pair(value):
        raise SpadeError(f"{hpath}: zone must be [height, width] of the inspection zone, or null")
    return int(value[0]), int(value[1])


def _read_arrays(paths: dict[str, tuple[Path, str]], folder: Path, n_train: int, shapes: list[tuple[int, int]],
                 zone_shape: tuple[int, int] | None) -> tuple[torch.Tensor, Bank, Zone | None]:
    """The global vectors, the feature bank and the inspection zone, checked against the header and each other."""
    from safetensors.torch import load_file

    ipath = paths["index"][0]
    try:
        index = load_file(str(ipath))
        glob = index["global"]
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise SpadeError(f"{ipath}: damaged model file ({exc})") from None
    zone = None
    if zone_shape is not None or "zone" in index:
        z = index.get("zone")
        if z is None or zone_shape is None or tuple(z.shape) != zone_shape or z.dtype != torch.uint8 \
                or bool((z > 1).any()):
            raise SpadeError(f"{ipath}: the inspection zone disagrees with model.json (damaged model file)")
        zone = Zone(z.numpy().astype(bool), str(ipath))
    bank = Bank(paths["bank"][0])
    if bank.n != n_train or glob.ndim != 2 or len(glob) != n_train:
        raise SpadeError(f"{folder}: model files disagree on the number of training images")
    if bank.n_levels != len(shapes) or any(
        bank.level_size(i)[0] != h * w for i, (h, w) in enumerate(shapes)
    ):
        raise SpadeError(f"{folder}: level_shapes in model.json disagree with the feature bank")
    if not bool(torch.isfinite(glob).all()):
        raise SpadeError(f"{paths['index'][0]}: global vectors contain NaN or infinite values")
    return glob, bank, zone


def _check_weights_given(settings: SpadeSettings, weights_id: str, folder: Path) -> None:
    """Refuse a model whose backbone weights the caller must name but did not: random test weights, or
    ImageNet weights that are not bundled (never looked for elsewhere)."""
    if settings.weights is None and weights_id.startswith("random"):
        raise SpadeError(f"{folder}: the model was fitted with random backbone weights (a test model); load it "
                         "with weights='random' if that is what you want")
    if settings.weights is None and not BACKBONES[settings.backbone].bundled:
        raise SpadeError(f"{folder}: the model uses {settings.backbone}, whose ImageNet weights are not bundled; "
                         "pass the weights file it was fitted with (--weights PATH, Spade.load(..., weights=PATH))")


def _data_paths(files: Any, folder: Path, hpath: Path) -> dict[str, tuple[Path, str]]:
    """The data files named by the header: plain names inside the folder, never a path elsewhere."""
    if not isinstance(files, dict) or not set(DATA) <= set(files) <= set(DATA + OPTIONAL_DATA):
        raise SpadeError(f"{hpath}: files must name the {' and '.join(DATA)} files (and at most the defects file)")
    out = {}
    for kind in [k for k in DATA + OPTIONAL_DATA if k in files]:
        entry = files[kind]
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(
                entry.get("sha256"), str):
            raise SpadeError(f"{hpath}: files.{kind} must have a name and a sha256")
        if not _DATA_NAME.match(entry["name"]) or not entry["name"].startswith(kind + "-"):
            raise SpadeError(f"{hpath}: files.{kind} names {entry['name']!r}, not a {kind} file of this folder")
        out[kind] = (folder / entry["name"], entry["sha256"])
    return out


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


__all__ = ["save_state", "read_state", "read_header", "generation_file", "folder_lock", "rollback", "read_history",
           "FORMAT_VERSION"]


def read_history(folder: Path) -> list[dict[str, Any]]:
    """The changes recorded in a model folder (the current generation's history), oldest first."""
    header = read_header(folder)
    history = header.get("history")
    if not isinstance(history, list):
        raise SpadeError(f"{folder / 'model.json'}: history must be a list of changes")
    return history


def rollback(folder: Path, generation: int, source: str | None = None,
             forced: list[str] | None = None) -> dict[str, Any]:
    """Make an earlier generation current again (as a new generation, so the history keeps everything).

    Returns the history entry of the rollback. The earlier generation's files must still be kept (the
    folder keeps the last ``KEEP_GENERATIONS``). The folder's known defects stay as they are; ``forced``
    names those the caller let the rollback judge good (recorded in the entry).
    """
    with folder_lock(folder):
        current = read_header(folder)
        clean_stale(folder, locked=True)
        if not 1 <= generation < current["generation"]:
            raise SpadeError(f"{folder}: generation must be between 1 and {current['generation'] - 1} "
                             f"(the current one is {current['generation']}), got {generation}")
        gfile = generation_file(folder, current["lineage"], generation)
        if not gfile.is_file():
            raise SpadeError(f"{folder}: generation {generation} is not kept in this folder (it was not saved here, "
                             f"or it is older than the last {KEEP_GENERATIONS})")
        try:
            old = json.loads(gfile.read_text(), parse_constant=_no_constants)
        except (OSError, ValueError) as exc:
            raise SpadeError(f"{gfile}: damaged generation copy ({exc})") from None
        if not isinstance(old, dict) or old.get("header_sha256") != header_digest(old):
            raise SpadeError(f"{gfile}: checksum mismatch (the copy is damaged or was modified)")
        for path, _ in _data_paths(old.get("files"), folder, gfile).values():
            if not path.is_file():
                raise SpadeError(f"{path}: model file of generation {generation} is missing")

        entry = {"generation": current["generation"] + 1, "time": utc_now(),
                 "action": "rollback", "to": generation, "added": [], "removed": [], "source": source,
                 "before": _numbers(current), "after": _numbers(old)}
        if forced:
            entry["forced"] = list(forced)
        header = {**old, "generation": entry["generation"], "history": [*current["history"], entry],
                  "lineage": current["lineage"], "defects": current.get("defects")}  # known defects stay known
        header["files"] = {k: v for k, v in old["files"].items() if k != "defects"}
        if "defects" in current["files"]:
            header["files"]["defects"] = current["files"]["defects"]
        header.pop("header_sha256", None)
        _commit_header(folder, header)
        return entry

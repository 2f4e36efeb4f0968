"""Known defects kept with a model: labelled defective images (``calibrate --defects``, the inspector's
"missed defect"), each with its ground-truth mask where one was given.

They serve two purposes: the operating point (a target recall is measured on them, and measured again after
every change of the model) and the defect gate (a change that would judge one of them good is refused
unless forced). They are stored as one data file of the model folder, ``defects-<sha>.safetensors``
(``image<i>``: HxWx3 uint8, ``mask<i>``: HxW uint8 0/1 where labelled), checked like the others, read only
when needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SpadeError


@dataclass(frozen=True)
class Defect:
    """One known defective image: its name (as given), pixels and mask (``None``: no mask given)."""

    name: str
    image: np.ndarray
    mask: np.ndarray | None


@dataclass(frozen=True)
class DefectSet:
    """The known defects of a model: the file holding them and, per image, its name, identity and whether it
    has a mask (what the header records)."""

    path: Path
    names: tuple[str, ...]
    ids: tuple[str, ...]
    masked: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.names)

    def read(self) -> Iterator[Defect]:
        """The defects one at a time (the file is read per image)."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="numpy") as f:
                keys = set(f.keys())
                for i, name in enumerate(self.names):
                    if f"image{i}" not in keys or self.masked[i] != (f"mask{i}" in keys):
                        raise SpadeError(f"{self.path}: defect {i} ({name}) is missing from the file")
                    image = np.asarray(f.get_tensor(f"image{i}"))
                    mask = np.asarray(f.get_tensor(f"mask{i}")).astype(bool) if self.masked[i] else None
                    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or (
                            mask is not None and mask.shape != image.shape[:2]):
                        raise SpadeError(f"{self.path}: defect {i} ({name}) is damaged")
                    yield Defect(name, image, mask)
        except SpadeError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise SpadeError(f"{self.path}: damaged defects file ({exc})") from None

    def as_header(self) -> list[dict[str, object]]:
        """The header's ``defects`` list."""
        return [{"name": n, "id": i, "masked": m} for n, i, m in zip(self.names, self.ids, self.masked, strict=True)]


def write_defects(path: Path, defects: Sequence[Defect], ids: Sequence[str]) -> DefectSet:
    """Write ``defects`` into the safetensors file ``path``; returns their :class:`DefectSet`."""
    from safetensors.numpy import save_file

    arrays: dict[str, np.ndarray] = {}
    for i, d in enumerate(defects):
        arrays[f"image{i}"] = np.ascontiguousarray(d.image, np.uint8)
        if d.mask is not None:
            arrays[f"mask{i}"] = np.ascontiguousarray(d.mask, np.uint8)
    save_file(arrays, str(path))
    return DefectSet(path, tuple(d.name for d in defects), tuple(ids), tuple(d.mask is not None for d in defects))


def defects_from_header(entries: object, path: Path, where: Path) -> DefectSet:
    """The header's ``defects`` list (names, ids, masked flags) for the data file ``path``, checked."""
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("id"), str)
            and isinstance(e.get("masked"), bool) for e in entries):
        raise SpadeError(f"{where}: defects must be a non-empty list of {{name, id, masked}}")
    return DefectSet(path, tuple(e["name"] for e in entries), tuple(e["id"] for e in entries),
                     tuple(e["masked"] for e in entries))


__all__ = ["Defect", "DefectSet", "write_defects", "defects_from_header"]

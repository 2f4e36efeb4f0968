"""The memory bank: per training image, its feature pyramid, streamed to disk during ``fit``.

The file is a valid safetensors file (fp16 tensors ``level0..levelL-1`` of shape (N, H*W, C)), written
incrementally so that fitting never holds more than one batch of pyramids in memory, and read back
through a read-only memory map so that ``predict`` touches only the retrieved neighbours.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from .errors import SpadeError

_DTYPES = {"F16": np.float16, "F32": np.float32}


class BankWriter:
    """Pre-sized safetensors file that rows (training images) are written into, in any order."""

    def __init__(self, path: Path, n: int, shapes: list[tuple[int, int]], dtype: str = "F16") -> None:
        self.path = Path(path)
        self.n = n
        self.shapes = shapes
        self.dtype = dtype
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        header: dict[str, object] = {}
        offset = 0
        self.row_bytes: list[int] = []
        self.starts: list[int] = []
        for i, (p, c) in enumerate(shapes):
            size = n * p * c * itemsize
            header[f"level{i}"] = {"dtype": dtype, "shape": [n, p, c], "data_offsets": [offset, offset + size]}
            self.starts.append(offset)
            self.row_bytes.append(p * c * itemsize)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.total = self.data_start + offset
        self.fh = open(self.path, "wb")
        self.fh.write(struct.pack("<Q", len(raw)))
        self.fh.write(raw)
        self.fh.truncate(self.total)

    def write(self, index: int, levels: list[np.ndarray]) -> None:
        """Write rows ``index .. index+B-1``; ``levels[i]`` has shape (B, H*W, C)."""
        np_dtype = _DTYPES[self.dtype]
        for i, arr in enumerate(levels):
            arr = np.ascontiguousarray(arr, dtype=np_dtype)
            if arr.shape[1:] != self.shapes[i]:
                raise ValueError(f"level {i}: shape {arr.shape[1:]} != {self.shapes[i]}")
            self.fh.seek(self.data_start + self.starts[i] + index * self.row_bytes[i])
            self.fh.write(arr.tobytes())

    def close(self) -> None:
        self.fh.flush()
        self.fh.close()


class Bank:
    """Read-only, memory-mapped view of a bank file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise ValueError("file is shorter than its header")
                (n_header,) = struct.unpack("<Q", head)
                if n_header > min(size, 100 << 20):
                    raise ValueError("header length is out of range")
                header = json.loads(fh.read(n_header))
        except FileNotFoundError:
            raise SpadeError(f"{self.path}: model file is missing") from None
        except (ValueError, UnicodeDecodeError, struct.error) as exc:
            raise SpadeError(f"{self.path}: damaged feature bank ({exc})") from None
        data_start = 8 + n_header
        self.levels: list[np.memmap] = []
        i = 0
        while f"level{i}" in header:
            meta = header[f"level{i}"]
            start, end = meta["data_offsets"]
            if meta["dtype"] not in _DTYPES or data_start + end > size:
                raise SpadeError(f"{self.path}: damaged feature bank (level{i} is truncated or malformed)")
            shape = tuple(meta["shape"])
            self.levels.append(
                np.memmap(self.path, dtype=_DTYPES[meta["dtype"]], mode="r", offset=data_start + start, shape=shape)
            )
            i += 1
        if not self.levels:
            raise SpadeError(f"{self.path}: damaged feature bank (no levels)")
        self.n = int(self.levels[0].shape[0])

    def gather(self, level: int, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` of one level as an array (B, H*W, C) in the stored dtype."""
        return np.asarray(self.levels[level][np.asarray(indices)])


def file_sha256(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()

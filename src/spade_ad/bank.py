"""The memory bank: per training image, its feature pyramid (and a thumbnail), streamed to disk in ``fit``.

The file is a valid safetensors file (fp16 tensors ``level0..levelL-1`` of shape (N, H*W, C) and uint8
``thumbnails`` (N, T, T, 3)), written incrementally so that fitting never holds more than one batch in
memory, and read back row by row with positioned reads, so that ``predict`` reads only the retrieved
neighbours and resident memory does not grow with the number of training images.

Banks written since the search index was introduced also hold that index
(:mod:`spade_ad.correspondence.cells`): per training image, tensors ``cells<l>.*`` with one row per
training image like the levels, and a few small model-wide tensors named ``codebook<l>.*`` (no row per
training image; :meth:`BankWriter.append` adds them at the end of the file). The index is derived from
the level rows alone; banks without it are read as before (the search then builds its cells per image).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import SpadeError
from .io import write_error

_DTYPES = {"F16": np.float16, "F32": np.float32, "U8": np.uint8, "I32": np.int32}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_HEADER_RESERVE = 4096  # header bytes kept free for the tensors appended at the end


def level_key(level: int) -> str:
    """The name of pyramid level ``level``'s tensor in a bank file: (N, h*w, C) float16 rows."""
    return f"level{level}"


class BankWriter:
    """Pre-sized safetensors file that rows (training images) are written into, in any order; small
    whole tensors can be appended at the end (:meth:`append`) before :meth:`close`."""

    def __init__(self, path: Path, n: int, tensors: dict[str, tuple[tuple[int, ...], str]]) -> None:
        """``tensors``: name -> (per-row shape, safetensors dtype)."""
        self.path = Path(path)
        self.n = n
        self.tensors = tensors
        self.header: dict[str, object] = {}
        offset = 0
        self.row_bytes: dict[str, int] = {}
        self.starts: dict[str, int] = {}
        for name, (shape, dtype) in tensors.items():
            row = int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize
            self.header[name] = {"dtype": dtype, "shape": [n, *shape], "data_offsets": [offset, offset + n * row]}
            self.starts[name] = offset
            self.row_bytes[name] = row
            offset += n * row
        self.end = offset
        raw = json.dumps(self.header, separators=(",", ":")).encode()
        self.header_len = len(raw) + _HEADER_RESERVE + (-(len(raw) + _HEADER_RESERVE) % 8)
        self.data_start = 8 + self.header_len
        with self._writing():
            self.fh = open(self.path, "w+b")
            self.fh.write(struct.pack("<Q", self.header_len))
            self.fh.write(raw.ljust(self.header_len))
            self.fh.truncate(self.data_start + offset)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write (disk full, ...) is one line naming the bank file."""
        try:
            yield
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def append(self, name: str, arr: np.ndarray) -> None:
        """Add a whole tensor (no row per training image) at the end of the file."""
        if name in self.header:
            raise ValueError(f"{name}: tensor already in the bank")
        arr = np.ascontiguousarray(arr)
        data = arr.tobytes()
        self.header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                             "data_offsets": [self.end, self.end + len(data)]}
        raw = json.dumps(self.header, separators=(",", ":")).encode()
        if len(raw) > self.header_len:
            raise ValueError("bank header reserve exceeded")
        with self._writing():
            self.fh.seek(self.data_start + self.end)
            self.fh.write(data)
            self.end += len(data)
            self.fh.seek(8)
            self.fh.write(raw.ljust(self.header_len))

    def flush(self) -> None:
        """Make what was written so far readable by :class:`Bank` (which sees the rows and appended tensors)."""
        with self._writing():
            self.fh.flush()

    def write(self, index: int, rows: dict[str, np.ndarray]) -> None:
        """Write rows ``index .. index+B-1`` of each named tensor (arrays of shape (B, *row_shape))."""
        for name, arr in rows.items():
            shape, dtype = self.tensors[name]
            arr = np.ascontiguousarray(arr, dtype=_DTYPES[dtype])
            if arr.shape[1:] != tuple(shape):
                raise ValueError(f"{name}: row shape {arr.shape[1:]} != {tuple(shape)}")
            with self._writing():
                self.fh.seek(self.data_start + self.starts[name] + index * self.row_bytes[name])
                self.fh.write(arr.tobytes())

    def close(self) -> None:
        try:
            with self._writing():
                self.fh.flush()
                os.fsync(self.fh.fileno())
        finally:
            with contextlib.suppress(OSError):
                self.fh.close()


class Bank:
    """Read-only access to a bank file by rows (positioned reads; nothing is mapped or cached)."""

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
        self.data_start = 8 + n_header
        self.meta: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                start, end = meta["data_offsets"]
                dtype = np.dtype(_DTYPES[meta["dtype"]])
                shape = tuple(int(x) for x in meta["shape"])
            except (KeyError, TypeError, ValueError):
                raise SpadeError(f"{self.path}: damaged feature bank ({name} is malformed)") from None
            if self.data_start + end > size or end - start != int(np.prod(shape)) * dtype.itemsize:
                raise SpadeError(f"{self.path}: damaged feature bank ({name} is truncated or malformed)")
            self.meta[name] = (self.data_start + start, shape, dtype)
        self.n_levels = sum(1 for k in self.meta if k.startswith(level_key(0)[:-1]))
        if not self.n_levels or any(level_key(i) not in self.meta for i in range(self.n_levels)):
            raise SpadeError(f"{self.path}: damaged feature bank (no feature levels)")
        self.n = self.meta[level_key(0)][1][0]
        self._fd = os.open(self.path, os.O_RDONLY)
        # closed when the bank is collected (a deleted bank file's space is freed then): nothing may keep a
        # bank alive beyond its model (caches refer to banks weakly, see correspondence.gallery)
        weakref.finalize(self, os.close, self._fd)

    def rows(self, name: str, indices: np.ndarray | list[int]) -> np.ndarray:
        """Rows ``indices`` of tensor ``name`` as an array (B, *row_shape) in the stored dtype."""
        start, shape, dtype = self.meta[name]
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape)) * dtype.itemsize
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), *row_shape), dtype)
        buf = out.reshape(len(idx), -1).view(np.uint8)
        for j, i in enumerate(idx):
            if not 0 <= i < shape[0]:
                raise IndexError(f"row {i} out of range for {name} with {shape[0]} rows")
            data = os.pread(self._fd, row_bytes, start + int(i) * row_bytes)
            if len(data) != row_bytes:
                raise SpadeError(f"{self.path}: damaged feature bank (short read)")
            buf[j] = np.frombuffer(data, np.uint8)
        return out

    def gather(self, level: int, indices: np.ndarray | list[int]) -> np.ndarray:
        """Feature rows of one pyramid level: (B, H*W, C) fp16."""
        return self.rows(level_key(level), indices)

    def level_size(self, level: int) -> tuple[int, int]:
        """(positions h*w, channels C) of each training image's rows at pyramid level ``level``."""
        hw, c = self.meta[level_key(level)][1][1:]
        return int(hw), int(c)

    def tensor(self, name: str) -> np.ndarray:
        """A whole tensor (for the small model-wide ones) in its stored dtype and shape."""
        start, shape, dtype = self.meta[name]
        size = int(np.prod(shape)) * dtype.itemsize
        data = os.pread(self._fd, size, start)
        if len(data) != size:
            raise SpadeError(f"{self.path}: damaged feature bank (short read)")
        return np.frombuffer(data, dtype).reshape(shape).copy()

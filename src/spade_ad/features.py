"""Stage 1: images -> feature pyramid (strides 4, 8, 16) and global vector, with an ImageNet backbone,
and what the memory bank stores per training image (:class:`BankRows`, :func:`bank_rows`,
:func:`write_bank`).

Images are prepared by the model's :class:`~spade_ad.preprocess.Preprocessor`. On a CPU the backbone
runs one image at a time: convolution results depend on the batch shape in the last bits, and one at
a time they do not, so an image gets the same features (and the same scores) whether it is scored in
a batch by ``spade-ad predict``, alone by the inspector, or during ``fit``; it is also faster on a CPU.
On a GPU images run in batches under bf16 autocast.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from spade_ad_runtime.zone import Zone

from .backbones import FeatureExtractor
from .bank import Bank, BankWriter, level_key
from .correspondence.cells import index_spec, write_index
from .correspondence.runtime import COMPUTE_LOCK
from .errors import SpadeError
from .persistence import crash_point
from .preprocess import Preprocessor
from .tiling import TileGrid, iter_tiles

THUMB = 128  # side of the training-image thumbnails kept in the model (for explanations)
TILE_CHUNK = 64  # tiles of a tiled model run through the backbone at once (memory: a chunk, not an image)
_THUMB_PREP = Preprocessor("resize", THUMB)
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def batches(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive batches covering ``range(n)``."""
    for s in range(0, n, batch_size):
        yield s, min(n, s + batch_size)


@torch.no_grad()
def extract(
    backbone: FeatureExtractor,
    images: Sequence[np.ndarray],
    prep: Preprocessor,
    device: torch.device,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pyramid levels as (B, H*W, C) fp32 and global vectors (B, D) fp32, on ``device``."""
    x = torch.stack([prep.to_input(img, device) for img in images])
    x = backbone.normalise(x)
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            pyramid, global_vec = backbone(x)
    else:
        outs = [backbone(x[i : i + 1]) for i in range(len(x))]
        pyramid = [torch.cat([o[0][li] for o in outs]) for li in range(len(outs[0][0]))]
        global_vec = torch.cat([o[1] for o in outs])
    levels = [p.float().permute(0, 2, 3, 1).reshape(p.shape[0], -1, p.shape[1]).contiguous() for p in pyramid]
    return levels, global_vec.float()


def level_shapes(backbone: FeatureExtractor, prep: Preprocessor) -> list[tuple[int, int]]:
    """(H, W) of each pyramid level for the network input of ``prep``."""
    with torch.no_grad():
        pyramid, _ = backbone(torch.zeros(1, 3, *prep.input_shape, device=backbone.mean.device))
    return [(int(p.shape[2]), int(p.shape[3])) for p in pyramid]


class BankRows(NamedTuple):
    """Feature-bank rows of consecutive training images ``start .. start+B-1`` (:func:`bank_rows`): one row
    per image, or per tile of each image in a tiled model (B * tiles rows, image by image)."""

    start: int
    levels: list[np.ndarray]  # per pyramid level, (rows, H*W, C) float16: what the bank stores
    global_: np.ndarray  # (rows, D) float32 global vectors
    thumbnails: np.ndarray  # (rows, THUMB, THUMB, 3) uint8
    ids: list[str] | None = None  # the images' identities (image_id), one per image; None: unknown


def image_id(image: np.ndarray) -> str:
    """A training image's identity: the SHA-256 of its decoded pixels (HxWx3 uint8) and their shape.

    It does not depend on how a path is spelled, on the file's name or format (a PNG and a lossless copy
    are the same image), or on whether it came as a file or an array; a model never holds one image twice.
    """
    a = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)
    return h.hexdigest()


def network_inputs(arrays: Sequence[np.ndarray], grid: TileGrid | None,
                   zone: Zone | None = None) -> Iterator[list[np.ndarray]]:
    """The network's inputs for decoded images, in chunks: the images themselves (one chunk), or with a
    tile grid their tiles, image by image in the grid's order, at most :data:`TILE_CHUNK` at a time (each
    image grey outside the inspection ``zone`` first: a tiled model's zone is the whole image's)."""
    if grid is None:
        yield list(arrays)
        return
    chunk: list[np.ndarray] = []
    for a in arrays:
        for t in iter_tiles(a if zone is None else zone.fill_outside(a), grid):
            chunk.append(t)
            if len(chunk) == TILE_CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def bank_rows(net: FeatureExtractor, prep: Preprocessor, device: torch.device, arrays: Sequence[np.ndarray],
              start: int, grid: TileGrid | None = None, zone: Zone | None = None) -> BankRows:
    """What the bank stores for training images ``start, start+1, ...`` (decoded ``arrays``): a row per
    image, or with a tile ``grid`` a row per tile.

    The one definition of a bank row: ``fit`` and ``add`` use it, and so do Ray workers
    (:mod:`spade_ad.distributed`), so all write the same bytes.
    """
    levels: list[list[np.ndarray]] = []
    gvecs, thumbs = [], []
    for inputs in network_inputs(arrays, grid, zone if grid is not None else None):
        with COMPUTE_LOCK:
            lv, gvec = extract(net, inputs, prep, device)
        levels.append([x.cpu().numpy().astype(np.float16) for x in lv])
        gvecs.append(gvec.cpu().numpy())
        thumbs.append(torch.stack([_THUMB_PREP.to_input(x) for x in inputs]).round().byte().permute(0, 2, 3, 1))
    return BankRows(start, [np.concatenate([c[li] for c in levels]) for li in range(len(levels[0]))],
                    np.concatenate(gvecs), torch.cat(thumbs).numpy(), [image_id(x) for x in arrays])


def check_distinct(old_names: list[str], old_ids: list[str | None], names: list[str],
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


class OldRows(NamedTuple):
    """The rows a new bank keeps from the current one (:func:`write_bank`)."""

    bank: Bank
    global_: torch.Tensor
    names: list[str]
    ids: list[str | None]
    keep: list[int]


def write_bank(path: Path, net: FeatureExtractor, shapes: list[tuple[int, int]], k: int, old: OldRows | None,
               rows: Iterable[BankRows], names: Sequence[str],
               progress: Progress | None, per_image: int = 1) -> tuple[torch.Tensor, Bank, list[str | None]]:
    """A new bank at ``path``: the images ``old.keep`` of the current bank, then ``rows`` for the images
    ``names`` (at their indices, in any order), streamed; then the search index for galleries of ``k``
    rows. ``per_image``: bank rows per image (a tiled model's tiles). An image that is already among the
    kept ones, or that comes twice (identical pixels, :func:`image_id`), is refused before the bank is
    finished.

    Returns the global vectors of all its rows (kept ones from ``old.global_``), the bank and the ids.
    """
    sizes = [(h * w, c) for (h, w), c in zip(shapes, net.channels, strict=True)]
    spec: dict[str, tuple[tuple[int, ...], str]] = {level_key(i): (sh, "F16") for i, sh in enumerate(sizes)}
    spec["thumbnails"] = ((THUMB, THUMB, 3), "U8")
    copied = list(spec)  # the index is rebuilt from the rows (it depends on the whole bank)
    spec.update(index_spec(sizes))
    keep = old.keep if old is not None else []
    nk, n, t = len(keep), len(names), per_image
    writer = BankWriter(path, (nk + n) * t, spec)
    global_ = np.zeros(((nk + n) * t, net.global_dim), dtype=np.float32)
    seen = np.zeros(n, dtype=bool)
    new_ids: list[str | None] = [None] * n
    try:
        if old is not None:
            _copy_rows(writer, old, copied, global_, progress, t)
        for r in rows:
            b = len(r.global_) // t
            if len(r.global_) != b * t:
                raise SpadeError(f"{names[r.start]}: got {len(r.global_)} bank rows, not {t} per image")
            writer.write((nk + r.start) * t, {**{level_key(i): lv for i, lv in enumerate(r.levels)},
                                              "thumbnails": r.thumbnails})
            crash_point("fit-bank")
            global_[(nk + r.start) * t : (nk + r.start + b) * t] = r.global_
            seen[r.start : r.start + b] = True
            if r.ids is not None:
                new_ids[r.start : r.start + b] = r.ids
            if progress:
                progress("fit", int(seen.sum()), n)
        if not seen.all():
            raise SpadeError(f"{names[int(np.argmin(seen))]}: no features were computed for this image")
        kept_ids = [old.ids[i] for i in keep] if old is not None else []
        check_distinct([old.names[i] for i in keep] if old is not None else [], kept_ids, list(names), new_ids)
        write_index(writer, k)
    except BaseException:
        with contextlib.suppress(SpadeError, OSError):  # the first error is the one reported
            writer.close()
        path.unlink(missing_ok=True)
        raise
    writer.close()
    return torch.from_numpy(global_), Bank(path), kept_ids + new_ids


def _copy_rows(writer: BankWriter, old: OldRows, names: list[str], global_: np.ndarray,
               progress: Progress | None, per_image: int) -> None:
    """Kept images' rows are copied from the current bank, never recomputed."""
    rows = [i * per_image + j for i in old.keep for j in range(per_image)]
    nk = len(rows)
    for a, b in batches(nk, 256):
        writer.write(a, {name: old.bank.rows(name, rows[a:b]) for name in names})
        global_[a:b] = old.global_[rows[a:b]].numpy()
        if progress:
            progress("copy", b, nk)


__all__ = ["extract", "level_shapes", "batches", "BankRows", "bank_rows", "network_inputs", "TILE_CHUNK",
           "image_id", "check_distinct", "OldRows",
           "write_bank", "THUMB"]

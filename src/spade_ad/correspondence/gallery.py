"""Stage 3, first steps: gather the retrieved training images' pyramids (the gallery) from the bank and
score every test position against all gallery positions of the same level (exact search).

With a bank that holds the search index (:mod:`.cells`), each neighbour's rows are prepared once and kept
in a bounded cache shared by all the test images of a model (work shared across test images: consecutive
images share most of their neighbours), and a test image's gallery is merged from them; otherwise (older
banks, GPUs, small problems) the gallery is gathered and searched as is. Both give the same bits.

On a CPU with several threads allowed, the test images of a batch are searched at once on worker threads,
one image per thread and one thread per op: the results do not depend on it (they are canonical, see
:mod:`.search`), and whole images are independent work, so a core taken by another process delays only
the image on it.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from ..bank import Bank
from .cells import LevelIndex, Prepared, index_names, load_level, merge, prepare_many
from .runtime import engine_threads
from .search import nn_distances, search_merged, search_plain

CACHE_BYTES = 256 << 20  # prepared neighbour rows kept per bank (least recently used ones are dropped)
INDEX_MIN_WORK = 5e8  # queries x gallery rows x channels below which the plain search is as fast
INDEX_MIN_QUERIES = 400  # with fewer queries, per-unit overheads outweigh what the bounds save
PREPARE_ROWS = 1 << 14  # neighbour rows prepared at once (fewer ops; more would fall out of the caches)
INDEX_MAX_KAPPA = 32  # above, the plain search (its bounds need kappa distinct rows per sub-block table)


class GalleryCache:
    """A bank's index (per level, or ``None``) and its prepared rows, least recently used dropped first.

    It refers to its bank weakly: the caches are kept in a map weakly keyed by bank, and a strong reference
    from the value would keep the key (and its open, possibly deleted, file) alive for ever.
    """

    def __init__(self, bank: Bank, max_bytes: int = CACHE_BYTES) -> None:
        self._bank = weakref.ref(bank)
        self.levels: list[LevelIndex | None] = [load_level(bank, li) for li in range(bank.n_levels)]
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, int], Prepared] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    @property
    def bank(self) -> Bank:
        """The bank (alive while anybody uses this cache: its callers hold it)."""
        bank = self._bank()
        if bank is None:
            raise RuntimeError("the bank of this gallery cache was released")
        return bank

    def prepared(self, level: int, indices: list[int], threads: int = 1) -> list[Prepared]:
        """The prepared rows of training images ``indices`` at ``level`` (read and prepared if not cached,
        on up to ``threads`` threads)."""
        lev = self.levels[level]
        assert lev is not None
        bank = self.bank
        with self.lock:
            missing = sorted({i for i in indices if (level, i) not in self.entries})
            if missing:
                unit_name, same_name = index_names(level)[:2]
                step = max(1, PREPARE_ROWS // bank.level_size(level)[0])

                def chunk(a: int) -> list[Prepared]:
                    ids = missing[a : a + step]
                    where = f"{bank.path} (training images {ids[0]}..{ids[-1]})"
                    return prepare_many(bank.gather(level, ids), bank.rows(unit_name, ids),
                                        bank.rows(same_name, ids), lev, where)

                starts = list(range(0, len(missing), step))
                for a, prepared in zip(starts, _each(chunk, starts, threads), strict=True):
                    for i, p in zip(missing[a : a + step], prepared, strict=True):
                        self.entries[(level, i)] = p
                        self.bytes += p.nbytes
            out = []
            for i in indices:
                self.entries.move_to_end((level, i))
                out.append(self.entries[(level, i)])
            keep = {(level, i) for i in indices}
            while self.bytes > self.max_bytes and len(self.entries) > len(keep):
                key = next(k for k in self.entries if k not in keep)
                self.bytes -= self.entries.pop(key).nbytes
            return out


_CACHES: weakref.WeakKeyDictionary[Bank, GalleryCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def gallery_cache(bank: Bank) -> GalleryCache:
    """The :class:`GalleryCache` of ``bank`` (one per bank object, dropped with it)."""
    with _CACHES_LOCK:
        cache = _CACHES.get(bank)
        if cache is None:
            cache = _CACHES[bank] = GalleryCache(bank)
        return cache


def release_galleries() -> None:
    """Drop every bank's cached prepared rows (they are rebuilt on demand)."""
    with _CACHES_LOCK:
        _CACHES.clear()


def indexed_pays(device: torch.device, n_q: int, n_g: int, dim: int, kappa: int) -> bool:
    """Whether the merged gallery of the index is used (CPU, big enough, kappa not too large)."""
    return (device.type == "cpu" and kappa <= INDEX_MAX_KAPPA and n_q >= INDEX_MIN_QUERIES
            and float(n_q) * n_g * dim >= INDEX_MIN_WORK)


def level_maps(
    levels: list[torch.Tensor],
    neighbours: torch.Tensor,
    bank: Bank,
    shapes: list[tuple[int, int]],
    kappa: int,
    tile_bytes: int,
) -> list[torch.Tensor]:
    """Per level, (B, h, w): the mean distance of each test feature to its ``kappa`` nearest gallery features.

    ``levels``: per level, (B, h*w, C) test features; ``neighbours``: (B, k) training indices (stage 2).
    The gallery of image b is every position of its k neighbours at the same level, read from ``bank``.
    """
    dev = levels[0].device
    cache = gallery_cache(bank)
    out = []
    for li, (h, w) in enumerate(shapes):
        grid = torch.empty(len(neighbours), h * w, device=dev)
        lev = cache.levels[li]
        dim = levels[li].shape[-1]
        plain = list(range(len(neighbours)))
        nbs = [[int(i) for i in np.asarray(neighbours[b])] for b in plain]
        if lev is not None and indexed_pays(dev, h * w, len(nbs[0]) * h * w, dim, kappa):
            threads = torch.get_num_threads()
            with engine_threads(1, 0.0):  # (one thread per chunk of neighbours)
                cache.prepared(li, sorted({i for nb in nbs for i in nb}), threads)  # the batch's neighbours at once
                parts = [cache.prepared(li, nb) for nb in nbs]
            indexed = [b for b in plain if all(p.finite for p in parts[b])]
            plain = [b for b in plain if b not in set(indexed)]
            _search_images(levels[li], parts, lev, kappa, tile_bytes, grid, indexed)
        if dev.type == "cpu":
            _plain_images(levels[li], bank, li, nbs, (h, w), kappa, tile_bytes, grid, plain)
        for b in plain if dev.type != "cpu" else []:
            gallery = torch.from_numpy(bank.gather(li, np.asarray(nbs[b])))
            gallery = gallery.to(dev).float().reshape(-1, gallery.shape[-1])
            grid[b] = nn_distances(levels[li][b], gallery, kappa, tile_bytes, query_hw=(h, w), gallery_hw=(h, w))
        out.append(grid.view(-1, h, w))
    return out


def _search_images(queries: torch.Tensor, parts: list[list[Prepared]], lev: LevelIndex, kappa: int, tile_bytes: int,
                   grid: torch.Tensor, images: list[int]) -> None:
    """``grid[b]``: the search of test image b's ``queries[b]`` in the gallery merged from ``parts[b]``."""

    def one(b: int) -> None:
        merged = merge(parts[b], lev, need_mult=kappa > 1)
        grid[b] = search_merged(queries[b], merged, kappa, tile_bytes)

    n_q, dim = queries.shape[1:]
    _run_images(one, images, float(n_q) * sum(p.aug.shape[0] for p in parts[images[0]]) * dim if images else 0.0)


def _plain_images(queries: torch.Tensor, bank: Bank, level: int, nbs: list[list[int]], hw: tuple[int, int],
                  kappa: int, tile_bytes: int, grid: torch.Tensor, images: list[int]) -> None:
    """``grid[b]``: the plain search of test image b's ``queries[b]`` in its neighbours' rows (CPU)."""

    def one(b: int) -> None:
        gallery = torch.from_numpy(bank.gather(level, np.asarray(nbs[b])))
        gallery = gallery.float().reshape(-1, gallery.shape[-1])
        grid[b] = search_plain(queries[b], gallery, kappa, tile_bytes, query_hw=hw, gallery_hw=hw)

    n_q, dim = queries.shape[1:]
    _run_images(one, images, float(n_q) * len(nbs[0]) * hw[0] * hw[1] * dim if images else 0.0)


_WORKERS: list[ThreadPoolExecutor] = []  # threads that search test images (or prepare neighbours) in parallel


def _run_images(one: Callable[[int], None], images: list[int], work: float) -> None:
    """``one(b)`` for each test image: with several CPU threads allowed, one image per thread at a time
    (each single-threaded; whole images are independent, so a busy core delays only its own image, where
    threads inside each GEMM would wait for each other), else under :func:`engine_threads`."""
    threads = torch.get_num_threads()
    if min(threads, len(images)) < 2:
        for b in images:
            with engine_threads(None, work):
                one(b)
        return
    with engine_threads(1, 0.0):  # every search single-threaded, on its own thread
        _each(one, images, threads)


T = TypeVar("T")
R = TypeVar("R")


def _each(fn: Callable[[T], R], items: list[T], threads: int) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``threads`` threads (this one and workers), taking items in turn.
    The caller sets torch to one thread per op (see :func:`_run_images`)."""
    n = min(threads, len(items))
    if n < 2:
        return [fn(x) for x in items]
    if not _WORKERS or _WORKERS[0]._max_workers < n - 1:  # noqa: SLF001
        _WORKERS[:] = [ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="spade-images")]
    todo = iter(enumerate(items))
    lock = threading.Lock()
    out: dict[int, R] = {}

    def worker() -> None:
        while True:
            with lock:
                nxt = next(todo, None)
            if nxt is None:
                return
            out[nxt[0]] = fn(nxt[1])

    others = [_WORKERS[0].submit(worker) for _ in range(n - 1)]
    try:
        worker()
    finally:
        for f in others:
            f.result()
    return [out[i] for i in range(len(items))]


__all__ = ["level_maps", "gallery_cache", "release_galleries", "GalleryCache", "CACHE_BYTES"]

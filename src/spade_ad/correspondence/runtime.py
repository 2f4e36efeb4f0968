"""Runtime heuristics of the exact search: how many CPU threads, and reusable work buffers.

Nothing here changes a result: the search is exact whatever the thread count or buffer reuse. The
thread count of torch is process-global, and the backbone's convolutions round differently with a
different count, so the model serialises its compute (:data:`COMPUTE_LOCK`): concurrent callers (the
inspector's thread pool) get exactly the results of one caller, and the engine may adjust the
thread count during a call without disturbing anybody else.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

_PROBE_TTL = 0.5  # seconds a measurement of whether threads pay is trusted
_STALL = 3.0  # a GEMM block this many times slower than the best one means the threads stall
_THREADS_MIN_WORK = 1e8  # P * M * C below which one thread is used (no measurement)

_PROBE: dict[str, float | int | bool] = {"at": -math.inf, "threads": 0, "ok": False}

COMPUTE_LOCK = threading.RLock()
"""Held by the model around feature extraction and scoring (see the module docstring)."""


@contextmanager
def engine_threads(threads: int | None, work: float) -> Iterator[None]:
    """Run the search with ``threads`` CPU threads (default: torch's setting) while they pay, restored
    afterwards. Parallel regions are used only while a quick measurement says they pay: when the cores
    are busy with other processes, each of the engine's hundreds of mid-sized parallel ops waits for a
    descheduled thread, and one thread is several times faster (the measurement is remembered for half
    a second)."""
    with COMPUTE_LOCK:
        before = torch.get_num_threads()
        want = max(1, before if threads is None else int(threads))
        torch.set_num_threads(1)
        try:
            if want > 1 and work >= _THREADS_MIN_WORK and parallel_pays(want):
                torch.set_num_threads(want)
            yield
        finally:
            torch.set_num_threads(before)


_POOL: list[ThreadPoolExecutor] = []
_SPLIT_MIN_WORK = 1 << 21  # pair-rows (multiply-adds / C) below which a loop is not split


def split_work(run: Callable[[int, int], None], work: list[int]) -> None:
    """Run ``run(lo, hi)`` over the items of a loop whose costs are ``work``: on this thread, or - when torch
    would use several threads here (:func:`engine_threads` found that they pay) - split in two halves of
    equal work, the second on a worker thread, both single-threaded. The items' outputs must be disjoint.
    (The search's loops are many mid-sized GEMMs: one op per core beats two threads per op.)"""
    n = len(work)
    threads = torch.get_num_threads()
    total = sum(work)
    if threads < 2 or n < 2 or total < _SPLIT_MIN_WORK:
        run(0, n)
        return
    acc, mid = 0, n
    for i, w in enumerate(work):
        acc += w
        if 2 * acc >= total:
            mid = max(1, min(n - 1, i + 1))
            break
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="spade-engine"))
    torch.set_num_threads(1)
    try:
        other = _POOL[0].submit(run, mid, n)
        try:
            run(0, mid)
        finally:
            other.result()
    finally:
        torch.set_num_threads(threads)


_SCRATCH = threading.local()
_SCRATCH_MAX = 64 << 20


def scratch(name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A reusable fp32 work buffer (uninitialised). On the CPU, freshly allocated multi-megabyte tensors
    page-fault on first touch at every call, which costs more than the arithmetic on them, so buffers of
    up to ``_SCRATCH_MAX`` bytes are kept per thread and grown as needed (see :func:`release_scratch`)."""
    n = math.prod(shape)
    if device.type != "cpu" or 4 * n > _SCRATCH_MAX:
        return torch.empty(shape, device=device)
    cache = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = cache.get(name)
    if buf is None or buf.numel() < n:
        buf = cache[name] = torch.empty(n)
    return buf[:n].view(shape)


def release_scratch() -> None:
    """Free this thread's work buffers of :func:`nn_distances` (they are reused between calls)."""
    _SCRATCH.__dict__.pop("bufs", None)



def watch_threads(pace: list[float], now: float) -> None:
    """Drop to one thread for the rest of the call (and the next half second) when the GEMM blocks get
    several times slower than the best seen: other processes took the cores, parallel regions stall."""
    pace[0] = min(pace[0], now)
    if now > _STALL * pace[0]:
        torch.set_num_threads(1)
        _PROBE.update(at=time.monotonic(), ok=False)


def parallel_pays(threads: int) -> bool:
    """Whether ``threads`` intra-op threads currently speed up a GEMM block, measured (and remembered
    for half a second). On a machine whose cores are busy with other processes, every parallel region
    waits for a descheduled thread and the engine's hundreds of mid-sized ops get many times slower
    than on one thread; there, one thread it is."""
    now = time.monotonic()
    if _PROBE["threads"] == threads and now - _PROBE["at"] < _PROBE_TTL:
        return bool(_PROBE["ok"])
    a = torch.ones(256, 64)
    b = torch.ones(64, 2048)
    out = torch.empty(256, 2048)

    def timed() -> float:
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        return time.perf_counter() - t

    torch.set_num_threads(threads)
    timed()  # (wakes the thread pool)
    torch.set_num_threads(1)
    one = min(timed() for _ in range(2))
    torch.set_num_threads(threads)
    many = sorted(timed() for _ in range(3))[1]
    torch.set_num_threads(1)
    ok = many < 0.8 * one
    _PROBE.update(at=time.monotonic(), threads=threads, ok=ok)
    return ok



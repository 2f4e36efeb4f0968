"""Stage 3 of a batch on worker processes: every core searches, none waits for Python's lock.

The search is many small numpy steps between its matrix products, and those steps hold Python's lock:
two threads of one process reach about 1.5 times one thread's rate, two processes twice it (measured on
bottle, 2-core AMD EPYC: 8.5 -> 16.0 images/s for the search alone). So the detector keeps, for batches,
a pool of processes that each hold the deploy folder's :class:`.PixelSearch`; the detector's own process
decodes, runs the backbone and finishes the maps while they search. The answer does not depend on it (the
search is the same code on the same rows).

The workers are forked from the detector's process (Linux): they inherit the bank as it was opened and
checked (nothing is read again, nothing is pickled but features and maps), start in milliseconds and need
no ``if __name__ == "__main__"`` guard in the user's script. They ignore Ctrl+C (the detector's process
handles it and stops them), use one BLAS thread each, and end with the detector's process even if it is
killed. Where fork is not the platform's way (macOS, Windows), :func:`start` returns ``None`` and the
detector searches in its own process.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from .blas import one_blas_thread
from .gallery import PixelSearch

_SEARCH: PixelSearch | None = None  # the worker's copy of the detector's search (inherited through fork)


def _start(search: PixelSearch) -> None:
    global _SEARCH
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the detector process's to handle
    try:  # end with the detector's process, even if it is killed (Linux: PR_SET_PDEATHSIG = 1)
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        pass
    one_blas_thread()
    search.reset_lock()  # (another thread of the parent may have held it when this process was forked)
    _SEARCH = search


def _level_maps(levels: list[np.ndarray], gallery: np.ndarray) -> list[np.ndarray]:
    assert _SEARCH is not None, "worker not started"
    return _SEARCH.level_maps(levels, gallery)


class SearchWorkers:
    """``processes`` worker processes, each holding ``search`` (forked when the first search is submitted)."""

    def __init__(self, search: PixelSearch, processes: int) -> None:
        self.processes = processes
        self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                                         initializer=_start, initargs=(search,))

    def submit(self, levels: list[np.ndarray], gallery: np.ndarray) -> Future[list[np.ndarray]]:
        """Stage 3 of one image: :meth:`.PixelSearch.level_maps` on a worker."""
        return self._pool.submit(_level_maps, levels, gallery)

    def close(self, wait: bool = True) -> None:
        """Stop the workers (queued searches are dropped; a running one finishes; ``wait``: for them to end)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)


def start(search: PixelSearch, processes: int) -> SearchWorkers | None:
    """Workers for ``search``, or ``None`` where processes are not forked (not Linux)."""
    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return None
    return SearchWorkers(search, processes)


__all__ = ["SearchWorkers", "start"]

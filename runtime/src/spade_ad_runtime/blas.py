"""BLAS threads while the detector scores.

The search's many small matrix products are slower when the BLAS starts its own threads for each, and
with one search per core those threads oversubscribe the cores (measured on bottle, 2 cores: one process
3.6 images/s with OpenBLAS's threads against 5.1 with one; two searches at once 2.9 against 6.1).
:func:`single_threaded_blas` limits every loaded BLAS to one thread while the detector scores and restores
it afterwards; :func:`one_blas_thread` does so for good in a search worker. Both go through
``threadpoolctl`` (the small, dependency-free library scikit-learn uses for the same purpose: it finds
the BLAS that numpy loaded, whichever it is).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def one_blas_thread() -> None:
    """Every loaded BLAS on one thread, for the rest of this process (a search worker)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


__all__ = ["single_threaded_blas", "one_blas_thread"]

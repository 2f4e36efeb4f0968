"""BLAS threads while the detector scores several images at once.

The detector runs one image per worker thread; a BLAS library that also starts its own threads for each
of the search's many small matrix products oversubscribes the cores (measured on bottle, 2 cores: 2.9
images/s with OpenBLAS's threads against 6.1 with one each). :func:`single_threaded_blas` limits every
loaded BLAS to one thread for the duration and restores it afterwards, through ``threadpoolctl`` (the
small, dependency-free library scikit-learn uses for the same purpose: it finds the BLAS that numpy
loaded, whichever it is).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


__all__ = ["single_threaded_blas"]

"""spade-ad-runtime: run spade-ad deploy folders (``spade-ad export``) without PyTorch.

>>> from spade_ad_runtime import Detector                     # doctest: +SKIP
>>> results = Detector.load("deploy").predict(["part.png"])   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``Detector``, ``ImageResult`` and ``SpadeError`` on first use (spade-ad imports this package
    for its io and run protocol without loading the detector's dependencies)."""
    if name == "Detector":
        from .detector import Detector

        return Detector
    if name == "ImageResult":
        from .result import ImageResult

        return ImageResult
    if name == "SpadeError":
        from .errors import SpadeError

        return SpadeError
    raise AttributeError(f"module 'spade_ad_runtime' has no attribute {name!r}")


__all__ = ["Detector", "ImageResult", "SpadeError", "__version__"]

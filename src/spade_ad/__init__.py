"""spade-ad: SPADE anomaly detection and segmentation, learned from defect-free images only.

The method's three stages: :mod:`spade_ad.features` (stage 1: feature pyramid and global vector),
:mod:`spade_ad.retrieval` (stage 2: image kNN) and :mod:`spade_ad.correspondence` (stage 3: pixel
correspondence). :class:`Spade` puts them together; :class:`SpadeSettings` defines every setting.
"""

__version__ = "0.1.0"

from .errors import SpadeError  # noqa: E402
from .model import Spade  # noqa: E402
from .result import ImageResult, Prediction  # noqa: E402
from .settings import SpadeSettings  # noqa: E402

__all__ = ["Spade", "SpadeSettings", "Prediction", "ImageResult", "SpadeError", "__version__"]

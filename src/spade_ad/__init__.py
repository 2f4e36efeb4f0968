"""spade-ad: SPADE anomaly detection and segmentation, learned from defect-free images only.

The method's three stages: :mod:`spade_ad.features` (stage 1: feature pyramid and global vector),
:mod:`spade_ad.retrieval` (stage 2: image kNN) and :mod:`spade_ad.correspondence` (stage 3: pixel
correspondence). :class:`Spade` puts them together; :class:`SpadeSettings` defines every setting.
"""

from .errors import SpadeError
from .model import Spade
from .result import ImageResult, Prediction
from .settings import SpadeSettings
from .version import __version__

__all__ = ["Spade", "SpadeSettings", "Prediction", "ImageResult", "SpadeError", "__version__"]

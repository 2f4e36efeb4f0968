"""spade-ad: SPADE anomaly detection and segmentation, learned from defect-free images only."""

__version__ = "0.1.0"

from .errors import SpadeError  # noqa: E402
from .model import Prediction, Spade  # noqa: E402

__all__ = ["Spade", "Prediction", "SpadeError", "__version__"]

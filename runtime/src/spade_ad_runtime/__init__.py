"""spade-ad-runtime: run spade-ad deploy folders (``spade-ad export``) without PyTorch.

>>> from spade_ad_runtime import Detector                     # doctest: +SKIP
>>> results = Detector.load("deploy").predict(["part.png"])   # doctest: +SKIP
"""

__version__ = "0.1.0"

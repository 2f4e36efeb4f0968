"""Heatmaps with one fixed colour scale per model, overlays and page pictures: :mod:`spade_ad_runtime.viz`.

Defined once, in the runtime package, so that both packages' overlays are the same pixels.
"""

from __future__ import annotations

from spade_ad_runtime.viz import *  # noqa: F403 - the module's public names, re-exported
from spade_ad_runtime.viz import __all__ as _public

__all__ = list(_public)

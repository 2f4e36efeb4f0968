"""Reading images and masks, listing folders, writing files atomically: :mod:`spade_ad_runtime.io`.

Defined once, in the runtime package that spade-ad depends on, so that ``spade-ad predict`` and
``spade-ad-runtime predict`` read the same pixels from a file and refuse the same files with the same line.
"""

from __future__ import annotations

from spade_ad_runtime.io import *  # noqa: F403 - the module's public names, re-exported
from spade_ad_runtime.io import __all__ as _public

__all__ = list(_public)

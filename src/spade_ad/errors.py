"""The one exception type users see: a single clear line naming the file and the problem.

``SpadeError`` is defined once, in the runtime package both spade-ad and spade-ad-runtime share.
"""

from __future__ import annotations

from spade_ad_runtime.errors import SpadeError


class NotFittedError(SpadeError, AttributeError):
    """The model was used before ``fit`` or ``load`` (an ``AttributeError`` too, as scikit-learn's)."""


__all__ = ["SpadeError", "NotFittedError"]

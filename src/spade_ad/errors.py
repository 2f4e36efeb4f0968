"""The one exception type users see: a single clear line naming the file and the problem."""

from __future__ import annotations


class SpadeError(Exception):
    """A user-facing error (bad input, bad option, damaged model file).

    The CLI prints ``str(error)`` as one line and exits non-zero; library users can catch it.
    """


class NotFittedError(SpadeError, AttributeError):
    """The model was used before ``fit`` or ``load`` (an ``AttributeError`` too, as scikit-learn's)."""

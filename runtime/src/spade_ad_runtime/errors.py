"""The one exception type users see: a single clear line naming the file and the problem.

Shared by spade-ad (which re-exports it as ``spade_ad.SpadeError``) and the runtime, so that a command of
either package reports bad input the same way and a program catches one type.
"""

from __future__ import annotations


class SpadeError(Exception):
    """A user-facing error (bad input, bad option, damaged model or deploy file).

    The command line prints ``str(error)`` as one line and exits non-zero; library users can catch it.
    """

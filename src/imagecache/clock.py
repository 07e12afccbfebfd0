"""The clocks a pass reads, as one value the edges build and tests replace.

Nothing in the library reads the wall clock by itself: the command line and the daemon pass a
:class:`Clock` down, and tests pass one whose ``sleep`` advances ``monotonic`` at once, so a
lock deadline is tested without sleeping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Clock"]


@dataclass(frozen=True, slots=True)
class Clock:
    """``wall``: epoch seconds (ages, audit lines); ``monotonic`` and ``sleep``: waits."""

    wall: Callable[[], float]
    monotonic: Callable[[], float]
    sleep: Callable[[float], None]

"""What acting on a plan did: one :class:`Outcome` per entry, and the :class:`Report` of a pass.

One vocabulary for cleaning and fetching: :class:`Result` says what became of an entry (or an
image), :class:`Outcome` is one row, :class:`Report` all of them plus the problems outside any
entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from imagecache.model import Kind, Problem
from imagecache.plan import Reason

__all__ = ["PROBLEM_REASONS", "Outcome", "Report", "Result"]


# Outcomes with these reasons mean "done with problems" (exit 1): the pass could not do what it
# should have, or it had to undo a removal. A skip because the entry changed, became used or
# vanished is the re-check doing its job, not a problem.
PROBLEM_REASONS = frozenset(
    {
        Reason.INCOMPLETE_VIEW,
        Reason.LOCK_TIMEOUT,
        Reason.NAME_TAKEN,
        Reason.NOT_IN_TRASH,
        Reason.TOUCH_DENIED,
        Reason.OS_ERROR,
        Reason.REFERENCED_AGAIN,
    }
)


class Result(StrEnum):
    """What became of one entry: by the executor (clean, restore) or the fetcher (precache)."""

    REMOVED = "removed"
    QUARANTINED = "quarantined"
    REAPED = "reaped"
    PURGED = "purged"
    RESTORED = "restored"
    TOUCHED = "touched"
    SKIPPED = "skipped"
    FAILED = "failed"
    # Fetching (Nova's cache_images statuses, its "error" being ``failed`` here).
    CACHED = "cached"  # downloaded now
    EXISTING = "existing"  # already present (touched)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One thing the executor did or refused to do, and why.

    ``reason`` is the plan's reason when the action was taken, else why it was skipped or failed.
    ``bytes`` is the size of the file acted on and ``bytes_freed`` what its removal freed, both
    measured (``st_blocks * 512``) just before acting; a quarantine frees nothing until its purge.
    """

    name: str
    kind: Kind
    result: Result
    reason: Reason
    bytes: int = 0
    bytes_freed: int = 0
    trash_name: str | None = None
    message: str = ""

    @property
    def problem(self) -> bool:
        return self.result is Result.FAILED or self.reason in PROBLEM_REASONS


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one application of a plan did; ``problems`` are failures outside any entry."""

    plan_id: str | None
    now: float
    outcomes: tuple[Outcome, ...] = ()
    problems: tuple[Problem, ...] = ()

    @property
    def bytes_freed(self) -> int:
        return sum(o.bytes_freed for o in self.outcomes)

    @property
    def ok(self) -> bool:
        return not self.problems and not any(o.problem for o in self.outcomes)

"""The values every layer passes around: observations in, a plan out.

Everything here is a frozen dataclass or a StrEnum, so an observation cannot change after it was
made and ``decide()`` can be a pure function of its inputs. Reason codes are part of the JSON
contract (DESIGN.md §6): add new ones, never rename them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "PROBLEM_REASONS",
    "Action",
    "CacheEntry",
    "Decision",
    "Disk",
    "FileType",
    "InstanceRecord",
    "Inventory",
    "Kind",
    "Outcome",
    "Plan",
    "Policy",
    "Problem",
    "Reason",
    "Report",
    "Result",
    "Source",
    "TrashDecision",
    "TrashEntry",
    "User",
]


class Kind(StrEnum):
    """What a name in the cache directory is (DESIGN.md §2)."""

    ORIGINAL = "original"
    SMALL = "small"
    RESIZED = "resized"
    SWAP = "swap"
    EPHEMERAL = "ephemeral"
    LEGACY_ID = "legacy-id"
    TEMP = "temp"
    UNKNOWN = "unknown"


class FileType(StrEnum):
    FILE = "file"
    SYMLINK = "symlink"
    DIRECTORY = "directory"
    OTHER = "other"


class Source(StrEnum):
    """Where knowledge that an entry is used comes from."""

    BACKING = "backing"
    INSTANCE = "instance"
    LIBVIRT = "libvirt"
    PEER = "peer"
    OPEN_FILE = "open-file"
    PIN = "pin"


class Action(StrEnum):
    KEEP = "keep"
    REMOVE = "remove"
    QUARANTINE = "quarantine"
    REAP = "reap"
    # Actions on quarantined entries (``Plan.trash``).
    PURGE = "purge"
    RESTORE = "restore"


class Reason(StrEnum):
    """Stable kebab-case codes; every decision carries exactly one."""

    IN_USE = "in-use"
    TOO_YOUNG = "too-young"
    REMOVAL_DISABLED = "removal-disabled"
    UNUSED_EXPIRED = "unused-expired"
    UNKNOWN_KIND = "unknown-kind"
    NOT_A_FILE = "not-a-regular-file"
    INCOMPLETE_VIEW = "incomplete-view"
    LEGACY_ID_DISABLED = "legacy-id-disabled"
    STALE_TEMP = "stale-temp"
    TEMP_TOO_YOUNG = "temp-too-young"
    CLOCK_SKEW = "clock-skew"
    # Quarantined entries.
    IN_QUARANTINE = "in-quarantine"
    QUARANTINE_EXPIRED = "quarantine-expired"
    REFERENCED_AGAIN = "referenced-again"
    OPERATOR_RESTORE = "operator-restore"
    # Why the executor did not do what the plan said (or what went wrong doing it).
    CHANGED_SINCE_PLAN = "changed-since-plan"
    NOW_IN_USE = "now-in-use"
    NOW_TOO_YOUNG = "now-too-young"
    NOW_KEPT = "now-kept"
    LOCK_TIMEOUT = "lock-timeout"
    VANISHED = "vanished"
    TEMP_LOCKED = "temp-locked"
    NAME_TAKEN = "name-taken"
    NOT_IN_TRASH = "not-in-trash"
    TOUCH_DENIED = "touch-denied"
    OS_ERROR = "os-error"


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


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One name directly in the cache directory, as ``lstat`` saw it."""

    name: str
    kind: Kind
    file_type: FileType
    bytes_allocated: int
    bytes_apparent: int
    mtime: float
    inode: int
    device: int


@dataclass(frozen=True, slots=True)
class TrashEntry:
    """A quarantined entry under ``<cache>/.imagecache/trash/``."""

    name: str
    trash_name: str
    bytes_allocated: int
    quarantined_at: float
    inode: int


@dataclass(frozen=True, slots=True)
class User:
    """Something that uses an entry: ``ref`` names it (a disk path, an instance uuid, a host)."""

    source: Source
    ref: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Disk:
    """One instance disk file and its resolved backing chain (nearest backing file first).

    ``chain`` holds absolute, normalised paths; a missing backing file is the last element and is
    also named in ``missing``. ``chain_ids`` holds the ``(st_dev, st_ino)`` of each file of
    ``chain`` as found through its name (symlinks followed), in the same order; a missing or
    unreadable last one has none.
    """

    path: str
    instance: str
    format: str
    chain: tuple[str, ...] = ()
    missing: str | None = None
    chain_ids: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One instance from an inventory source (DESIGN.md §7); only ``uuid`` is required."""

    uuid: str
    name: str | None = None
    host: str | None = None
    image_ref: str | None = None
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    swap_mb: int | None = None
    ephemeral_gb: int | None = None
    ephemeral_format: str | None = None
    vm_state: str | None = None
    task_state: str | None = None


@dataclass(frozen=True, slots=True)
class Problem:
    """Something that could not be observed. ``blocking`` problems make the view incomplete."""

    source: str
    ref: str
    message: str
    blocking: bool = True


@dataclass(frozen=True, slots=True)
class Inventory:
    """Everything one observation saw; the only input of ``decide()`` besides policy and now.

    ``registry`` is Nova's ``compute_nodes`` file as read: (host, last registration epoch) pairs of
    the hosts that share ``instances_path``.
    """

    host: str
    instances_path: str
    cache_dir: str
    entries: tuple[CacheEntry, ...] = ()
    disks: tuple[Disk, ...] = ()
    instances: tuple[InstanceRecord, ...] = ()
    trash: tuple[TrashEntry, ...] = ()
    registry: tuple[tuple[str, float], ...] = ()
    problems: tuple[Problem, ...] = ()

    @property
    def complete(self) -> bool:
        return not any(p.blocking for p in self.problems)


@dataclass(frozen=True, slots=True)
class Policy:
    """The thresholds and switches of a pass, in seconds (Nova's defaults)."""

    remove_unused: bool = True
    original_age: int = 86400
    resized_age: int = 3600
    remove_unused_kernels: bool = False
    stale_temp_age: int = 86400
    quarantine_seconds: int = 86400
    default_ephemeral_format: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What a pass does with one entry, and why.

    ``removable_at`` is the epoch time at which an unused entry becomes removable (None when it is
    used or never removable); ``last_used`` is the time its age is measured from.
    """

    entry: CacheEntry
    action: Action
    reason: Reason
    users: tuple[User, ...] = ()
    last_used: float = 0.0
    age_seconds: float = 0.0
    threshold: int | None = None
    removable_at: float | None = None

    @property
    def in_use(self) -> bool:
        return bool(self.users)


@dataclass(frozen=True, slots=True)
class TrashDecision:
    """What a pass does with one quarantined entry: keep it, purge it, or restore it.

    ``users`` are the users of its original name (a disk whose backing file is that name, an
    instance record that claims it); ``purge_at`` is when its quarantine expires.
    """

    entry: TrashEntry
    action: Action
    reason: Reason
    users: tuple[User, ...] = ()
    purge_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Plan:
    """The decisions of one pass over one cache directory (and its trash)."""

    host: str
    cache_dir: str
    now: float
    complete: bool
    decisions: tuple[Decision, ...]
    problems: tuple[Problem, ...] = ()
    policy: Policy = field(default_factory=Policy)
    trash: tuple[TrashDecision, ...] = ()


class Result(StrEnum):
    """What the executor did with one entry."""

    REMOVED = "removed"
    QUARANTINED = "quarantined"
    REAPED = "reaped"
    PURGED = "purged"
    RESTORED = "restored"
    TOUCHED = "touched"
    SKIPPED = "skipped"
    FAILED = "failed"


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

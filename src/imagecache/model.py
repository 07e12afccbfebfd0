"""The values every layer passes around: observations in, a plan out.

Everything here is a frozen dataclass or a StrEnum, so an observation cannot change after it was
made and ``decide()`` can be a pure function of its inputs. Reason codes are part of the JSON
contract (DESIGN.md §6): add new ones, never rename them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "Action",
    "CacheEntry",
    "Decision",
    "Disk",
    "FileType",
    "InstanceRecord",
    "Inventory",
    "Kind",
    "Plan",
    "Policy",
    "Problem",
    "Reason",
    "Source",
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
    also named in ``missing``.
    """

    path: str
    instance: str
    format: str
    chain: tuple[str, ...] = ()
    missing: str | None = None


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
class Plan:
    """The decisions of one pass over one cache directory."""

    host: str
    cache_dir: str
    now: float
    complete: bool
    decisions: tuple[Decision, ...]
    problems: tuple[Problem, ...] = ()
    policy: Policy = field(default_factory=Policy)

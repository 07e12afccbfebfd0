"""What a pass decides: the policy, each entry's action and reason, the plan, and its document.

Reason codes are part of the JSON contract (DESIGN.md §6): add new ones, never rename them. The
plan document (:func:`plan_to_dict`, :func:`plan_from_dict`) is written and read here and nowhere
else, with a schema version; ``plan_from_dict(plan_to_dict(p)) == p`` for every plan.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from imagecache import naming
from imagecache._version import __version__
from imagecache.errors import UsageError
from imagecache.model import (
    CacheEntry,
    FileType,
    FsUsage,
    Integrity,
    Kind,
    Problem,
    ProblemCode,
    Source,
    TrashEntry,
    User,
)

__all__ = [
    "MAX_SECONDS",
    "SCHEMA",
    "Action",
    "Capacity",
    "Decision",
    "Plan",
    "Policy",
    "Reason",
    "TrashDecision",
    "iso",
    "plan_from_dict",
    "plan_id",
    "plan_to_dict",
    "problem_to_dict",
    "summary",
]

SCHEMA = 1

# Every epoch time and age a plan document may carry, in seconds either way: beyond any file's
# mtime (ext4 stops in 2446) and far inside what a float holds, so no sum overflows and every
# time a plan holds is one a report can print.
MAX_SECONDS = 10**11
# Counts (bytes, inodes, thresholds): what an off_t or ino_t holds.
_MAX_COUNT = 1 << 63

_E = TypeVar("_E", bound=StrEnum)


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
    STOPPED = "stopped"  # the pass was asked to stop (a daemon's shutdown) before this entry
    # Integrity (at the end: codes are appended, never renumbered).
    CORRUPT = "corrupt"  # its bytes no longer match its digest record: quarantined, unused
    OPEN_FILE = "open-file"  # a process holds it open (or qemu's image lock): kept, re-checked
    # Shared storage: another host holds the storage's cleaner lock; this one only touches.
    ANOTHER_CLEANER = "another-cleaner"
    # Capacity (issue 13): removed, or purged early, to get under a limit (the rule's name).
    OVER_SIZE = "over-size"
    OVER_WATERMARK = "over-watermark"


@dataclass(frozen=True, slots=True)
class Policy:
    """The thresholds and switches of a pass, in seconds.

    No defaults here: each option's default is written once, in the options table of
    :mod:`imagecache.config` (``load_settings([]).policy`` is the default policy).
    """

    remove_unused: bool
    original_age: int
    resized_age: int
    remove_unused_kernels: bool
    stale_temp_age: int
    quarantine_seconds: int
    default_ephemeral_format: str | None
    # A peer sharing the storage whose manifest is older than this makes the view incomplete.
    peer_stale_seconds: int
    # Capacity: the size limit of the cache in allocated bytes (0: none), the watermarks of its
    # filesystem's Use% (high 0: off), the least unused age of an eviction, the configuration's
    # pins (image ids or URLs), and whether images deleted or deactivated upstream go first.
    max_cache_bytes: int
    high_watermark_percent: float
    low_watermark_percent: float
    min_unused_seconds: int
    pinned_images: tuple[str, ...]
    evict_deleted_first: bool

    @property
    def capacity_limited(self) -> bool:
        """A size limit or a watermark is set: the capacity rules run."""
        return self.max_cache_bytes > 0 or self.high_watermark_percent > 0


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
class Capacity:
    """Where the cache stands against its capacity limits, and what this plan does about it.

    ``cache_bytes``: allocated bytes of the entries and the quarantined entries. ``fs_used_bytes``
    and ``fs_available_bytes``: the filesystem's, by statvfs (None: not measured). ``over``: the
    rules in force this pass (``over-size``, ``over-watermark``). ``need_bytes``: what must be
    freed to be at or under the size limit and the low watermark; ``freeing_bytes``: what this
    plan frees (age removals, reaps, purges and evictions); ``shortfall_bytes``: what it cannot,
    because the rest is protected (``protected``: bytes by why). ``next``: the entries that
    would go next, least recently used first.
    """

    cache_bytes: int
    max_cache_bytes: int
    fs_used_bytes: int | None
    fs_available_bytes: int | None
    high_watermark_percent: float
    low_watermark_percent: float
    over: tuple[Reason, ...]
    need_bytes: int
    freeing_bytes: int
    shortfall_bytes: int
    protected: tuple[tuple[str, int], ...] = ()
    next: tuple[str, ...] = ()

    @property
    def used_percent(self) -> float | None:
        if self.fs_used_bytes is None or self.fs_available_bytes is None:
            return None
        return FsUsage(self.fs_used_bytes, self.fs_available_bytes).used_percent


@dataclass(frozen=True, slots=True)
class Plan:
    """The decisions of one pass over one cache directory (and its trash)."""

    host: str
    cache_dir: str
    now: float
    complete: bool
    decisions: tuple[Decision, ...]
    policy: Policy
    problems: tuple[Problem, ...] = ()
    trash: tuple[TrashDecision, ...] = ()
    capacity: Capacity | None = None  # None: no capacity limit is configured

    @property
    def ok(self) -> bool:
        """Complete, and no finding that fails the command (a corrupt entry in use)."""
        return self.complete and not any(p.fails for p in self.problems)


def iso(ts: float) -> str:
    """An epoch time as ISO 8601 in UTC, to the second; never raises.

    A time no date can show (an mtime set far in the future, a threshold of centuries added to
    it) is written as its epoch number instead, so one odd file cannot stop a report.
    """
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return f"epoch {ts!r}"


def plan_id(plan: Plan) -> str:
    """A stable id of what a plan decided (same observations and decisions, same id)."""
    digest = hashlib.sha256()
    # File names are bytes: a name that is not UTF-8 arrives surrogate-escaped, and must hash
    # as the bytes it is rather than stop every pass on the host.
    digest.update(_fsencode(f"{plan.host}\0{plan.cache_dir}\0{plan.now}"))
    for d in plan.decisions:
        e = d.entry
        digest.update(_fsencode(f"\0{e.name}\0{e.inode}\0{e.mtime}\0{d.action}"))
    for t in plan.trash:
        digest.update(_fsencode(f"\0{t.entry.trash_name}\0{t.entry.inode}\0{t.action}"))
    return digest.hexdigest()[:16]


def _fsencode(text: str) -> bytes:
    # os.fsencode on Linux, without importing os into the pure core.
    return text.encode("utf-8", "surrogateescape")


def summary(decisions: Iterable[Decision], trash: Iterable[TrashDecision] = ()) -> dict[str, Any]:
    """Counts and byte totals of a plan, as its document and its renderings show them."""
    decisions, trash = list(decisions), list(trash)
    # Quarantined bytes still take space: they count in every size figure until purged, so a
    # quarantine frees nothing yet; what is freed now is removals, reaps and purges.
    freeing = (Action.REMOVE, Action.REAP)
    freed = sum(d.entry.bytes_allocated for d in decisions if d.action in freeing)
    freed += sum(t.entry.bytes_allocated for t in trash if t.action is Action.PURGE)
    moved = sum(d.entry.bytes_allocated for d in decisions if d.action is Action.QUARANTINE)
    trash_bytes = sum(t.entry.bytes_allocated for t in trash)
    return {
        "entries": len(decisions),
        "bytes": sum(d.entry.bytes_allocated for d in decisions) + trash_bytes,
        "trash_entries": len(trash),
        "trash_bytes": trash_bytes,
        "in_use": sum(1 for d in decisions if d.in_use),
        "actions": dict(sorted(Counter(str(d.action) for d in decisions).items())),
        "reasons": dict(sorted(Counter(str(d.reason) for d in decisions).items())),
        "bytes_to_free": freed,
        "bytes_to_quarantine": moved,
    }


# -- the plan document ------------------------------------------------------------------------
#
# Written by ``plan --json`` / ``plan -o`` and read back by ``clean --plan``. Fields a person reads
# (ISO times, ``summary``) are written but never read; every field of :class:`Plan` is written
# exactly (epoch floats as JSON numbers round-trip bit for bit) and read back.


def _users(users: Iterable[User]) -> list[dict[str, str]]:
    # One comprehension for all of an entry's users, not a call per user: a large host has tens
    # of thousands of them (performance issue 14). ``detail`` is left out when empty.
    return [
        {"source": str(u.source), "ref": u.ref, "detail": u.detail}
        if u.detail
        else {"source": str(u.source), "ref": u.ref}
        for u in users
    ]


def problem_to_dict(p: Problem) -> dict[str, Any]:
    return {
        "code": str(p.code),
        "source": str(p.source),
        "ref": p.ref,
        "message": p.message,
        "blocking": p.blocking,
    }


def _policy(policy: Policy) -> dict[str, Any]:
    return {
        "remove_unused": policy.remove_unused,
        "original_age_seconds": policy.original_age,
        "resized_age_seconds": policy.resized_age,
        "remove_unused_kernels": policy.remove_unused_kernels,
        "stale_temp_seconds": policy.stale_temp_age,
        "quarantine_seconds": policy.quarantine_seconds,
        "peer_stale_seconds": policy.peer_stale_seconds,
        "default_ephemeral_format": policy.default_ephemeral_format,
        "max_cache_bytes": policy.max_cache_bytes,
        "high_watermark_percent": policy.high_watermark_percent,
        "low_watermark_percent": policy.low_watermark_percent,
        "min_unused_seconds": policy.min_unused_seconds,
        "pinned_images": list(policy.pinned_images),
        "evict_deleted_images_first": policy.evict_deleted_first,
    }


def _entry(d: Decision) -> dict[str, Any]:
    e = d.entry
    return {
        "name": e.name,
        "kind": str(e.kind),
        "file_type": str(e.file_type),
        "bytes": e.bytes_allocated,
        "apparent_bytes": e.bytes_apparent,
        "mtime": e.mtime,
        "inode": e.inode,
        "device": e.device,
        "integrity": str(e.integrity),
        "ctime_ns": e.ctime_ns,
        "birth_ns": e.birth_ns,
        "age_seconds": d.age_seconds,
        "threshold_seconds": d.threshold,
        "in_use": d.in_use,
        "users": _users(d.users),
        "action": str(d.action),
        "reason": str(d.reason),
        "last_used": iso(d.last_used),
        "last_used_epoch": d.last_used,
        "removable_at": iso(d.removable_at) if d.removable_at is not None else None,
        "removable_at_epoch": d.removable_at,
    }


def _trash(t: TrashDecision) -> dict[str, Any]:
    e = t.entry
    return {
        "name": e.name,
        "trash_name": e.trash_name,
        "kind": str(naming.classify(e.name)),
        "bytes": e.bytes_allocated,
        "inode": e.inode,
        "quarantined_at": iso(e.quarantined_at),
        "quarantined_at_epoch": e.quarantined_at,
        "users": _users(t.users),
        "action": str(t.action),
        "reason": str(t.reason),
        "purge_at": iso(t.purge_at),
        "purge_at_epoch": t.purge_at,
    }


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan document (DESIGN.md §6): ``plan --json``, and what ``plan -o`` saves."""
    return {
        "schema": SCHEMA,
        "version": __version__,
        "plan_id": plan_id(plan),
        "host": plan.host,
        "cache_dir": plan.cache_dir,
        "now": iso(plan.now),
        "now_epoch": plan.now,
        "complete": plan.complete,
        "problems": [problem_to_dict(p) for p in plan.problems],
        "policy": _policy(plan.policy),
        "summary": summary(plan.decisions, plan.trash),
        "entries": [_entry(d) for d in plan.decisions],
        "trash": [_trash(t) for t in plan.trash],
        "capacity": None if plan.capacity is None else _capacity(plan.capacity),
    }


def _capacity(c: Capacity) -> dict[str, Any]:
    return {
        "cache_bytes": c.cache_bytes,
        "max_cache_bytes": c.max_cache_bytes,
        "fs_used_bytes": c.fs_used_bytes,
        "fs_available_bytes": c.fs_available_bytes,
        "used_percent": c.used_percent,
        "high_watermark_percent": c.high_watermark_percent,
        "low_watermark_percent": c.low_watermark_percent,
        "over": [str(r) for r in c.over],
        "need_bytes": c.need_bytes,
        "freeing_bytes": c.freeing_bytes,
        "shortfall_bytes": c.shortfall_bytes,
        "protected_bytes": dict(c.protected),
        "next": list(c.next),
    }


def _capacity_from(r: _Reader) -> Capacity:
    protected = r.child("protected_bytes")
    return Capacity(
        cache_bytes=r.integer("cache_bytes"),
        max_cache_bytes=r.integer("max_cache_bytes"),
        fs_used_bytes=r.optional_integer("fs_used_bytes"),
        fs_available_bytes=r.optional_integer("fs_available_bytes"),
        high_watermark_percent=r.percent("high_watermark_percent"),
        low_watermark_percent=r.percent("low_watermark_percent"),
        over=tuple(_capacity_reason(r, x) for x in r.texts("over")),
        need_bytes=r.integer("need_bytes"),
        freeing_bytes=r.integer("freeing_bytes"),
        shortfall_bytes=r.integer("shortfall_bytes"),
        protected=tuple((k, protected.integer(k)) for k in protected.doc),
        next=tuple(_entry_name_of(r, n) for n in r.texts("next")),
    )


def _capacity_reason(r: _Reader, value: str) -> Reason:
    if value not in (Reason.OVER_SIZE, Reason.OVER_WATERMARK):
        raise UsageError(f"{r.where}: 'over' holds {value!r}, not a capacity rule")
    return Reason(value)


def _entry_name_of(r: _Reader, name: str) -> str:
    if not naming.valid_entry_name(name):
        raise UsageError(f"{r.where}: 'next' holds {name!r}, not a plain entry name")
    return name


class _Reader:
    """Typed access to one JSON object of a document; every failure names the field."""

    def __init__(self, doc: Any, where: str) -> None:
        if not isinstance(doc, dict):
            raise UsageError(f"{where}: expected an object")
        self.doc, self.where = doc, where

    def _get(self, key: str) -> Any:
        if key not in self.doc:
            raise UsageError(f"{self.where}: missing {key!r}")
        return self.doc[key]

    def _bad(self, key: str, what: str) -> UsageError:
        return UsageError(f"{self.where}: {key!r} must be {what}")

    def text(self, key: str, default: str | None = None) -> str:
        value = self._get(key) if default is None or key in self.doc else default
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return self._checked(key, value)

    def optional_text(self, key: str) -> str | None:
        value = self.doc.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._bad(key, "a string or null")
        return self._checked(key, value)

    def _checked(self, key: str, value: str) -> str:
        # Paths and messages built from them may carry undecodable bytes (surrogate-escaped, as
        # this tool writes them); a lone surrogate that stands for no byte is not text at all.
        if not naming.fs_encodable(value):
            raise self._bad(key, "text (it holds a lone surrogate)")
        return value

    def flag(self, key: str, default: bool | None = None) -> bool:
        value = self._get(key) if default is None or key in self.doc else default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def percent(self, key: str) -> float:
        """A percentage from 0 to 100; 0 when absent."""
        value = self.doc.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number from 0 to 100")
        number = float(value) if isinstance(value, float) or abs(value) < 1000 else math.inf
        if not 0 <= number <= 100:
            raise self._bad(key, "a number from 0 to 100")
        return number

    def texts(self, key: str) -> list[str]:
        """A list of strings; empty when absent."""
        value = self.doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "a list of strings")
        return [self._checked(key, v) for v in value]

    def integer(self, key: str, default: int | None = None) -> int:
        value = self._get(key) if default is None or key in self.doc else default
        # 2**63: inode numbers, byte counts and thresholds all fit; a 400-digit number does not.
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_COUNT:
            raise self._bad(key, "an integer from 0 to 2**63 - 1")
        return value

    def optional_integer(self, key: str) -> int | None:
        return None if self.doc.get(key) is None else self.integer(key)

    def number(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number")
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            number = math.inf
        # NaN, Infinity and 1e400 (which json reads as inf) fail here too.
        if not -MAX_SECONDS <= number <= MAX_SECONDS:
            raise self._bad(key, f"a finite number of seconds within +-{MAX_SECONDS:.0e}")
        return number

    def optional_number(self, key: str) -> float | None:
        return None if self.doc.get(key) is None else self.number(key)

    def items(self, key: str) -> list[_Reader]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self._bad(key, "a list")
        return [_Reader(v, f"{self.where}.{key}[{i}]") for i, v in enumerate(value)]

    def child(self, key: str) -> _Reader:
        return _Reader(self._get(key), f"{self.where}.{key}")

    def choice(self, key: str, enum: type[_E], default: _E | None = None) -> _E:
        value = self.text(key, None if default is None else str(default))
        try:
            return enum(value)
        except ValueError:
            raise self._bad(key, "one of " + ", ".join(str(m) for m in enum)) from None


def _entry_name(r: _Reader, key: str) -> str:
    name = r.text(key)
    if not naming.valid_entry_name(name):
        raise UsageError(f"{r.where}: {key!r} is not a plain entry name: {name!r}")
    return name


def _kind(r: _Reader, name: str, file_type: FileType) -> Kind:
    # The kind is the name's, never the document's word: a plan that calls an original a temp
    # (to reap it unquarantined, say) is not one this tool wrote.
    kind = r.choice("kind", Kind)
    if kind is not naming.classify(name, file_type):
        raise UsageError(
            f"{r.where}: 'kind' is {kind}, but {name!r} ({file_type}) is "
            f"{naming.classify(name, file_type)}"
        )
    return kind


def _users_from(r: _Reader) -> tuple[User, ...]:
    return tuple(
        User(u.choice("source", Source), u.text("ref"), u.text("detail", ""))
        for u in r.items("users")
    )


def _decision_from(r: _Reader) -> Decision:
    name = _entry_name(r, "name")
    file_type = r.choice("file_type", FileType)
    entry = CacheEntry(
        name=name,
        kind=_kind(r, name, file_type),
        file_type=file_type,
        bytes_allocated=r.integer("bytes"),
        bytes_apparent=r.integer("apparent_bytes"),
        mtime=r.number("mtime"),
        inode=r.integer("inode"),
        device=r.integer("device", 0),
        integrity=r.choice("integrity", Integrity, Integrity.UNVERIFIED),
        ctime_ns=r.integer("ctime_ns", 0),
        birth_ns=r.integer("birth_ns", 0),
    )
    last_used = r.optional_number("last_used_epoch")
    return Decision(
        entry=entry,
        action=r.choice("action", Action),
        reason=r.choice("reason", Reason),
        users=_users_from(r),
        last_used=entry.mtime if last_used is None else last_used,
        age_seconds=r.number("age_seconds"),
        threshold=r.optional_integer("threshold_seconds"),
        removable_at=r.optional_number("removable_at_epoch"),
    )


def _trash_from(r: _Reader) -> TrashDecision:
    entry = TrashEntry(
        name=_entry_name(r, "name"),
        trash_name=r.text("trash_name"),
        bytes_allocated=r.integer("bytes"),
        quarantined_at=r.number("quarantined_at_epoch"),
        inode=r.integer("inode"),
    )
    if naming.parse_trash_name(entry.trash_name) != (entry.name, int(entry.quarantined_at)):
        raise UsageError(f"{r.where}: 'trash_name' is not {entry.name}@<quarantined_at_epoch>")
    purge_at = r.optional_number("purge_at_epoch")
    return TrashDecision(
        entry,
        r.choice("action", Action),
        r.choice("reason", Reason),
        _users_from(r),
        purge_at=0.0 if purge_at is None else purge_at,
    )


def _policy_from(r: _Reader) -> Policy:
    return Policy(
        remove_unused=r.flag("remove_unused"),
        original_age=r.integer("original_age_seconds"),
        resized_age=r.integer("resized_age_seconds"),
        remove_unused_kernels=r.flag("remove_unused_kernels"),
        stale_temp_age=r.integer("stale_temp_seconds"),
        quarantine_seconds=r.integer("quarantine_seconds"),
        # Plans saved before manifests existed: three default intervals, as the option says.
        peer_stale_seconds=r.integer("peer_stale_seconds", 3 * 2400),
        default_ephemeral_format=_ephemeral_format(r),
        # Plans saved before capacity rules existed: none of them.
        max_cache_bytes=r.integer("max_cache_bytes", 0),
        high_watermark_percent=r.percent("high_watermark_percent"),
        low_watermark_percent=r.percent("low_watermark_percent"),
        min_unused_seconds=r.integer("min_unused_seconds", 600),
        pinned_images=tuple(r.texts("pinned_images")),
        evict_deleted_first=r.flag("evict_deleted_images_first", False),
    )


def _ephemeral_format(r: _Reader) -> str | None:
    # A filesystem name is hashed as UTF-8 text into ephemeral entry names: no escaped bytes.
    value = r.optional_text("default_ephemeral_format")
    if value is not None and not naming.encodable(value):
        raise UsageError(f"{r.where}: 'default_ephemeral_format' must be UTF-8 text")
    return value


def plan_from_dict(doc: Any) -> Plan:
    """The :class:`Plan` a plan document describes; the inverse of :func:`plan_to_dict`.

    A saved plan is untrusted input: every field is type- and range-checked (integers from 0 to
    2**63 - 1, times and ages finite and within :data:`MAX_SECONDS`), every text must be text
    (no lone surrogate), every name a plain entry name (:func:`naming.valid_entry_name`) whose
    kind is the one the document states. Fields this reader does not know are ignored.

    Raises:
        UsageError: the document is not a plan of a schema this version reads, or a field is
            missing or wrong (the message names it).
    """
    r = _Reader(doc, "plan")
    schema = r.integer("schema", SCHEMA)  # documents from before the schema field are schema 1
    if schema != SCHEMA:
        raise UsageError(f"plan: schema {schema} is not one this version reads ({SCHEMA})")
    return Plan(
        host=r.text("host"),
        cache_dir=r.text("cache_dir"),
        now=r.number("now_epoch"),
        complete=r.flag("complete"),
        decisions=tuple(_decision_from(e) for e in r.items("entries")),
        policy=_policy_from(r.child("policy")),
        problems=tuple(
            Problem(p.choice("code", ProblemCode), p.text("ref"), p.text("message"))
            for p in r.items("problems")
        ),
        trash=tuple(_trash_from(t) for t in r.items("trash")) if "trash" in r.doc else (),
        capacity=None if r.doc.get("capacity") is None else _capacity_from(r.child("capacity")),
    )

"""The capacity rules (issue 13): keep the cache under a size and its filesystem under a watermark.

Pure, like :func:`imagecache.policy.decide`, which calls :func:`apply` on the decisions its rule
table made. Capacity never overrides a keep rule: it only chooses, among the entries those rules
would let go anyway, which go *now*, and removes them directly (a quarantine frees nothing).

When over a limit — the size limit (``max_cache_bytes``, allocated bytes of the entries and the
quarantined entries) or the high watermark (the filesystem's Use% as ``df`` shows it, used /
(used + available)) — a pass frees, until it is at or under the size limit *and* the low
watermark, in this order:

1. what the pass frees anyway: removals by age, stale temps reaped, quarantines expired;
2. quarantined entries, purged early, longest quarantined first;
3. unused entries, least recently used first. An original and its ``_sm`` and resized copies are
   one unit: it is ordered by the newest use among them and removed whole, and it is a candidate
   only when every one of them is. With ``evict_deleted_images_first`` and a complete listing of
   the image service, units whose image is deactivated, or no longer listed, come first.

Never a candidate: an entry in use (pins are users, :mod:`imagecache.usage`), unused for less
than ``min_unused_seconds``, of an unknown kind, not a regular file, a legacy id while
``remove_unused_kernels`` is off, corrupt (quarantined by its own rule), or anything on an
incomplete view or with removal turned off. What cannot be freed is a ``capacity-shortfall``
problem saying what was needed, what is freed, and why the rest stays.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from imagecache import naming
from imagecache.model import FileType, Inventory, Kind, Problem, ProblemCode, Source
from imagecache.plan import Action, Capacity, Decision, Policy, Reason, TrashDecision

__all__ = ["NEXT_SHOWN", "apply"]

NEXT_SHOWN = 10  # entries a plan shows as "would go next"

# Reasons of the rule table after which an entry may be evicted (given min_unused_seconds).
_EVICTABLE = frozenset({Reason.TOO_YOUNG, Reason.UNUSED_EXPIRED})
_FREEING = frozenset({Action.REMOVE, Action.REAP})


def _protection(d: Decision, min_unused: int) -> str | None:
    """Why ``d`` can never be evicted, as a word of the shortfall; None if it may be."""
    if any(u.source is Source.PIN for u in d.users):
        return "pinned"
    if d.users:
        return "in-use"
    if d.entry.kind is Kind.TEMP:
        return "temp"
    if d.reason not in _EVICTABLE:
        return str(d.reason)
    if d.entry.file_type is not FileType.FILE or d.entry.kind is Kind.UNKNOWN:
        return "unknown"
    if d.age_seconds < 0 or d.age_seconds < min_unused:
        return "too-young"
    return None


_FAMILY = frozenset({Kind.ORIGINAL, Kind.SMALL, Kind.RESIZED})


def _unit_of(name: str) -> str:
    """An original and its copies share their fingerprint; anything else is a unit alone. By
    the name only: a symlink or directory named like a copy joins (and so protects) its unit."""
    prefix = naming.image_prefix(name) if naming.classify(name) in _FAMILY else None
    return prefix or name


def _file_of(i: int, d: Decision) -> tuple[int, int]:
    """The file a decision's entry is: (device, inode) for a regular file; a key of its own
    (negative, no inode is) for anything else."""
    e = d.entry
    return (e.device, e.inode) if e.file_type is FileType.FILE else (-1, -1 - i)


def _units(
    decisions: Sequence[Decision], files: Mapping[tuple[int, int], list[int]]
) -> dict[str, list[int]]:
    """Decision indices by unit: a name's family (:func:`_unit_of`), merged with every family
    a hard link of one of its files belongs to (a small union-find over unit keys)."""
    parent: dict[str, str] = {}

    def root(u: str) -> str:
        while parent.setdefault(u, u) != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for names in files.values():
        first = root(_unit_of(decisions[names[0]].entry.name))
        for i in names[1:]:
            other = root(_unit_of(decisions[i].entry.name))
            if other != first:
                parent[other] = first
    units: defaultdict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(decisions):
        units[root(_unit_of(d.entry.name))].append(i)
    return units


def _upstream_first(inventory: Inventory, policy: Policy) -> frozenset[str]:
    """Units whose image the image service reports deactivated, or (complete listing) not at
    all: deleted."""
    up = inventory.upstream
    if not policy.evict_deleted_first or up is None:
        return frozenset()
    by_unit = {naming.fingerprint(image): status for image, status in up.statuses}
    by_unit.update(dict(up.statuses))  # legacy entries, named by the raw image id
    first = set()
    for e in inventory.entries:
        unit = _unit_of(e.name)
        status = by_unit.get(unit)
        deleted = up.complete and status is None and naming.classify(e.name) in _FAMILY
        if deleted or status == "deactivated":
            first.add(unit)
    return frozenset(first)


def _needs(inventory: Inventory, policy: Policy, cache_bytes: int) -> tuple[int, int]:
    """Bytes to free for the size limit, and for the watermark (0: not over it)."""
    size = max(0, cache_bytes - policy.max_cache_bytes) if policy.max_cache_bytes else 0
    fs = inventory.filesystem
    if policy.high_watermark_percent <= 0 or fs is None:
        return size, 0
    if fs.used_percent < policy.high_watermark_percent:
        return size, 0
    total = fs.used_bytes + fs.available_bytes
    return size, max(0, math.ceil(fs.used_bytes - policy.low_watermark_percent / 100 * total))


def apply(
    inventory: Inventory,
    policy: Policy,
    decisions: tuple[Decision, ...],
    trash: tuple[TrashDecision, ...],
) -> tuple[tuple[Decision, ...], tuple[TrashDecision, ...], Capacity, tuple[Problem, ...]]:
    """The decisions and trash decisions with the capacity evictions made, the capacity state,
    and the shortfall problem if the limits cannot be met."""
    # A file with several names in the cache (hard links) holds its bytes once, and frees them
    # only when its last name goes: bytes are counted by file, and its names are one unit.
    files: defaultdict[tuple[int, int], list[int]] = defaultdict(list)
    for i, d in enumerate(decisions):
        files[_file_of(i, d)].append(i)
    cache_bytes = sum(decisions[names[0]].entry.bytes_allocated for names in files.values())
    cache_bytes += sum(t.bytes_allocated for t in inventory.trash)
    need_size, need_wm = _needs(inventory, policy, cache_bytes)
    over = tuple(r for r, n in ((Reason.OVER_SIZE, need_size), (Reason.OVER_WATERMARK, need_wm))
                 if n > 0)  # fmt: skip
    freed_files = {k for k, names in files.items()
                   if all(decisions[i].action in _FREEING for i in names)}  # fmt: skip
    freeing = sum(decisions[files[k][0]].entry.bytes_allocated for k in freed_files)
    freeing += sum(t.entry.bytes_allocated for t in trash if t.action is Action.PURGE)
    may_evict = inventory.complete and policy.remove_unused

    def left() -> int:
        return max(need_size, need_wm) - freeing

    def rule() -> Reason:
        return Reason.OVER_WATERMARK if need_wm - freeing > 0 else Reason.OVER_SIZE

    new_trash = list(trash)
    if may_evict:
        for i in sorted(range(len(trash)), key=lambda i: (trash[i].entry.quarantined_at, i)):
            t = trash[i]
            if left() <= 0:
                break
            if t.action is Action.KEEP and t.reason is Reason.IN_QUARANTINE and not t.users:
                new_trash[i] = dataclasses.replace(t, action=Action.PURGE, reason=rule())
                freeing += t.entry.bytes_allocated

    units = _units(decisions, files)
    why = {i: _protection(d, policy.min_unused_seconds) for i, d in enumerate(decisions)}
    first = _upstream_first(inventory, policy)
    eligible = [u for u, members in units.items() if all(why[i] is None for i in members)]

    def order(u: str) -> tuple[bool, float, str]:
        preferred = any(_unit_of(decisions[i].entry.name) in first for i in units[u])
        return (not preferred, max(decisions[i].last_used for i in units[u]), u)

    eligible.sort(key=order)

    new = list(decisions)
    upcoming: list[str] = []
    for unit in eligible:
        pending = [i for i in units[unit] if decisions[i].action is not Action.REMOVE]
        if not pending:
            continue  # all of it goes by age already
        if not may_evict or left() <= 0:
            upcoming += [decisions[i].entry.name for i in pending]
            continue
        reason = rule()
        for i in pending:
            new[i] = dataclasses.replace(
                decisions[i], action=Action.REMOVE, reason=reason, removable_at=None
            )
        for k in {_file_of(i, decisions[i]) for i in pending} - freed_files:
            freed_files.add(k)  # every name of a file is in its unit: it goes whole
            freeing += decisions[files[k][0]].entry.bytes_allocated

    shortfall = max(0, left()) if over else 0
    protected = _protected(new, new_trash, why, units, may_evict=may_evict, shortfall=shortfall)
    capacity = Capacity(
        cache_bytes=cache_bytes,
        max_cache_bytes=policy.max_cache_bytes,
        fs_used_bytes=None if inventory.filesystem is None else inventory.filesystem.used_bytes,
        fs_available_bytes=(
            None if inventory.filesystem is None else inventory.filesystem.available_bytes
        ),
        high_watermark_percent=policy.high_watermark_percent,
        low_watermark_percent=policy.low_watermark_percent,
        over=over,
        need_bytes=max(need_size, need_wm),
        freeing_bytes=freeing,
        shortfall_bytes=shortfall,
        protected=protected,
        next=tuple(upcoming[:NEXT_SHOWN]),
    )
    problems = (_shortfall(capacity, policy),) if shortfall else ()
    return tuple(new), tuple(new_trash), capacity, problems


def _protected(
    decisions: Sequence[Decision],
    trash: Iterable[TrashDecision],
    why: Mapping[int, str | None],
    units: Mapping[str, list[int]],
    *,
    may_evict: bool,
    shortfall: int,
) -> tuple[tuple[str, int], ...]:
    """Bytes that stay, by why (only when the plan falls short: otherwise nobody asks)."""
    if not shortfall:
        return ()
    out: defaultdict[str, int] = defaultdict(int)
    for members in units.values():
        blocked = any(why[i] is not None for i in members)
        for i in members:
            d = decisions[i]
            if d.action in _FREEING:
                continue
            if why[i] is not None:
                out[str(why[i])] += d.entry.bytes_allocated
            elif not may_evict:
                out["removal-blocked"] += d.entry.bytes_allocated
            elif blocked:
                out["copy-of-a-protected-entry"] += d.entry.bytes_allocated
    for t in trash:
        if t.action is not Action.PURGE:
            out["quarantined-" + str(t.reason)] += t.entry.bytes_allocated
    return tuple(sorted(out.items()))


def _shortfall(c: Capacity, policy: Policy) -> Problem:
    limits = []
    if Reason.OVER_SIZE in c.over:
        limits.append(f"max_cache_bytes {policy.max_cache_bytes}")
    if Reason.OVER_WATERMARK in c.over:
        limits.append(f"low_watermark_percent {policy.low_watermark_percent:g}")
    why = ", ".join(f"{b} bytes {w}" for w, b in c.protected) or "nothing left to remove"
    return Problem(
        ProblemCode.CAPACITY_SHORTFALL,
        "capacity",
        f"over {' and '.join(str(r) for r in c.over)}: {c.need_bytes} bytes must go to be under "
        f"{' and '.join(limits)}; this pass frees {c.freeing_bytes}, {c.shortfall_bytes} short; "
        f"the rest is protected: {why}",
    )

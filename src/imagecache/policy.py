"""All the decisions of a pass, as one pure function: ``decide(inventory, policy, now) -> Plan``.

No I/O, no clock, no globals. Each entry walks one table of rules, first match wins, and comes out
with an action and the reason code of the rule that decided it. Age is ``now - last use`` where last
use is the entry's mtime (refreshed for in-use entries every pass, as Nova does); removal happens
at ``age >= threshold`` (Nova's boundary, nova-imagecache.md §3.3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from imagecache import capacity, naming
from imagecache.model import (
    CacheEntry,
    FileType,
    Integrity,
    Inventory,
    Kind,
    Problem,
    ProblemCode,
    TrashEntry,
    User,
)
from imagecache.naming import Threshold
from imagecache.plan import Action, Capacity, Decision, Plan, Policy, Reason, TrashDecision
from imagecache.usage import name_shared, peer_problems, peers, record_notes, users_by_entry

__all__ = ["decide", "threshold_seconds", "touch_only"]


def threshold_seconds(kind: Kind, policy: Policy) -> int | None:
    """The unused age after which an entry of ``kind`` may go; None for never."""
    return {
        Threshold.ORIGINAL: policy.original_age,
        Threshold.RESIZED: policy.resized_age,
        Threshold.TEMP: policy.stale_temp_age,
        Threshold.NEVER: None,
    }[naming.threshold_of(kind)]


@dataclass(frozen=True, slots=True)
class _Facts:
    entry: CacheEntry
    users: tuple[User, ...]
    age: float
    threshold: int | None
    complete: bool
    policy: Policy


def _expired_action(f: _Facts) -> Action:
    if f.entry.kind is Kind.TEMP:
        return Action.REAP
    return Action.QUARANTINE if f.policy.quarantine_seconds > 0 else Action.REMOVE


# (reason, applies?, action) in order. Everything that keeps comes before everything that removes,
# so a removal needs every keep rule to have said no.
_RULES: tuple[tuple[Reason, Callable[[_Facts], bool], Callable[[_Facts], Action]], ...] = (
    (Reason.NOT_A_FILE, lambda f: f.entry.file_type is not FileType.FILE, lambda f: Action.KEEP),
    (Reason.UNKNOWN_KIND, lambda f: f.entry.kind is Kind.UNKNOWN, lambda f: Action.KEEP),
    (Reason.IN_USE, lambda f: bool(f.users), lambda f: Action.KEEP),
    (
        Reason.LEGACY_ID_DISABLED,
        lambda f: f.entry.kind is Kind.LEGACY_ID and not f.policy.remove_unused_kernels,
        lambda f: Action.KEEP,
    ),
    # Unused and its bytes no longer match its digest: quarantined whatever its age (Nova would
    # build new instances on it), but only on a complete view and when removal is on.
    (
        Reason.CORRUPT,
        lambda f: f.entry.integrity is Integrity.CORRUPT and f.complete and f.policy.remove_unused,
        lambda f: Action.QUARANTINE,
    ),
    (Reason.CLOCK_SKEW, lambda f: f.age < 0, lambda f: Action.KEEP),
    (
        Reason.TEMP_TOO_YOUNG,
        lambda f: f.entry.kind is Kind.TEMP and f.age < (f.threshold or 0),
        lambda f: Action.KEEP,
    ),
    (Reason.TOO_YOUNG, lambda f: f.age < (f.threshold or 0), lambda f: Action.KEEP),
    (Reason.INCOMPLETE_VIEW, lambda f: not f.complete, lambda f: Action.KEEP),
    (Reason.REMOVAL_DISABLED, lambda f: not f.policy.remove_unused, lambda f: Action.KEEP),
    (Reason.STALE_TEMP, lambda f: f.entry.kind is Kind.TEMP, _expired_action),
    (Reason.UNUSED_EXPIRED, lambda f: True, _expired_action),
)


# Reasons after which an entry becomes removable by itself once old enough.
_WAITING = frozenset({Reason.TOO_YOUNG, Reason.TEMP_TOO_YOUNG, Reason.CLOCK_SKEW})


def _decide_one(f: _Facts) -> Decision:
    reason, _, action_of = next(rule for rule in _RULES if rule[1](f))
    waiting = f.threshold is not None and not f.users and reason in _WAITING
    return Decision(
        entry=f.entry,
        action=action_of(f),
        reason=reason,
        users=f.users,
        last_used=f.entry.mtime,
        age_seconds=f.age,
        threshold=f.threshold,
        removable_at=f.entry.mtime + f.threshold if waiting and f.threshold is not None else None,
    )


@dataclass(frozen=True, slots=True)
class _TrashFacts:
    entry: TrashEntry
    users: tuple[User, ...]
    restorable: bool  # referenced, no cache entry of its name, newest copy of its name
    now: float
    complete: bool
    policy: Policy

    @property
    def purge_at(self) -> float:
        return self.entry.quarantined_at + self.policy.quarantine_seconds


# Same shape as _RULES. Restoring comes first: it undoes a removal and is always safe, even on an
# incomplete view. Purging is a removal, so it needs every keep rule to have said no.
_TRASH_RULES: tuple[tuple[Reason, Callable[[_TrashFacts], bool], Action], ...] = (
    (Reason.REFERENCED_AGAIN, lambda f: f.restorable, Action.RESTORE),
    (Reason.CLOCK_SKEW, lambda f: f.now < f.entry.quarantined_at, Action.KEEP),
    (Reason.IN_QUARANTINE, lambda f: f.now < f.purge_at, Action.KEEP),
    (Reason.INCOMPLETE_VIEW, lambda f: not f.complete, Action.KEEP),
    (Reason.REMOVAL_DISABLED, lambda f: not f.policy.remove_unused, Action.KEEP),
    (Reason.QUARANTINE_EXPIRED, lambda f: True, Action.PURGE),
)


def _decide_trash(
    inventory: Inventory, policy: Policy, users: Mapping[str, tuple[User, ...]], now: float
) -> tuple[TrashDecision, ...]:
    present = {e.name for e in inventory.entries}
    newest: dict[str, TrashEntry] = {}
    for t in inventory.trash:
        if t.name not in newest or t.quarantined_at > newest[t.name].quarantined_at:
            newest[t.name] = t
    out = []
    for t in inventory.trash:
        used = users.get(t.name, ())
        f = _TrashFacts(
            entry=t,
            users=used,
            restorable=bool(used) and t.name not in present and newest[t.name] is t,
            now=now,
            complete=inventory.complete,
            policy=policy,
        )
        reason, _, action = next(rule for rule in _TRASH_RULES if rule[1](f))
        out.append(TrashDecision(t, action, reason, users=used, purge_at=f.purge_at))
    return tuple(out)


def _corrupt_in_use(decisions: tuple[Decision, ...]) -> tuple[Problem, ...]:
    """A corrupt entry still in use is kept (removing it would destroy its users) and reported
    with every user, so that the operator can repair it (``imagecache verify --repair``)."""
    return tuple(
        Problem(
            ProblemCode.ENTRY_CORRUPT,
            d.entry.name,
            "its bytes no longer match its digest record; kept, because it is in use by "
            + ", ".join(f"{u.source} {u.ref}" for u in d.users)
            + f"; repair it with `imagecache verify --repair {d.entry.name}`",
        )
        for d in decisions
        if d.entry.integrity is Integrity.CORRUPT and d.users
    )


def decide(inventory: Inventory, policy: Policy, now: float) -> Plan:
    """Decide the action and reason for every cache entry and every quarantined entry; pure.

    An incomplete view (any blocking problem) removes nothing; report-only mode
    (``remove_unused`` false) removes nothing; unknown names, symlinks and directories are never
    removed; a negative age (a clock step) never removes. A quarantined entry is purged when its
    quarantine has expired (``quarantined_at + quarantine_seconds <= now``) and restored when its
    name is referenced again (a disk's backing chain names it, an instance record claims it) and
    no cache entry of that name exists.
    """
    # Shared storage: a peer whose manifest is missing, stale or incomplete is a gap in the view.
    gaps = peer_problems(peers(inventory, policy, now), policy, now)
    gaps += name_shared(inventory, policy, now)
    if gaps:
        inventory = dataclasses.replace(inventory, problems=(*inventory.problems, *gaps))
    users = users_by_entry(inventory, policy)
    complete = inventory.complete
    decisions = tuple(
        _decide_one(
            _Facts(
                entry=entry,
                # Every kind: a `.part` or `.converted` name that a disk opens as its backing
                # file is in use like any other entry, whatever its name says.
                users=users.get(entry.name, ()),
                age=now - entry.mtime,
                threshold=threshold_seconds(entry.kind, policy),
                complete=complete,
                policy=policy,
            )
        )
        for entry in inventory.entries
    )
    trash = _decide_trash(inventory, policy, users, now)
    state: Capacity | None = None
    short: tuple[Problem, ...] = ()
    if policy.capacity_limited:  # a size limit or a watermark: make room (capacity.py)
        decisions, trash, state, short = capacity.apply(inventory, policy, decisions, trash)
    return Plan(
        host=inventory.host,
        cache_dir=inventory.cache_dir,
        now=now,
        complete=complete,
        decisions=decisions,
        problems=inventory.problems + record_notes(inventory) + _corrupt_in_use(decisions) + short,
        policy=policy,
        trash=trash,
        capacity=state,
    )


def touch_only(plan: Plan) -> Plan:
    """``plan`` without removals (another host cleans): in-use entries are still touched, and a
    quarantined entry used again is still restored."""
    keep = Reason.ANOTHER_CLEANER
    return dataclasses.replace(
        plan,
        decisions=tuple(
            d
            if d.action is Action.KEEP
            else dataclasses.replace(d, action=Action.KEEP, reason=keep)
            for d in plan.decisions
        ),
        trash=tuple(
            t
            if t.action is not Action.PURGE
            else dataclasses.replace(t, action=Action.KEEP, reason=keep)
            for t in plan.trash
        ),
    )

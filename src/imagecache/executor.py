"""Apply a plan beside nova-compute: entry locks, a re-decision under them, quarantine, audit.

:func:`apply` does, in this order:

1. touch every entry decided ``in-use`` (``touch_in_use``), without a lock, as Nova does, so a
   peer's manager never sees it as old: only a regular file a fresh listing of the cache still
   shows under that name, with the planned device and inode;
2. check that the audit log can be appended to: if not, nothing is removed, quarantined, purged,
   restored or reaped and no lock file collected (every action must leave its line);
3. for every entry to quarantine, remove or reap and every quarantined entry to purge or restore,
   in batches: take the entry locks that are free right now, without waiting; while holding
   them, observe the host once more and decide again; act; release. Then the same for the
   removals whose lock was busy: wait, holding nothing, until some of them are free, within what
   is left of *one* deadline of ``lock_timeout`` seconds for the whole pass; take those, act,
   release; again for the rest (a temp whose lock is busy is being written: it is skipped, never
   waited for). An entry is acted on only if the fresh decision still says so
   *and* it is the very file planned (inode, size, mtime). A re-check of the file alone is not
   enough: a spawn may have created an overlay on it since the plan without changing it. Holding
   the lock, a well-behaved writer (nova-compute, our own create-disk) has either finished, and
   the fresh observation sees its overlay, or starts after we release, and then finds the base
   missing and fetches it again under the lock.

   Why batches and one deadline: every lock we hold blocks nova-compute's spawns on that
   base. Waiting for the locks one by one, each for ``lock_timeout``, while holding those already
   taken, let one long Nova download block spawns on every other planned entry for N times the
   timeout; and two passes that each held half of the same entries while waiting for the other
   half waited each other out for the whole timeout. Now a lock is held only for one
   observation and its action, never while waiting for another;
4. collect lock files of names gone for long, only where a removal pass could have removed those
   names: the plan is complete, removal is enabled, and the cache directory was fully listed.

A saved plan (``clean --plan``) is decided afresh with the current policy *and* with the policy it
was made with: an entry goes only if both fresh decisions remove it, and it is quarantined unless
both say remove. So a plan never does more than either policy would do now.

The clock is a parameter (:class:`~imagecache.clock.Clock`), and so is ``should_stop``, asked
between entries: a daemon told to stop leaves the remaining entries as they are. Nothing here
raises for one entry: each entry's fate is an :class:`~imagecache.results.Outcome`, and every
exception an action may meet maps to one through :data:`_FAILURES`.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

from imagecache import lockfiles, locks, naming
from imagecache.clock import Clock
from imagecache.errors import EntryChanged, LockTimeout
from imagecache.layout import Layout, trash_dir_of
from imagecache.model import (
    CacheEntry,
    FileType,
    Inventory,
    Kind,
    Problem,
    ProblemCode,
    TrashEntry,
)
from imagecache.plan import Action, Decision, Plan, Policy, Reason, TrashDecision, plan_id
from imagecache.policy import decide
from imagecache.results import Outcome, Report, Result
from imagecache.sources import openfiles
from imagecache.sources.cache import scan_cache
from imagecache.store import fsops
from imagecache.store import trash as trash_store
from imagecache.store.audit import AuditLog

__all__ = ["Failure", "apply", "failure_of"]

LOG = logging.getLogger(__name__)

_REMOVALS = frozenset({Action.REMOVE, Action.QUARANTINE})
_ACTIONS = _REMOVALS | {Action.REAP}

# Why a fresh decision no longer acts, as the reason a planned action is skipped.
_SKIP_REASON = {
    Reason.IN_USE: Reason.NOW_IN_USE,
    Reason.REFERENCED_AGAIN: Reason.NOW_IN_USE,
    Reason.TOO_YOUNG: Reason.NOW_TOO_YOUNG,
    Reason.TEMP_TOO_YOUNG: Reason.NOW_TOO_YOUNG,
    Reason.CLOCK_SKEW: Reason.NOW_TOO_YOUNG,
    Reason.IN_QUARANTINE: Reason.NOW_TOO_YOUNG,
    Reason.INCOMPLETE_VIEW: Reason.INCOMPLETE_VIEW,
}


@dataclass(frozen=True, slots=True)
class Failure:
    """How an exception met while acting becomes an outcome: its result, reason, and message."""

    exception: type[BaseException]
    result: Result
    reason: Reason
    with_message: bool = True


# The one failure table, first match wins: what every action (touch, removal, quarantine, purge,
# restore, reap) may meet. Callers put their few special cases in front (a busy temp is
# ``temp-locked``, a restore's missing trash entry ``not-in-trash``).
_FAILURES: tuple[Failure, ...] = (
    Failure(FileNotFoundError, Result.SKIPPED, Reason.VANISHED, with_message=False),
    Failure(EntryChanged, Result.SKIPPED, Reason.NAME_TAKEN),
    Failure(LockTimeout, Result.SKIPPED, Reason.LOCK_TIMEOUT),
    Failure(OSError, Result.FAILED, Reason.OS_ERROR),
)
_TOUCH_FAILURES = (Failure(PermissionError, Result.FAILED, Reason.TOUCH_DENIED),)
_REAP_FAILURES = (Failure(LockTimeout, Result.SKIPPED, Reason.TEMP_LOCKED, with_message=False),)


def failure_of(exc: BaseException, special: Sequence[Failure] = ()) -> Failure | None:
    """The first row of ``special`` then :data:`_FAILURES` that ``exc`` is an instance of."""
    return next((f for f in (*special, *_FAILURES) if isinstance(exc, f.exception)), None)


def outcome_for(
    name: str,
    kind: Kind,
    exc: BaseException,
    *,
    special: Sequence[Failure] = (),
    trash_name: str | None = None,
) -> Outcome:
    """The outcome of an action that raised ``exc``; re-raises what no table row maps."""
    f = failure_of(exc, special)
    if f is None:
        raise exc
    message = str(exc) if f.with_message else ""
    return Outcome(name, kind, f.result, f.reason, trash_name=trash_name, message=message)


@dataclass
class Run:
    """The state of one application: where to act, and what happened so far."""

    layout: Layout
    audit: AuditLog
    plan_id: str | None
    outcomes: list[Outcome] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # The clock each audit line is stamped with when its action is taken (not its batch's time:
    # on shared storage, lines of several hosts are compared by it).
    wall: Callable[[], float] | None = None

    def path(self, name: str) -> str:
        return self.layout.entry_path(name)

    def note(self, outcome: Outcome) -> None:
        """Record an outcome that changed nothing (a skip, a failure, a touch): not audited."""
        self.outcomes.append(outcome)
        level = logging.WARNING if outcome.problem else logging.DEBUG
        LOG.log(level, "%s %r: %s %s", outcome.result, outcome.name, outcome.reason,
                outcome.message)  # fmt: skip

    def done(self, outcome: Outcome, *, now: float) -> None:
        """Record an action taken, in the report and the audit log."""
        self.outcomes.append(outcome)
        level = logging.WARNING if outcome.problem else logging.INFO
        LOG.log(level, "%s %r (%s, %d bytes)", outcome.result, outcome.name, outcome.reason,
                outcome.bytes)  # fmt: skip
        try:
            when = now if self.wall is None else self.wall()
            self.audit.record(outcome, now=when, plan_id=self.plan_id)
        except OSError as exc:
            # The action stands (undoing it would be a second unlogged action); say so loudly.
            LOG.error("cannot write the audit log %s: %s", self.audit.path, exc)
            message = f"cannot append: {exc}"
            self.problems.append(Problem(ProblemCode.AUDIT_UNWRITABLE, self.audit.path, message))

    def audit_writable(self) -> bool:
        """Whether the audit log can be appended to; if not, say why as a problem of the pass."""
        try:
            self.audit.check_writable()
        except OSError as exc:
            LOG.error("cannot open the audit log %s: %s; nothing removed", self.audit.path, exc)
            message = f"audit log not writable: nothing removed ({exc})"
            self.problems.append(Problem(ProblemCode.AUDIT_UNWRITABLE, self.audit.path, message))
            return False
        return True

    def report(self, now: float) -> Report:
        return Report(self.plan_id, now, tuple(self.outcomes), tuple(self.problems))


def _outcome(
    entry: CacheEntry, result: Result, reason: Reason, *, bytes_: int = 0, freed: int = 0,
    trash_name: str | None = None, message: str = "",
) -> Outcome:  # fmt: skip
    return Outcome(entry.name, entry.kind, result, reason, bytes_, freed, trash_name, message)


def _trash_outcome(
    entry: TrashEntry, result: Result, reason: Reason, *, bytes_: int = 0, freed: int = 0,
    message: str = "",
) -> Outcome:  # fmt: skip
    kind = naming.classify(entry.name)
    return Outcome(entry.name, kind, result, reason, bytes_, freed, entry.trash_name, message)


def apply(
    plan: Plan,
    *,
    layout: Layout,
    observe: Callable[[], Inventory],
    policy: Policy,
    clock: Clock,
    audit: AuditLog,
    lock_timeout: float,
    touch_in_use: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    housekeeping: bool = True,
    collect_lock_files: bool = True,
    max_bytes_per_second: float = 0.0,
) -> Report:
    """Carry out ``plan`` safely and return what was done, entry by entry.

    ``observe`` makes a fresh observation of the host (the same sources the plan came from);
    ``policy`` (the current one) decides again under the locks, and so does ``plan.policy`` when
    it differs; ``clock`` gives the time of each step and the waits; ``should_stop`` is asked
    between entries, and a true answer leaves every entry not yet acted on as it is
    (``stopped``). ``housekeeping`` false skips what only a pass does besides the plan's
    actions: touching in-use entries and collecting stale lock files (``verify`` acting on what
    it found corrupt). ``max_bytes_per_second`` > 0 (``remove_max_bytes_per_second``) frees
    one entry per batch and pauses after each, holding no lock, for as long as its bytes take
    at that rate: large unlinks on XFS, ext4 or NFS are I/O storms otherwise.

    Raises:
        ValueError: ``lock_timeout`` is negative.
    """
    if lock_timeout < 0:
        raise ValueError(f"lock_timeout must be >= 0, got {lock_timeout!r}")
    run = Run(layout=layout, audit=audit, plan_id=plan_id(plan), wall=clock.wall)
    now = clock.wall()
    if touch_in_use and housekeeping:
        _touch_in_use(run, plan, now)
    if _acts(plan) and not run.audit_writable():
        return run.report(now)
    policies = (policy,) if plan.policy == policy else (policy, plan.policy)
    _apply_locked(run, plan, observe=observe, policies=policies, clock=clock,
                  lock_timeout=lock_timeout, should_stop=should_stop,
                  rate=max_bytes_per_second)  # fmt: skip
    # Unlinking in the shared locks/ is a removal too: only the storage's cleaner does it.
    collect = housekeeping and collect_lock_files
    if collect and _may_collect_lock_files(plan, policy) and not should_stop():
        _collect_lock_files(run, plan, now=now)
    return run.report(now)


def _acts(plan: Plan) -> bool:
    """Whether applying ``plan`` may take an audited action (touches are not audited)."""
    return any(d.action in _ACTIONS for d in plan.decisions) or any(
        t.action is not Action.KEEP for t in plan.trash
    )


def _touch_in_use(run: Run, plan: Plan, now: float) -> None:
    """Touch the entries ``plan`` decided in use that are still those very files in the cache.

    A plan may be a saved one, hand-edited since: its names are checked against a fresh listing
    of the cache directory (``lstat`` of each name, nothing opened), and only a regular file that
    is still the one planned (device and inode) is touched, never a symlink, a directory, our own
    state directory or a name the cache does not hold. The listing costs one ``scandir``, not an
    observation of the host. Between it and the touch a name can still be swapped: the touch
    never follows a symlink (:func:`fsops.touch`), so at worst a new cache entry is touched.
    """
    in_use = [d for d in plan.decisions if d.reason is Reason.IN_USE]
    if not in_use:
        return
    entries, _ = scan_cache(run.layout.cache_dir)
    listed = {e.name: e for e in entries}
    for d in in_use:
        found = listed.get(d.entry.name)
        if found is None:
            run.note(_outcome(d.entry, Result.SKIPPED, Reason.VANISHED))
            continue
        if found.file_type is not FileType.FILE or not _same_identity(d.entry, found):
            run.note(_outcome(d.entry, Result.SKIPPED, Reason.CHANGED_SINCE_PLAN))
            continue
        try:
            # Nova ignores EACCES here (LP 1809123); we go on, but say so.
            fsops.touch(run.path(d.entry.name), now)
        except OSError as exc:
            run.note(outcome_for(d.entry.name, d.entry.kind, exc, special=_TOUCH_FAILURES))
        else:
            run.note(_outcome(d.entry, Result.TOUCHED, Reason.IN_USE))


def _same_identity(planned: CacheEntry, found: CacheEntry) -> bool:
    # A plan saved before devices were recorded says device 0: its inode must still match.
    same_device = planned.device in (0, found.device)
    return same_device and planned.inode == found.inode


def _lock_name(d: Decision) -> str:
    # A temp file is written under the lock of the entry it becomes.
    return naming.entry_of_temp(d.entry.name) if d.action is Action.REAP else d.entry.name


@dataclass(frozen=True, slots=True)
class _Work:
    """What one batch acts on."""

    decisions: tuple[Decision, ...]
    trash: tuple[TrashDecision, ...]

    @property
    def lock_names(self) -> set[str]:
        return {_lock_name(d) for d in self.decisions} | {t.entry.name for t in self.trash}

    def only(self, names: set[str]) -> _Work:
        return _Work(
            tuple(d for d in self.decisions if _lock_name(d) in names),
            tuple(t for t in self.trash if t.entry.name in names),
        )

    def parts(self, *, throttled: bool) -> list[_Work]:
        """The batches to act in: all at once; throttled, what frees bytes one entry at a time
        (after what frees none, together: quarantines and restores are renames)."""
        if not throttled:
            return [self]
        frees = [d for d in self.decisions if d.action is not Action.QUARANTINE]
        purges = [t for t in self.trash if t.action is Action.PURGE]
        rest = _Work(
            tuple(d for d in self.decisions if d.action is Action.QUARANTINE),
            tuple(t for t in self.trash if t.action is not Action.PURGE),
        )
        singles = [_Work((d,), ()) for d in frees] + [_Work((), (t,)) for t in purges]
        return [rest, *singles] if rest.decisions or rest.trash else singles


def _apply_locked(
    run: Run,
    plan: Plan,
    *,
    observe: Callable[[], Inventory],
    policies: tuple[Policy, ...],
    clock: Clock,
    lock_timeout: float,
    should_stop: Callable[[], bool],
    rate: float = 0.0,
) -> None:
    work = _Work(
        tuple(d for d in plan.decisions if d.action in _ACTIONS),
        tuple(t for t in plan.trash if t.action is not Action.KEEP),
    )
    if not work.decisions and not work.trash:
        return
    # One deadline for the whole pass, on the monotonic clock (a wait, not an age).
    deadline = clock.monotonic() + lock_timeout
    batch = _Batch(run, observe=observe, policies=policies, clock=clock, should_stop=should_stop)

    owed = 0.0  # seconds of pause the bytes freed so far still owe (the throttle)

    def apply(part: _Work, wait: float) -> dict[str, LockTimeout]:
        nonlocal owed
        if owed > 0:  # paid before the next batch, holding no lock; never after the last
            _pause(owed, clock, should_stop)
            owed = 0.0
        if should_stop():  # no lock, no observation of the host: only what was not done
            for d in part.decisions:
                run.note(_outcome(d.entry, Result.SKIPPED, Reason.STOPPED))
            for t in part.trash:
                run.note(_trash_outcome(t.entry, Result.SKIPPED, Reason.STOPPED))
            return {}
        done = len(run.outcomes)
        busy = batch.apply(part, wait=wait)
        if rate > 0:
            owed = sum(o.bytes_freed for o in run.outcomes[done:]) / rate
        return busy

    busy: dict[str, LockTimeout] = {}
    for part in work.parts(throttled=rate > 0):
        busy |= apply(part, 0)
    for d in work.decisions:  # a temp whose lock is busy is being written: never waited for
        if d.action is Action.REAP and _lock_name(d) in busy:
            run.note(_outcome(d.entry, Result.SKIPPED, Reason.TEMP_LOCKED))
    retry = _Work(tuple(d for d in work.decisions if d.action is not Action.REAP), work.trash)
    retry = retry.only(set(busy))
    if not retry.decisions and not retry.trash:
        return
    # Each batch waits only while it holds nothing, acts on the locks that came free, releases
    # them and asks again for the rest: never holding one lock while waiting for another.
    while True:
        still: dict[str, LockTimeout] = {}
        for part in retry.parts(throttled=rate > 0):
            still |= apply(part, max(0.0, deadline - clock.monotonic()))
        if not still or len(still) == len(retry.lock_names) or should_stop():
            break
        retry = retry.only(set(still))
    message = f"(one wait of at most {lock_timeout:g} s for the whole pass)"
    stopped = should_stop()
    for name in sorted(retry.lock_names & set(still)):
        kind = naming.classify(name)
        if stopped:  # not waited for any more: the pass was asked to stop
            run.note(Outcome(name, kind, Result.SKIPPED, Reason.STOPPED))
        else:
            run.note(Outcome(name, kind, Result.SKIPPED, Reason.LOCK_TIMEOUT,
                             message=f"{still[name]} {message}"))  # fmt: skip


def _pause(seconds: float, clock: Clock, should_stop: Callable[[], bool]) -> None:
    """Sleep ``seconds`` in slices of at most one, so that a stop is heard within a second."""
    end = clock.monotonic() + seconds
    while (left := end - clock.monotonic()) > 0 and not should_stop():
        clock.sleep(min(1.0, left))


@dataclass
class _Batch:
    """Lock what can be locked, observe and decide once more, act, release."""

    run: Run
    observe: Callable[[], Inventory]
    policies: tuple[Policy, ...]
    clock: Clock
    should_stop: Callable[[], bool]

    def apply(self, work: _Work, *, wait: float) -> dict[str, LockTimeout]:
        """Act on ``work`` within ``wait`` seconds of lock waiting; return the busy locks."""
        run = self.run
        with ExitStack() as held:
            names = work.lock_names
            missed = locks.take_entry_locks(
                held, run.layout.instances_path, names, wait=wait,
                monotonic=self.clock.monotonic, sleep=self.clock.sleep,
            )  # fmt: skip
            busy = {n: exc for n, exc in missed.items() if isinstance(exc, LockTimeout)}
            failed = {n: exc for n, exc in missed.items() if n not in busy}
            now = self.clock.wall()
            # Observing the host again is the slow part: only when there is something to act on.
            inventory = self.observe() if len(missed) < len(names) else None
            fresh = tuple(decide(inventory, p, now) for p in self.policies) if inventory else ()
            _report_gaps(run, fresh)  # why the fresh decisions keep everything, if they do
            for d in work.decisions:
                name = _lock_name(d)
                if name in busy:
                    continue
                if self.should_stop():
                    run.note(_outcome(d.entry, Result.SKIPPED, Reason.STOPPED))
                elif name in failed:
                    run.note(outcome_for(d.entry.name, d.entry.kind, failed[name]))
                else:
                    found = [_decision_named(p, d.entry.name) for p in fresh]
                    _act_on_entry(run, d, found, now=now)
            for t in work.trash:
                if t.entry.name in busy:
                    continue
                if self.should_stop():
                    run.note(_trash_outcome(t.entry, Result.SKIPPED, Reason.STOPPED))
                elif t.entry.name in failed:
                    run.note(_trash_failure(t.entry, failed[t.entry.name]))
                else:
                    found_t = [_trash_named(p, t.entry.trash_name) for p in fresh]
                    _act_on_trash(run, t, found_t, now=now)
        return busy


def _report_gaps(run: Run, fresh: Sequence[Plan]) -> None:
    """The blocking problems of the act-time decisions, once each, as the pass's own: a plan
    made from a complete view may meet an incomplete one (libvirt gone since, a peer stale), and
    the report must say why nothing was done."""
    seen = {(p.code, p.ref) for p in run.problems}
    for p in (p for plan in fresh for p in plan.problems):
        if p.blocking and (p.code, p.ref) not in seen:
            seen.add((p.code, p.ref))
            run.problems.append(p)


def _decision_named(plan: Plan, name: str) -> Decision | None:
    return next((d for d in plan.decisions if d.entry.name == name), None)


def _trash_named(plan: Plan, trash_name: str) -> TrashDecision | None:
    return next((t for t in plan.trash if t.entry.trash_name == trash_name), None)


def _same_file(entry: CacheEntry, st: os.stat_result | CacheEntry) -> bool:
    if isinstance(st, CacheEntry):
        return (entry.inode, entry.bytes_apparent, entry.mtime) == (
            st.inode, st.bytes_apparent, st.mtime
        )  # fmt: skip
    return (entry.inode, entry.bytes_apparent, entry.mtime) == (st.st_ino, st.st_size, st.st_mtime)


def recheck(planned: Decision, fresh: Sequence[Decision | None]) -> tuple[Action, Reason | None]:
    """The action to take on ``planned`` now, or why not, from the fresh decisions under its lock.

    The one re-check of removals, quarantines and reaps. The entry must still be the very file
    planned, and every fresh decision (one per policy) must act on it as the plan does: a removal
    only when all remove, else a quarantine when all remove or quarantine; a reap only when all
    reap. Returns ``(action, None)`` to act, ``(KEEP, reason)`` to skip.
    """
    if not fresh or any(f is None for f in fresh):
        return Action.KEEP, Reason.VANISHED
    decided = [f for f in fresh if f is not None]
    if not all(_same_file(planned.entry, f.entry) for f in decided):
        return Action.KEEP, Reason.CHANGED_SINCE_PLAN
    wanted = {Action.REAP} if planned.action is Action.REAP else _REMOVALS
    refusing = next((f for f in decided if f.action not in wanted), None)
    if refusing is not None:
        return Action.KEEP, _SKIP_REASON.get(refusing.reason, Reason.NOW_KEPT)
    if planned.action is Action.REAP:
        return Action.REAP, None
    both_remove = planned.action is Action.REMOVE and all(
        f.action is Action.REMOVE for f in decided
    )
    return (Action.REMOVE if both_remove else Action.QUARANTINE), None


def _open_by(path: str, st: os.stat_result, *, walk: bool) -> str:
    """Who holds the regular file ``path`` (``st``, its ``lstat``) open: by ``/proc`` when
    ``walk`` (the fresh observation under the lock already walked it for cache entries: they
    are users then, ``open-file``), and by qemu's image lock, which also sees a qemu in a PID
    namespace whose ``/proc`` is hidden. Empty when nobody does."""
    if not stat.S_ISREG(st.st_mode):
        return ""  # never opened: a FIFO would wake its writer
    if walk:
        key = (st.st_dev, st.st_ino)
        holding = openfiles.holders({key}).get(key, [])
        if holding:
            return "held open by " + ", ".join(holding)
    if openfiles.ofd_locked(path):
        return "locked by another process (qemu's image lock), perhaps in another PID namespace"
    return ""


def _act_on_entry(
    run: Run,
    d: Decision,
    fresh: Sequence[Decision | None],
    *,
    now: float,
) -> None:
    """Quarantine, remove or reap one entry; its lock is held. A file any process holds open is
    in use whatever the records say: kept (``open-file``), the process named."""
    e = d.entry
    action, skip = recheck(d, fresh)
    if skip is not None:
        return run.note(_outcome(e, Result.SKIPPED, skip))
    path = run.path(e.name)
    try:
        st = os.lstat(path)
        # Nova touches a base outside the lock; one last look catches a touch since re-observing.
        if not _same_file(e, st):
            return run.note(_outcome(e, Result.SKIPPED, Reason.CHANGED_SINCE_PLAN))
        held = _open_by(path, st, walk=False)
        if held:
            LOG.warning("kept %s: %s", e.name, held)
            return run.note(_outcome(e, Result.SKIPPED, Reason.OPEN_FILE, message=held))
        size = st.st_blocks * 512
        if action is Action.QUARANTINE:
            name = trash_store.quarantine(run.layout.cache_dir, e.name, now=now)
            done = _outcome(e, Result.QUARANTINED, d.reason, bytes_=size, trash_name=name)
        else:
            freed = fsops.remove(path)
            result = Result.REAPED if action is Action.REAP else Result.REMOVED
            done = _outcome(e, result, d.reason, bytes_=size, freed=freed)
    except (OSError, EntryChanged) as exc:
        return run.note(outcome_for(e.name, e.kind, exc))
    run.done(done, now=now)


def _trash_failure(e: TrashEntry, exc: BaseException) -> Outcome:
    return outcome_for(e.name, naming.classify(e.name), exc, trash_name=e.trash_name)


def _act_on_trash(
    run: Run, t: TrashDecision, fresh: Sequence[TrashDecision | None], *, now: float
) -> None:
    """Purge or restore one quarantined entry; the lock of its original name is held.

    A restore needs only the current policy's fresh decision (restoring undoes a removal and is
    always safe); a purge needs every fresh decision to purge.
    """
    e = t.entry
    if not fresh or fresh[0] is None:
        return run.note(_trash_outcome(e, Result.SKIPPED, Reason.VANISHED))
    current = fresh[0]
    if current.entry.inode != e.inode:
        return run.note(_trash_outcome(e, Result.SKIPPED, Reason.CHANGED_SINCE_PLAN))
    deciding = fresh if t.action is Action.PURGE else fresh[:1]
    refusing = next((f for f in deciding if f is None or f.action is not t.action), None)
    if refusing is not None or current.action is not t.action:
        reason = _SKIP_REASON.get(refusing.reason, Reason.NOW_KEPT) if refusing else Reason.NOW_KEPT
        return run.note(_trash_outcome(e, Result.SKIPPED, reason))
    try:
        if t.action is Action.PURGE:
            path = os.path.join(trash_dir_of(run.layout.cache_dir), e.trash_name)
            st = os.lstat(path)
            held = _open_by(path, st, walk=True)  # a trash entry is no observed entry
            if held:  # a qemu still running on a quarantined base: it stays in the trash
                LOG.warning("kept %s in the trash: %s", e.trash_name, held)
                return run.note(_trash_outcome(e, Result.SKIPPED, Reason.OPEN_FILE, message=held))
            freed = trash_store.purge(run.layout.cache_dir, e.trash_name)
            done = _trash_outcome(e, Result.PURGED, t.reason, bytes_=freed, freed=freed)
        else:
            trash_store.restore(run.layout.cache_dir, e.trash_name)
            users = ", ".join(f"{u.source} {u.ref}" for u in current.users)
            done = _trash_outcome(e, Result.RESTORED, t.reason, bytes_=e.bytes_allocated,
                                  message=f"referenced again by {users}")  # fmt: skip
    except (OSError, EntryChanged) as exc:
        return run.note(_trash_failure(e, exc))
    if done.result is Result.RESTORED:
        LOG.warning("RESTORED %r from the trash: %s", e.name, done.message)
    run.done(done, now=now)


def _may_collect_lock_files(plan: Plan, policy: Policy) -> bool:
    # A problem that hides entries (a cache missing, unlistable, an entry that cannot be stat'ed)
    # means the plan does not name every entry, so its names cannot tell live lock files from dead.
    listed = not any(p.hides_entries for p in plan.problems)
    return plan.complete and policy.remove_unused and listed


def _collect_lock_files(run: Run, plan: Plan, *, now: float) -> None:
    live = {d.entry.name for d in plan.decisions} | {t.entry.name for t in plan.trash}
    live |= {naming.entry_of_temp(d.entry.name) for d in plan.decisions}
    try:
        found = lockfiles.collect_stale_lock_files(
            run.layout.instances_path, live, cache_dir=run.layout.cache_dir, now=now
        )
        for path in found:
            LOG.info("removed stale lock file %s", path)
    except OSError as exc:
        message = f"cannot collect: {exc}"
        run.problems.append(Problem(ProblemCode.LOCKS_UNCOLLECTED, run.layout.locks_dir, message))

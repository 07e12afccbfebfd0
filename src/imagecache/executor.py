"""Apply a plan beside nova-compute: entry locks, a re-check under them, quarantine, audit log.

:func:`apply` does, in this order:

1. touch every entry decided ``in-use`` (``touch_in_use``), without a lock, as Nova does, so a
   peer's manager never sees it as old;
2. for every entry to quarantine or remove and every quarantined entry to purge or restore, in
   at most two batches: take the entry locks that are free right now, without waiting; while
   holding them, observe the host once more and decide again with the same policy; act; release.
   Then the same for the entries whose lock was busy, waiting for those locks within what is left
   of *one* deadline of ``lock_timeout`` seconds for the whole pass (a lock still busy then skips
   its entry with ``lock-timeout``). An entry is acted on only if the fresh decision still says so
   *and* it is the very file planned (inode, size, mtime). A re-check of the file alone is not
   enough: a spawn may have created an overlay on it since the plan without changing it. Holding
   the lock, a well-behaved writer (nova-compute, our own create-disk) has either finished, and
   the fresh observation sees its overlay, or starts after we release, and then finds the base
   missing and fetches it again under the lock.

   Why two batches and one deadline: every lock we hold blocks nova-compute's spawns on that
   base. Waiting for the locks one by one, each for ``lock_timeout``, while holding those already
   taken, let one long Nova download block spawns on every other planned entry for N times the
   timeout. Now a free entry's lock is held only for one observation and its action, and no lock
   is held longer than ``lock_timeout`` plus one observation and its actions, however many entries
   are busy: a bounded total hold time for Nova's spawns;
   Before any of this (after the touches), the audit log is opened for append: if it cannot
   be, no entry is removed, quarantined, purged, restored or reaped and no lock file collected,
   only a problem says so: every action must leave its line;
3. reap each stale temporary whose entry lock is free at that moment;
4. collect lock files of names gone for long, only where a removal pass could have removed those
   names: the plan is complete, removal is enabled, and the cache directory was listed. A cache
   directory that is missing or unreadable (an unmounted share) observes no entry at all, which
   would make every lock file look dead, live entries' included.

Every action taken is appended to the audit log. Nothing here raises for one entry: each entry's
fate is an :class:`~imagecache.model.Outcome` in the returned :class:`~imagecache.model.Report`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

from imagecache import locks, naming
from imagecache.errors import EntryChanged, LockTimeout, ObservationError
from imagecache.model import (
    Action,
    CacheEntry,
    Decision,
    Inventory,
    Outcome,
    Plan,
    Policy,
    Problem,
    Reason,
    Report,
    Result,
    TrashDecision,
    TrashEntry,
)
from imagecache.policy import decide
from imagecache.render.plan import plan_id
from imagecache.store import fsops
from imagecache.store.audit import AuditLog

__all__ = ["apply", "restore_entry"]

LOG = logging.getLogger(__name__)

_REMOVALS = frozenset({Action.REMOVE, Action.QUARANTINE})
_ACTIONS = _REMOVALS | {Action.REAP}

# Why a fresh decision no longer removes, as the reason a planned action is skipped.
_SKIP_REASON = {
    Reason.IN_USE: Reason.NOW_IN_USE,
    Reason.REFERENCED_AGAIN: Reason.NOW_IN_USE,
    Reason.TOO_YOUNG: Reason.NOW_TOO_YOUNG,
    Reason.TEMP_TOO_YOUNG: Reason.NOW_TOO_YOUNG,
    Reason.CLOCK_SKEW: Reason.NOW_TOO_YOUNG,
    Reason.IN_QUARANTINE: Reason.NOW_TOO_YOUNG,
    Reason.INCOMPLETE_VIEW: Reason.INCOMPLETE_VIEW,
}


@dataclass
class _Run:
    """The state of one application: where to act, and what happened so far."""

    plan: Plan
    instances_path: str
    audit: AuditLog
    plan_id: str | None
    outcomes: list[Outcome] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def path(self, name: str) -> str:
        return os.path.join(self.plan.cache_dir, name)

    def note(self, outcome: Outcome) -> None:
        """Record an outcome that changed nothing (a skip, a failure, a touch): not audited."""
        self.outcomes.append(outcome)
        level = logging.WARNING if outcome.problem else logging.DEBUG
        LOG.log(
            level, "%s %s: %s %s", outcome.result, outcome.name, outcome.reason, outcome.message
        )

    def done(self, outcome: Outcome, *, now: float) -> None:
        """Record an action taken, in the report and the audit log."""
        self.outcomes.append(outcome)
        level = logging.WARNING if outcome.problem else logging.INFO
        LOG.log(level, "%s %s (%s, %d bytes)", outcome.result, outcome.name, outcome.reason,
                outcome.bytes)  # fmt: skip
        try:
            self.audit.record(outcome, now=now, plan_id=self.plan_id)
        except OSError as exc:
            # The action stands (undoing it would be a second unlogged action); say so loudly.
            LOG.error("cannot write the audit log %s: %s", self.audit.path, exc)
            self.problems.append(Problem("audit", self.audit.path, f"cannot append: {exc}"))


def _outcome(
    entry: CacheEntry,
    result: Result,
    reason: Reason,
    *,
    bytes: int = 0,
    bytes_freed: int = 0,
    trash_name: str | None = None,
    message: str = "",
) -> Outcome:
    return Outcome(entry.name, entry.kind, result, reason, bytes, bytes_freed, trash_name, message)


def _trash_outcome(
    entry: TrashEntry,
    result: Result,
    reason: Reason,
    *,
    bytes: int = 0,
    bytes_freed: int = 0,
    message: str = "",
) -> Outcome:
    kind = naming.classify(entry.name)
    return Outcome(entry.name, kind, result, reason, bytes, bytes_freed, entry.trash_name, message)


def _same(entry: CacheEntry, *, inode: int, size: int, mtime: float) -> bool:
    return (entry.inode, entry.bytes_apparent, entry.mtime) == (inode, size, mtime)


def apply(
    plan: Plan,
    *,
    instances_path: str,
    observe: Callable[[], Inventory],
    policy: Policy,
    clock: Callable[[], float],
    audit: AuditLog,
    lock_timeout: float,
    touch_in_use: bool = True,
) -> Report:
    """Carry out ``plan`` safely and return what was done, entry by entry.

    ``observe`` makes a fresh observation of the host (the same sources the plan came from);
    ``policy`` decides again under the locks; ``clock`` gives the time of each step.

    Raises:
        ValueError: ``lock_timeout`` is negative.
    """
    run = _Run(plan=plan, instances_path=instances_path, audit=audit, plan_id=plan_id(plan))
    now = clock()
    if touch_in_use:
        _touch_in_use(run, now)
    if _acts(plan) and not _audit_writable(run):
        return Report(run.plan_id, now, tuple(run.outcomes), tuple(run.problems))
    _apply_locked(run, observe=observe, policy=policy, clock=clock, lock_timeout=lock_timeout)
    _reap_temps(run, now=clock(), stale_age=policy.stale_temp_age)
    if _may_collect_lock_files(plan, policy):
        _collect_lock_files(run, now=now)
    return Report(run.plan_id, now, tuple(run.outcomes), tuple(run.problems))


def _acts(plan: Plan) -> bool:
    """Whether applying ``plan`` may take an audited action (touches are not audited)."""
    return any(d.action in _ACTIONS for d in plan.decisions) or any(
        t.action is not Action.KEEP for t in plan.trash
    )


def _audit_writable(run: _Run) -> bool:
    """Whether the audit log can be appended to; if not, say why as a problem of the pass."""
    try:
        run.audit.check_writable()
    except OSError as exc:
        LOG.error("cannot open the audit log %s: %s; nothing removed", run.audit.path, exc)
        message = f"audit log not writable: nothing removed ({exc})"
        run.problems.append(Problem("audit", run.audit.path, message))
        return False
    return True


def _touch_in_use(run: _Run, now: float) -> None:
    for d in run.plan.decisions:
        if d.reason is not Reason.IN_USE:
            continue
        try:
            fsops.touch(run.path(d.entry.name), now)
        except FileNotFoundError:
            run.note(_outcome(d.entry, Result.SKIPPED, Reason.VANISHED))
        except PermissionError as exc:
            # Nova ignores EACCES here (LP 1809123); we go on, but say so.
            run.note(_outcome(d.entry, Result.FAILED, Reason.TOUCH_DENIED, message=str(exc)))
        except OSError as exc:
            run.note(_outcome(d.entry, Result.FAILED, Reason.OS_ERROR, message=str(exc)))
        else:
            run.note(_outcome(d.entry, Result.TOUCHED, Reason.IN_USE))


def _apply_locked(
    run: _Run,
    *,
    observe: Callable[[], Inventory],
    policy: Policy,
    clock: Callable[[], float],
    lock_timeout: float,
) -> None:
    removals = [d for d in run.plan.decisions if d.action in _REMOVALS]
    trash = [t for t in run.plan.trash if t.action is not Action.KEEP]
    if not removals and not trash:
        return
    if lock_timeout < 0:
        raise ValueError(f"lock_timeout must be >= 0, got {lock_timeout!r}")
    # One deadline for the whole pass, on the monotonic clock (a wait, not an age).
    deadline = time.monotonic() + lock_timeout
    busy = _apply_batch(run, removals, trash, observe=observe, policy=policy, clock=clock, wait=0)
    if not busy:
        return
    wait = max(0.0, deadline - time.monotonic())
    removals = [d for d in removals if d.entry.name in busy]
    trash = [t for t in trash if t.entry.name in busy]
    still = _apply_batch(run, removals, trash, observe=observe, policy=policy, clock=clock,
                         wait=wait)  # fmt: skip
    for d in removals:
        if d.entry.name in still:
            run.note(_timed_out(d.entry.name, still[d.entry.name], lock_timeout))
    for t in trash:
        if t.entry.name in still:
            run.note(_timed_out(t.entry.name, still[t.entry.name], lock_timeout))


def _timed_out(name: str, exc: LockTimeout, lock_timeout: float) -> Outcome:
    message = f"{exc} (one wait of at most {lock_timeout:g} s for the whole pass)"
    return Outcome(name, naming.classify(name), Result.SKIPPED, Reason.LOCK_TIMEOUT,
                   message=message)  # fmt: skip


def _apply_batch(
    run: _Run,
    removals: list[Decision],
    trash: list[TrashDecision],
    *,
    observe: Callable[[], Inventory],
    policy: Policy,
    clock: Callable[[], float],
    wait: float,
) -> dict[str, LockTimeout]:
    """Lock what can be locked within ``wait``, re-observe once, act, release; return the busy."""
    with ExitStack() as held:
        names = {d.entry.name for d in removals} | {t.entry.name for t in trash}
        missed = locks.take_entry_locks(held, run.instances_path, names, wait=wait)
        busy = {n: exc for n, exc in missed.items() if isinstance(exc, LockTimeout)}
        failed = {n: str(exc) for n, exc in missed.items() if n not in busy}
        removals = [d for d in removals if d.entry.name not in busy]
        trash = [t for t in trash if t.entry.name not in busy]
        now = clock()
        # Observing the host again is the slow part: only when there is something to act on.
        fresh = decide(observe(), policy, now) if len(missed) < len(names) else None
        by_name = {d.entry.name: d for d in fresh.decisions} if fresh else {}
        by_trash_name = {t.entry.trash_name: t for t in fresh.trash} if fresh else {}
        for d in removals:
            if d.entry.name in failed:
                run.note(_outcome(d.entry, Result.FAILED, Reason.OS_ERROR,
                                  message=failed[d.entry.name]))  # fmt: skip
            else:
                _remove_one(run, d, by_name.get(d.entry.name), now=now)
        for t in trash:
            if t.entry.name in failed:
                run.note(_trash_outcome(t.entry, Result.FAILED, Reason.OS_ERROR,
                                        message=failed[t.entry.name]))  # fmt: skip
            else:
                _trash_one(run, t, by_trash_name.get(t.entry.trash_name), now=now)
    return busy


def _remove_one(run: _Run, d: Decision, fresh: Decision | None, *, now: float) -> None:
    """Quarantine or remove one entry; its lock is held."""
    e = d.entry
    if fresh is None:
        return run.note(_outcome(e, Result.SKIPPED, Reason.VANISHED))
    f = fresh.entry
    if not _same(e, inode=f.inode, size=f.bytes_apparent, mtime=f.mtime):
        return run.note(_outcome(e, Result.SKIPPED, Reason.CHANGED_SINCE_PLAN))
    if fresh.action not in _REMOVALS:
        return run.note(
            _outcome(e, Result.SKIPPED, _SKIP_REASON.get(fresh.reason, Reason.NOW_KEPT))
        )
    path = run.path(e.name)
    try:
        st = os.lstat(path)
        # Nova touches a base outside the lock; one last look catches a touch since re-observing.
        if not _same(e, inode=st.st_ino, size=st.st_size, mtime=st.st_mtime):
            return run.note(_outcome(e, Result.SKIPPED, Reason.CHANGED_SINCE_PLAN))
        if d.action is Action.QUARANTINE:
            trash_name = fsops.quarantine(run.plan.cache_dir, e.name, now=now)
            done = _outcome(e, Result.QUARANTINED, d.reason, bytes=st.st_blocks * 512,
                            trash_name=trash_name)  # fmt: skip
        else:
            freed = fsops.remove(path)
            done = _outcome(
                e, Result.REMOVED, d.reason, bytes=st.st_blocks * 512, bytes_freed=freed
            )
    except FileNotFoundError:
        return run.note(_outcome(e, Result.SKIPPED, Reason.VANISHED))
    except EntryChanged as exc:
        return run.note(_outcome(e, Result.SKIPPED, Reason.NAME_TAKEN, message=str(exc)))
    except OSError as exc:
        return run.note(_outcome(e, Result.FAILED, Reason.OS_ERROR, message=str(exc)))
    run.done(done, now=now)


def _trash_one(run: _Run, t: TrashDecision, fresh: TrashDecision | None, *, now: float) -> None:
    """Purge or restore one quarantined entry; the lock of its original name is held."""
    e = t.entry
    if fresh is None:
        return run.note(_trash_outcome(e, Result.SKIPPED, Reason.VANISHED))
    if fresh.entry.inode != e.inode:
        return run.note(_trash_outcome(e, Result.SKIPPED, Reason.CHANGED_SINCE_PLAN))
    if fresh.action is not t.action:
        reason = _SKIP_REASON.get(fresh.reason, Reason.NOW_KEPT)
        return run.note(_trash_outcome(e, Result.SKIPPED, reason))
    try:
        if t.action is Action.PURGE:
            freed = fsops.purge(run.plan.cache_dir, e.trash_name)
            done = _trash_outcome(e, Result.PURGED, t.reason, bytes=freed, bytes_freed=freed)
        else:
            fsops.restore(run.plan.cache_dir, e.trash_name)
            users = ", ".join(f"{u.source} {u.ref}" for u in fresh.users)
            done = _trash_outcome(e, Result.RESTORED, t.reason, bytes=e.bytes_allocated,
                                  message=f"referenced again by {users}")  # fmt: skip
    except FileNotFoundError:
        return run.note(_trash_outcome(e, Result.SKIPPED, Reason.VANISHED))
    except EntryChanged as exc:
        return run.note(_trash_outcome(e, Result.SKIPPED, Reason.NAME_TAKEN, message=str(exc)))
    except OSError as exc:
        return run.note(_trash_outcome(e, Result.FAILED, Reason.OS_ERROR, message=str(exc)))
    if done.result is Result.RESTORED:
        LOG.warning("RESTORED %s from the trash: %s", e.name, done.message)
    run.done(done, now=now)


def _reap_temps(run: _Run, *, now: float, stale_age: int) -> None:
    """Remove stale temporaries, each only if its entry lock is free right now (no waiting)."""
    for d in run.plan.decisions:
        if d.action is not Action.REAP:
            continue
        e = d.entry
        try:
            with locks.entry_lock(run.instances_path, naming.entry_of_temp(e.name), timeout=0):
                st = os.lstat(run.path(e.name))
                if not _same(e, inode=st.st_ino, size=st.st_size, mtime=st.st_mtime):
                    run.note(_outcome(e, Result.SKIPPED, Reason.CHANGED_SINCE_PLAN))
                    continue
                if now - st.st_mtime < stale_age:
                    run.note(_outcome(e, Result.SKIPPED, Reason.NOW_TOO_YOUNG))
                    continue
                freed = fsops.remove(run.path(e.name))
        except LockTimeout:
            # Someone (a download, a conversion) is working on the entry: the temp may be live.
            run.note(_outcome(e, Result.SKIPPED, Reason.TEMP_LOCKED))
            continue
        except FileNotFoundError:
            run.note(_outcome(e, Result.SKIPPED, Reason.VANISHED))
            continue
        except OSError as exc:
            run.note(_outcome(e, Result.FAILED, Reason.OS_ERROR, message=str(exc)))
            continue
        bytes_ = st.st_blocks * 512
        run.done(_outcome(e, Result.REAPED, d.reason, bytes=bytes_, bytes_freed=freed), now=now)


def _may_collect_lock_files(plan: Plan, policy: Policy) -> bool:
    # A "cache" problem of any kind (missing, unlistable, an entry that cannot be stat'ed) means
    # the plan does not name every entry, so its names cannot tell live lock files from dead ones.
    listed = not any(p.source == "cache" for p in plan.problems)
    return plan.complete and policy.remove_unused and listed


def _collect_lock_files(run: _Run, *, now: float) -> None:
    plan = run.plan
    live = {d.entry.name for d in plan.decisions} | {t.entry.name for t in plan.trash}
    live |= {naming.entry_of_temp(d.entry.name) for d in plan.decisions}
    try:
        found = locks.collect_stale_lock_files(
            run.instances_path, live, cache_dir=plan.cache_dir, now=now
        )
        for path in found:
            LOG.info("removed stale lock file %s", path)
    except OSError as exc:
        run.problems.append(Problem("locks", run.instances_path, f"cannot collect: {exc}"))


def _touch_restored(path: str, now: float) -> None:
    try:
        fsops.touch(path, now)
    except OSError as exc:
        LOG.warning("restored %s but could not touch it: %s", path, exc)


def restore_entry(
    name: str,
    *,
    cache_dir: str,
    instances_path: str,
    lock_timeout: float,
    audit: AuditLog,
    now: float,
) -> Report:
    """Bring the quarantined entry ``name`` (or trash name ``name@epoch``) back into the cache.

    With several quarantined copies of one name the newest comes back. It is refused (an outcome
    ``name-taken``) when an entry of that name exists again, e.g. Nova fetched the image anew.
    The restored entry is touched (best effort): an operator who brings an entry back wants it
    kept, not quarantined again by the next pass because its old mtime is still expired.

    Raises:
        ObservationError: the trash cannot be listed.
    """
    try:
        trash = fsops.list_trash(cache_dir)
    except OSError as exc:
        raise ObservationError(f"cannot list the trash of {cache_dir}: {exc}") from exc
    matches = [t for t in trash if name in (t.name, t.trash_name)]
    run = _Run(
        plan=Plan(host=audit.host, cache_dir=cache_dir, now=now, complete=True, decisions=()),
        instances_path=instances_path,
        audit=audit,
        plan_id=None,
    )
    if not matches:
        missing = Outcome(name, naming.classify(name), Result.SKIPPED, Reason.NOT_IN_TRASH)
        run.note(missing)
        return Report(None, now, tuple(run.outcomes))
    entry = max(matches, key=lambda t: (t.quarantined_at, t.trash_name))
    try:
        with locks.entry_lock(instances_path, entry.name, timeout=lock_timeout):
            fsops.restore(cache_dir, entry.trash_name)
            _touch_restored(os.path.join(cache_dir, entry.name), now)
    except LockTimeout as exc:
        run.note(_trash_outcome(entry, Result.SKIPPED, Reason.LOCK_TIMEOUT, message=str(exc)))
    except EntryChanged as exc:
        run.note(_trash_outcome(entry, Result.SKIPPED, Reason.NAME_TAKEN, message=str(exc)))
    except FileNotFoundError:
        run.note(_trash_outcome(entry, Result.SKIPPED, Reason.NOT_IN_TRASH))
    except OSError as exc:
        run.note(_trash_outcome(entry, Result.FAILED, Reason.OS_ERROR, message=str(exc)))
    else:
        restored = _trash_outcome(
            entry, Result.RESTORED, Reason.OPERATOR_RESTORE, bytes=entry.bytes_allocated
        )
        run.done(restored, now=now)
    return Report(None, now, tuple(run.outcomes), tuple(run.problems))

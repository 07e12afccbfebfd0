"""``imagecache restore NAME``: bring a quarantined entry back by hand, under its entry lock."""

from __future__ import annotations

import logging

from imagecache import locks, naming
from imagecache.errors import EntryChanged, LockTimeout, ObservationError, UsageError
from imagecache.executor import Failure, Run, outcome_for
from imagecache.layout import Layout
from imagecache.plan import Reason
from imagecache.results import Outcome, Report, Result
from imagecache.store import fsops
from imagecache.store import trash as trash_store
from imagecache.store.audit import AuditLog

__all__ = ["restore_entry"]

LOG = logging.getLogger(__name__)

# The trash entry vanished between listing and moving: as if it had never been there.
_RESTORE_FAILURES = (Failure(FileNotFoundError, Result.SKIPPED, Reason.NOT_IN_TRASH, False),)


def restore_entry(
    name: str, *, layout: Layout, lock_timeout: float, audit: AuditLog, now: float
) -> Report:
    """Bring the quarantined entry ``name`` (or trash name ``name@epoch``) back into the cache.

    With several quarantined copies of one name the newest comes back. It is refused (an outcome
    ``name-taken``) when an entry of that name exists again, e.g. Nova fetched the image anew.
    The restored entry is touched (best effort): an operator who brings an entry back wants it
    kept, not quarantined again by the next pass because its old mtime is still expired.

    Raises:
        UsageError: ``name`` cannot be an entry or trash name (``/``, ``..``, empty).
        ObservationError: the trash cannot be listed.
    """
    if not naming.valid_entry_name(name):
        raise UsageError(f"not an entry name: {name!r}")
    try:
        trash = trash_store.list_trash(layout.cache_dir)
    except OSError as exc:
        raise ObservationError(f"cannot list the trash of {layout.cache_dir}: {exc}") from exc
    run = Run(layout=layout, audit=audit, plan_id=None)
    matches = [t for t in trash if name in (t.name, t.trash_name)]
    if not matches:
        run.note(Outcome(name, naming.classify(name), Result.SKIPPED, Reason.NOT_IN_TRASH))
        return run.report(now)
    entry = max(matches, key=lambda t: (t.quarantined_at, t.trash_name))
    kind = naming.classify(entry.name)
    try:
        with locks.entry_lock(layout.instances_path, entry.name, timeout=lock_timeout):
            trash_store.restore(layout.cache_dir, entry.trash_name)
            _touch_restored(layout.entry_path(entry.name), now)
    except (OSError, LockTimeout, EntryChanged) as exc:
        run.note(outcome_for(entry.name, kind, exc, special=_RESTORE_FAILURES,
                             trash_name=entry.trash_name))  # fmt: skip
    else:
        restored = Outcome(entry.name, kind, Result.RESTORED, Reason.OPERATOR_RESTORE,
                           bytes=entry.bytes_allocated, trash_name=entry.trash_name)  # fmt: skip
        run.done(restored, now=now)
    return run.report(now)


def _touch_restored(path: str, now: float) -> None:
    try:
        fsops.touch(path, now)
    except OSError as exc:
        LOG.warning("restored %s but could not touch it: %s", path, exc)

"""The Nova-compatible per-entry lock (DESIGN.md §4).

``nova-compute`` serialises work on a cache entry with an oslo.concurrency *external* lock named
after the entry, with prefix ``nova-`` and lock path ``$instances_path/locks``: a POSIX record lock
(``fcntl.lockf``) on the whole file ``$instances_path/locks/nova-<entry name>``, taken through
``fasteners.InterProcessLock``. We take the very same lock with the very same library, so Nova and
imagecache exclude each other on one host, and across hosts where the shared filesystem honours
POSIX locks.

POSIX record locks belong to a *process*: a second thread of the same process would "get" a lock
its sibling holds, and closing any descriptor of the file drops every lock the process has on it.
So, like oslo's internal semaphore, every file lock here is guarded by a process-local lock per lock
file, and lock files are only ever opened and closed while that guard is held.

Lock files of live entries are never unlinked: a process that has the file open (waiting for it, or
about to lock it) would keep locking the unlinked inode while a newcomer creates and locks a fresh
one, and both would believe they hold the lock (nova-imagecache.md §9.1 item 6).
:mod:`imagecache.lockfiles` removes only lock files of names that have been gone for long, and
re-checks under the held lock that nothing of the name is left in the cache.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import fasteners

from imagecache import naming
from imagecache.errors import LockTimeout
from imagecache.layout import LOCKS_DIR

__all__ = ["entry_lock", "held_lock", "is_locked", "lock_path", "take_entry_locks"]

LOG = logging.getLogger(__name__)

# One guard per lock file path, alive while someone holds or waits on it (oslo keeps its internal
# semaphores the same way). The registry itself is protected by a plain lock.
_guards: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
_guards_lock = threading.Lock()


def _guard(path: str) -> threading.Lock:
    # Keyed by the absolute path, so that callers passing relative and absolute instances paths
    # still share one guard.
    key = str(Path(path).absolute())
    with _guards_lock:
        guard = _guards.get(key)
        if guard is None:
            guard = threading.Lock()
            _guards[key] = guard
        return guard


def lock_path(instances_path: str | os.PathLike[str], name: str) -> str:
    """The lock file of entry ``name``: ``<instances_path>/locks/nova-<name>``.

    This is the path oslo.concurrency builds for ``lock(name, lock_file_prefix="nova-",
    external=True, lock_path=<instances_path>/locks)``. Oslo silently turns ``/`` into ``_``; a
    cache entry name never contains one, so such a name is a caller's bug here.

    Raises:
        ValueError: ``name`` is empty, ``.`` or ``..``, or contains ``/`` or NUL.
    """
    return str(Path(instances_path, LOCKS_DIR, naming.lock_file_name(name)))


@contextmanager
def held_lock(
    path: str, *, timeout: float, poll: float, what: str
) -> Iterator[fasteners.InterProcessLock]:
    """Hold the guard and the file lock of ``path``, waiting at most ``timeout`` seconds in all."""
    if timeout < 0 or poll <= 0:
        raise ValueError(f"timeout must be >= 0 and poll > 0, got {timeout!r} and {poll!r}")
    # The wait is bounded by the monotonic clock: the only clock this module reads.
    deadline = time.monotonic() + timeout
    guard = _guard(path)
    got_guard = guard.acquire(timeout=timeout) if timeout > 0 else guard.acquire(blocking=False)
    if not got_guard:
        raise LockTimeout(
            f"{what}: lock {path} is held by another thread of this process; "
            f"gave up after {timeout:g} s"
        )
    try:
        file_lock = fasteners.InterProcessLock(path)
        remaining = max(0.0, deadline - time.monotonic())
        try:
            gotten = file_lock.acquire(
                blocking=remaining > 0, delay=poll, max_delay=poll, timeout=remaining
            )
        except threading.ThreadError as exc:
            # fasteners wraps unexpected lockf errors (ENOLCK on NFS without lock support, ...) in
            # ThreadError; the OSError underneath is what a caller can report.
            cause = exc.__context__
            code = cause.errno if isinstance(cause, OSError) else errno.ENOLCK
            raise OSError(code, f"cannot lock {path}: {cause or exc}") from exc
        finally:
            # fasteners leaves the file open when it did not get the lock. Close it now, under the
            # guard: closing any descriptor of the file drops this process's locks on it, so it must
            # not happen later (at garbage collection) while another thread holds the lock.
            if not file_lock.acquired and file_lock.lockfile is not None:
                file_lock.lockfile.close()
                file_lock.lockfile = None
        if not gotten:
            raise LockTimeout(
                f"{what}: lock {path} is held by another process; gave up after {timeout:g} s"
            )
        try:
            yield file_lock
        finally:
            file_lock.release()
    finally:
        guard.release()


@contextmanager
def entry_lock(
    instances_path: str | os.PathLike[str], name: str, *, timeout: float, poll: float = 0.05
) -> Iterator[None]:
    """Hold the Nova-compatible lock of cache entry ``name`` for the ``with`` block.

    Waits at most ``timeout`` seconds (``[imagecache] lock_timeout_seconds``), polling every
    ``poll`` seconds as oslo does; ``timeout=0`` tries exactly once. Creates ``locks/`` and the lock
    file when missing. The wait is measured with ``time.monotonic()``.

    While held, the lock file's mtime is set to the current time (best effort): it records when
    imagecache last worked on the entry, which is how :func:`collect_stale_lock_files` tells a name
    gone for a week from one that was removed yesterday. Nova never looks at it.

    Raises:
        LockTimeout: another process (Nova, another imagecache) or another thread of this process
            held the lock for the whole wait; the message names the entry and the wait.
        ValueError: ``name`` is not a valid entry name, or ``timeout < 0`` or ``poll <= 0``.
        OSError: the lock directory or file cannot be created or opened, or the filesystem
            refuses POSIX locks.
    """
    path = lock_path(instances_path, name)
    with held_lock(path, timeout=timeout, poll=poll, what=f"entry {name}") as file_lock:
        try:
            os.utime(file_lock.lockfile.fileno())
        except OSError as exc:
            LOG.debug("could not refresh the mtime of %s: %s", path, exc)
        yield


def take_entry_locks(
    stack: ExitStack,
    instances_path: str | os.PathLike[str],
    names: Iterable[str],
    *,
    wait: float,
    poll: float = 0.05,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Exception]:
    """Take as many of the entry locks of ``names`` as possible, never blocking on one of them.

    Every lock is tried once without waiting, in sorted order; the busy ones are tried again, in
    turn, every ``poll`` seconds until ``wait`` seconds have passed (``wait=0``: one try each),
    measured with ``monotonic`` and waited with ``sleep`` (a test passes a clock of its own).
    The locks taken are entered into ``stack`` and held until it closes. Holding some while
    trying others cannot deadlock: no attempt ever blocks.

    Returns:
        The names not locked, each with why: :class:`LockTimeout` (still busy when the wait
        ended) or the ``OSError`` of a lock file that cannot be created, opened or locked.

    Raises:
        ValueError: a name is not a valid entry name, or ``wait < 0`` or ``poll <= 0``.
    """
    if wait < 0 or poll <= 0:
        raise ValueError(f"wait must be >= 0 and poll > 0, got {wait!r} and {poll!r}")
    start = monotonic()
    deadline = start + wait
    pending = sorted(set(names))
    failed: dict[str, Exception] = {}
    while True:
        busy = []
        for name in pending:
            try:
                stack.enter_context(entry_lock(instances_path, name, timeout=0, poll=poll))
            except LockTimeout:
                busy.append(name)
            except OSError as exc:
                failed[name] = exc
        pending = busy
        left = deadline - monotonic()
        if not pending or left <= 0:
            break
        sleep(min(poll, left))
    waited = monotonic() - start
    for name in pending:
        failed[name] = LockTimeout(
            f"entry {name}: lock {lock_path(instances_path, name)} is held by another process "
            f"or thread; gave up after {waited:.3g} s"
        )
    return failed


def is_locked(instances_path: str | os.PathLike[str], name: str) -> bool:
    """Whether someone holds the lock of entry ``name`` right now, probed without waiting.

    A free lock is taken and released at once; a missing lock file means free and is not created.
    The answer may be stale by the time the caller reads it: to act on a free entry, take
    :func:`entry_lock` instead.

    Raises:
        ValueError: ``name`` is not a valid entry name.
        OSError: the lock file exists but cannot be opened or locked.
    """
    path = lock_path(instances_path, name)
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    try:
        with held_lock(path, timeout=0, poll=0.05, what=f"entry {name}"):
            return False
    except LockTimeout:
        return True

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
:func:`collect_stale_lock_files` removes only lock files of names that have been gone for long,
and re-checks under the held lock that nothing of the name is left in the cache.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
import weakref
from collections.abc import Collection, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import fasteners

from imagecache import naming
from imagecache.errors import LockTimeout
from imagecache.model import Kind
from imagecache.store import fsops

__all__ = [
    "LOCKS_DIR",
    "LOCK_PREFIX",
    "STALE_LOCK_AGE",
    "collect_stale_lock_files",
    "entry_lock",
    "is_locked",
    "lock_path",
    "take_entry_locks",
]

LOCKS_DIR = "locks"
LOCK_PREFIX = "nova-"
STALE_LOCK_AGE = 7 * 86400

log = logging.getLogger(__name__)

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
    if not name or name in {".", ".."} or "/" in name or "\0" in name:
        raise ValueError(f"not a valid entry name for a lock: {name!r}")
    return str(Path(instances_path, LOCKS_DIR, LOCK_PREFIX + name))


@contextmanager
def _held(
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
    with _held(path, timeout=timeout, poll=poll, what=f"entry {name}") as file_lock:
        try:
            os.utime(file_lock.lockfile.fileno())
        except OSError as exc:
            log.debug("could not refresh the mtime of %s: %s", path, exc)
        yield


def take_entry_locks(
    stack: ExitStack,
    instances_path: str | os.PathLike[str],
    names: Iterable[str],
    *,
    wait: float,
    poll: float = 0.05,
) -> dict[str, Exception]:
    """Take as many of the entry locks of ``names`` as possible, never blocking on one of them.

    Every lock is tried once without waiting, in sorted order; the busy ones are tried again, in
    turn, every ``poll`` seconds until ``wait`` seconds have passed (``wait=0``: one try each).
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
    start = time.monotonic()
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
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(poll, left))
    waited = time.monotonic() - start
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
        with _held(path, timeout=0, poll=0.05, what=f"entry {name}"):
            return False
    except LockTimeout:
        return True


def _collectable(name: str) -> bool:
    # Only names of cache entries: Nova and other services keep unrelated locks here
    # (nova-storage-registry-lock, ...) and those are never ours to remove.
    return naming.classify(name) is not Kind.UNKNOWN


def collect_stale_lock_files(
    instances_path: str | os.PathLike[str],
    live_names: Collection[str],
    *,
    cache_dir: str | os.PathLike[str],
    now: float,
    min_age: float = STALE_LOCK_AGE,
) -> list[str]:
    """Remove lock files of cache entries that have been gone for at least ``min_age`` seconds.

    A file ``locks/nova-<name>`` is removed only when all of these hold:

    - ``name`` is a cache entry name (:func:`imagecache.naming.classify` gives a kind other than
      ``unknown``; temp names classify as ``temp``) and is not in ``live_names``;
    - it is a regular file whose mtime is at least ``min_age`` seconds before ``now`` (the mtime
      is refreshed each time :func:`entry_lock` holds it: the last time we worked on the entry);
      ``min_age`` defaults to :data:`STALE_LOCK_AGE` (7 days);
    - its lock can be taken without waiting, and the path still names the locked file;
    - while it is held, ``cache_dir`` can be listed and holds neither ``name`` nor a temp file of
      it (``name.*``), and its trash holds no quarantined ``name@<epoch>``. ``live_names`` was
      observed before the lock was taken; an entry fetched or quarantined since, or a cache
      directory that vanished (an unmounted share), must not make a live lock file look dead.

    It is unlinked while the lock is held. Anything else in ``locks/`` is left alone.

    Returns:
        The removed paths, in name order.

    Raises:
        OSError: ``locks/``, the cache directory or its trash cannot be listed (a missing cache
            directory removes nothing), or a lock file cannot be opened, locked or unlinked (a
            file that vanishes meanwhile is skipped).
    """
    directory = Path(instances_path, LOCKS_DIR)
    live = frozenset(live_names)
    try:
        names = sorted(child.name for child in directory.iterdir())
    except FileNotFoundError:
        return []
    removed: list[str] = []
    for file_name in names:
        name = file_name.removeprefix(LOCK_PREFIX)
        if name == file_name or name in live or not _collectable(name):
            continue
        path = str(directory / file_name)
        try:
            if _remove_if_stale(path, name, cache_dir=Path(cache_dir), now=now, min_age=min_age):
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed


def _is_stale(st: os.stat_result, *, now: float, min_age: float) -> bool:
    return stat.S_ISREG(st.st_mode) and now - st.st_mtime >= min_age


def _left_in(directory: Path, name: str, separator: str) -> bool:
    """Whether ``directory`` holds ``name`` or a name that starts with ``name + separator``."""
    prefix = name + separator
    with os.scandir(directory) as it:
        return any(e.name == name or e.name.startswith(prefix) for e in it)


def _entry_gone(cache_dir: Path, name: str) -> bool:
    """Nothing of entry ``name`` is left: no entry, no temp file, no quarantined copy."""
    try:
        if _left_in(cache_dir, name, "."):
            return False
    except FileNotFoundError:
        # No cache directory at all (an unmounted share, a wrong path): nothing is known gone.
        return False
    try:
        return not _left_in(fsops.trash_dir(cache_dir), name, "@")
    except FileNotFoundError:
        return True


def _remove_if_stale(path: str, name: str, *, cache_dir: Path, now: float, min_age: float) -> bool:
    if not _is_stale(os.lstat(path), now=now, min_age=min_age):
        return False
    try:
        with _held(path, timeout=0, poll=0.05, what=path) as file_lock:
            held = os.fstat(file_lock.lockfile.fileno())
            current = os.lstat(path)
            # Someone may have replaced the file, or worked on the entry, since the first look.
            if (held.st_dev, held.st_ino) != (current.st_dev, current.st_ino):
                return False
            if not _is_stale(current, now=now, min_age=min_age):
                return False
            # Only under the lock is the answer final: a fetch or a quarantine takes it.
            if not _entry_gone(cache_dir, name):
                return False
            Path(path).unlink()
            log.info("removed stale lock file %s", path)
            return True
    except LockTimeout:
        return False

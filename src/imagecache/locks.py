"""The Nova-compatible per-entry lock (DESIGN.md §4).

``nova-compute`` serialises work on a cache entry with an oslo.concurrency *external* lock named
after the entry, with prefix ``nova-`` and lock path ``$instances_path/locks``: a POSIX record lock
(``fcntl.lockf``) on the whole file ``$instances_path/locks/nova-<entry name>``, taken through
``fasteners.InterProcessLock``. We take the very same lock, ``fcntl.lockf`` on the whole file of
that path, so Nova and imagecache exclude each other on one host, and across hosts where the shared
filesystem honours POSIX locks. Unlike fasteners we never follow a symlink: ``locks/`` must be a
real directory and the lock file a regular file in it, opened ``O_NOFOLLOW``, so a link planted in
the lock directory can neither make us create or lock a file elsewhere nor pass for a lock.

POSIX record locks belong to a *process*: a second thread of the same process would "get" a lock
its sibling holds, and closing any descriptor of the file drops every lock the process has on it.
So, like oslo's internal semaphore, every file lock here is guarded by a process-local lock per lock
file, and lock files are only ever opened and closed while that guard is held.

Lock files of live entries are never unlinked: a process that has the file open (waiting for it, or
about to lock it) would keep locking the unlinked inode while a newcomer creates and locks a fresh
one, and both would believe they hold the lock (nova-imagecache.md §9.1 item 6).
:mod:`imagecache.lockfiles` removes only lock files of names that have been gone for long, and
re-checks under the held lock that nothing of the name is left in any cache sharing ``locks/``.
Our own side of that race is closed too: once locked, :func:`held_lock` checks that the path still
names the locked file and starts over if it does not; only a Nova waiting at that moment is left
with the unlinked inode.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from imagecache import naming, owners
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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC  # read-write: lockf(LOCK_EX) needs write
_FILE_MODE = 0o644
# What lockf(LOCK_NB) answers when another process holds the lock.
_BUSY = frozenset({errno.EACCES, errno.EAGAIN})


def _unsafe(path: str, what: str) -> OSError:
    try:
        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        is_link = False
    if is_link:
        return OSError(errno.ELOOP, f"{what} is a symlink; not followed", path)
    return OSError(errno.ENOTDIR, f"{what} is not a directory", path)


def _open_dir(path: str, *, create: bool) -> int:
    """The lock directory, a real directory (never a symlink), made when missing and ``create``."""
    try:
        return _open_real_dir(path)
    except FileNotFoundError:
        if not create:
            raise
    # Made as fasteners makes it (mode 0777 less the umask, missing parents too: the instances
    # path is the configured root, followed like any configured path). Only the last component,
    # the lock directory that sits in the tree we share with Nova, must not be a link.
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    made = False
    with suppress(FileExistsError):  # made meanwhile: open it, with the same checks
        os.mkdir(path)
        made = True
    fd = _open_real_dir(path)
    if made:
        _adopt_in(fd, parent)
    return fd


def _adopt_in(fd: int, parent: str) -> None:
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        owners.adopt(fd, parent_fd)
    finally:
        os.close(parent_fd)


def _open_real_dir(path: str) -> int:
    try:
        return os.open(path, _DIR_FLAGS)
    except NotADirectoryError as exc:
        # O_NOFOLLOW | O_DIRECTORY answers ENOTDIR for a symlink and a file alike.
        raise _unsafe(path, "lock directory") from exc


def _open_lock_file(path: str, *, create: bool) -> int:
    """A descriptor of the regular file ``path``, opened in its real directory, never via a link."""
    directory, name = os.path.split(path)
    dir_fd = _open_dir(directory, create=create)
    try:
        fd = -1
        if create:  # made now, by us: handed to the lock directory's owner (see owners.py)
            with suppress(FileExistsError):
                fd = os.open(name, _FILE_FLAGS | os.O_CREAT | os.O_EXCL, _FILE_MODE, dir_fd=dir_fd)
                owners.adopt(fd, dir_fd)
        if fd < 0:
            try:
                fd = os.open(name, _FILE_FLAGS, _FILE_MODE, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise OSError(
                        errno.ELOOP, "lock file is a symlink; not followed", path
                    ) from exc
                raise OSError(exc.errno, exc.strerror, path) from exc
    finally:
        os.close(dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "lock file is not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_lock(fd: int, path: str) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _BUSY:
            return False
        # ENOLCK on NFS without lock support, ...: what a caller can report.
        raise OSError(exc.errno, f"cannot lock {path}: {exc.strerror}") from exc
    return True


def _still_named(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not unlinked or replaced meanwhile)."""
    try:
        current = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)


def _lock(
    path: str, *, deadline: float, poll: float, timeout: float, what: str, create: bool
) -> int:
    """The descriptor of ``path``, POSIX-locked; polls every ``poll`` seconds until ``deadline``."""
    fd = _open_lock_file(path, create=create)
    reopened = False
    try:
        while True:
            if _try_lock(fd, path):
                if _still_named(fd, path):
                    return fd
                # A collector unlinked the file while we waited for it: a lock on that inode
                # excludes nobody any more. Start over on what the path names now (at once the
                # first time, then at the pace of the poll).
                os.close(fd)
                fd = -1
                fd = _open_lock_file(path, create=create)
                if not reopened:
                    reopened = True
                    continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(
                    f"{what}: lock {path} is held by another process; gave up after {timeout:g} s"
                )
            time.sleep(min(poll, left))
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


@contextmanager
def held_lock(
    path: str, *, timeout: float, poll: float, what: str, create: bool = True
) -> Iterator[int]:
    """Hold the guard and the file lock of ``path``, waiting at most ``timeout`` seconds in all.

    Yields the descriptor of the locked file (the caller may ``fstat`` or ``utime`` it, never
    close it). The file is opened ``O_RDWR | O_NOFOLLOW`` (and ``O_CREAT``, mode 0644, with
    ``create``) in its directory, which must be a real directory (made when missing, with
    ``create``), and locked with ``fcntl.lockf(LOCK_EX | LOCK_NB)``, tried every ``poll``
    seconds: the lock oslo.concurrency takes on the same path.

    Raises:
        LockTimeout: another thread of this process or another process held it for the whole wait.
        ValueError: ``timeout < 0`` or ``poll <= 0``.
        FileNotFoundError: without ``create``, the lock file or its directory is missing.
        OSError: the lock directory is a symlink (``ELOOP``, "lock directory is a symlink; not
            followed") or not a directory (``ENOTDIR``); the lock file is a symlink (``ELOOP``,
            "lock file is a symlink; not followed") or not a regular file (``EINVAL``,
            ``EISDIR``); either cannot be created or opened; or the filesystem refuses POSIX
            locks (``ENOLCK``, "cannot lock <path>: ...").
    """
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
        fd = _lock(path, deadline=deadline, poll=poll, timeout=timeout, what=what, create=create)
        try:
            yield fd
        finally:
            # Closing the descriptor drops the lock. It happens here, under the guard: closing any
            # descriptor of the file drops this process's locks on it, so no other thread of ours
            # may hold the lock while we close.
            os.close(fd)
    finally:
        guard.release()


@contextmanager
def entry_lock(
    instances_path: str | os.PathLike[str], name: str, *, timeout: float, poll: float = 0.05
) -> Iterator[None]:
    """Hold the Nova-compatible lock of cache entry ``name`` for the ``with`` block.

    Waits at most ``timeout`` seconds (``[imagecache] lock_timeout_seconds``), polling every
    ``poll`` seconds as oslo does; ``timeout=0`` tries exactly once. Creates ``locks/`` and the lock
    file when missing, never through a symlink (see :func:`held_lock`). The wait is measured with
    ``time.monotonic()``.

    While held, the lock file's mtime is set to the current time (best effort): it records when
    imagecache last worked on the entry, which is how :func:`collect_stale_lock_files` tells a name
    gone for a week from one that was removed yesterday. Nova never looks at it.

    Raises:
        LockTimeout: another process (Nova, another imagecache) or another thread of this process
            held the lock for the whole wait; the message names the entry and the wait.
        ValueError: ``name`` is not a valid entry name, or ``timeout < 0`` or ``poll <= 0``.
        OSError: the lock directory or file cannot be created or opened, or is a symlink or not
            a directory / regular file (never followed: see :func:`held_lock` for the messages),
            or the filesystem refuses POSIX locks.
    """
    path = lock_path(instances_path, name)
    with held_lock(path, timeout=timeout, poll=poll, what=f"entry {name}") as fd:
        try:
            os.utime(fd)
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
    """Take as many of the entry locks of ``names`` as possible, never blocking on one of them,
    and never waiting while holding one.

    Every lock is tried once without waiting, in sorted order. If none could be taken, the busy
    ones are tried again, in turn, every ``poll`` seconds until at least one is taken or
    ``wait`` seconds have passed (``wait=0``: one try each), measured with ``monotonic`` and
    waited with ``sleep`` (a test passes a clock of its own). The locks taken are entered into
    ``stack`` and held until it closes; the caller acts on them, releases them and asks again
    for the rest. Waiting while holding some is how two callers that each took half of the same
    names would wait each other out until their deadlines (hold-and-wait: two cleaners of one
    storage without coordination did, for the whole ``lock_timeout``).

    Returns:
        The names not locked, each with why: :class:`LockTimeout` (busy: still busy when the
        wait ended, or not waited for because others were taken) or the ``OSError`` of a lock
        file that cannot be created, opened or locked.

    Raises:
        ValueError: a name is not a valid entry name, or ``wait < 0`` or ``poll <= 0``.
    """
    if wait < 0 or poll <= 0:
        raise ValueError(f"wait must be >= 0 and poll > 0, got {wait!r} and {poll!r}")
    start = monotonic()
    deadline = start + wait
    pending = sorted(set(names))
    failed: dict[str, Exception] = {}
    taken = False
    while True:
        busy = []
        for name in pending:
            try:
                stack.enter_context(entry_lock(instances_path, name, timeout=0, poll=poll))
                taken = True
            except LockTimeout:
                busy.append(name)
            except OSError as exc:
                failed[name] = exc
        pending = busy
        left = deadline - monotonic()
        if not pending or taken or left <= 0:
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
        OSError: the lock file exists but cannot be opened or locked, or it or the lock directory
            is a symlink or not a regular file / directory (never followed).
    """
    path = lock_path(instances_path, name)
    try:
        with held_lock(path, timeout=0, poll=0.05, what=f"entry {name}", create=False):
            return False
    except FileNotFoundError:
        return False
    except LockTimeout:
        return True

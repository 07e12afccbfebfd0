"""Lock-file hygiene: remove the lock files of cache entries gone for long, and nothing else.

Lock files of live entries are never unlinked (:mod:`imagecache.locks` says why). Only lock files
of names gone for a week are collected, each re-checked under its own held lock. "Gone" means gone
from every cache that shares ``locks/``: on shared storage each host may have its own
``_base_<ip>`` beside ``_base``, and all of them lock their entries in the one ``locks/``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Collection
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from imagecache import layout, naming
from imagecache.errors import LockTimeout
from imagecache.layout import CACHE_PREFIX, LOCKS_DIR
from imagecache.locks import held_lock
from imagecache.model import Kind

__all__ = ["STALE_LOCK_AGE", "collect_stale_lock_files"]

LOG = logging.getLogger(__name__)

STALE_LOCK_AGE = 7 * 86400

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _collectable(name: str) -> bool:
    # Only names of cache entries: Nova and other services keep unrelated locks here
    # (nova-storage-registry-lock, ...) and those are never ours to remove.
    return naming.classify(name) is not Kind.UNKNOWN


@dataclass(frozen=True, slots=True)
class _Where:
    instances_path: str
    cache_dir: str
    locks_fd: int  # the real directory locks/, held open: every look and unlink goes through it


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
    - it is a regular file (``lstat``: a symlink is never followed nor unlinked) whose mtime is at
      least ``min_age`` seconds before ``now`` (the mtime is refreshed each time
      :func:`entry_lock` holds it: the last time we worked on the entry); ``min_age`` defaults to
      :data:`STALE_LOCK_AGE` (7 days);
    - its lock can be taken without waiting, and the name still names the locked file;
    - while it is held, every cache that shares ``locks/`` can be listed and holds neither
      ``name`` nor a temp file of it (``name.*``), and its trash holds no quarantined
      ``name@<epoch>``. Those caches are ``cache_dir`` and every directory directly under
      ``instances_path`` whose name starts with ``_base`` (a peer's ``_base_<ip>`` on shared
      storage), listed again under the lock. ``live_names`` was observed before the lock was
      taken; an entry fetched or quarantined since, a peer's entry, or a cache directory that is
      missing (an unmounted share) must not make a live lock file look dead: when in doubt, the
      lock file stays.

    It is unlinked through the descriptor of ``locks/`` while the lock is held. Anything else in
    ``locks/`` is left alone.

    Returns:
        The removed paths, in name order.

    Raises:
        OSError: ``locks/`` or the instances path cannot be listed, ``locks/`` is a symlink
            (``ELOOP``, "a symlink, not a real directory; not followed") or not a directory;
            a cache or its trash cannot be listed, or its ``.imagecache`` or ``trash`` is a
            symlink or not a directory (a missing cache directory removes nothing); or a lock
            file cannot be opened, locked or unlinked (a file that vanishes meanwhile is skipped).
            Nothing more is removed once it is raised.
    """
    live = frozenset(live_names)
    locks_dir = Path(instances_path, LOCKS_DIR)
    with ExitStack() as stack:
        try:
            locks_fd = _open_real_dir(locks_dir)
        except FileNotFoundError:
            return []
        stack.callback(os.close, locks_fd)
        where = _Where(str(instances_path), str(cache_dir), locks_fd)
        with os.scandir(locks_fd) as it:
            names = sorted(entry.name for entry in it)
        removed: list[str] = []
        for file_name in names:
            name = naming.entry_of_lock_file(file_name)
            if name is None or name in live or not _collectable(name):
                continue
            path = str(locks_dir / file_name)
            try:
                if _remove_if_stale(where, file_name, path, name, now=now, min_age=min_age):
                    removed.append(path)
            except FileNotFoundError:
                continue
        return removed


def _open_real_dir(path: Path, *, dir_fd: int | None = None) -> int:
    """``path`` (its last component in ``dir_fd``, if given) opened as a real directory, no link."""
    name = str(path) if dir_fd is None else path.name
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    except NotADirectoryError as exc:
        # O_NOFOLLOW | O_DIRECTORY answers ENOTDIR for a symlink and a file alike: say which.
        try:
            is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = False
        if is_link:
            message = "a symlink, not a real directory; not followed"
            raise OSError(errno.ELOOP, message, str(path)) from exc
        raise OSError(errno.ENOTDIR, "not a directory", str(path)) from exc


def _is_stale(st: os.stat_result, *, now: float, min_age: float) -> bool:
    return stat.S_ISREG(st.st_mode) and now - st.st_mtime >= min_age


def _holds(dir_fd: int, name: str, separator: str) -> bool:
    """Whether directory ``dir_fd`` holds ``name`` or a name starting with ``name + separator``."""
    prefix = name + separator
    with os.scandir(dir_fd) as it:
        return any(e.name == name or e.name.startswith(prefix) for e in it)


def _caches(where: _Where) -> list[Path]:
    """The configured cache, then every ``_base*`` directory under the instances path but it."""
    configured = os.path.abspath(where.cache_dir)
    with os.scandir(where.instances_path) as it:
        peers = sorted(e.name for e in it if e.name.startswith(CACHE_PREFIX))
    others = (Path(where.instances_path, peer) for peer in peers)
    return [Path(where.cache_dir), *(p for p in others if os.path.abspath(p) != configured)]


def _entry_gone(where: _Where, name: str) -> bool:
    """Nothing of entry ``name`` is left in any cache: no entry, no temp, no quarantined copy."""
    configured, *peers = _caches(where)
    return _gone_from(configured, name, configured=True) and all(
        _gone_from(peer, name, configured=False) for peer in peers
    )


def _gone_from(cache: Path, name: str, *, configured: bool) -> bool:
    with ExitStack() as stack:
        try:
            # Only read, so the cache itself may be a link the operator made (it is followed):
            # reading more can only keep more.
            fd = os.open(cache, _DIR_FLAGS)
        except FileNotFoundError:
            # No such cache (an unmounted share, a wrong path, a dangling link, a peer's cache
            # renamed meanwhile): nothing is known gone.
            return False
        except NotADirectoryError:
            if configured:
                raise
            return True  # a file named _base...: no cache, nothing of any entry in it
        stack.callback(os.close, fd)
        if _holds(fd, name, "."):
            return False
        # The trash is ours: a real directory or nothing, as the trash store has it.
        trash = Path(layout.trash_dir_of(str(cache)))
        for path in (trash.parent, trash):
            try:
                fd = _open_real_dir(path, dir_fd=fd)
            except FileNotFoundError:
                return True
            stack.callback(os.close, fd)
        return not _holds(fd, name, "@")


def _remove_if_stale(
    where: _Where, file_name: str, path: str, name: str, *, now: float, min_age: float
) -> bool:
    def look() -> os.stat_result:
        return os.stat(file_name, dir_fd=where.locks_fd, follow_symlinks=False)

    if not _is_stale(look(), now=now, min_age=min_age):
        return False
    try:
        with held_lock(path, timeout=0, poll=0.05, what=path, create=False) as fd:
            held, current = os.fstat(fd), look()
            # Someone may have replaced the file, or worked on the entry, since the first look.
            if (held.st_dev, held.st_ino) != (current.st_dev, current.st_ino):
                return False
            if not _is_stale(current, now=now, min_age=min_age):
                return False
            # Only under the lock is the answer final: a fetch or a quarantine takes it.
            if not _entry_gone(where, name):
                return False
            os.unlink(file_name, dir_fd=where.locks_fd)
            LOG.info("removed stale lock file %s", path)
            return True
    except LockTimeout:
        return False

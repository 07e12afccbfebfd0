"""Lock-file hygiene: remove the lock files of cache entries gone for long, and nothing else.

Lock files of live entries are never unlinked (:mod:`imagecache.locks` says why). Only lock files
of names gone for a week are collected, each re-checked under its own held lock.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Collection
from pathlib import Path

from imagecache import layout, naming
from imagecache.errors import LockTimeout
from imagecache.layout import LOCKS_DIR
from imagecache.locks import held_lock
from imagecache.model import Kind

__all__ = ["STALE_LOCK_AGE", "collect_stale_lock_files"]

LOG = logging.getLogger(__name__)

STALE_LOCK_AGE = 7 * 86400


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
        name = naming.entry_of_lock_file(file_name)
        if name is None or name in live or not _collectable(name):
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
        return not _left_in(Path(layout.trash_dir_of(str(cache_dir))), name, "@")
    except FileNotFoundError:
        return True


def _remove_if_stale(path: str, name: str, *, cache_dir: Path, now: float, min_age: float) -> bool:
    if not _is_stale(os.lstat(path), now=now, min_age=min_age):
        return False
    try:
        with held_lock(path, timeout=0, poll=0.05, what=path) as file_lock:
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
            LOG.info("removed stale lock file %s", path)
            return True
    except LockTimeout:
        return False

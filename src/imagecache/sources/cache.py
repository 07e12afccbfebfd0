"""Observe the cache directory and its trash, from ``lstat`` only: nothing is opened."""

from __future__ import annotations

import os
import stat

from imagecache import naming
from imagecache.layout import STATE_DIR
from imagecache.model import CacheEntry, FileType, Problem, ProblemCode, TrashEntry
from imagecache.store import fsops
from imagecache.store import trash as trash_store

__all__ = ["scan_cache", "scan_trash"]

_FILE_TYPES = (
    (stat.S_ISREG, FileType.FILE),
    (stat.S_ISLNK, FileType.SYMLINK),
    (stat.S_ISDIR, FileType.DIRECTORY),
)
_OWN_STATE_DIR = STATE_DIR


def _file_type(mode: int) -> FileType:
    return next((ft for test, ft in _FILE_TYPES if test(mode)), FileType.OTHER)


def scan_cache(cache_dir: str) -> tuple[tuple[CacheEntry, ...], tuple[Problem, ...]]:
    """Every name directly in the cache directory, classified, from ``lstat`` only.

    A name that vanishes between listing and ``lstat`` is simply gone. A missing cache directory is
    an empty cache (Nova creates it on first download), reported as a non-blocking problem.
    """
    entries: list[CacheEntry] = []
    try:
        with os.scandir(cache_dir) as it:
            listing = [e for e in it if e.name != _OWN_STATE_DIR]
    except FileNotFoundError:
        return (), (
            Problem(ProblemCode.CACHE_MISSING, cache_dir, "cache directory does not exist"),
        )
    except OSError as exc:
        message = f"cannot list cache directory: {exc.strerror}"
        return (), (Problem(ProblemCode.CACHE_UNLISTED, cache_dir, message),)
    problems: list[Problem] = []
    for item in listing:
        try:
            st = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            message = f"cannot stat: {exc.strerror}"
            problems.append(Problem(ProblemCode.ENTRY_UNSTATABLE, item.path, message))
            continue
        ftype = _file_type(st.st_mode)
        entries.append(
            CacheEntry(
                name=item.name,
                kind=naming.classify(item.name, ftype),
                file_type=ftype,
                bytes_allocated=st.st_blocks * 512,
                bytes_apparent=st.st_size,
                mtime=st.st_mtime,
                inode=st.st_ino,
                device=st.st_dev,
                ctime_ns=st.st_ctime_ns,
                birth_ns=fsops.birth_ns(item.path) if ftype is FileType.FILE else 0,
            )
        )
    entries.sort(key=lambda e: e.name)
    return tuple(entries), tuple(problems)


def scan_trash(cache_dir: str) -> tuple[tuple[TrashEntry, ...], tuple[Problem, ...]]:
    """The quarantined entries under ``<cache>/.imagecache/trash``; unreadable is blocking.

    A trash that cannot be listed hides entries that may have to be restored or purged, so the
    view is incomplete, as with any other source.
    """
    try:
        return trash_store.list_trash(cache_dir), ()
    except OSError as exc:
        path = str(trash_store.trash_dir(cache_dir))
        message = f"cannot list trash: {exc.strerror}"
        return (), (Problem(ProblemCode.TRASH_UNLISTED, path, message),)

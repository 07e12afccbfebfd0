"""The quarantine: ``<cache>/.imagecache/trash/<name>@<epoch>``, one on-disk format.

Removal goes through here (nova-imagecache.md §9.1 item 7): :func:`quarantine` renames an entry
into the trash (same filesystem, one atomic rename), from where :func:`restore` brings it back
and :func:`purge` deletes it after the grace period. Trash names are
:func:`imagecache.naming.trash_name`. The caller holds the entry lock and has re-checked the
entry under it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

from imagecache import layout, naming
from imagecache.errors import EntryChanged
from imagecache.model import TrashEntry
from imagecache.store import fsops

__all__ = ["list_trash", "purge", "quarantine", "restore", "trash_dir"]

StrPath = fsops.StrPath


def _check_name(name: str) -> None:
    if not naming.valid_entry_name(name):
        raise ValueError(f"not a valid entry name: {name!r}")


def trash_dir(cache_dir: StrPath) -> Path:
    """``<cache_dir>/.imagecache/trash``, where quarantined entries wait for their purge."""
    return Path(layout.trash_dir_of(str(cache_dir)))


def _open_trash(stack: ExitStack, cache: Path, *, create: bool) -> tuple[int, int] | None:
    """Descriptors of the cache directory and of its trash, closed with ``stack``.

    The cache directory is the configured one and may be reached through a symlink the operator
    made. ``.imagecache`` and ``trash`` are ours: each is opened ``O_NOFOLLOW`` in its parent's
    descriptor and must be a real directory on the cache's filesystem, so a symlink or a mount
    swapped in for one of them never sends a quarantine, a restore or a purge out of the cache.
    With ``create`` missing ones are made; without, a missing one gives None.

    Raises:
        FileNotFoundError: the cache directory is missing.
        OSError: ``.imagecache`` or ``trash`` is a symlink (``ELOOP``), not a directory
            (``ENOTDIR``) or on another filesystem (``EXDEV``), or cannot be opened or created.
    """
    cache_fd = os.open(cache, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack.callback(os.close, cache_fd)
    device = os.fstat(cache_fd).st_dev
    fd = cache_fd
    for path in (cache / layout.STATE_DIR, trash_dir(cache)):
        try:
            fd = fsops.open_dir(path, dir_fd=fd, create=create)
        except FileNotFoundError:
            if create:
                raise
            return None
        stack.callback(os.close, fd)
        if os.fstat(fd).st_dev != device:
            raise OSError(errno.EXDEV, f"on another filesystem than the cache {cache}", str(path))
    return cache_fd, fd


def _require(fds: tuple[int, int] | None, missing: Path) -> tuple[int, int]:
    if fds is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(missing))
    return fds


def quarantine(cache_dir: StrPath, name: str, *, now: float) -> str:
    """Move entry ``name`` into the trash as ``<name>@<int(now)>`` and return that trash name.

    One atomic rename within the cache directory's filesystem (the trash directories are created
    first), followed by an fsync of both directories: after a crash the entry is in exactly one of
    the two places. Space is freed only by :func:`purge`. The rename goes through descriptors of
    the cache and of a trash that is a real directory on the cache's filesystem.

    Raises:
        ValueError: ``name`` is not a plain entry name.
        EntryChanged: the entry vanished, or the trash already holds that trash name (the same
            name quarantined in the same second); nothing was moved.
        OSError: the cache directory is missing (FileNotFoundError) or the trash cannot be
            created; ``.imagecache`` or ``trash`` is a symlink
            (``ELOOP``, "a symlink, not a real directory; not followed"), not a directory
            (``ENOTDIR``) or on another filesystem (``EXDEV``, "on another filesystem than the
            cache ..."), and nothing was moved; or the rename or a sync failed.
    """
    _check_name(name)
    cache = Path(cache_dir)
    trash_name = naming.trash_name(name, now)
    with ExitStack() as stack:
        cache_fd, trash_fd = _require(_open_trash(stack, cache, create=True), trash_dir(cache))
        try:
            fsops.rename_noreplace(
                cache / name,
                trash_dir(cache) / trash_name,
                src_dir_fd=cache_fd,
                dst_dir_fd=trash_fd,
            )
        except FileExistsError as exc:
            raise EntryChanged(
                f"cannot quarantine {name}: the trash already holds {trash_name}"
            ) from exc
        except FileNotFoundError as exc:
            raise EntryChanged(f"cannot quarantine {name}: it is gone from {cache}") from exc
        fsops.fsync_dir(trash_fd)
        fsops.fsync_dir(cache_fd)
    return trash_name


def restore(cache_dir: StrPath, trash_name: str) -> str:
    """Move a quarantined entry back to its name in the cache directory; return that name.

    The rename never replaces: if an entry of the same name has appeared since (Nova fetched the
    image again), it is left alone and the trash entry stays. The caller holds the entry's lock.

    Raises:
        ValueError: ``trash_name`` is not ``<name>@<epoch>``.
        EntryChanged: an entry of that name exists again in the cache directory.
        OSError: the trash entry does not exist (FileNotFoundError), the trash is not a real
            directory on the cache's filesystem (as for :func:`quarantine`), or the rename failed.
    """
    parsed = naming.parse_trash_name(trash_name)
    if parsed is None:
        raise ValueError(f"not a trash name (<name>@<epoch>): {trash_name!r}")
    name = parsed[0]
    cache = Path(cache_dir)
    source = trash_dir(cache) / trash_name
    with ExitStack() as stack:
        cache_fd, trash_fd = _require(_open_trash(stack, cache, create=False), source)
        try:
            fsops.rename_noreplace(source, cache / name, src_dir_fd=trash_fd, dst_dir_fd=cache_fd)
        except FileExistsError as exc:
            raise EntryChanged(
                f"cannot restore {trash_name}: an entry named {name} exists again in {cache}"
            ) from exc
        fsops.fsync_dir(cache_fd)
        fsops.fsync_dir(trash_fd)
    return name


def purge(cache_dir: StrPath, trash_name: str) -> int:
    """Delete a quarantined entry for good; return the bytes freed.

    Raises:
        ValueError: ``trash_name`` is not ``<name>@<epoch>``.
        OSError: it is gone (FileNotFoundError), it cannot be unlinked, or the trash is not a real
            directory on the cache's filesystem (as for :func:`quarantine`); nothing was unlinked.
    """
    if naming.parse_trash_name(trash_name) is None:
        raise ValueError(f"not a trash name (<name>@<epoch>): {trash_name!r}")
    path = trash_dir(cache_dir) / trash_name
    with ExitStack() as stack:
        _cache_fd, trash_fd = _require(_open_trash(stack, Path(cache_dir), create=False), path)
        return fsops.remove(path, dir_fd=trash_fd)


def list_trash(cache_dir: StrPath) -> tuple[TrashEntry, ...]:
    """The quarantined entries of ``cache_dir``, ordered by trash name.

    Names that are not ``<name>@<epoch>`` and anything that is not a regular file are skipped (they
    are not ours); an entry that vanishes while listing is skipped; a missing cache directory or
    trash is empty.

    Raises:
        OSError: the trash exists but cannot be listed, or is not a real directory on the cache's
            filesystem (as for :func:`quarantine`: ``ELOOP``, ``ENOTDIR``, ``EXDEV``).
    """
    with ExitStack() as stack:
        try:
            fds = _open_trash(stack, Path(cache_dir), create=False)
        except FileNotFoundError:
            return ()  # no cache directory: nothing quarantined in it
        if fds is None:
            return ()
        trash_fd = fds[1]
        with os.scandir(trash_fd) as it:
            names = sorted(e.name for e in it)
        return tuple(_entries(trash_fd, names))


def _entries(trash_fd: int, names: list[str]) -> Iterator[TrashEntry]:
    for child in names:
        parsed = naming.parse_trash_name(child)
        if parsed is None:
            continue
        try:
            st = os.stat(child, dir_fd=trash_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        name, epoch = parsed
        yield TrashEntry(
            name=name,
            trash_name=child,
            bytes_allocated=st.st_blocks * 512,
            quarantined_at=float(epoch),
            inode=st.st_ino,
        )

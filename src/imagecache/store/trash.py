"""The quarantine: ``<cache>/.imagecache/trash/<name>@<epoch>``, one on-disk format.

Removal goes through here (nova-imagecache.md §9.1 item 7): :func:`quarantine` renames an entry
into the trash (same filesystem, one atomic rename), from where :func:`restore` brings it back
and :func:`purge` deletes it after the grace period. Trash names are
:func:`imagecache.naming.trash_name`. The caller holds the entry lock and has re-checked the
entry under it.
"""

from __future__ import annotations

import stat
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


def quarantine(cache_dir: StrPath, name: str, *, now: float) -> str:
    """Move entry ``name`` into the trash as ``<name>@<int(now)>`` and return that trash name.

    One atomic rename within the cache directory's filesystem (the trash directories are created
    first), followed by an fsync of both directories: after a crash the entry is in exactly one of
    the two places. Space is freed only by :func:`purge`.

    Raises:
        ValueError: ``name`` is not a plain entry name.
        EntryChanged: the entry vanished, or the trash already holds that trash name (the same
            name quarantined in the same second); nothing was moved.
        OSError: the trash cannot be created, or the rename or a sync failed.
    """
    _check_name(name)
    cache, trash = Path(cache_dir), trash_dir(cache_dir)
    trash_name = naming.trash_name(name, now)
    fsops.ensure_dir(trash)
    try:
        fsops.rename_noreplace(cache / name, trash / trash_name)
    except FileExistsError as exc:
        raise EntryChanged(
            f"cannot quarantine {name}: the trash already holds {trash_name}"
        ) from exc
    except FileNotFoundError as exc:
        raise EntryChanged(f"cannot quarantine {name}: it is gone from {cache}") from exc
    fsops.fsync_dir(trash)
    fsops.fsync_dir(cache)
    return trash_name


def restore(cache_dir: StrPath, trash_name: str) -> str:
    """Move a quarantined entry back to its name in the cache directory; return that name.

    The rename never replaces: if an entry of the same name has appeared since (Nova fetched the
    image again), it is left alone and the trash entry stays. The caller holds the entry's lock.

    Raises:
        ValueError: ``trash_name`` is not ``<name>@<epoch>``.
        EntryChanged: an entry of that name exists again in the cache directory.
        OSError: the trash entry does not exist (FileNotFoundError), or the rename failed.
    """
    parsed = naming.parse_trash_name(trash_name)
    if parsed is None:
        raise ValueError(f"not a trash name (<name>@<epoch>): {trash_name!r}")
    name = parsed[0]
    cache, trash = Path(cache_dir), trash_dir(cache_dir)
    try:
        fsops.rename_noreplace(trash / trash_name, cache / name)
    except FileExistsError as exc:
        raise EntryChanged(
            f"cannot restore {trash_name}: an entry named {name} exists again in {cache}"
        ) from exc
    fsops.fsync_dir(cache)
    fsops.fsync_dir(trash)
    return name


def purge(cache_dir: StrPath, trash_name: str) -> int:
    """Delete a quarantined entry for good; return the bytes freed.

    Raises:
        ValueError: ``trash_name`` is not ``<name>@<epoch>``.
        OSError: it is gone (FileNotFoundError), or it cannot be unlinked.
    """
    if naming.parse_trash_name(trash_name) is None:
        raise ValueError(f"not a trash name (<name>@<epoch>): {trash_name!r}")
    return fsops.remove(trash_dir(cache_dir) / trash_name)


def list_trash(cache_dir: StrPath) -> tuple[TrashEntry, ...]:
    """The quarantined entries of ``cache_dir``, ordered by trash name.

    Names that are not ``<name>@<epoch>`` and anything that is not a regular file are skipped (they
    are not ours); an entry that vanishes while listing is skipped; a missing trash is empty.

    Raises:
        OSError: the trash exists but cannot be listed.
    """
    try:
        children = sorted(trash_dir(cache_dir).iterdir())
    except FileNotFoundError:
        return ()
    entries = []
    for child in children:
        parsed = naming.parse_trash_name(child.name)
        if parsed is None:
            continue
        try:
            st = child.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        name, epoch = parsed
        entries.append(
            TrashEntry(
                name=name,
                trash_name=child.name,
                bytes_allocated=st.st_blocks * 512,
                quarantined_at=float(epoch),
                inode=st.st_ino,
            )
        )
    return tuple(entries)

"""The storage's own id, ``<cache>/.imagecache/storage-id``: the same on every host that shares it.

The coordination group and the cleaner lock are named after the storage (issue 12). A path is
no name for it: two hosts may mount one share at different paths (or reach it through a
symlink), and would then join different groups and each take a cleaner lock of its own. The
first pass that needs it writes a random id there, published with ``RENAME_NOREPLACE`` so that
two hosts racing to make it agree on one; every pass after reads it back.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat

from imagecache.layout import Layout
from imagecache.store import fsops

__all__ = ["STORAGE_ID_FILE", "machine_id", "storage_id"]

STORAGE_ID_FILE = "storage-id"
_ID = re.compile(r"[0-9a-f]{32}")


def storage_id(layout: Layout) -> str:
    """The id of the storage ``layout``'s cache is on, made on first use.

    Raises:
        OSError: the state directory cannot be opened or made, or the id cannot be read or
            written, or the file is not a regular file holding an id (EINVAL): never replaced,
            since hosts that read the old one would coordinate apart from those with the new.
    """
    fd = fsops.open_dir(layout.state_dir, create=True)
    try:
        try:
            return _read(fd)
        except FileNotFoundError:
            pass
        temp = f".{STORAGE_ID_FILE}.{secrets.token_hex(8)}.tmp"
        fsops.replace_at(fd, temp, (secrets.token_hex(16) + "\n").encode(), temp=temp + ".w")
        try:
            fsops.rename_noreplace(temp, STORAGE_ID_FILE, src_dir_fd=fd, dst_dir_fd=fd)
        except FileExistsError:
            pass  # another host made it first: theirs it is
        finally:
            with contextlib.suppress(FileNotFoundError):
                fsops.remove(temp, dir_fd=fd)
        fsops.fsync_dir(fd)
        return _read(fd)
    finally:
        os.close(fd)


def _read(dir_fd: int) -> str:
    if not stat.S_ISREG(os.stat(STORAGE_ID_FILE, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        raise OSError(22, f"{STORAGE_ID_FILE} is not a regular file")
    fd = os.open(STORAGE_ID_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 dir_fd=dir_fd)  # fmt: skip
    try:
        data = os.read(fd, 64)
    finally:
        os.close(fd)
    text = data.decode("ascii", "replace").strip()
    if not _ID.fullmatch(text):
        raise OSError(22, f"{STORAGE_ID_FILE} holds no storage id ({data[:40]!r})")
    return text


_MACHINE = re.compile(r"[0-9a-f]{32}")


def machine_id(path: str) -> str:
    """This machine's id, from ``path`` (systemd's ``/etc/machine-id``: 32 hex digits); "" when
    there is none or it is not one (a container without it, an empty file): unknown, and then
    no two machines are told apart by it."""
    if not path:
        return ""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return ""
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            data = os.read(fd, 128)
        finally:
            os.close(fd)
    except OSError:
        return ""
    text = data.decode("ascii", "replace").strip()
    return text if _MACHINE.fullmatch(text) else ""

"""Reading the small JSON files of a host (``compute_nodes``, inventories, ``disk.info``, plans).

One reader for all of them, because each is hostile input: a symlink swapped in, a FIFO that
never answers, ``/dev/zero`` behind a name, a file of gigabytes. The name is ``stat``ed first
and anything but a regular file is refused unopened (opening a device can act: a watchdog arms,
a tape rewinds; opening a FIFO wakes its writer). It is then opened with
``O_NOFOLLOW | O_NONBLOCK`` (a FIFO swapped in meanwhile cannot block the open, a symlink is
refused), must still be a regular file by ``fstat``, and is read up to a size cap.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_BYTES", "JsonFileError", "read_json", "read_json_at"]

MAX_BYTES = 16 << 20  # compute_nodes of thousands of hosts, an inventory of 100,000 instances


class JsonFileError(Exception):
    """The file cannot be read as JSON.

    ``missing``: it does not exist. ``corrupt``: it was read, and is not valid UTF-8 JSON.
    Otherwise it could not be read at all (a symlink, not a regular file, too large, EACCES).
    """

    def __init__(self, message: str, *, missing: bool = False, corrupt: bool = False) -> None:
        super().__init__(message)
        self.missing = missing
        self.corrupt = corrupt


def read_json(path: str, *, max_bytes: int = MAX_BYTES, follow_symlinks: bool = False) -> Any:
    """The JSON document in the regular file ``path``.

    ``follow_symlinks`` is for files an operator names on the command line (``--inventory``,
    ``--plan``): a link they made is theirs. Files found on the host are never followed.

    Raises:
        JsonFileError: it does not exist (``missing``), is a symlink, is not a regular file,
            cannot be read, is larger than ``max_bytes``, or is not valid UTF-8 JSON (the
            message says which); never OSError, ValueError or RecursionError.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        mode = os.stat(path, follow_symlinks=follow_symlinks).st_mode
        if stat.S_ISLNK(mode):
            raise JsonFileError("is a symlink: not followed")
        if not stat.S_ISREG(mode):
            raise JsonFileError("is not a regular file")
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise JsonFileError("does not exist", missing=True) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise JsonFileError("is a symlink: not followed") from None
        raise JsonFileError(f"cannot read: {exc.strerror}") from None
    except ValueError:  # a NUL byte or a lone surrogate: no file has that name
        raise JsonFileError("is not a valid file name") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JsonFileError("is not a regular file")
        if st.st_size > max_bytes:
            raise JsonFileError(f"is larger than {max_bytes} bytes")
        # One read of the size fstat gave, plus one byte: a short read is the end of the file,
        # so the usual file (thousands of disk.info per pass) costs a single read(2). A file
        # that grew meanwhile is read on, up to the cap.
        chunks = [os.read(fd, st.st_size + 1)]
        size = len(chunks[0])
        while size > st.st_size and size <= max_bytes and (chunk := os.read(fd, 1 << 20)):
            size += len(chunk)
            chunks.append(chunk)
        if size > max_bytes:
            raise JsonFileError(f"is larger than {max_bytes} bytes")
    except OSError as exc:
        raise JsonFileError(f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise JsonFileError(f"not valid JSON: {exc}", corrupt=True) from None


def read_json_at(
    dir_fd: int,
    name: str,
    *,
    max_bytes: int,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """The JSON of the regular file ``name`` in the open directory ``dir_fd`` (this project's
    own records, manifests and pins): stat first (a FIFO or a device is never opened; a symlink
    is refused), then ``O_NOFOLLOW | O_NONBLOCK``, ``fstat`` again, at most ``max_bytes``;
    ``object_pairs_hook`` as :func:`json.loads` takes it (to refuse duplicate keys, say).

    Raises:
        OSError: not a regular file of at most ``max_bytes``, or it cannot be read.
        ValueError: not UTF-8 JSON (``UnicodeDecodeError``, ``JSONDecodeError``).
    """
    mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    if stat.S_ISLNK(mode):
        raise OSError(errno.ELOOP, "a symlink: not followed", name)
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file", name)
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"not a regular file of at most {max_bytes} bytes", name)
        chunks = []
        size = 0
        while size <= max_bytes and (data := os.read(fd, min(1 << 20, max_bytes + 1 - size))):
            chunks.append(data)
            size += len(data)
    finally:
        os.close(fd)
    if size > max_bytes:
        raise OSError(errno.EFBIG, f"grew past {max_bytes} bytes while read", name)
    return json.loads(b"".join(chunks).decode("utf-8"), object_pairs_hook=object_pairs_hook)

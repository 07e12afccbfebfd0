"""Who has a file open right now: the last word before a removal.

A file a running qemu (or ``qemu-nbd``, or anything) holds open is in use whatever any record or
disk header says. Two checks, both read-only:

- QEMU's own image locks: qemu takes OFD byte-range locks on the images it opens (the bytes from
  100 on), and ``fcntl(F_OFD_GETLK)`` over the whole file tells whether another open file
  description holds one, as ``qemu-img`` asks "is another process using the image?". This works
  across PID namespaces (a containerised qemu whose ``/proc`` we cannot see).
- ``/proc/*/fd``: every descriptor of every process we may look at, by device and inode (one walk
  for a whole batch of entries, not one per entry). Processes of other users are invisible
  unless we are root; the lock check still sees qemu.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterable, Mapping

__all__ = ["Holder", "holders", "ofd_locked"]

Holder = str  # "pid 1234 (qemu-system-x86)"

# struct flock on Linux x86-64 / arm64: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (and padding).
_FLOCK = struct.Struct("hhqqi4x")
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)


def ofd_locked(path: str) -> bool:
    """Whether another open file description holds a lock on any byte of ``path`` (qemu's image
    locks). A file that cannot be opened read-only, never through a symlink, is "not known to be
    locked" (False): the caller's other checks decide."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, _F_OFD_GETLK, probe)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            return False  # a filesystem without OFD locks: nobody can hold one there either
        raise
    finally:
        os.close(fd)
    return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)


def holders(
    files: Iterable[tuple[int, int]], *, proc: str = "/proc"
) -> Mapping[tuple[int, int], list[Holder]]:
    """The processes that have any of ``files`` ((device, inode) pairs) open, by file; one walk
    of ``proc``. Processes that vanish or hide their descriptors meanwhile are skipped."""
    wanted = set(files)
    found: dict[tuple[int, int], list[Holder]] = {}
    if not wanted:
        return found
    me = str(os.getpid())
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit() and p != me]
    except OSError:
        return found
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")  # the open file itself, through the magic link
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in wanted:
                found.setdefault(key, []).append(f"pid {pid} ({_comm(proc, pid)})")
    return found


def _comm(proc: str, pid: str) -> str:
    try:
        with open(f"{proc}/{pid}/comm", "rb") as f:
            return f.read(64).decode("utf-8", "replace").strip() or "?"
    except OSError:
        return "?"

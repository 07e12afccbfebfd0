"""Who has a file open right now: the last word before a removal.

A file a running qemu (or ``qemu-nbd``, or anything) holds open is in use whatever any record or
disk header says. Two checks, both read-only:

- QEMU's own image locks: qemu takes OFD byte-range locks on the images it opens (the bytes from
  100 on), and ``fcntl(F_OFD_GETLK)`` over the whole file tells whether another open file
  description holds one, as ``qemu-img`` asks "is another process using the image?". This works
  across PID namespaces (a containerised qemu whose ``/proc`` we cannot see).
- ``/proc/*/fd`` and ``/proc/*/maps``: every descriptor and every file mapping of every process
  we may look at, by device and inode (one walk for a whole batch of entries, not one per
  entry): a file a process has mmapped counts even once its descriptor is closed. Processes of
  other users are invisible unless we are root; the lock check still sees qemu.
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
    """The processes that have any of ``files`` ((device, inode) pairs) open or mapped, by file,
    each process once per file; one walk of ``proc``. Processes that vanish or hide their
    descriptors or mappings meanwhile are skipped (for what they hide)."""
    wanted = set(files)
    found: dict[tuple[int, int], list[Holder]] = {}
    if not wanted:
        return found
    me = str(os.getpid())
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit() and p != me]
    except OSError:
        return found
    inodes = frozenset(b"%d" % ino for _, ino in wanted)  # in decimal, as maps writes them
    for pid in pids:
        held = _descriptors(f"{proc}/{pid}/fd", wanted)
        held |= _mappings(f"{proc}/{pid}/maps", wanted, inodes)
        if held:
            holder = f"pid {pid} ({_comm(proc, pid)})"
            for key in held:
                found.setdefault(key, []).append(holder)
    return found


def _descriptors(fd_dir: str, wanted: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The ``wanted`` files among one process's open descriptors (none if they are hidden)."""
    held: set[tuple[int, int]] = set()
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return held
    for fd in fds:
        try:
            st = os.stat(f"{fd_dir}/{fd}")  # the open file itself, through the magic link
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in wanted:
            held.add(key)
    return held


# At most this much of one process's /proc/PID/maps is read: all of it for any sane process (the
# default vm.max_map_count, 65530 mappings, at some 100 bytes a line). Of a larger one only the
# mappings in the first _MAPS_CAP bytes count; its descriptors and qemu's locks still do.
_MAPS_CAP = 8 << 20
_MAPS_CHUNK = 1 << 16  # the kernel hands maps out a page or so per read(2) anyway
_HEX = frozenset(b"0123456789abcdefABCDEF")
_SEARCH_AT_MOST = 4  # wanted inodes searched for in a whole table before its lines are split


def _mappings(
    maps: str, wanted: set[tuple[int, int]], inodes: frozenset[bytes]
) -> set[tuple[int, int]]:
    """The ``wanted`` files among one process's file mappings, from its ``maps`` (none if it
    cannot be read); ``inodes``, the wanted inode numbers in decimal. The kernel writes a line
    as ``start-end perms offset MAJOR:MINOR INODE `` (one space after each field, the device in
    hex, the inode in decimal, 0 for a mapping of no file) then padding and the path. Only the
    first five fields are ever split off, at single spaces, and the path never looked at: it
    may hold spaces, tabs, carriage returns, ``" (deleted)"``, any bytes at all; only a newline
    the kernel escapes (as ``\\012``), so a newline always ends a line. Nothing but a
    well-formed device and a nonzero inode, each followed by its space, counts.

    The device and inode are those the kernel reports for the mapping's inode, which are not
    always what a ``stat`` by path says: a file on overlayfs is mapped through its underlying
    (upper or lower) file, whose device (and, without xino, inode number) ``maps`` shows, while
    ``stat`` shows the overlay's. Such a mapping is not matched here; a descriptor on the file
    still is (through ``fd``, where ``stat`` gives the overlay's numbers), and qemu keeps its
    images open, so only a mapping whose descriptor is closed goes unseen there."""
    data = _read_capped(maps)
    if not data:
        return set()
    # A table in which no wanted inode appears as " INODE " maps nothing wanted. For a few
    # inodes (the executor asks about one file) searching the bytes for them is much cheaper than
    # splitting every line; for many, one search each would cost more than the split.
    if len(inodes) <= _SEARCH_AT_MOST and not any(b" %s " % i in data for i in inodes):
        return set()
    held: set[tuple[int, int]] = set()
    for line in data.split(b"\n"):
        fields = line.split(b" ", 5)  # the sixth, what follows INODE's space, is never read
        if len(fields) == 6 and fields[4] in inodes:  # a set look-up before any parsing
            key = _maps_key(fields[3], fields[4])
            if key is not None and key in wanted:
                held.add(key)
    return held


def _maps_key(dev: bytes, inode: bytes) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` from the maps fields ``MAJOR:MINOR`` and ``INODE``; None unless
    they are hex digits and a nonzero decimal as the kernel writes them (no sign, no prefix, no
    underscores, no leading zero: what ``int`` would accept beyond that is not a device)."""
    major, colon, minor = dev.partition(b":")
    if not (
        colon
        and 0 < len(major) <= 8
        and 0 < len(minor) <= 8
        and _HEX.issuperset(major)
        and _HEX.issuperset(minor)
        and 0 < len(inode) <= 20
        and inode.isdigit()  # bytes.isdigit: ASCII digits only
        and inode[:1] != b"0"  # 0 itself (no file), or a leading zero
    ):
        return None
    try:
        return os.makedev(int(major, 16), int(minor, 16)), int(inode)
    except (OverflowError, ValueError):
        return None


def _read_capped(path: str) -> bytes:
    """Up to _MAPS_CAP bytes of ``path``; empty if it cannot be read through. A maps line the
    cap cuts short is not misread: an INODE cut short lacks the space that ends the field."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    chunks: list[bytes] = []
    left = _MAPS_CAP
    try:
        while left > 0:
            chunk = os.read(fd, min(left, _MAPS_CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError:
        return b""
    finally:
        os.close(fd)
    return b"".join(chunks)


def _comm(proc: str, pid: str) -> str:
    try:
        with open(f"{proc}/{pid}/comm", "rb") as f:
            return f.read(64).decode("utf-8", "replace").strip() or "?"
    except OSError:
        return "?"

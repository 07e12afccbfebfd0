"""Which files a piece of code opened, seen by the kernel (inotify ``IN_OPEN``), not by patching;
and what happened to the files of a directory (:class:`DirWatch`).

Linux only, like the rest of the project. A watch follows symlinks, so watching a FIFO or a file
sees opens made through any name of it.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path
from types import TracebackType

_IN_ACCESS = 0x00000001  # a read
_IN_CLOSE_NOWRITE = 0x00000010
_IN_OPEN = 0x00000020
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
_libc = ctypes.CDLL(None, use_errno=True)


class OpenWatch:
    """``with OpenWatch(a, b) as watch: ...; watch.opened()`` -> the watched paths opened since
    (``reads=True``: read from, by ``read(2)`` and its kin, instead)."""

    def __init__(self, *paths: Path, reads: bool = False) -> None:
        self._paths = paths
        self._fd = -1
        self._by_wd: dict[int, Path] = {}
        self._mask = _IN_ACCESS if reads else _IN_OPEN

    def __enter__(self) -> OpenWatch:
        self._fd = _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        for path in self._paths:
            # Closes are watched too, only so that two opens in a row are two events: the kernel
            # merges an event identical to the one queued before it.
            mask = self._mask | _IN_CLOSE_NOWRITE
            wd = _check(_libc.inotify_add_watch(self._fd, os.fsencode(path), mask))
            self._by_wd[wd] = path
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        os.close(self._fd)

    def opened(self) -> set[Path]:
        """The watched paths opened since the watch started (or since the last call)."""
        return set(self.events())

    def events(self) -> list[Path]:
        """The watched path of every open (or read) since the start or the last call, in order."""
        found: list[Path] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return found
            at = 0
            while at < len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, at)
                at += _EVENT.size + length
                if mask & self._mask:
                    found.append(self._by_wd[wd])


class DirWatch:
    """``with DirWatch(directory) as watch: ...; watch.events()`` -> what happened to the files
    directly in ``directory`` since, in order, by name: ``("read", name)`` for a ``read(2)`` and
    its kin (through any descriptor, even one opened under an earlier name: the kernel reports
    the name the file has now), ``("created", name)``, ``("moved-in", name)`` for a rename into
    that name. What happens in its subdirectories is not seen."""

    _KINDS = ((_IN_ACCESS, "read"), (_IN_CREATE, "created"), (_IN_MOVED_TO, "moved-in"))

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._fd = -1

    def __enter__(self) -> DirWatch:
        self._fd = _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        mask = _IN_ACCESS | _IN_CREATE | _IN_MOVED_TO
        _check(_libc.inotify_add_watch(self._fd, os.fsencode(self._directory), mask))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        os.close(self._fd)

    def events(self) -> list[tuple[str, str]]:
        """The events since the watch started (or since the last call), oldest first."""
        found: list[tuple[str, str]] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return found
            at = 0
            while at < len(data):
                _, mask, _, length = _EVENT.unpack_from(data, at)
                raw = data[at + _EVENT.size : at + _EVENT.size + length]
                at += _EVENT.size + length
                name = os.fsdecode(raw.rstrip(b"\0"))
                found += [(kind, name) for bit, kind in self._KINDS if mask & bit and name]


def _check(result: int) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result

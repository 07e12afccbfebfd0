"""Half of a scan done in a second process, when there is enough of it to pay for one.

A big host's scan is tens of thousands of ``open``/``fstat``/``read``/``close`` and as much Python
per file, on one core; hypervisors have several. :func:`start` forks one child, which runs the
scan of the second half of the instance directories on its copy of the scan's state and sends
back what it found as plain values; the parent scans the first half meanwhile and, with
:func:`collect`, gets the child's findings to append: the same disks and problems, in the same
order, as one process scanning them all (``tests/test_scan_split.py`` checks that on hostile
hosts). Anything unusual and the parent scans that half itself, so a child can make a scan
slower, never different:

- it forks only while it is the process's one thread (a fork copies no other thread, and a
  lock another thread held stays held in the child): never in the daemon, whose heart and
  metrics threads run;
- the child only reads files. It never writes one, never logs (a handler's lock, a file's
  buffer), never returns into the caller's code: whatever happens, it ends in ``os._exit``,
  so no ``atexit`` work and no flush of inherited buffers runs in it;
- a child that fails (an exception, a signal, a truncated or malformed answer) is ignored.

Forking costs a few milliseconds (the page tables of the parent), and the answer costs its
encoding, about 1 µs per disk: below :data:`MIN_DIRECTORIES` a second process does not pay.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagecache.model import Disk, Problem, ProblemCode

__all__ = ["MIN_DIRECTORIES", "Child", "Found", "abandon", "collect", "start", "worth_splitting"]

#: Fewer instance directories than this are scanned in one process (measured: the fork and the
#: answer cost about as much as 500 directories' scan; below a few thousand the gain is noise).
MIN_DIRECTORIES = 2000

_DISK_FIELDS = tuple(Disk.__dataclass_fields__)
_ANSWER_LIMIT = 1 << 31  # no scan's answer is near this: a longer one is not read on


@dataclass(frozen=True, slots=True)
class Found:
    """What a half scan found: its disks and problems in order, and the ``(st_dev, st_ino)`` of
    every directory it entered (to tell whether both halves met the same one)."""

    disks: list[Disk]
    problems: list[Problem]
    known: set[tuple[int, int] | None]


@dataclass(frozen=True, slots=True)
class Child:
    pid: int
    answer: int  # the read end of the pipe the child writes its answer to


def worth_splitting(directories: int, *, at: int | None = MIN_DIRECTORIES) -> bool:
    """Whether a scan of ``directories`` is split (``at`` None: never), given this process."""
    if at is None or directories < max(2, at):
        return False
    if not hasattr(os, "fork") or not _one_thread():
        return False
    affinity = getattr(os, "sched_getaffinity", None)  # Linux: the CPUs this process may use
    return (len(affinity(0)) if affinity is not None else os.cpu_count() or 1) >= 2


def _one_thread() -> bool:
    """Whether this process runs one thread: in Python's count, and the kernel's where it has one
    (a thread a C library started is in no Python count, and may hold a lock the child needs)."""
    if threading.active_count() != 1:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return True  # no /proc: Python's count is all there is


def start(scan: Callable[[], Found]) -> Child | None:
    """Fork a child that runs ``scan`` and sends back what it found; None if it cannot be."""
    try:
        read_end, write_end = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:  # the child: never returns
        _child(scan, read_end, write_end)
    os.close(write_end)
    return Child(pid, read_end)


def _child(scan: Callable[[], Found], read_end: int, write_end: int) -> None:
    status = 1
    try:
        os.close(read_end)
        # An interrupt is the parent's to handle (it scans on, or stops); the child just ends.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        data = marshal.dumps(_encode(scan()))
        view = memoryview(data)
        while view:
            view = view[os.write(write_end, view) :]
        status = 0
    finally:  # whatever was raised (an interrupt too) never reaches the caller's code
        os._exit(status)


def abandon(child: Child) -> None:
    """End a child whose answer is no longer wanted (the parent's half raised): killed, its
    pipe closed, reaped, so that neither a zombie nor a child blocked writing is left."""
    os.close(child.answer)
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child.pid, 0)


def collect(child: Child) -> Found | None:
    """The child's findings, or None when it failed in any way (the caller scans its half).

    Reads the whole answer first (the child may be blocked writing it), then reaps the child.
    """
    chunks = []
    size = 0
    try:
        try:
            while size <= _ANSWER_LIMIT and (chunk := os.read(child.answer, 1 << 20)):
                chunks.append(chunk)
                size += len(chunk)
        except OSError:
            chunks = []
    except BaseException:  # an interrupt while reading: no child is left behind either
        abandon(child)
        raise
    os.close(child.answer)
    if size > _ANSWER_LIMIT:
        os.kill(child.pid, signal.SIGKILL)
    try:
        _, status = os.waitpid(child.pid, 0)
    except ChildProcessError:
        return None
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0 or not chunks:
        return None
    try:
        return _decode(marshal.loads(b"".join(chunks)))
    except (ValueError, TypeError, EOFError, KeyError, IndexError):
        return None


# -- the answer: plain values only -------------------------------------------------------------


def _encode(found: Found) -> Any:
    disks = [tuple(getattr(d, f) for f in _DISK_FIELDS) for d in found.disks]
    problems = [(p.code.value, p.ref, p.message) for p in found.problems]
    return disks, problems, sorted(found.known, key=lambda k: (k is not None, k))


def _decode(answer: object) -> Found:
    """Raises ValueError, TypeError, KeyError or IndexError for anything not an answer."""
    if not isinstance(answer, tuple) or len(answer) != 3:
        raise ValueError("not an answer")
    disks, problems, known = answer
    if not (isinstance(disks, list) and isinstance(problems, list) and isinstance(known, list)):
        raise ValueError("not an answer")
    return Found(
        [Disk(*_fields(d)) for d in disks],
        [Problem(ProblemCode(code), ref, message) for code, ref, message in problems],
        {None if k is None else (k[0], k[1]) for k in known},
    )


def _fields(disk: object) -> Any:
    if not isinstance(disk, tuple) or len(disk) != len(_DISK_FIELDS):
        raise ValueError("not a disk")
    return disk

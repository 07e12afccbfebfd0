"""Hostile review of the split instance scan (``imagecache.sources.split``): what is left behind
when the parent gives up on its child."""

from __future__ import annotations

import os
import time

from imagecache.model import Disk
from imagecache.sources import split


def _children() -> set[int]:
    """This process's children (running or zombie), from /proc: a process edge, not a patch."""
    found: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            found.update(int(p) for p in f.read().split())
    return found


def test_an_abandoned_child_blocked_writing_leaves_nothing_behind() -> None:
    # The parent's half raised (an interrupt): the child, blocked writing an answer of megabytes
    # nobody reads, must not be left as a blocked process or a zombie, nor its pipe open.
    disk = Disk("/i/u/disk", "u", "qcow2", ("/i/_base/x",), None, ((1, 2),), (1, 3))
    before = _children()
    fds_before = set(os.listdir("/proc/self/fd"))
    child = split.start(lambda: split.Found([disk] * 200_000, [], set()))
    assert child is not None and child.pid in _children()
    time.sleep(0.2)  # let it fill the pipe and block
    split.abandon(child)
    assert _children() - before == set()
    assert set(os.listdir("/proc/self/fd")) <= fds_before

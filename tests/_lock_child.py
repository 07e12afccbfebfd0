"""Child process for tests/test_locks.py: takes an entry lock exactly as nova-compute does.

Nova wraps oslo.concurrency: ``lockutils.lock(name, lock_file_prefix="nova-", external=True,
lock_path=<instances_path>/locks)``. Running it in another process is what makes the test real:
POSIX record locks never conflict within one process.

    python _lock_child.py hold LOCK_DIR NAME [MARKER]
        take the lock (waiting as long as needed), print "held", wait for a line on stdin, create
        MARKER if given, release, print "released"
    python _lock_child.py try LOCK_DIR NAME
        try once without waiting; print "got" (and release) or "busy"
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from pathlib import Path

from oslo_concurrency import lockutils


def _lock(lock_dir: str, name: str, *, blocking: bool) -> AbstractContextManager[object]:
    return lockutils.lock(
        name,
        lock_file_prefix="nova-",
        external=True,
        lock_path=lock_dir,
        blocking=blocking,
        do_log=False,
    )


def main(argv: list[str]) -> int:
    mode, lock_dir, name, *rest = argv
    if mode == "hold":
        with _lock(lock_dir, name, blocking=True):
            print("held", flush=True)
            sys.stdin.readline()
            if rest:
                Path(rest[0]).touch()
        print("released", flush=True)
        return 0
    if mode == "try":
        try:
            with _lock(lock_dir, name, blocking=False):
                print("got", flush=True)
        except lockutils.AcquireLockFailedException:
            print("busy", flush=True)
        return 0
    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

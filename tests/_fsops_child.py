"""Child process for the crash-safety tests in tests/test_fsops.py: mutates until SIGKILLed.

    python _fsops_child.py quarantine CACHE_DIR NAME...
        forever: quarantine each NAME that is in CACHE_DIR, restore each one that is in the trash
    python _fsops_child.py write PATH
        forever: atomic_write(PATH, payload(i)) for i = 0, 1, 2, 0, 1, ...

Prints "ready" once everything is imported, so the parent's kill lands among the mutations.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
from pathlib import Path

from imagecache.store import fsops
from imagecache.store import trash as trash_store

PAYLOADS = 3


def payload(i: int) -> bytes:
    """Distinct content and length per i, large enough that a write takes a while."""
    return hashlib.sha256(str(i).encode()).digest() * (2048 * (i + 1))


def quarantine_forever(cache: Path, names: list[str]) -> None:
    for now in itertools.count(1):
        trashed = {entry.name: entry.trash_name for entry in trash_store.list_trash(cache)}
        for name in names:
            if name in trashed:
                trash_store.restore(cache, trashed[name])
            else:
                trash_store.quarantine(cache, name, now=now)


def write_forever(path: Path) -> None:
    for i in itertools.cycle(range(PAYLOADS)):
        fsops.atomic_write(path, payload(i))


def main(argv: list[str]) -> int:
    mode, target, *names = argv
    print("ready", flush=True)
    if mode == "quarantine":
        quarantine_forever(Path(target), names)
    elif mode == "write":
        write_forever(Path(target))
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

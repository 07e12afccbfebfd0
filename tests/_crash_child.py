"""Child process for tests/test_crash.py: cleans and restores until SIGKILLed.

    python _crash_child.py CONFIG
        forever: restore every quarantined entry (``imagecache restore``), then run a ``clean``
        pass (which quarantines them all again: every threshold is 0).

Prints "ready" once everything is imported, so the parent's kill lands among the mutations.
"""

from __future__ import annotations

import sys
import time

from imagecache import manager
from imagecache.clock import Clock
from imagecache.config import load_settings
from imagecache.store import trash as trash_store


def main(argv: list[str]) -> int:
    settings = load_settings([argv[0]])
    print("ready", flush=True)
    while True:
        for entry in trash_store.list_trash(settings.cache_dir):
            manager.restore(
                settings, entry.trash_name, clock=Clock(time.time, time.monotonic, time.sleep)
            )
        manager.run_pass(settings, clock=Clock(time.time, time.monotonic, time.sleep))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

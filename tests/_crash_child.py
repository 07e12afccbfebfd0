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
from imagecache.config import load_settings
from imagecache.store import fsops


def main(argv: list[str]) -> int:
    settings = load_settings([argv[0]])
    print("ready", flush=True)
    while True:
        for entry in fsops.list_trash(settings.cache_dir):
            manager.restore(settings, entry.trash_name, clock=time.time)
        manager.run_pass(settings, clock=time.time)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``clean`` with every threshold at 0 beside nova-compute spawning: no instance loses its base.

Three worker processes create instances with the real qemu-img under oslo.concurrency's external
lock on the base, fetching it again when missing, and delete them again, while a fourth process
runs ``clean`` passes in a loop with every age threshold and the quarantine at 0: each base is
removable the very moment no overlay uses it. The only thing that keeps a base alive is the
re-observation under the entry lock. Two spawn orders (tests/_race_child.py):

- ``locked``: check and use under the lock, as imagecache's create-disk does; no spawn fails;
- ``nova``: nova-compute's real order, ``exists()`` and the touch outside the lock; a spawn may
  fail because the base vanished between the check and the lock (Nova's behaviour), but no
  overlay may ever exist whose backing file is missing.

At the end the workers delete every instance and the cleaner runs until the unused bases are
gone, so every base fetched is removed exactly once, whatever the scheduling.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CHILD = Path(__file__).with_name("_race_child.py")
WORKERS = 3
ITERATIONS = 300


@pytest.mark.slow
@pytest.mark.parametrize("order", ["locked", "nova"])
def test_no_overlay_ever_loses_its_backing_file(tmp_path: Path, order: str) -> None:
    instances = tmp_path / "instances"
    (instances / "_base").mkdir(parents=True)
    (tmp_path / "pristine").write_bytes(b"\x5a" * 65536)
    config = tmp_path / "nova.conf"
    config.write_text(
        f"[DEFAULT]\ninstances_path = {instances}\nhost = h1\n"
        "[image_cache]\nremove_unused_original_minimum_age_seconds = 0\n"
        "remove_unused_resized_minimum_age_seconds = 0\n"
        f"[imagecache]\nquarantine_seconds = 0\nstale_temp_seconds = 0\n"
        f"lock_timeout_seconds = 10\naudit_log = {tmp_path}/audit.jsonl\n"
    )
    stop = tmp_path / "stop"
    python = [sys.executable, str(CHILD)]
    cleaner = subprocess.Popen(
        [*python, "cleaner", str(config), str(stop)], stdout=subprocess.PIPE, text=True
    )
    try:
        workers = [
            subprocess.Popen(
                [*python, "worker", str(tmp_path), f"w{i}", str(ITERATIONS), str(i), order],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(WORKERS)
        ]
        outs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        stop.touch()
        cleaned = cleaner.communicate(timeout=120)[0]
    assert [w.returncode for w in workers] == [0] * WORKERS and cleaner.returncode == 0
    stats: list[dict[str, Any]] = [json.loads(out) for out in outs]
    done: dict[str, Any] = json.loads(cleaned)
    clean: dict[str, int] = done["counts"]
    counts: list[dict[str, int]] = [s["counts"] for s in stats]

    # The invariant: no overlay ever had a missing backing file, checked after every spawn
    # and by qemu-img at the end.
    assert [s["missing"] for s in stats] == [[]] * WORKERS, (clean, stats)
    # Every spawn either made an overlay or failed because its base was gone (Nova's order only).
    for c in counts:
        assert c.get("creations", 0) + c.get("spawn_failures", 0) == ITERATIONS, c
        assert c.get("deletions", 0) == c.get("creations", 0), c
    if order == "locked":
        assert all(c.get("spawn_failures", 0) == 0 for c in counts), counts
    # Operations that really happened: overlays made, instances deleted, clean passes.
    ops = sum(c.get("creations", 0) + c.get("deletions", 0) for c in counts) + clean["passes"]
    assert ops >= 1000, (ops, counts, clean)
    # Every base fetched was removed exactly once: while in play or in the final drain, when no
    # instance is left. The cache starts empty, so there is at least one.
    assert done["leftover"] == [], done
    removed = clean.get("removed:unused-expired", 0)
    assert removed == sum(c.get("fetches", 0) for c in counts) >= 1, (clean, counts)
    assert not [k for k in clean if k.startswith("failed:")], clean

    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == removed + clean.get("reaped:stale-temp", 0)

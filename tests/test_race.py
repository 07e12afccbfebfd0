"""``clean`` with every threshold at 0 beside nova-compute spawning: no instance loses its base.

Three worker processes create instances as nova-compute does (oslo.concurrency's external lock on
the base, fetch it again if missing, create a qcow2 overlay with the real qemu-img) and delete
them again, while a fourth process runs ``clean`` passes in a loop with every age threshold and the
quarantine at 0: each base is removable the very moment no overlay uses it. The only thing that
keeps a base alive is the re-observation under the entry lock.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imagecache.scan import scan_instances
from tests.qemu import info_chain

CHILD = Path(__file__).with_name("_race_child.py")
WORKERS = 3
ITERATIONS = 300


@pytest.mark.slow
def test_no_overlay_ever_loses_its_backing_file(tmp_path: Path) -> None:
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
                [*python, "worker", str(tmp_path), f"w{i}", str(ITERATIONS), str(i)],
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
    clean: dict[str, int] = json.loads(cleaned)["counts"]

    assert [s["missing"] for s in stats] == [[]] * WORKERS, (clean, stats)
    ops = sum(s["counts"]["creations"] + s["counts"].get("deletions", 0) for s in stats)
    ops += clean["passes"]
    assert ops >= 1000, (ops, clean)
    # The race was real: bases were removed while in play, fetched again, and removals were
    # refused because a spawn had just used the base.
    removed = clean.get("removed:unused-expired", 0)
    assert removed >= 10, clean
    assert sum(s["counts"].get("fetches", 0) for s in stats) >= removed
    refused = {k: v for k, v in clean.items() if k.startswith("skipped:")}
    assert refused, clean

    disks, problems = scan_instances(str(instances), cache_dir_name="_base")
    assert problems == () and len(disks) == WORKERS
    assert [d.path for d in disks if d.missing is not None] == []
    for disk in disks:  # and qemu itself agrees that every chain is whole
        assert len(info_chain(Path(disk.path))) == 2
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == removed + clean.get("reaped:stale-temp", 0)

"""Child processes for tests/test_race.py: nova-compute's spawn path against ``clean`` in a loop.

    python _race_child.py worker ROOT ID ITERATIONS SEED
        ITERATIONS times, as nova-compute spawns an instance: take the entry lock of a random base
        with oslo.concurrency (lock_file_prefix "nova-", external, lock_path instances/locks), fetch
        the base again if it is missing (copy of ROOT/pristine, published by rename), touch it
        (every other time only, so the base itself does not always change), create a real qcow2
        overlay on it with qemu-img and move the instance directory into place, release. Outside
        the lock, check that every instance this worker still has has its backing file. Then
        delete the oldest instance once there are more than two (rename away, then rmtree), as an
        instance deletion does, so bases do become unused.
    python _race_child.py cleaner CONFIG STOPFILE
        ``imagecache clean`` passes in a loop (the library's run_pass, the real locks and
        re-checks) until STOPFILE exists.

Each prints one JSON line of counts at the end.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from oslo_concurrency import lockutils

from imagecache import manager, naming
from imagecache.config import load_settings
from imagecache.model import Result

BASES = tuple(naming.fingerprint(f"race-image-{i}") for i in range(5))


def worker(root: Path, ident: str, iterations: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    instances, cache = root / "instances", root / "instances" / "_base"
    staging, graveyard = root / f"staging-{ident}", root / f"graveyard-{ident}"
    staging.mkdir()
    graveyard.mkdir()
    live: list[tuple[Path, Path]] = []  # (instance dir, base it uses)
    counts: Counter[str] = Counter()
    missing: list[str] = []
    for i in range(iterations):
        name = rng.choice(BASES)
        base = cache / name
        inst = f"{ident}-{i:05d}"
        with lockutils.lock(
            name, lock_file_prefix="nova-", external=True, lock_path=str(instances / "locks")
        ):
            if not base.exists():
                temp = cache / naming.temp_name(name, os.getpid(), f"{i:x}")
                shutil.copyfile(root / "pristine", temp)
                temp.rename(base)
                counts["fetches"] += 1
            if i % 2 == 0:
                os.utime(base)
            disk = staging / inst / "disk"
            disk.parent.mkdir()
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "raw",
                    "-b",
                    str(base),
                    str(disk),
                ],
                check=True,
                capture_output=True,
            )
            (staging / inst).rename(instances / inst)
        counts["creations"] += 1
        live.append((instances / inst, base))
        # Outside the lock, after the fact: every instance we still have can still boot.
        missing += [f"{d.name} -> {b.name}" for d, b in live if not b.exists()]
        if len(live) > 1:
            gone, _ = live.pop(0)
            gone.rename(graveyard / gone.name)
            shutil.rmtree(graveyard / gone.name)
            counts["deletions"] += 1
    return {"counts": dict(counts), "missing": missing}


def cleaner(config: str, stopfile: Path) -> dict[str, object]:
    settings = load_settings([config])
    counts: Counter[str] = Counter()
    while not stopfile.exists():
        _, report = manager.run_pass(settings, clock=time.time)
        counts["passes"] += 1
        for o in report.outcomes:
            if o.result is not Result.TOUCHED:
                counts[f"{o.result}:{o.reason}"] += 1
    return {"counts": dict(counts)}


def main(argv: list[str]) -> int:
    mode, *args = argv
    if mode == "worker":
        out = worker(Path(args[0]), args[1], int(args[2]), int(args[3]))
    elif mode == "cleaner":
        out = cleaner(args[0], Path(args[1]))
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

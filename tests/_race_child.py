"""Child processes for tests/test_race.py: nova-compute's spawn path against ``clean`` in a loop.

    python _race_child.py worker ROOT ID ITERATIONS SEED ORDER
        ITERATIONS times, spawn an instance on a random base with a real qcow2 overlay made by
        qemu-img (without -u: it opens the backing file and refuses a missing one), the lock
        being oslo.concurrency's (lock_file_prefix "nova-", external, lock_path instances/locks),
        in one of two orders:

        locked  check and use entirely under the entry lock, as imagecache's create-disk does:
                take the lock, fetch the base if missing (copy of ROOT/pristine published by
                rename), touch it (every other time), create the overlay, release. Never fails.
        nova    nova-compute's real order (imagebackend.Qcow2.create_image): ``exists()`` outside
                the lock, fetch under the lock if missing (re-checked there), touch the base and
                read its size OUTSIDE the lock, then take the lock and create the overlay without
                checking again. The base may vanish between the check and the lock: the touch,
                the size or qemu-img fails, and the spawn fails (``spawn_failures``), as Nova's
                does. That is a failed spawn, never a lost disk.

        After each spawn, outside the lock, check that every instance this worker still has has
        its backing file. Delete the oldest instance once there are more than two (rename away,
        then rmtree), as an instance deletion does, so bases do become unused. At the end,
        verify every remaining chain with qemu-img, then delete every instance: every base
        becomes unused, so the cleaner's drain removes them all.
    python _race_child.py cleaner CONFIG STOPFILE
        ``imagecache clean`` passes in a loop (the library's run_pass, the real locks and
        re-checks) until STOPFILE exists; then passes until no base is left in the cache (at
        most DRAIN_PASSES), the names still there at the end being reported as ``leftover``.

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
from contextlib import AbstractContextManager
from pathlib import Path

from oslo_concurrency import lockutils

from imagecache import manager, naming
from imagecache.clock import Clock
from imagecache.config import load_settings
from imagecache.results import Result

BASES = tuple(naming.fingerprint(f"race-image-{i}") for i in range(5))
DRAIN_PASSES = 50


class SpawnFailed(Exception):
    """The base vanished between Nova's unlocked check and its lock (Nova's spawn fails too)."""


def _lock(instances: Path, name: str) -> AbstractContextManager[object]:
    return lockutils.lock(
        name, lock_file_prefix="nova-", external=True, lock_path=str(instances / "locks")
    )


def _fetch_if_missing(base: Path, pristine: Path, token: str, counts: Counter[str]) -> None:
    """Nova's fetch_func_sync, run under the entry lock: fetch only if the base is missing."""
    if base.exists():
        return
    temp = base.with_name(naming.temp_name(base.name, os.getpid(), token))
    shutil.copyfile(pristine, temp)
    temp.rename(base)
    counts["fetches"] += 1  # counted even if the spawn then fails: the base exists


def _create_instance(base: Path, staging: Path, final: Path) -> None:
    """The overlay: ``qemu-img create`` without -u and without a size refuses a missing backing.

    It is made in ``staging`` and the directory renamed to ``final`` (in the instances path) by
    the caller's lock holder, so the cleaner never reads a half-written header.
    """
    disk = staging / "disk"
    done = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(disk)],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode == 0:
        staging.rename(final)
        return
    if "Could not open" in done.stderr and not base.exists():
        raise SpawnFailed(done.stderr.strip())
    raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)


def _spawn_locked(
    root: Path, base: Path, staging: Path, final: Path, i: int, *, counts: Counter[str]
) -> None:
    instances = root / "instances"
    with _lock(instances, base.name):
        _fetch_if_missing(base, root / "pristine", f"{i:x}", counts)
        if i % 2 == 0:
            os.utime(base)
        _create_instance(base, staging, final)


def _spawn_nova(
    root: Path, base: Path, staging: Path, final: Path, i: int, *, counts: Counter[str]
) -> None:
    instances = root / "instances"
    if not base.exists():
        with _lock(instances, base.name):
            _fetch_if_missing(base, root / "pristine", f"{i:x}", counts)
    try:
        os.utime(base)  # _update_utime_ignore_eacces: ENOENT is not ignored
        os.path.getsize(base)  # verify_base_size
    except FileNotFoundError as exc:
        raise SpawnFailed(str(exc)) from exc
    with _lock(instances, base.name):
        _create_instance(base, staging, final)


SPAWN = {"locked": _spawn_locked, "nova": _spawn_nova}


def _delete(instance: Path, graveyard: Path) -> None:
    instance.rename(graveyard / instance.name)
    shutil.rmtree(graveyard / instance.name)


def _chain_is_whole(disk: Path) -> bool:
    done = subprocess.run(
        ["qemu-img", "info", "--backing-chain", "--output=json", "-U", str(disk)],
        check=False,
        capture_output=True,
        text=True,
    )
    return done.returncode == 0 and len(json.loads(done.stdout)) == 2


def worker(root: Path, ident: str, iterations: int, seed: int, order: str) -> dict[str, object]:
    rng = random.Random(seed)
    spawn = SPAWN[order]
    instances, cache = root / "instances", root / "instances" / "_base"
    staging, graveyard = root / f"staging-{ident}", root / f"graveyard-{ident}"
    staging.mkdir()
    graveyard.mkdir()
    live: list[tuple[Path, Path]] = []  # (instance dir, base it uses)
    counts: Counter[str] = Counter()
    missing: list[str] = []
    for i in range(iterations):
        base = cache / rng.choice(BASES)
        inst = f"{ident}-{i:05d}"
        (staging / inst).mkdir()
        try:
            spawn(root, base, staging / inst, instances / inst, i, counts=counts)
        except SpawnFailed:
            shutil.rmtree(staging / inst)  # Nova's remove_path_on_error
            counts["spawn_failures"] += 1
            continue
        if (instances / inst / "disk").is_file():
            counts["creations"] += 1
        live.append((instances / inst, base))
        # Outside the lock, after the fact: every instance we still have can still boot.
        missing += [f"{d.name} -> {b.name}" for d, b in live if not b.exists()]
        if len(live) > 2:
            _delete(live.pop(0)[0], graveyard)
            counts["deletions"] += 1
    missing += [f"{d.name}: qemu-img" for d, _ in live if not _chain_is_whole(d / "disk")]
    for instance, _ in live:
        _delete(instance, graveyard)
        counts["deletions"] += 1
    return {"counts": dict(counts), "missing": missing}


def cleaner(config: str, stopfile: Path) -> dict[str, object]:
    settings = load_settings([config])
    counts: Counter[str] = Counter()
    cache = Path(settings.cache_dir)

    def one_pass() -> None:
        _, report = manager.run_pass(settings, clock=Clock(time.time, time.monotonic, time.sleep))
        counts["passes"] += 1
        for o in report.outcomes:
            if o.result is not Result.TOUCHED:
                counts[f"{o.result}:{o.reason}"] += 1

    while not stopfile.exists():
        one_pass()
    for _ in range(DRAIN_PASSES):
        if not any((cache / name).exists() for name in BASES):
            break
        one_pass()
    leftover = sorted(p.name for p in cache.iterdir() if p.name != ".imagecache")
    return {"counts": dict(counts), "leftover": leftover}


def main(argv: list[str]) -> int:
    mode, *args = argv
    if mode == "worker":
        out = worker(Path(args[0]), args[1], int(args[2]), int(args[3]), args[4])
    elif mode == "cleaner":
        out = cleaner(args[0], Path(args[1]))
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

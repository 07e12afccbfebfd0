"""SIGKILL ``clean`` at random moments: every entry is in place or in the trash, intact, once.

A child quarantines and restores a cache of real files in a loop (every rename fsynced, every
action in the audit log) and is killed at a random instant, many times over. After each kill,
each file must be in exactly one of its two places with exactly its original bytes; and a normal
pass afterwards must still work.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from imagecache import naming
from imagecache.cli import main
from imagecache.store import trash as trash_store

CHILD = Path(__file__).with_name("_crash_child.py")
KILLS = 30
fp = naming.fingerprint
NAMES = (
    *(fp(f"crash-{i}") for i in range(6)),
    fp("crash-0") + "_sm",
    fp("crash-1") + "_20",
    "swap_512",
    "swap_1024",
    naming.ephemeral_name(1, None),
    naming.ephemeral_name(4, "ext4"),
)


def _where(cache: Path) -> dict[str, list[Path]]:
    """Every place each name is found: the cache directory and the trash."""
    found: dict[str, list[Path]] = {}
    for path in cache.iterdir():
        if path.name != ".imagecache":
            found.setdefault(path.name, []).append(path)
    for entry in trash_store.list_trash(cache):
        found.setdefault(entry.name, []).append(trash_store.trash_dir(cache) / entry.trash_name)
    leftovers = {p.name for p in trash_store.trash_dir(cache).iterdir()} - {
        e.trash_name for e in trash_store.list_trash(cache)
    } if trash_store.trash_dir(cache).exists() else set()  # fmt: skip
    assert leftovers == set()
    return found


def _check(cache: Path, digests: dict[str, str]) -> int:
    """Assert the invariant; return how many entries are in the trash."""
    found = _where(cache)
    assert set(found) == set(digests)
    in_trash = 0
    for name, places in found.items():
        assert len(places) == 1, (name, places)  # never both, never neither
        assert hashlib.sha256(places[0].read_bytes()).hexdigest() == digests[name], name
        in_trash += places[0].parent != cache
    return in_trash


@pytest.mark.slow
def test_sigkill_never_leaves_a_half_moved_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(20261121)
    instances = tmp_path / "instances"
    cache = instances / "_base"
    cache.mkdir(parents=True)
    digests = {}
    for name in NAMES:
        data = rng.randbytes(rng.randrange(64, 512) * 1024)
        (cache / name).write_bytes(data)
        os.utime(cache / name, (1000, 1000))
        digests[name] = hashlib.sha256(data).hexdigest()
    config = tmp_path / "nova.conf"
    config.write_text(
        f"[DEFAULT]\ninstances_path = {instances}\nhost = h1\n"
        "[image_cache]\nremove_unused_original_minimum_age_seconds = 0\n"
        "remove_unused_resized_minimum_age_seconds = 0\n"
        f"[imagecache]\nquarantine_seconds = 86400\naudit_log = {tmp_path}/audit.jsonl\n"
    )

    states: Counter[int] = Counter()
    for _ in range(KILLS):
        with subprocess.Popen(
            [sys.executable, str(CHILD), str(config)], stdout=subprocess.PIPE, text=True
        ) as child:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0, 0.15))
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        states[_check(cache, digests)] += 1
    # The kills landed mid-pass, not only between passes (all in place or all in the trash).
    assert sum(n for k, n in states.items() if 0 < k < len(NAMES)) > 0, states
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) > KILLS

    # Afterwards a normal pass and a restore still work.
    argv = ["--config-file", str(config), "--json"]
    assert main([*argv, "clean"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert _check(cache, digests) == len(NAMES)
    assert main([*argv, "restore", NAMES[0]]) == 0
    capsys.readouterr()
    assert _check(cache, digests) == len(NAMES) - 1

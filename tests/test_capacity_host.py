"""Capacity on real hosts (issue 13): real files, real qcow2 overlays, a real small filesystem.

The size limit needs no mount. The watermark runs on a tmpfs of fixed size mounted by the test
(root only; skipped with the reason where mounting is not permitted), so the filesystem's Use%
is real and every byte freed shows in ``statvfs``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from imagecache import locks, manager, naming
from imagecache.config import load_settings
from imagecache.results import Report
from tests.defaults import FakeClock
from tests.qemu import reads_pattern, write_pattern
from tests.test_executor import NOW, Host, cli, entries, make_host, put, use

MIB = 1 << 20
HOUR = 3600.0


def fp(image: str) -> str:
    return naming.fingerprint(image)


def audit(host: Host) -> list[dict[str, Any]]:
    if not host.audit.exists():
        return []
    return [json.loads(line) for line in host.audit.read_text().splitlines()]


def removed(doc: dict[str, Any]) -> dict[str, str]:
    return {o["name"]: o["reason"] for o in doc["outcomes"] if o["result"] == "removed"}


def test_a_size_limit_pass_evicts_in_lru_order_and_never_what_is_used_or_pinned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, max_cache_bytes=4 * MIB, pinned_images="pinned-image",
                     min_unused_seconds=600)  # fmt: skip
    ages = {"a": 9 * HOUR, "b": 7 * HOUR, "c": 5 * HOUR, "d": 3 * HOUR, "e": 2 * HOUR}
    for image, age in ages.items():
        put(host, fp(image), age, size=MIB)
    put(host, fp("used"), 20 * HOUR, size=MIB)
    put(host, fp("pinned-image"), 20 * HOUR, size=MIB)
    put(host, fp("young"), 60, size=MIB)
    disk = use(host, fp("used"))
    write_pattern(disk, 0x5A)
    code, doc = cli(host, capsys, "plan")
    # 8 MiB held, 4 allowed: a, b, c, d go (least recently used first), e stays.
    assert code == 0, doc["problems"]
    capacity = doc["capacity"]
    assert capacity["over"] == ["over-size"] and capacity["need_bytes"] >= 4 * MIB
    actions = {e["name"]: (e["action"], e["reason"]) for e in doc["entries"]}
    assert {n for n, (a, _) in actions.items() if a == "remove"} == {fp(i) for i in "abcd"}
    assert actions[fp("used")] == ("keep", "in-use")
    assert actions[fp("pinned-image")] == ("keep", "in-use")
    assert actions[fp("young")] == ("keep", "too-young")
    assert capacity["next"] == [fp("e")]

    code, doc = cli(host, capsys, "clean")
    assert code == 0, doc["problems"]
    assert removed(doc) == {fp(i): "over-size" for i in "abcd"}
    left = entries(host)
    assert left >= {fp("used"), fp("pinned-image"), fp("young"), fp("e")}
    assert not left & {fp(i) for i in "abcd"}
    assert not (host.cache / ".imagecache" / "trash").exists() or not list(
        (host.cache / ".imagecache" / "trash").iterdir()
    )  # removed directly: a quarantine would free nothing
    lines = [x for x in audit(host) if x["action"] == "removed"]
    assert sorted((x["entry"], x["reason"]) for x in lines) == sorted(
        (fp(i), "over-size") for i in "abcd"
    )
    assert reads_pattern(disk, 0x5A)  # the guest still reads its data


def test_a_size_limit_that_cannot_be_met_frees_what_it_can_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, max_cache_bytes=MIB, pinned_images="p")
    put(host, fp("p"), 20 * HOUR, size=2 * MIB)
    put(host, fp("used"), 20 * HOUR, size=2 * MIB)
    put(host, fp("free"), 20 * HOUR, size=MIB)
    use(host, fp("used"))
    code, doc = cli(host, capsys, "clean")
    assert code == 1  # a shortfall fails the pass
    assert removed(doc) == {fp("free"): "over-size"}
    (short,) = [p for p in doc["problems"] if p["code"] == "capacity-shortfall"]
    assert not short["blocking"]
    assert "pinned" in short["message"] and "in-use" in short["message"]
    assert doc["capacity"]["shortfall_bytes"] > 0
    assert entries(host) >= {fp("p"), fp("used")}


def test_plan_and_explain_show_the_capacity_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from imagecache.cli import main

    host = make_host(tmp_path, max_cache_bytes=2 * MIB)
    for image, age in (("a", 9 * HOUR), ("b", 7 * HOUR), ("c", 5 * HOUR)):
        put(host, fp(image), age, size=MIB)
    argv = ["--config-file", str(host.config), "--inventory", str(host.inventory)]
    assert main([*argv, "plan"], clock=lambda: NOW) == 0
    text = capsys.readouterr().out
    assert "capacity: cache 3.0 MiB of max 2.0 MiB; over: over-size" in text
    assert f"next to go (least recently used first): {fp('b')}, {fp('c')}" in text
    assert main([*argv, "explain", "b"], clock=lambda: NOW) == 0
    text = capsys.readouterr().out
    assert "capacity: next to go when over a limit (#1" in text
    assert main([*argv, "explain", "a"], clock=lambda: NOW) == 0
    assert "decision: remove (over-size" in capsys.readouterr().out


def test_throttled_removals_pause_with_no_lock_held(tmp_path: Path) -> None:
    """remove_max_bytes_per_second: each removal its own batch, and before the next one a pause
    as long as its bytes take at that rate, during which no entry lock is held."""
    host = make_host(tmp_path, quarantine_seconds=0, remove_max_bytes_per_second=MIB)
    names = [fp(i) for i in "abc"]
    for name, size in zip(names, (2, 3, 1), strict=True):
        put(host, name, 2 * 86400, size=size * MIB)
    fake = FakeClock(wall=NOW)
    held_while_pausing: list[str] = []
    sleep = fake.sleep

    def pausing(seconds: float) -> None:
        held_while_pausing.extend(n for n in names if locks.is_locked(host.instances, n))
        sleep(seconds)

    fake.sleep = pausing  # type: ignore[method-assign]
    settings = load_settings([str(host.config)])
    _, report = manager.run_pass(settings, inventory_files=[str(host.inventory)], clock=fake.clock)
    assert isinstance(report, Report) and report.ok
    assert sorted(o.name for o in report.outcomes if str(o.result) == "removed") == sorted(names)
    freed = [o.bytes_freed for o in report.outcomes if str(o.result) == "removed"]
    assert sum(freed) >= 6 * MIB
    # A pause before each removal but the first, as long as the one before it took at 1 MiB/s;
    # none after the last (nothing left to spare the disk for).
    assert abs(fake.slept - sum(freed[:-1]) / MIB) < 0.01, (fake.slept, freed)
    assert held_while_pausing == []


# -- the watermark, on a real filesystem of fixed size -------------------------------------------


def used_percent(path: Path) -> float:
    st = os.statvfs(path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return 100.0 * used / (used + st.f_bavail * st.f_frsize)


def test_the_watermark_frees_down_to_the_low_mark_in_lru_order(
    small_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(small_fs, high_watermark_percent=60, low_watermark_percent=40,
                     pinned_images="pinned", min_unused_seconds=600)  # fmt: skip
    # 8 unused entries of 5 MiB (oldest first: i0 ... i7), one in use, one pinned: 50 MiB of 64.
    for i in range(8):
        put(host, fp(f"i{i}"), (20 - i) * HOUR, size=5 * MIB, now=NOW)
    put(host, fp("used"), 30 * HOUR, size=5 * MIB)
    put(host, fp("pinned"), 30 * HOUR, size=5 * MIB)
    disk = use(host, fp("used"))
    write_pattern(disk, 0x33)
    before = used_percent(small_fs)
    assert before >= 60
    code, doc = cli(host, capsys, "clean")
    assert code == 0, doc["problems"]
    gone = removed(doc)
    assert set(gone.values()) == {"over-watermark"}
    # The least recently used went, and no more than needed to reach the low mark.
    order = [fp(f"i{i}") for i in range(8)]
    assert set(gone) == set(order[: len(gone)])
    after = used_percent(small_fs)
    assert after <= 40 < after + 5 * MIB / (64 * MIB) * 100 + 1e-9, (before, after)
    assert {fp("used"), fp("pinned")} <= entries(host)
    assert reads_pattern(disk, 0x33)

    # Everything left is protected: a shortfall, nothing of it touched.
    host2 = make_host(small_fs / "second", high_watermark_percent=10, low_watermark_percent=5,
                      pinned_images="pinned")  # fmt: skip
    put(host2, fp("pinned"), 30 * HOUR, size=5 * MIB)
    put(host2, fp("fresh"), 30, size=5 * MIB)
    code, doc = cli(host2, capsys, "clean")
    assert code == 1
    assert removed(doc) == {}
    assert "capacity-shortfall" in [p["code"] for p in doc["problems"]] and doc["complete"]
    assert entries(host2) == {fp("pinned"), fp("fresh")}

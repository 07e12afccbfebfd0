"""A hostile review of the capacity rules (issue 13), on real hosts.

Each test is a host or an operator doing what the capacity feature must survive: hard links,
sparse files, odd file types, skewed clocks, saved plans edited by hand, space freed or entries
used between the plan and the act, a statvfs that fails, a throttle whose pauses are long.
Tests that show a defect fail on the code they were written against; the others probe what held.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from imagecache import manager, naming
from imagecache.cli import main
from imagecache.config import load_settings
from imagecache.store import pins
from tests.defaults import FakeClock
from tests.qemu import make_overlay, reads_pattern, write_pattern
from tests.test_executor import NOW, Host, cli, entries, make_host, put, use
from tests.test_locks import nova_holds

MIB = 1 << 20
HOUR = 3600.0
DAY = 86400.0


def fp(image: str) -> str:
    return naming.fingerprint(image)


def removed(doc: dict[str, Any]) -> dict[str, str]:
    return {o["name"]: o["reason"] for o in doc["outcomes"] if o["result"] == "removed"}


def actions(doc: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["action"], e["reason"]) for e in doc["entries"]}


# -- hard links: one file, two names --------------------------------------------------------------


def test_hard_links_are_counted_once_against_the_size_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two names of one 2 MiB file hold 2 MiB, not 4: with a 3.5 MiB limit and another 1 MiB
    entry the cache holds 3 MiB and nothing must go. Counting each name evicts an entry that
    did not need to go."""
    host = make_host(tmp_path, max_cache_bytes=3 * MIB + MIB // 2, min_unused_seconds=60)
    put(host, fp("linked"), 5 * HOUR, size=2 * MIB)
    os.link(host.path(fp("linked")), host.path(fp("linked-too")))
    put(host, fp("alone"), 9 * HOUR, size=MIB)
    code, doc = cli(host, capsys, "clean")
    assert code == 0, doc["problems"]
    assert removed(doc) == {}, "an entry evicted for bytes counted twice"
    assert entries(host) == {fp("linked"), fp("linked-too"), fp("alone")}


# -- statvfs failing ------------------------------------------------------------------------------


def test_a_watermark_that_cannot_be_observed_is_said_not_silently_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """statvfs of the cache failing (an NFS server answering EIO, a seccomp filter) at the
    process edge: the watermark the operator set cannot be checked. A pass that says nothing
    about it reports a cache that is fine while its disk may be full."""
    host = make_host(tmp_path, high_watermark_percent=80, low_watermark_percent=70)
    put(host, fp("a"), 9 * HOUR, size=MIB)
    real = os.statvfs

    def failing(path: Any) -> os.statvfs_result:
        if os.fspath(path).startswith(str(host.cache)):
            raise OSError(5, "Input/output error")
        return real(path)

    monkeypatch.setattr(os, "statvfs", failing)
    code, doc = cli(host, capsys, "plan")
    said = [p for p in doc["problems"] if "statvfs" in p["message"] or "watermark" in p["message"]]
    assert said, ("the watermark is silently not enforced", doc["problems"], doc["capacity"])
    assert code == 1


# -- the throttle ---------------------------------------------------------------------------------


def test_a_stop_during_a_throttle_pause_does_not_observe_the_host_once_per_planned_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rate so low that the first removal's pause would last 18 hours: SIGTERM arrives
    during it. The pause ends within a second, but every remaining throttled batch then still
    takes its locks and observes the whole host again (libvirt, every instance disk, /proc)
    only to skip its one entry as stopped: a large host's daemon takes minutes to stop."""
    host = make_host(tmp_path, quarantine_seconds=0, remove_max_bytes_per_second=1)
    names = [fp(f"old-{i}") for i in range(12)]
    for name in names:
        put(host, name, 3 * DAY)
    settings = load_settings([str(host.config)])
    fake = FakeClock(wall=NOW)
    observed: list[float] = []
    real_observe = manager.observe

    def counting(*args: Any, **kwargs: Any) -> Any:
        observed.append(fake.mono_now)
        return real_observe(*args, **kwargs)

    monkeypatch.setattr(manager, "observe", counting)
    stop_at: list[int] = []

    def should_stop() -> bool:
        if fake.slept >= 2 and not stop_at:
            stop_at.append(len(observed))  # SIGTERM, two seconds into the first pause
        return bool(stop_at)

    _, report = manager.run_pass(settings, inventory_files=[str(host.inventory)],
                                 clock=fake.clock, should_stop=should_stop)  # fmt: skip
    done = [o.name for o in report.outcomes if str(o.result) == "removed"]
    assert len(done) == 1 and fake.slept < 4  # the pause heard the stop at once
    stopped = [o.name for o in report.outcomes if str(o.reason) == "stopped"]
    assert sorted(stopped) == sorted(set(names) - set(done))
    after = len(observed) - stop_at[0]
    assert after <= 1, f"{after} observations of the host after the stop, one per entry left"


def test_a_throttled_pass_does_not_sleep_after_its_last_removal(tmp_path: Path) -> None:
    """One removal at a rate that makes its pause a day: with nothing left to remove, the pass
    still sleeps that day before it ends, holding the daemon's run lock and the storage's
    cleaner lock, its report, metrics and the next pass's touches and manifest delayed."""
    host = make_host(tmp_path, quarantine_seconds=0, remove_max_bytes_per_second=MIB / DAY)
    put(host, fp("old"), 3 * DAY, size=MIB)
    settings = load_settings([str(host.config)])
    fake = FakeClock(wall=NOW)
    _, report = manager.run_pass(settings, inventory_files=[str(host.inventory)],
                                 clock=fake.clock)  # fmt: skip
    assert [str(o.result) for o in report.outcomes] == ["removed"]
    assert fake.slept < 1, f"slept {fake.slept / HOUR:.1f} h after the pass's last removal"


# -- between the plan and the act -----------------------------------------------------------------


def test_space_freed_by_another_process_since_the_saved_plan_evicts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, max_cache_bytes=3 * MIB, min_unused_seconds=60)
    for i in range(5):
        put(host, fp(f"e{i}"), (10 - i) * HOUR, size=MIB)
    saved = tmp_path / "plan.json"
    code, plan = cli(host, capsys, "plan", "-o", str(saved))
    assert code == 0
    assert {n for n, (a, _) in actions(plan).items() if a == "remove"} == {fp("e0"), fp("e1")}
    # An operator frees 2 MiB by hand: the cache is at its limit now.
    host.path(fp("e3")).unlink()
    host.path(fp("e4")).unlink()
    code, doc = cli(host, capsys, "clean", "--plan", str(saved), now=NOW + 60)
    assert code == 0, doc["problems"]
    assert removed(doc) == {}
    assert entries(host) == {fp("e0"), fp("e1"), fp("e2")}


def test_an_entry_used_since_the_saved_plan_is_kept_and_nothing_goes_in_its_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, max_cache_bytes=2 * MIB, min_unused_seconds=60)
    for i in range(3):
        put(host, fp(f"e{i}"), (10 - i) * HOUR, size=MIB)
    saved = tmp_path / "plan.json"
    cli(host, capsys, "plan", "-o", str(saved))
    disk = use(host, fp("e0"))  # a spawn on the entry the plan evicts
    write_pattern(disk, 0x6C)
    code, doc = cli(host, capsys, "clean", "--plan", str(saved), now=NOW + 60)
    assert code == 0, doc["problems"]
    assert removed(doc) == {}
    assert {o["name"]: o["reason"] for o in doc["outcomes"] if o["result"] == "skipped"} == {
        fp("e0"): "now-in-use"
    }
    assert reads_pattern(disk, 0x6C)


def test_a_hand_edited_saved_plan_evicts_no_more_than_a_fresh_decision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The saved plan says: no limit but 1 byte, no pin, no minimum age, every entry removed
    over-size, a capacity block that needs everything. Only what the configuration's own fresh
    decision evicts goes (the least recently used one)."""
    host = make_host(tmp_path, max_cache_bytes=4 * MIB, min_unused_seconds=600,
                     pinned_images="golden", quarantine_seconds=int(DAY))  # fmt: skip
    for i in range(4):
        put(host, fp(f"e{i}"), (10 - i) * HOUR, size=MIB)
    put(host, fp("golden"), 30 * DAY, size=MIB)
    put(host, fp("young"), 30, size=MIB)
    saved = tmp_path / "plan.json"
    code, plan = cli(host, capsys, "plan", "-o", str(saved))
    assert code == 0
    assert {n for n, (a, _) in actions(plan).items() if a == "remove"} == {fp("e0"), fp("e1")}
    doc = json.loads(saved.read_text())
    doc["policy"].update(max_cache_bytes=1, pinned_images=[], min_unused_seconds=0,
                         original_age_seconds=0)  # fmt: skip
    for e in doc["entries"]:
        e.update(action="remove", reason="over-size", users=[])
    doc["capacity"].update(need_bytes=1 << 40, over=["over-size", "over-watermark"])
    saved.write_text(json.dumps(doc))
    _code, done = cli(host, capsys, "clean", "--plan", str(saved), now=NOW + 60)
    assert "outcomes" in done, done  # the edited plan was read, and applied
    assert set(removed(done)) <= {fp("e0"), fp("e1")}, removed(done)
    assert {fp("golden"), fp("young"), fp("e2"), fp("e3")} <= entries(host)


# -- what an entry is -----------------------------------------------------------------------------


def test_an_original_used_only_through_its_sm_copy_is_kept_over_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The guest's disk is an overlay on ``<fp>_sm``, itself a qcow2 overlay on the original:
    the original holds the guest's bytes, though no disk names it."""
    host = make_host(tmp_path, max_cache_bytes=1, min_unused_seconds=60)
    original = host.path(fp("img"))
    original.write_bytes(b"\0" * MIB)
    write_pattern(original, 0x2E, fmt="raw")
    small = make_overlay(host.path(fp("img") + "_sm"), original)
    disk = make_overlay(host.instances / "inst-1" / "disk", small, backing_fmt="qcow2")
    for p in (original, small):
        os.utime(p, (NOW - 30 * DAY, NOW - 30 * DAY))
    put(host, fp("free"), 30 * DAY, size=MIB)
    _code, doc = cli(host, capsys, "clean")
    assert removed(doc) == {fp("free"): "over-size"}
    assert actions(doc)[fp("img")][0] == "keep"
    assert reads_pattern(disk, 0x2E)


def test_a_quarantined_entry_referenced_again_is_restored_not_purged_over_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, quarantine_seconds=int(7 * DAY))
    original = host.path(fp("img"))
    original.write_bytes(b"\0" * MIB)
    write_pattern(original, 0x3D, fmt="raw")
    os.utime(original, (NOW - 3 * DAY, NOW - 3 * DAY))
    code, doc = cli(host, capsys, "clean")
    assert code == 0
    assert {o["name"]: o["result"] for o in doc["outcomes"]} == {fp("img"): "quarantined"}
    # A disk names it again (a shelved instance unshelved on this host), and the cache is over
    # a limit now: the trash is what capacity purges first.
    disk = make_overlay(host.instances / "inst-1" / "disk", original, unsafe_size="1M")
    host.config.write_text(host.config.read_text() + "max_cache_bytes = 1\n")
    put(host, fp("other"), 30 * DAY, size=MIB)
    _code, doc = cli(host, capsys, "clean", now=NOW + 60)
    results = {o["name"]: o["result"] for o in doc["outcomes"] if o["result"] != "touched"}
    assert results[fp("img")] == "restored", results
    assert reads_pattern(disk, 0x3D)


def test_entries_with_mtimes_in_the_future_are_never_evicted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clock stepped back (or an entry copied with a future mtime): its age is negative and
    says nothing about its last use; the trash's future quarantine times likewise."""
    host = make_host(tmp_path, max_cache_bytes=1, min_unused_seconds=60)
    for i in range(3):
        put(host, fp(f"f{i}"), -(i + 1) * DAY, size=MIB)  # used "tomorrow"
    trash = host.cache / ".imagecache" / "trash"
    trash.mkdir(parents=True)
    future = trash / naming.trash_name(fp("q"), NOW + DAY)  # quarantined "tomorrow"
    future.write_bytes(b"q" * MIB)
    code, doc = cli(host, capsys, "clean")
    assert removed(doc) == {}
    assert [o for o in doc["outcomes"] if o["result"] == "purged"] == []
    assert future.exists()
    assert code == 1 and "capacity-shortfall" in [p["code"] for p in doc["problems"]]
    assert entries(host) == {fp(f"f{i}") for i in range(3)}


@pytest.mark.parametrize("kernels", [False, True])
def test_a_legacy_raw_id_entry_follows_remove_unused_kernels_and_its_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kernels: bool
) -> None:
    kernel, free = "6b1f3a4e-27d4-4e4b-9d5a-3f0e8c1b2a90", "0d6c2f57-6a55-4b64-9a4e-8b1f6e6f3b2c"
    host = make_host(tmp_path, max_cache_bytes=1, min_unused_seconds=60)
    text = host.config.read_text()
    host.config.write_text(
        text.replace("[libvirt]\n", f"[libvirt]\nremove_unused_kernels = {kernels}\n")
    )
    put(host, kernel, 30 * DAY, size=MIB)
    put(host, free, 30 * DAY, size=MIB)
    host.inventory.write_text(json.dumps(
        {"instances": [{"uuid": "u1", "host": "h1", "image_ref": "", "kernel_id": kernel}]}
    ))  # fmt: skip
    _code, doc = cli(host, capsys, "clean")
    assert kernel in entries(host)  # its record names it: in use either way
    assert removed(doc) == ({free: "over-size"} if kernels else {})


def test_sparse_entries_count_their_allocated_bytes_not_their_apparent_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, max_cache_bytes=2 * MIB, min_unused_seconds=60)
    sparse = host.path(fp("sparse"))
    with sparse.open("wb") as f:
        f.truncate(1 << 30)  # 1 GiB apparent, nothing allocated
        f.write(b"x" * 4096)
    os.utime(sparse, (NOW - 9 * HOUR, NOW - 9 * HOUR))
    put(host, fp("dense"), 5 * HOUR, size=MIB)
    code, doc = cli(host, capsys, "clean")
    assert code == 0, doc["problems"]
    assert removed(doc) == {}
    assert doc["capacity"]["cache_bytes"] < 2 * MIB


def test_directories_symlinks_and_fifos_named_like_images_are_never_evicted_or_opened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, max_cache_bytes=1, min_unused_seconds=0)
    (host.path(fp("dir"))).mkdir()
    (host.path(fp("dir")) / "big").write_bytes(b"d" * MIB)
    target = put(host, "not-an-image-name", 30 * DAY, size=MIB)
    os.symlink(target, host.path(fp("link")))
    os.mkfifo(host.path(fp("fifo") + "_sm"))
    for name in (fp("dir"), fp("link"), fp("fifo") + "_sm"):
        os.utime(host.path(name), (NOW - 30 * DAY, NOW - 30 * DAY), follow_symlinks=False)
    code, doc = cli(host, capsys, "clean")
    assert removed(doc) == {}
    assert entries(host) == {fp("dir"), fp("link"), fp("fifo") + "_sm", "not-an-image-name"}
    assert code == 1 and "capacity-shortfall" in [p["code"] for p in doc["problems"]]


def test_an_entry_used_while_its_lock_was_waited_for_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plan evicts a and b; Nova holds a's lock. b goes first, then the pass waits for a;
    meanwhile a spawn makes its overlay on a and Nova lets go. The retry batch decides again
    on a fresh view: a is in use now, and nothing else goes in its place."""
    host = make_host(tmp_path, max_cache_bytes=MIB, min_unused_seconds=60,
                     lock_timeout_seconds=30)  # fmt: skip
    a, b, c = fp("a"), fp("b"), fp("c")
    for name, age in ((a, 9 * HOUR), (b, 8 * HOUR), (c, 7 * HOUR)):
        put(host, name, age, size=MIB)
    disks: list[Path] = []

    with nova_holds(host.instances, a) as release:

        def spawn() -> None:
            deadline = time.monotonic() + 20
            while host.path(b).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            disk = use(host, a)
            write_pattern(disk, 0x47)
            disks.append(disk)
            release()

        worker = threading.Thread(target=spawn)
        worker.start()
        _code, doc = cli(host, capsys, "clean")
        worker.join()
    assert removed(doc) == {b: "over-size"}
    assert {o["name"]: o["reason"] for o in doc["outcomes"] if o["result"] == "skipped"} == {
        a: "now-in-use"
    }
    assert entries(host) == {a, c}
    assert reads_pattern(disks[0], 0x47)


def test_a_pin_made_on_another_host_after_the_saved_plan_keeps_the_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, max_cache_bytes=MIB, min_unused_seconds=60)
    put(host, fp("golden"), 30 * DAY, size=MIB)
    put(host, fp("other"), HOUR, size=MIB)
    saved = tmp_path / "plan.json"
    code, plan = cli(host, capsys, "plan", "-o", str(saved))
    assert code == 0
    assert actions(plan)[fp("golden")][0] == "remove"
    # Another host of the shared cache pins it, in the cache's own pins file.
    layout = load_settings([str(host.config)]).layout
    assert pins.pin(layout, "golden", host="h2", now=NOW + 10, comment="CI")
    _code, doc = cli(host, capsys, "clean", "--plan", str(saved), now=NOW + 60)
    assert removed(doc) == {}
    assert fp("golden") in entries(host)


# -- numbers at their edges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_cache_bytes", 1 << 63),
        ("min_unused_seconds", 10**20),
        ("quarantine_seconds", 1 << 63),  # the same gap, older than capacity
    ],
)
def test_a_plan_saved_with_a_huge_accepted_limit_can_be_applied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: int
) -> None:
    """The configuration accepts the value; `plan -o` saves it; `clean --plan` must then read
    its own plan back (or the configuration must refuse the value up front)."""
    host = make_host(tmp_path, **{option: value})
    put(host, fp("a"), 30 * DAY, size=MIB)
    saved = tmp_path / "plan.json"
    code, plan = cli(host, capsys, "plan", "-o", str(saved))
    if code == 2:  # refused up front, naming the option: fine
        assert option in plan["error"]
        return
    code, doc = cli(host, capsys, "clean", "--plan", str(saved))
    assert code != 2, doc.get("error")


def fill(host: Host, prefix: str, age: float, chunk: int = 4 * MIB) -> list[str]:
    """Entries of ``chunk`` bytes until the filesystem is full (the last one cut short)."""
    names = []
    for i in range(1000):
        name = fp(f"{prefix}-{i}")
        path = host.path(name)
        names.append(name)
        try:
            with path.open("wb") as f:
                for _ in range(chunk // 65536):
                    f.write(b"\xa5" * 65536)
        except OSError:
            break
        finally:
            os.utime(path, (NOW - age - i, NOW - age - i))
    return names


def test_a_full_filesystem_with_the_high_mark_at_100_and_a_tiny_low_mark(
    small_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """high_watermark_percent = 100 triggers only on a full filesystem, and then a low mark of
    0.001 % frees every candidate, never the entry in use, whose guest still reads its data."""
    host = make_host(small_fs, high_watermark_percent=100, low_watermark_percent=0.001,
                     min_unused_seconds=60)  # fmt: skip
    put(host, fp("used"), 30 * DAY, size=MIB)
    disk = use(host, fp("used"))
    write_pattern(disk, 0x71)
    code, doc = cli(host, capsys, "plan")
    assert code == 0 and doc["capacity"]["over"] == [], doc["capacity"]  # not full: nothing
    names = fill(host, "fill", HOUR)
    st = os.statvfs(small_fs)
    assert st.f_bavail == 0  # full, as df shows it: 100 %
    code, doc = cli(host, capsys, "clean")
    assert set(removed(doc)) == set(names)
    assert set(removed(doc).values()) == {"over-watermark"}
    assert entries(host) == {fp("used")}
    assert code == 1 and "capacity-shortfall" in [p["code"] for p in doc["problems"]]
    assert reads_pattern(disk, 0x71)


def test_an_image_only_another_host_of_the_shared_cache_pins_is_kept_by_the_cleaner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """h2 pins the image in its own configuration; h1, the storage's cleaner, does not, and is
    over its size limit. h2's manifest says what it keeps: the pin holds on h1 too."""
    host = make_host(tmp_path, max_cache_bytes=1, min_unused_seconds=60)
    put(host, fp("golden"), 10 * HOUR, size=MIB)
    put(host, fp("other"), 9 * HOUR, size=MIB)
    h2 = host.root / "nova-h2.conf"
    text = host.config.read_text().replace("host = h1", "host = h2")
    h2.write_text(text.replace("max_cache_bytes = 1\n", "pinned_images = golden\n"))
    argv = ["--config-file", str(h2), "--inventory", str(host.inventory), "--json", "clean"]
    assert main(argv, clock=lambda: NOW) in (0, 1)
    capsys.readouterr()
    _code, doc = cli(host, capsys, "clean", now=NOW + 60)
    assert removed(doc) == {fp("other"): "over-size"}, doc["problems"]
    assert fp("golden") in entries(host)
    assert actions(doc)[fp("golden")][1] == "in-use"


def test_a_saved_plan_that_purges_early_refuses_once_a_disk_names_the_entry_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, quarantine_seconds=int(7 * DAY))
    original = host.path(fp("img"))
    original.write_bytes(b"\0" * MIB)
    write_pattern(original, 0x19, fmt="raw")
    os.utime(original, (NOW - 3 * DAY, NOW - 3 * DAY))
    cli(host, capsys, "clean")
    (trashed,) = host.trash().values()
    host.config.write_text(host.config.read_text() + "max_cache_bytes = 1\n")
    saved = tmp_path / "plan.json"
    code, plan = cli(host, capsys, "plan", "-o", str(saved), now=NOW + 60)
    assert [(t["action"], t["reason"]) for t in plan["trash"]] == [("purge", "over-size")]
    disk = make_overlay(host.instances / "inst-1" / "disk", original, unsafe_size="1M")
    code, doc = cli(host, capsys, "clean", "--plan", str(saved), now=NOW + 120)
    assert code == 0, doc["problems"]
    assert [o["result"] for o in doc["outcomes"] if o["name"] == fp("img")] == ["skipped"]
    assert trashed.exists()
    _code, doc = cli(host, capsys, "clean", now=NOW + 180)  # the next pass restores it
    assert [o["result"] for o in doc["outcomes"] if o["name"] == fp("img")] == ["restored"]
    assert reads_pattern(disk, 0x19)

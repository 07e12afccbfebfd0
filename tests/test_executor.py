"""``clean`` end to end on real files: locks, re-checks, quarantine, restore, audit log.

Every test drives the real command line with a fixed clock (``main(argv, clock=...)``); entries
get their age from ``os.utime``, never from sleeping.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagecache import _sample as sample
from imagecache import naming
from imagecache.cli import main
from imagecache.config import load_settings
from imagecache.manager import plan_pass
from imagecache.model import (
    CacheEntry,
    Disk,
    FileType,
    Inventory,
    Problem,
    ProblemCode,
    TrashEntry,
)
from imagecache.plan import Policy, plan_from_dict, plan_id, plan_to_dict
from imagecache.policy import decide
from imagecache.store import plans
from tests.defaults import policy as make_policy
from tests.qemu import make_overlay
from tests.test_locks import nova_holds, nova_tries

NOW = 1_900_000_000.0
DAY, HOUR = 86400, 3600
fp = naming.fingerprint
A, B, C, D, E = (fp(f"image-{x}") for x in "abcde")


@dataclass(frozen=True)
class Host:
    root: Path
    instances: Path
    cache: Path
    config: Path
    audit: Path
    inventory: Path

    def path(self, name: str) -> Path:
        return self.cache / name

    def trash(self) -> dict[str, Path]:
        trash = self.cache / ".imagecache" / "trash"
        return {p.name.rsplit("@", 1)[0]: p for p in trash.iterdir()} if trash.exists() else {}

    def audit_lines(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


def make_host(tmp_path: Path, **options: object) -> Host:
    root = tmp_path / "host"
    instances = root / "instances"
    (instances / "_base").mkdir(parents=True)
    # libvirt off unless a test points it somewhere: a libvirt daemon on the machine running the
    # suite must not become every test host's hypervisor.
    imagecache = {"audit_log": root / "log" / "audit.jsonl", "lock_timeout_seconds": 5,
                  "libvirt_uri": "none", **options}  # fmt: skip
    # Each of Nova's options in its own group: one written in another would be silently unread.
    libvirt_keys = ("checksum_", "remove_unused_kernels")
    libvirt = {k: imagecache.pop(k) for k in list(imagecache) if k.startswith(libvirt_keys)}
    image_cache = {k: imagecache.pop(k) for k in list(imagecache) if k.startswith("remove_unused")}
    # Nova's own manager off, as beside imagecache it must be (nova_manager_interval=N: on).
    image_cache["manager_interval"] = imagecache.pop("nova_manager_interval", -1)
    config = root / "nova.conf"
    config.write_text(
        f"[DEFAULT]\ninstances_path = {instances}\nhost = h1\n[image_cache]\n"
        + "".join(f"{k} = {v}\n" for k, v in image_cache.items())
        + "[libvirt]\n"
        + "".join(f"{k} = {v}\n" for k, v in libvirt.items())
        + "[imagecache]\n"
        + "".join(f"{k} = {v}\n" for k, v in imagecache.items())
    )
    inventory = root / "inventory.json"
    inventory.write_text('{"instances": []}')
    return Host(root, instances, instances / "_base", config, Path(str(imagecache["audit_log"])),
                inventory)  # fmt: skip


def put(host: Host, name: str, age: float, *, size: int = 65536, now: float = NOW) -> Path:
    """A cache entry of real, distinct bytes whose mtime is ``age`` seconds before ``now``."""
    path = host.path(name)
    seed = hashlib.sha256(name.encode()).digest()
    path.write_bytes(seed * (size // len(seed)))
    os.utime(path, (now - age, now - age))
    return path


def use(host: Host, name: str, instance: str = "inst-1") -> Path:
    """A real qcow2 overlay in an instance directory backed by entry ``name`` (mtime kept)."""
    st = host.path(name).stat()
    disk = make_overlay(host.instances / instance / "disk", host.path(name))
    os.utime(host.path(name), ns=(st.st_atime_ns, st.st_mtime_ns))
    return disk


def entries(host: Host) -> set[str]:
    """The names in the cache directory, without this project's own state directory."""
    return {p.name for p in host.cache.iterdir()} - {".imagecache"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(
    host: Host, capsys: pytest.CaptureFixture[str], *args: str, now: float = NOW
) -> tuple[int, dict[str, Any]]:
    argv = ["--config-file", str(host.config), "--inventory", str(host.inventory), "--json", *args]
    code = main(argv, clock=lambda: now)
    out = capsys.readouterr().out
    return code, json.loads(out)


def results(doc: dict[str, Any], *, touched: bool = False) -> dict[str, tuple[str, str]]:
    return {
        o["name"]: (o["result"], o["reason"])
        for o in doc["outcomes"]
        if touched or o["result"] != "touched"
    }


# The sample host: exactly what the plan said, and an audit line per action.


def test_clean_on_the_sample_host_does_exactly_what_plan_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sh = sample.build(tmp_path / "host", now=NOW)
    host = Host(sh.root, sh.instances_path, sh.cache_dir, sh.config, sh.root / "audit.jsonl",
                sh.inventory)  # fmt: skip
    before = {p.name: (digest(p), p.lstat().st_blocks * 512) for p in host.cache.iterdir()
              if p.is_file() and not p.is_symlink()}  # fmt: skip
    code, plan = cli(host, capsys, "plan")
    assert code == 0
    code, doc = cli(host, capsys, "clean")
    assert code == 0 and doc["ok"] is True and doc["plan_id"] == plan["plan_id"]

    planned = {e["name"]: e["action"] for e in plan["entries"] if e["action"] != "keep"}
    assert planned == {n: a for n, (_, a, _) in sample.EXPECTED.items() if a != "keep"}
    done = {"quarantine": ("quarantined", "unused-expired"), "reap": ("reaped", "stale-temp")}
    assert results(doc) == {name: done[action] for name, action in planned.items()}
    trash = host.trash()
    for name, (_, action, _) in sample.EXPECTED.items():
        if action == "keep":
            assert host.path(name).exists() or host.path(name).is_symlink(), name
            assert name not in trash
        elif action == "quarantine":
            assert not host.path(name).exists() and digest(trash[name]) == before[name][0]
        else:
            assert not host.path(name).exists() and name not in trash
    lines = host.audit_lines()
    assert sorted(line["entry"] for line in lines) == sorted(planned)
    for line in lines:
        assert line["host"] == sample.HOST and line["plan_id"] == plan["plan_id"]
        assert line["bytes"] == before[line["entry"]][1]  # measured, not taken from the plan
        freed = line["bytes"] if line["action"] == "reaped" else 0
        assert line["bytes_freed"] == freed
    reaped = [n for n, a in planned.items() if a == "reap"]
    assert doc["totals"]["bytes_freed"] == sum(before[n][1] for n in reaped) > 0
    # The next pass has nothing left to do, and counts the trash in its sizes.
    code, again = cli(host, capsys, "clean", now=NOW + 60)
    assert code == 0 and results(again) == {} and again["summary"]["trash_entries"] == len(trash)
    assert again["summary"]["trash_bytes"] == sum(before[n][1] for n in trash)


# Nova's thresholds: removal at age >= threshold, per kind.

BOUNDARIES = {
    # name: (age, removed?)
    A: (DAY, True),
    B: (DAY - 1, False),
    C: (HOUR, False),  # an original does not go at the resized age
    A + "_sm": (HOUR, True),
    B + "_sm": (HOUR - 1, False),
    A + "_7": (HOUR, True),
    B + "_7": (HOUR - 1, False),
    "swap_1": (DAY, True),
    "swap_2": (DAY - 1, False),
    "swap_3": (HOUR, False),
    naming.ephemeral_name(1, None): (DAY, True),
    naming.ephemeral_name(2, "ext4"): (DAY - 1, False),
    naming.ephemeral_name(3, None): (HOUR, False),
}


def test_thresholds_are_novas_at_the_boundary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, quarantine_seconds=0)
    sizes = {name: put(host, name, age).lstat().st_blocks * 512
             for name, (age, _) in BOUNDARIES.items()}  # fmt: skip
    _, plan = cli(host, capsys, "plan")
    code, doc = cli(host, capsys, "clean")
    assert code == 0
    expected = {name for name, (_, removed) in BOUNDARIES.items() if removed}
    assert {e["name"] for e in plan["entries"] if e["action"] == "remove"} == expected
    assert results(doc) == dict.fromkeys(expected, ("removed", "unused-expired"))
    assert entries(host) == set(BOUNDARIES) - expected
    assert host.trash() == {}
    assert {line["entry"]: line["bytes_freed"] for line in host.audit_lines()} == {
        name: sizes[name] for name in expected
    }
    assert doc["totals"]["bytes_freed"] == sum(sizes[name] for name in expected)


# A saved plan: applied exactly, re-checked entry by entry.


def test_a_saved_plan_is_applied_and_what_changed_since_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, quarantine_seconds=0)
    for name in (A, B, C, D):
        put(host, name, 2 * DAY)
    saved = tmp_path / "plan.json"
    code, plan = cli(host, capsys, "plan", "-o", str(saved))
    assert code == 0 and {e["action"] for e in plan["entries"]} == {"remove"}
    os.utime(host.path(A), (NOW - 10, NOW - 10))  # touched by a spawn since
    st = host.path(B).stat()
    # Fetched again and published by rename: another file, same name, same mtime and size.
    put(host, B + ".new", 2 * DAY).rename(host.path(B))
    assert host.path(B).stat().st_ino != st.st_ino
    use(host, C)  # an overlay made since: C itself did not change at all
    put(host, E, 2 * DAY)  # not in the plan: not touched

    code, doc = cli(host, capsys, "clean", "--plan", str(saved), now=NOW + 60)
    assert code == 0, doc
    assert results(doc) == {
        A: ("skipped", "changed-since-plan"),
        B: ("skipped", "changed-since-plan"),
        C: ("skipped", "now-in-use"),
        D: ("removed", "unused-expired"),
    }
    assert entries(host) == {A, B, C, E}
    assert [(line["entry"], line["plan_id"]) for line in host.audit_lines()] == [
        (D, plan["plan_id"])
    ]
    # A plan only ever applies to the cache it was made for.
    other = make_host(tmp_path / "other")
    argv = ["--config-file", str(other.config), "clean", "--plan", str(saved)]
    assert main(argv, clock=lambda: NOW) == 2
    assert "is a plan for" in capsys.readouterr().err


def test_a_saved_plan_reads_back_as_the_same_plan(tmp_path: Path) -> None:
    sh = sample.build(tmp_path / "host", now=NOW)
    settings = load_settings([str(sh.config)])
    plan = plan_pass(settings, inventory_files=[str(sh.inventory)], now=NOW)
    saved = tmp_path / "plan.json"
    plans.save_plan(str(saved), plan)
    again = plans.load_plan(str(saved))
    assert plan_id(again) == plan_id(plan)
    # Every field, not only what the executor needs: the codec loses nothing.
    assert again == plan
    assert plan_from_dict(json.loads(json.dumps(plan_to_dict(plan)))) == plan
    assert json.loads(saved.read_text())["schema"] == 1


def test_a_file_that_is_not_a_plan_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    bad = tmp_path / "plan.json"
    bad.write_text('{"entries": []}')
    argv = ["--config-file", str(host.config), "clean", "--plan", str(bad)]
    assert main(argv, clock=lambda: NOW) == 2
    assert "plan: missing 'host'" in capsys.readouterr().err


# Modes that remove nothing.


def test_report_only_touches_but_removes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, remove_unused_base_images="false")
    put(host, A, 2 * DAY)
    put(host, B, 2 * DAY)
    use(host, B)
    code, doc = cli(host, capsys, "clean")
    assert code == 0 and results(doc) == {}
    assert results(doc, touched=True) == {B: ("touched", "in-use")}
    assert host.path(A).stat().st_mtime == NOW - 2 * DAY
    assert host.path(B).stat().st_mtime == NOW
    assert host.audit_lines() == []


def test_dry_run_is_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = make_host(tmp_path)
    put(host, A, 2 * DAY)
    _, plan = cli(host, capsys, "plan")
    code, dry = cli(host, capsys, "clean", "--dry-run")
    assert code == 0 and dry == plan and host.path(A).exists()


def test_an_incomplete_view_removes_nothing_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, quarantine_seconds=0)
    put(host, A, 2 * DAY)
    put(host, B, 2 * DAY)
    use(host, B)
    broken = host.instances / "inst-2" / "disk"
    broken.parent.mkdir()
    broken.write_bytes(b"QFI\xfb\x00\x00\x00\x09" + b"\x00" * 200)  # qcow2, version 9
    code, doc = cli(host, capsys, "clean")
    assert code == 1 and doc["complete"] is False
    assert results(doc) == {} and host.path(A).exists()
    assert host.path(B).stat().st_mtime == NOW  # touching still happens


# Quarantine, purge, restore.


def test_quarantine_then_purge_when_it_expires(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, quarantine_seconds=DAY)
    put(host, A, 2 * DAY, size=1 << 20)
    blocks = host.path(A).lstat().st_blocks * 512
    code, doc = cli(host, capsys, "clean")
    assert code == 0 and results(doc) == {A: ("quarantined", "unused-expired")}
    assert doc["totals"]["bytes_freed"] == 0 and doc["totals"]["bytes_quarantined"] == blocks
    assert not host.path(A).exists() and set(host.trash()) == {A}

    code, doc = cli(host, capsys, "clean", now=NOW + DAY - 1)
    assert code == 0 and results(doc) == {}
    assert [(t["name"], t["action"], t["reason"]) for t in doc["trash"]] == [
        (A, "keep", "in-quarantine")
    ]
    assert doc["summary"]["bytes"] == doc["summary"]["trash_bytes"] == blocks

    code, doc = cli(host, capsys, "clean", now=NOW + DAY)
    assert code == 0 and results(doc) == {A: ("purged", "quarantine-expired")}
    assert doc["totals"]["bytes_freed"] == blocks
    assert host.trash() == {} and not host.path(A).exists()
    assert [(x["entry"], x["action"], x["bytes_freed"]) for x in host.audit_lines()] == [
        (A, "quarantined", 0),
        (A, "purged", blocks),
    ]


def test_restore_brings_a_quarantined_entry_back_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    put(host, A, 2 * DAY)
    st, before = host.path(A).stat(), digest(host.path(A))
    cli(host, capsys, "clean")
    assert not host.path(A).exists()

    code, doc = cli(host, capsys, "restore", A, now=NOW + 60)
    assert code == 0 and results(doc) == {A: ("restored", "operator-restore")}
    back = host.path(A).stat()
    assert back.st_ino == st.st_ino and digest(host.path(A)) == before
    assert back.st_mtime == NOW + 60  # touched: the next pass keeps what an operator brought back
    assert host.trash() == {}
    assert [(x["action"], x["reason"], x["plan_id"]) for x in host.audit_lines()][-1] == (
        "restored", "operator-restore", None)  # fmt: skip

    code, doc = cli(host, capsys, "clean", now=NOW + 120)
    assert code == 0 and results(doc) == {} and host.path(A).exists()
    code, doc = cli(host, capsys, "restore", A)
    assert code == 1 and results(doc) == {A: ("skipped", "not-in-trash")}


def test_restore_is_refused_when_the_name_exists_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    put(host, A, 2 * DAY)
    old = digest(host.path(A))
    cli(host, capsys, "clean")
    host.path(A).write_bytes(b"fetched again by nova")
    code, doc = cli(host, capsys, "restore", A)
    assert code == 1 and results(doc) == {A: ("skipped", "name-taken")}
    assert host.path(A).read_bytes() == b"fetched again by nova"
    assert digest(host.trash()[A]) == old


@pytest.mark.parametrize("how", ["disk", "record"])
def test_a_quarantined_entry_referenced_again_is_restored_loudly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    host = make_host(tmp_path)
    image_id = "0e7b2a5c-4f7d-4c55-9a8e-3a9d3b3c1f00"
    name = fp(image_id)
    put(host, name, 2 * DAY)
    before = digest(host.path(name))
    cli(host, capsys, "clean")
    assert not host.path(name).exists()
    if how == "disk":  # an instance whose backing file is the missing original path
        make_overlay(host.instances / "inst-9" / "disk", host.path(name), unsafe_size="1M")
    else:
        host.inventory.write_text(
            json.dumps({"instances": [{"uuid": "u9", "image_ref": image_id}]})
        )

    code, doc = cli(host, capsys, "clean", now=NOW + 60)
    assert code == 1  # loud: a removal had to be undone
    assert results(doc) == {name: ("restored", "referenced-again")}
    assert host.path(name).exists() and digest(host.path(name)) == before
    assert host.trash() == {}
    assert host.audit_lines()[-1]["action"] == "restored"


# Touching in-use entries.


def test_in_use_entries_are_touched_unless_disabled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    put(host, A, HOUR)
    use(host, A)
    cli(host, capsys, "clean")
    assert host.path(A).stat().st_mtime == NOW

    host = make_host(tmp_path / "off", touch_in_use="false")
    put(host, A, HOUR)
    use(host, A)
    code, doc = cli(host, capsys, "clean")
    assert code == 0 and results(doc, touched=True) == {}
    assert host.path(A).stat().st_mtime == NOW - HOUR


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Paths made immutable with chattr +i (even root cannot utime them); undone afterwards."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_a_touch_refused_is_reported_and_the_pass_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], immutable: list[Path]
) -> None:
    host = make_host(tmp_path, quarantine_seconds=0)
    put(host, A, HOUR)
    use(host, A)
    put(host, B, 2 * DAY)
    done = subprocess.run(["chattr", "+i", str(host.path(A))], check=False, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i unsupported here: {done.stderr.decode().strip()}")
    immutable.append(host.path(A))
    code, doc = cli(host, capsys, "clean")
    assert code == 1
    assert results(doc, touched=True) == {
        A: ("failed", "touch-denied"),
        B: ("removed", "unused-expired"),
    }


# Stale temporaries and Nova's lock.


def test_a_stale_temp_is_reaped_only_when_its_entry_lock_is_free(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, stale_temp_seconds=HOUR)
    temp = naming.temp_name(A, 4242, "beef")
    put(host, temp, HOUR)
    put(host, A + ".part", HOUR - 1)
    with nova_holds(host.instances, A):  # a download of A in progress, as nova-compute locks it
        code, doc = cli(host, capsys, "clean")
    assert code == 0 and results(doc) == {temp: ("skipped", "temp-locked")}
    assert host.path(temp).exists()
    code, doc = cli(host, capsys, "clean")
    assert code == 0 and results(doc) == {temp: ("reaped", "stale-temp")}
    assert not host.path(temp).exists() and host.path(A + ".part").exists()


def test_an_entry_nova_holds_is_skipped_after_the_bounded_wait(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, quarantine_seconds=0, lock_timeout_seconds=0)
    put(host, A, 2 * DAY)
    put(host, B, 2 * DAY)
    with nova_holds(host.instances, A):
        code, doc = cli(host, capsys, "clean")
    assert code == 1
    assert results(doc) == {A: ("skipped", "lock-timeout"), B: ("removed", "unused-expired")}
    assert host.path(A).exists()
    code, doc = cli(host, capsys, "clean")
    assert code == 0 and results(doc) == {A: ("removed", "unused-expired")}


def test_free_entries_are_done_and_released_before_waiting_for_busy_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # While Nova downloads A, spawns on D must not wait for our pass: D is removed and its lock
    # released before the pass starts waiting for A, and A is done as soon as Nova lets go.
    host = make_host(tmp_path, quarantine_seconds=0, lock_timeout_seconds=60)
    put(host, A, 2 * DAY)
    put(host, D, 2 * DAY)
    done: list[tuple[int, dict[str, Any]]] = []
    with nova_holds(host.instances, A) as release:
        thread = threading.Thread(target=lambda: done.append(cli(host, capsys, "clean")))
        thread.start()
        try:
            limit = time.monotonic() + 20
            while host.path(D).exists() and time.monotonic() < limit:
                time.sleep(0.02)
            assert not host.path(D).exists(), "D waited for the lock Nova holds on A"
            assert nova_tries(host.instances, D) == "got"
            assert host.path(A).exists()
        finally:
            release()
            thread.join(timeout=60)
    [(code, doc)] = done
    assert code == 0
    assert results(doc) == {A: ("removed", "unused-expired"), D: ("removed", "unused-expired")}


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_audit_log_that_cannot_be_written_stops_every_action_but_touches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    # A host where the log's directory cannot be created must not act without an audit trail.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    log = blocker / "audit.jsonl" if where == "under-a-file" else Path("/proc/nope/audit.jsonl")
    host = make_host(tmp_path, audit_log=log)
    put(host, A, 2 * DAY)  # would be quarantined
    put(host, B + ".part", 30 * DAY)  # would be reaped
    put(host, C, 2 * DAY)
    use(host, C)  # in use: still touched
    code, doc = cli(host, capsys, "clean")
    assert code == 1 and results(doc) == {}
    assert results(doc, touched=True) == {C: ("touched", "in-use")}
    assert host.path(C).stat().st_mtime == NOW
    assert host.path(A).exists() and host.path(B + ".part").exists() and host.trash() == {}
    assert not (host.instances / "locks" / f"nova-{A}").exists()  # no lock was taken either
    [problem] = doc["apply_problems"]
    assert problem["source"] == "audit"
    assert problem["message"].startswith("audit log not writable: nothing removed")


def test_human_output_says_what_was_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, quarantine_seconds=0)
    put(host, A, 2 * DAY, size=1 << 20)
    argv = ["--config-file", str(host.config), "clean"]
    assert main(argv, clock=lambda: NOW) == 0
    out = capsys.readouterr().out
    assert f"removed  {A}" in out and "1.0 MiB freed" in out


# Trash decisions are pure: values in, decisions out.

QUARANTINE_DAY = make_policy(quarantine_seconds=DAY)


def _trash_plan(
    trash: list[tuple[str, float]],
    *,
    entries: tuple[str, ...] = (),
    disks: tuple[Disk, ...] = (),
    problems: tuple[Problem, ...] = (),
    now: float = NOW,
    policy: Policy = QUARANTINE_DAY,
) -> list[tuple[str, str, str]]:
    inventory = Inventory(
        host="h1",
        instances_path="/i",
        cache_dir="/i/_base",
        entries=tuple(
            CacheEntry(n, naming.classify(n), FileType.FILE, 4096, 4096, NOW, 1, 1) for n in entries
        ),
        disks=disks,
        trash=tuple(TrashEntry(n, f"{n}@{int(at)}", 4096, at, 7) for n, at in trash),
        problems=problems,
    )
    plan = decide(inventory, policy, now)
    return [(t.entry.trash_name, str(t.action), str(t.reason)) for t in plan.trash]


def test_trash_decisions() -> None:
    at = NOW - 10
    disk = Disk("/i/x/disk", "x", "qcow2", chain=(f"/i/_base/{A}",), missing=f"/i/_base/{A}")
    # Kept while quarantined, purged when quarantined_at + quarantine_seconds <= now.
    assert _trash_plan([(A, at)], now=at + DAY - 1) == [(f"{A}@{int(at)}", "keep", "in-quarantine")]
    assert _trash_plan([(A, at)], now=at + DAY) == [
        (f"{A}@{int(at)}", "purge", "quarantine-expired")
    ]
    # Never purged on an incomplete view, in report-only mode, or before it was quarantined.
    late = at + 2 * DAY
    blocking = (Problem(ProblemCode.DISK_UNREADABLE, "/i/y/disk", "unreadable"),)
    assert _trash_plan([(A, at)], now=late, problems=blocking)[0][1:] == ("keep", "incomplete-view")
    report_only = make_policy(quarantine_seconds=DAY, remove_unused=False)
    assert _trash_plan([(A, at)], now=late, policy=report_only)[0][1:] == (
        "keep",
        "removal-disabled",
    )
    assert _trash_plan([(A, at)], now=at - 1)[0][1:] == ("keep", "clock-skew")
    # Referenced again: the newest copy comes back (even on an incomplete view), the others wait.
    got = _trash_plan([(A, at - 5), (A, at)], disks=(disk,), problems=blocking)
    assert got == [
        (f"{A}@{int(at - 5)}", "keep", "in-quarantine"),
        (f"{A}@{int(at)}", "restore", "referenced-again"),
    ]
    # ... unless an entry of that name is back in the cache already.
    assert _trash_plan([(A, at)], disks=(disk,), entries=(A,))[0][1:] == ("keep", "in-quarantine")


def test_an_incomplete_view_under_the_lock_skips_a_saved_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, quarantine_seconds=0)
    put(host, A, 2 * DAY)
    saved = tmp_path / "plan.json"
    cli(host, capsys, "plan", "-o", str(saved))
    broken = host.instances / "inst-2" / "disk"
    broken.parent.mkdir()
    broken.write_bytes(b"QFI\xfb\x00\x00\x00\x09" + b"\x00" * 200)
    code, doc = cli(host, capsys, "clean", "--plan", str(saved))
    assert code == 1 and results(doc) == {A: ("skipped", "incomplete-view")}
    assert host.path(A).exists()


@pytest.mark.parametrize("command", ["clean", "restore"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: imagecache" in capsys.readouterr().out


def test_dry_run_and_plan_exclude_each_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    argv = ["--config-file", str(host.config), "clean", "--dry-run", "--plan", "x.json"]
    assert main(argv, clock=lambda: NOW) == 2
    assert "exclude each other" in capsys.readouterr().err


# Lock files: collected only where a removal pass could have removed their names.


def _old_lock_files(host: Host, *names: str) -> set[str]:
    locks_dir = host.instances / "locks"
    locks_dir.mkdir(exist_ok=True)
    for name in names:
        path = locks_dir / f"nova-{name}"
        path.touch()
        os.utime(path, (NOW - 8 * DAY, NOW - 8 * DAY))
    return {f"nova-{name}" for name in names}


def _lock_files(host: Host) -> set[str]:
    """The entry lock files (not Nova's registry lock, which every ``clean`` takes)."""
    registry_lock = "nova-storage-registry-lock"
    return {p.name for p in (host.instances / "locks").iterdir()} - {registry_lock}


def test_a_missing_cache_directory_collects_no_lock_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The cache share is not mounted: the scan sees no entry, which is only a warning (Nova makes
    # the directory on its first download). It must not make every lock file look dead.
    host = make_host(tmp_path)
    host.cache.rmdir()
    names = _old_lock_files(host, A, B, "swap_512")
    code, doc = cli(host, capsys, "clean")
    assert code == 0 and doc["complete"] is True
    assert [p["source"] for p in doc["problems"] if p["source"] != "inventory"] == ["cache"]
    assert _lock_files(host) == names


@pytest.mark.parametrize("mode", ["report-only", "incomplete"])
def test_no_lock_file_is_collected_by_a_pass_that_removes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    options = {"remove_unused_base_images": "false"} if mode == "report-only" else {}
    host = make_host(tmp_path, **options)
    if mode == "incomplete":
        broken = host.instances / "inst-2" / "disk"
        broken.parent.mkdir()
        broken.write_bytes(b"QFI\xfb\x00\x00\x00\x09" + b"\x00" * 200)  # qcow2, version 9
    names = _old_lock_files(host, A, "swap_512")
    cli(host, capsys, "clean")
    assert _lock_files(host) == names
    if mode == "incomplete":
        (host.instances / "inst-2" / "disk").unlink()
    else:
        host.config.write_text(host.config.read_text().replace("= false", "= true"))
    code, _ = cli(host, capsys, "clean")  # the same names, on a pass that may remove
    assert code == 0 and _lock_files(host) == set()

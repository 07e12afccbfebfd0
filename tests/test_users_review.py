"""What a hostile review found after the safety issue: each case lost a guest's base on clean.

Every test writes a pattern through QEMU, runs ``clean`` with zero thresholds and reads the
pattern back with ``qemu-io`` (``qemu-img info`` succeeds with a missing backing file).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import qemu
from tests.test_executor import A, B, C, cli, make_host, put
from tests.test_users_data_files import ZERO, age, host_with, reasons


def test_a_missing_link_named_like_an_entry_outside_the_cache_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A snapshot store names its files like entries; its volume is not mounted right now.
    host = host_with(tmp_path)
    put(host, A, 0)
    qemu.write_pattern(host.path(A), 0xAB, fmt="raw")
    store = tmp_path / "snapvol"
    mid = qemu.make_overlay(store / B, host.path(A))
    disk = qemu.make_overlay(host.instances / "inst-1" / "disk", mid, backing_fmt="qcow2")
    age(host.path(A))
    store.rename(tmp_path / "snapvol.unmounted")
    code, doc = cli(host, capsys, "clean")
    assert code == 1 and not doc["complete"] and host.path(A).exists()
    assert "chain-link-missing" in {p["code"] for p in doc["problems"]}
    (tmp_path / "snapvol.unmounted").rename(store)
    assert qemu.reads_pattern(disk, 0xAB)


def test_a_qed_overlay_blocks_removal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = host_with(tmp_path)
    put(host, A, 0)
    disk = host.instances / "inst-1" / "disk"
    disk.parent.mkdir(parents=True)
    qemu.qemu_img("create", "-q", "-f", "qed", "-F", "raw", "-b", host.path(A), disk)
    age(host.path(A))
    code, doc = cli(host, capsys, "clean")
    assert code == 1 and host.path(A).exists()
    assert "header-garbage" in {p["code"] for p in doc["problems"]}


def test_a_disk_directly_in_the_instances_path_protects_its_base(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = host_with(tmp_path)
    put(host, A, 0)
    qemu.write_pattern(host.path(A), 0xCD, fmt="raw")
    disk = qemu.make_overlay(host.instances / "stray-disk", host.path(A))
    age(host.path(A))
    code, doc = cli(host, capsys, "clean")
    assert reasons(doc) == {A: "in-use"} and code == 0
    assert qemu.reads_pattern(disk, 0xCD)


def test_an_entry_that_names_another_keeps_it_while_it_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An operator's golden qcow2 parked in the cache (unknown kind, kept) on an old base, and a
    # young entry on another: both bases stay while their users do.
    host = make_host(tmp_path, **{**ZERO, "remove_unused_original_minimum_age_seconds": 3600})
    put(host, B, 0)
    put(host, C, 0)
    qemu.write_pattern(host.path(C), 0xEF, fmt="raw")
    golden = qemu.make_overlay(host.path("golden.qcow2"), host.path(C))
    young = qemu.make_overlay(host.path(A), host.path(B))
    age(host.path(B), host.path(C))
    age(young, days=0.001)  # a minute and a half old
    code, doc = cli(host, capsys, "clean")
    assert code == 0
    assert reasons(doc) == {
        A: "too-young",
        B: "in-use",
        C: "in-use",
        "golden.qcow2": "unknown-kind",
    }
    assert qemu.reads_pattern(golden, 0xEF) and young.exists() and host.path(B).exists()


def test_an_entry_that_is_its_own_backing_file_keeps_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An uploaded file naming itself (and another entry) must not pin anything forever.
    host = host_with(tmp_path)
    put(host, B, 0)
    tmp = tmp_path / "self.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", host.path(A), tmp, "1M")
    tmp.rename(host.path(A))
    age(host.path(A), host.path(B))
    code, doc = cli(host, capsys, "clean")
    assert reasons(doc) == {A: "unused-expired", B: "unused-expired"} and code == 0


def test_a_broken_instance_behind_a_symlinked_instances_path_only_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = host_with(tmp_path)
    real = tmp_path / "volume"
    host.instances.rename(real)
    host.instances.symlink_to(real)
    (real / "inst-1").mkdir(exist_ok=True)
    (real / "inst-1" / "disk").symlink_to(host.instances / "_base" / A)  # A is gone
    put(host, B, 0)
    age(host.path(B))
    code, doc = cli(host, capsys, "clean")
    assert code == 0
    assert doc["complete"] and reasons(doc) == {B: "unused-expired"}
    assert "backing-missing" in {p["code"] for p in doc["problems"]}

"""Users the scanner must find beyond the backing chains of the files in an instance directory.

Instance files that are cache entries (symlinks, hard links), disks in subdirectories (Nova's
live-snapshot deltas), a chain whose intermediate link is temporarily unreachable, and files a
guest writes, which never make us open a host file. Real images, real qemu-io, the real ``clean``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imagecache import sources
from imagecache.layout import Layout
from imagecache.model import Disk, ProblemCode
from tests import qemu
from tests.opens import OpenWatch
from tests.test_executor import A, B, C, D, E, Host, cli, put
from tests.test_users_data_files import age, details, host_with, reasons

MIB = 1 << 20


def patterned_entry(host: Host, name: str, pattern: int, size: int = MIB) -> Path:
    """A raw cache entry whose first 64 KiB the guest wrote as ``pattern``."""
    path = host.path(name)
    with path.open("wb") as f:
        f.truncate(size)
    qemu.write_pattern(path, pattern, fmt="raw")
    return path


def scan(host: Host) -> tuple[tuple[Disk, ...], list[tuple[str, ProblemCode, bool]]]:
    disks, problems = sources.scan_instances(Layout(str(host.instances)))
    return disks, [(p.ref, p.code, p.blocking) for p in problems]


# --- 3. an instance file that is a cache entry -----------------------------------------------


def test_a_raw_disk_symlinked_or_hard_linked_to_an_entry_protects_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = host_with(tmp_path)
    inst = host.instances / "inst-1"
    inst.mkdir()
    patterned_entry(host, A, 0x41)
    (inst / "disk").symlink_to(host.path(A))  # a raw root disk on the base itself
    put(host, B, 0, size=MIB)
    os.link(host.path(B), inst / "disk.config")  # an ISO, hard-linked
    qemu.make_qcow2(host.path(C))
    (inst / "disk.local").symlink_to(f"../_base/{C}")  # a qcow2 disk that is an entry
    (inst / "disk.info").write_text(json.dumps({str(inst / "disk"): "raw"}))
    (inst / "console.log").write_text("booted\n")
    qemu.write_pattern(inst / "disk", 0x42, fmt="raw", length="4k")  # the guest writes on
    age(host.path(A), host.path(B), host.path(C))

    code, doc = cli(host, capsys, "clean")

    assert reasons(doc) == {A: "in-use", B: "in-use", C: "in-use"}
    assert details(doc, A) == ["the disk file itself"]
    assert code == 0 and doc["complete"]
    assert qemu.reads_pattern(inst / "disk", 0x42, fmt="raw", length="4k")
    # Files with a single name of their own are no entry: they make no Disk at all.
    disks, _ = scan(host)
    assert sorted(os.path.basename(d.path) for d in disks) == ["disk", "disk.config", "disk.local"]


# --- 4. disks in subdirectories --------------------------------------------------------------


def test_a_live_snapshot_delta_under_snapshots_keeps_its_base(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nova's live snapshot: $instances_path/snapshots/<tmp>/<name>.delta, backed by the base.
    host = host_with(tmp_path)
    patterned_entry(host, A, 0x44)
    delta = qemu.make_overlay(host.instances / "snapshots" / "tmpk2j4" / "snap.delta", host.path(A))
    age(host.path(A))

    code, doc = cli(host, capsys, "clean")

    assert reasons(doc) == {A: "in-use"} and code == 0
    assert qemu.reads_pattern(delta, 0x44)


def test_subdirectories_are_scanned_to_a_bound_and_deeper_ones_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = host_with(tmp_path)
    inst = host.instances / "inst-1"
    patterned_entry(host, A, 0x45)
    put(host, B, 0)
    deep = qemu.make_overlay(inst / "a" / "b" / "c" / "disk", host.path(A))
    age(host.path(A), host.path(B))
    disks, problems = scan(host)
    assert [d.path for d in disks] == [str(deep)] and problems == []

    too_deep = qemu.make_overlay(inst / "a" / "b" / "c" / "d" / "disk", host.path(B))
    _, problems = scan(host)
    assert problems == [(str(too_deep.parent), ProblemCode.TREE_TOO_DEEP, True)]
    code, doc = cli(host, capsys, "clean")
    assert reasons(doc) == {A: "in-use", B: "incomplete-view"} and code == 1
    assert host.path(B).exists() and qemu.reads_pattern(deep, 0x45)


def test_a_symlinked_subdirectory_is_never_followed(tmp_path: Path) -> None:
    # Out of the tree: not listed, its disks never opened, and the view is incomplete. Within the
    # tree (or to the cache): nothing hides behind it, the target is scanned under its own name.
    host = host_with(tmp_path)
    inst = host.instances / "inst-1"
    put(host, A, 0)
    outside = qemu.make_overlay(tmp_path / "elsewhere" / "disk", host.path(A))
    qemu.make_overlay(inst / "snaps" / "disk", host.path(A))
    (inst / "extra").symlink_to(outside.parent)
    (inst / "current").symlink_to("snaps")
    (inst / "cache").symlink_to("../_base")
    with OpenWatch(outside) as watch:
        disks, problems = scan(host)
        assert watch.opened() == set()
    assert [d.path for d in disks] == [str(inst / "snaps" / "disk")]
    assert problems == [(str(inst / "extra"), ProblemCode.TREE_LINK_UNFOLLOWED, True)]


# --- 5. a missing link that is not a cache entry -----------------------------------------------


def test_an_unreachable_intermediate_link_blocks_removal_of_what_lies_behind_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # disk -> /vol/snap.qcow2 (an external snapshot on a volume, unmounted now) -> entry A.
    host = host_with(tmp_path)
    patterned_entry(host, A, 0x46)
    vol = tmp_path / "vol"
    snap = qemu.make_overlay(vol / "snap.qcow2", host.path(A))
    disk = qemu.make_overlay(host.instances / "inst-1" / "disk", snap, backing_fmt="qcow2")
    age(host.path(A))
    vol.rename(tmp_path / "vol.unmounted")

    _, problems = scan(host)
    assert problems == [(str(disk), ProblemCode.CHAIN_LINK_MISSING, True)]
    code, doc = cli(host, capsys, "clean")
    assert reasons(doc) == {A: "incomplete-view"} and code == 1

    (tmp_path / "vol.unmounted").rename(vol)
    assert qemu.reads_pattern(disk, 0x46)


def test_a_missing_link_in_a_cache_of_this_storage_is_a_broken_instance(tmp_path: Path) -> None:
    # Only a file directly in a cache directory under instances_path (ours, or a peer's _base*)
    # is the case that only warns. A cache-like NAME elsewhere is not enough: a snapshot store
    # may name its files like entries, on a volume not mounted now, hiding the chain behind it.
    host = host_with(tmp_path)
    inst = host.instances / "inst-1"
    peer = host.instances / "_base_10.0.0.2"
    for name, backing in (
        ("disk", host.path(A)),
        ("disk.local", tmp_path / "anywhere" / "swap_512"),
        ("disk.swap", peer / "not-a-pattern"),
        ("disk.rescue", tmp_path / "elsewhere" / "_base" / A),
    ):
        qemu.make_overlay(inst / name, backing, unsafe_size="1M")
    qemu.make_data_file_image(inst / "disk.eph0", host.path(B))
    host.path(B).unlink()
    _, problems = scan(host)
    assert sorted((os.path.basename(r), c, b) for r, c, b in problems) == [
        ("disk", ProblemCode.BACKING_MISSING, False),
        ("disk.eph0", ProblemCode.BACKING_MISSING, False),
        ("disk.local", ProblemCode.CHAIN_LINK_MISSING, True),
        ("disk.rescue", ProblemCode.CHAIN_LINK_MISSING, True),
        ("disk.swap", ProblemCode.BACKING_MISSING, False),
    ]
    (inst / "disk.local").unlink()
    (inst / "disk.rescue").unlink()
    # Not so a data file or extent outside the cache: what it would show is unknown.
    (inst / "disk.eph0").unlink()
    (tmp_path / "vol").mkdir()
    qemu.make_data_file_image(inst / "disk.eph0", tmp_path / "vol" / "data.raw")
    (tmp_path / "vol" / "data.raw").unlink()
    _, problems = scan(host)
    assert [(os.path.basename(r), c, b) for r, c, b in problems if b] == [
        ("disk.eph0", ProblemCode.CHAIN_LINK_MISSING, True)
    ]


def test_a_dangling_symlinked_disk_follows_the_same_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = host_with(tmp_path)
    inst = host.instances / "inst-1"
    inst.mkdir()
    (inst / "disk").symlink_to(host.path(A))  # its entry is gone (quarantined, say)
    _, problems = scan(host)
    assert problems == [(str(inst / "disk"), ProblemCode.BACKING_MISSING, False)]
    (inst / "disk.local").symlink_to(tmp_path / "vol" / "disk.local")  # an unmounted volume
    _, problems = scan(host)
    assert problems[1:] == [(str(inst / "disk.local"), ProblemCode.CHAIN_LINK_MISSING, True)]


# --- 14. bytes a guest writes never make us open a host file -----------------------------------


def test_a_forged_header_in_a_guest_written_file_is_stat_ed_never_followed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The guest wrote a qcow2 header into its raw disk (disk.info says raw) naming entry B, a
    # qcow2 on entry C, and a VMDK descriptor into its console log naming entry D. What they
    # name is kept (the safe side), but only stat()ed: B is never opened, so C is not reached.
    host = host_with(tmp_path)
    inst = host.instances / "inst-1"
    put(host, C, 0)
    qemu.make_overlay(host.path(B), host.path(C))
    put(host, D, 0, size=MIB)
    put(host, E, 0)
    qemu.make_overlay(inst / "disk", host.path(B), backing_fmt="qcow2")
    (inst / "disk.info").write_text(json.dumps({str(inst / "disk"): "raw"}))
    (inst / "console.log").write_text(
        f'# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
        f'RW 2048 FLAT "{host.path(D)}" 0\nRW 2048 SPARSE "{host.path(E)}"\n'
    )
    age(*(host.path(n) for n in (B, C, D, E)))

    # The instance scan opens none of them (the entries' own headers are read as entries).
    with OpenWatch(host.path(B), host.path(C), host.path(D), host.path(E)) as watch:
        scan(host)
        assert watch.opened() == set()
    code, doc = cli(host, capsys, "plan")
    assert reasons(doc) == {
        B: "in-use",
        C: "in-use",  # not through the guest's header: entry B itself is a qcow2 on C
        D: "in-use",
        E: "in-use",
    }
    assert doc["complete"] and code == 0


def test_disk_info_is_read_before_any_chain_is_followed(tmp_path: Path) -> None:
    # A well-formed header whose chain would open a FIFO, in a disk Nova recorded as raw: never
    # opened (it is only stat()ed), and no problem at all.
    host = host_with(tmp_path)
    inst = host.instances / "inst-1"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    mid = qemu.make_overlay(tmp_path / "mid.qcow2", fifo, unsafe_size="1M")
    qemu.make_overlay(inst / "disk", mid, backing_fmt="qcow2", unsafe_size="1M")
    (inst / "disk.info").write_text(json.dumps({str(inst / "disk"): "raw"}))
    with OpenWatch(mid, fifo) as watch:
        disks, problems = scan(host)
        assert watch.opened() == set()
    assert problems == []
    assert [d.chain for d in disks] == [(str(mid),)]

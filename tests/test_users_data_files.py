"""A qcow2 external data file is where the guest's bytes live: an entry that is one is in use.

Real images made by qemu-img (``-o data_file=...``), real guest writes by qemu-io, the real
``clean`` with zero thresholds; each data-loss case checks afterwards that qemu still reads what
the guest wrote (``qemu-img info`` succeeds without the data file, so it proves nothing).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from imagecache import sources
from imagecache.layout import Layout
from imagecache.model import ProblemCode
from tests import qemu
from tests.test_executor import DAY, NOW, A, B, C, Host, cli, make_host

ZERO = {
    "remove_unused_original_minimum_age_seconds": 0,
    "remove_unused_resized_minimum_age_seconds": 0,
    "quarantine_seconds": 0,
}


def host_with(tmp_path: Path) -> Host:
    return make_host(tmp_path, **ZERO)


def age(*paths: Path, days: float = 2) -> None:
    """Make entries old (qemu-img and qemu-io just wrote them) without touching their bytes."""
    for path in paths:
        os.utime(path, (NOW - days * DAY, NOW - days * DAY))


def clean(host: Host, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    return cli(host, capsys, "clean")


def reasons(doc: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["reason"] for e in doc["entries"]}


def details(doc: dict[str, Any], name: str) -> list[str]:
    return [u["detail"] for e in doc["entries"] if e["name"] == name for u in e["users"]]


def test_a_data_file_that_is_a_cache_entry_survives_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = host_with(tmp_path)
    disk = qemu.make_data_file_image(host.instances / "inst-1" / "disk", host.path(A))
    qemu.write_pattern(disk, 0xA5)
    age(host.path(A))

    code, doc = clean(host, capsys)

    assert reasons(doc) == {A: "in-use"}
    assert details(doc, A) == ["data file at depth 0"]
    assert code == 0 and doc["complete"]
    assert qemu.reads_pattern(disk, 0xA5)


def test_a_data_file_anywhere_in_the_chain_is_in_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # disk -> B (a qcow2 entry) whose data file is entry A: A is used at depth 1.
    host = host_with(tmp_path)
    qemu.make_data_file_image(host.path(B), host.path(A))
    qemu.write_pattern(host.path(B), 0x5A)
    disk = qemu.make_overlay(host.instances / "inst-1" / "disk", host.path(B), backing_fmt="qcow2")
    age(host.path(A), host.path(B))

    code, doc = clean(host, capsys)

    assert reasons(doc) == {A: "in-use", B: "in-use"}
    # ... and by entry B itself, whose own data file it is (depth 0), while B exists.
    assert sorted(details(doc, A)) == ["data file at depth 0", "data file at depth 1"]
    assert code == 0
    assert qemu.reads_pattern(disk, 0x5A)


def test_a_data_file_protects_the_entry_it_is_by_device_and_inode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Named by names that are no entry's, outside any instance directory: relatively (against
    # the image's directory, as libvirt resolves it) to a hard link, and through a symlink.
    host = host_with(tmp_path)
    inst = host.instances / "inst-1"
    golden = host.root / "golden"
    golden.mkdir()
    qemu.make_data_file_image(inst / "disk", "../../golden/disk.data")
    qemu.write_pattern(inst / "disk", 0x11)
    os.link(golden / "disk.data", host.path(A))
    qemu.make_data_file_image(inst / "disk.local", golden / "current")
    shutil.move(golden / "current", host.path(B))
    (golden / "current").symlink_to(host.path(B))
    qemu.write_pattern(inst / "disk.local", 0x22)
    age(host.path(A), host.path(B))

    code, doc = clean(host, capsys)

    assert reasons(doc) == {A: "in-use", B: "in-use"} and code == 0
    assert details(doc, A) == [f"data file at depth 0 via {golden / 'disk.data'}"]
    assert details(doc, B) == [f"data file at depth 0 via {golden / 'current'}"]
    assert qemu.reads_pattern(inst / "disk", 0x11)
    assert qemu.reads_pattern(inst / "disk.local", 0x22)


def _unname_data_file(image: Path) -> Path:
    """Keep the incompatible data-file bit but drop the name: qemu then needs ``data-file``.

    The data-file header extension (0x44415441) becomes an unknown one, which qemu skips.
    """
    data = bytearray(image.read_bytes()[:65536])
    at = data.find(b"\x44\x41\x54\x41", 104)
    if at < 0:
        raise ValueError(f"{image} has no data-file extension")
    data[at : at + 4] = b"\x12\x34\x56\x78"
    with image.open("r+b") as f:
        f.write(data[: at + 4])
    return image


def test_a_data_file_bit_without_a_name_makes_the_view_incomplete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = host_with(tmp_path)
    disk = qemu.make_data_file_image(host.instances / "inst-1" / "disk", host.path(A))
    qemu.write_pattern(disk, 0x33)
    _unname_data_file(disk)
    age(host.path(A))
    assert "data-file' is required" in qemu.qemu_io(disk, "read 0 512").stderr

    problems = sources.scan_instances(Layout(str(host.instances)))[1]
    assert [(p.code, p.ref, p.blocking) for p in problems] == [
        (ProblemCode.CHAIN_UNRESOLVABLE, str(disk), True)
    ]
    assert "data-file" in problems[0].message
    code, doc = clean(host, capsys)

    assert reasons(doc) == {A: "incomplete-view"} and not doc["complete"] and code == 1
    opts = f"driver=qcow2,file.filename={disk},data-file.filename={host.path(A)}"
    assert qemu.reads_pattern(opts, 0x33, fmt="image-opts")


def _rename_data_file(image: Path, old: str, new: str) -> Path:
    """Rewrite the data file's name in the header (same length: the extension keeps its size)."""
    assert len(old) == len(new)
    data = image.read_bytes()[:65536]
    at = data.index(old.encode(), 104)
    with image.open("r+b") as f:
        f.seek(at)
        f.write(new.encode())
    return image


def test_a_data_file_name_qemu_would_not_open_as_a_local_file_blocks(tmp_path: Path) -> None:
    # qemu parses a json: or protocol name given as the data file (CVE-2024-4467 territory).
    host = host_with(tmp_path)
    inst = host.instances / "inst-1"
    for name, data_file in (("disk", 'json:{"a":1}'), ("disk.local", "nbd:host:123")):
        image = qemu.make_data_file_image(inst / name, "datafile.raw")
        _rename_data_file(image, "datafile.raw", data_file)
        assert qemu.info(image)["format-specific"]["data"]["data-file"] == data_file
    _, problems = sources.scan_instances(Layout(str(host.instances)))
    assert sorted((os.path.basename(p.ref), p.code, p.blocking) for p in problems) == [
        ("disk", ProblemCode.CHAIN_UNRESOLVABLE, True),
        ("disk.local", ProblemCode.CHAIN_UNRESOLVABLE, True),
    ]


def test_a_data_file_named_without_the_bit_still_counts(tmp_path: Path) -> None:
    # qemu ignores the name unless the incompatible bit is set; keeping its entry is the safe side,
    # and a name qemu never opens is no problem when it is missing.
    host = host_with(tmp_path)
    inst = host.instances / "inst-1"
    for name in ("disk", "disk.local"):
        image = qemu.make_data_file_image(inst / name, f"{name}.data", raw=False)
        data = bytearray(image.read_bytes()[:80])
        data[79] &= ~0x04  # incompatible_features (8 bytes at 72, big-endian): clear bit 2
        with image.open("r+b") as f:
            f.write(data)
        assert qemu.qemu_io(image, "read 0 512").returncode == 0  # no data file needed now
    os.link(inst / "disk.data", host.path(C))
    (inst / "disk.local.data").unlink()
    disks, problems = sources.scan_instances(Layout(str(host.instances)))
    assert problems == ()
    by_name = {os.path.basename(d.path): d for d in disks}
    assert by_name["disk"].data_files == ((0, str(inst / "disk.data")),)
    assert by_name["disk"].data_file_ids == (
        (os.stat(host.path(C)).st_dev, os.stat(host.path(C)).st_ino),
    )
    assert by_name["disk.local"].data_files == ((0, str(inst / "disk.local.data")),)
    assert by_name["disk.local"].data_file_ids == (None,)

"""VMDK extent files hold a VMDK's guest bytes: an entry that is an extent is in use.

Descriptors are made by qemu-img (``subformat=monolithicFlat``) and edited as an operator would;
qemu-img and qemu-io are the reference for which files qemu opens.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from imagecache import sources
from imagecache.layout import Layout
from imagecache.model import ProblemCode
from tests import qemu
from tests.opens import OpenWatch
from tests.test_executor import A, B, C, D, Host, cli
from tests.test_users_data_files import age, details, host_with, reasons

MIB = 1 << 20


def flat_descriptor(path: Path, *extent_lines: str, parent: str | None = None) -> Path:
    """A monolithicFlat descriptor made by qemu-img, its extent lines replaced by ``extent_lines``.

    qemu-img's own flat extent is removed: only the files the lines name are extents.
    """
    qemu.make_vmdk(path, subformat="monolithicFlat")
    (path.parent / f"{path.stem}-flat{path.suffix}").unlink()
    text = path.read_text()
    old = next(line for line in text.splitlines() if line.startswith("RW "))
    text = text.replace(old, "\n".join(extent_lines))
    if parent is not None:
        text = text.replace(
            "parentCID=ffffffff", f'parentCID=ffffffff\nparentFileNameHint="{parent}"'
        )
    path.write_text(text)
    return path


def qemu_extents(image: Path) -> list[str]:
    return [e["filename"] for e in qemu.info(image)["format-specific"]["data"]["extents"]]


def raw_entry(host: Host, name: str, size: int = MIB) -> Path:
    path = host.path(name)
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_a_flat_extent_that_is_a_cache_entry_survives_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = host_with(tmp_path)
    raw_entry(host, A)
    disk = flat_descriptor(host.instances / "inst-1" / "disk", f'RW 2048 FLAT "{host.path(A)}" 0')
    qemu.write_pattern(disk, 0xA1, fmt="vmdk")
    age(host.path(A))
    assert qemu_extents(disk) == [str(host.path(A))]

    code, doc = cli(host, capsys, "clean")

    assert reasons(doc) == {A: "in-use"} and details(doc, A) == ["vmdk extent at depth 0"]
    assert code == 0 and doc["complete"]
    assert qemu.reads_pattern(disk, 0xA1, fmt="vmdk")


def test_every_extent_counts_relative_names_hard_links_and_sparse_extents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Three RW extents qemu opens, named relatively to the descriptor's directory: an entry by
    # its name, a hard link to another, and a sparse VMDK entry (which qemu parses); and two
    # lines qemu ignores (read-only, no access), which still keep what they name (the safe side).
    host = host_with(tmp_path)
    inst = host.instances / "inst-1"
    raw_entry(host, A, 512 * 1024)
    raw_entry(host, B, 512 * 1024)
    qemu.make_vmdk(host.path(C), "1M")
    raw_entry(host, D, 512 * 1024)
    inst.mkdir()
    os.link(host.path(B), inst / "disk-s002.vmdk")
    disk = flat_descriptor(
        inst / "disk",
        f'RW 1024 FLAT "../_base/{A}" 0',
        'RW 1024 FLAT "disk-s002.vmdk" 0',
        f'RW 2048 SPARSE "../_base/{C}"',
        f'RDONLY 1024 FLAT "../_base/{D}" 0',
        'NOACCESS 1024 FLAT "/nonexistent/ignored" 0',
    )
    qemu.write_pattern(disk, 0xB2, fmt="vmdk", length="2M")
    age(host.path(A), host.path(B), host.path(C), host.path(D))
    assert [os.path.basename(e) for e in qemu_extents(disk)] == [A, "disk-s002.vmdk", C]

    code, doc = cli(host, capsys, "clean")

    assert reasons(doc) == {A: "in-use", B: "in-use", C: "in-use", D: "in-use"}
    # (The hard link in the instance directory is also a user of its own: the same file.)
    assert f"vmdk extent at depth 0 via {inst / 'disk-s002.vmdk'}" in details(doc, B)
    assert code == 0
    assert qemu.reads_pattern(disk, 0xB2, fmt="vmdk", length="2M")


def test_extents_of_a_vmdk_parent_are_used_at_its_depth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A sparse child in the instance directory; its parent, a descriptor parked elsewhere, keeps
    # the guest's bytes in entry A.
    host = host_with(tmp_path)
    raw_entry(host, A)
    parent = flat_descriptor(
        tmp_path / "golden" / "parent.vmdk", f'RW 2048 FLAT "{host.path(A)}" 0'
    )
    qemu.write_pattern(parent, 0xC3, fmt="vmdk")
    child = qemu.make_vmdk(host.instances / "inst-1" / "disk", backing=parent)
    age(host.path(A))

    code, doc = cli(host, capsys, "clean")

    assert reasons(doc) == {A: "in-use"} and details(doc, A) == ["vmdk extent at depth 1"]
    assert code == 0
    assert qemu.reads_pattern(child, 0xC3, fmt="vmdk")


def test_an_extent_line_spread_over_lines_is_read_as_qemu_reads_it(tmp_path: Path) -> None:
    # qemu scans each line with sscanf, whose spaces match newlines too.
    host = host_with(tmp_path)
    raw_entry(host, A)
    disk = flat_descriptor(
        host.instances / "inst-1" / "disk", "RW 2048\nFLAT", f'"{host.path(A)}"\n0'
    )
    assert qemu_extents(disk) == [str(host.path(A))]
    disks, problems = sources.scan_instances(Layout(str(host.instances)))
    assert problems == ()
    assert disks[0].extents == ((0, str(host.path(A))),)


@pytest.mark.parametrize(
    "line",
    ['RW 2048 FLAT "{a}"', 'RW 2048 VMFS "{a}" 0', 'RW 2048 SPARSE "{a}" 0'],
    ids=["flat-without-offset", "vmfs-with-offset", "sparse-with-offset"],
)
def test_a_descriptor_qemu_refuses_makes_the_view_incomplete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str
) -> None:
    host = host_with(tmp_path)
    raw_entry(host, A)
    disk = flat_descriptor(host.instances / "inst-1" / "disk", line.format(a=host.path(A)))
    with pytest.raises(subprocess.CalledProcessError):
        qemu.info(disk)
    problems = sources.scan_instances(Layout(str(host.instances)))[1]
    assert [(p.code, p.ref, p.blocking) for p in problems] == [
        (ProblemCode.HEADER_GARBAGE, str(disk), True)
    ]
    _, doc = cli(host, capsys, "clean")
    assert reasons(doc) == {A: "incomplete-view"} and host.path(A).exists()


def test_a_flat_extent_is_stat_ed_never_opened_and_a_sparse_one_only_parsed(tmp_path: Path) -> None:
    host = host_with(tmp_path)
    raw_entry(host, A)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    flat_descriptor(
        host.instances / "inst-1" / "disk",
        f'RW 2048 FLAT "{host.path(A)}" 0',
        f'RW 2048 FLAT "{fifo}" 0',
    )
    with OpenWatch(host.path(A), fifo) as watch:
        disks, problems = sources.scan_instances(Layout(str(host.instances)))
        assert watch.opened() == set()
    assert disks[0].extents == ((0, str(host.path(A))), (0, str(fifo)))
    assert [(p.code, p.blocking) for p in problems] == [(ProblemCode.CHAIN_UNRESOLVABLE, True)]
    assert "not a regular file or block device" in problems[0].message


def test_an_embedded_descriptor_qemu_ignores_still_keeps_what_it_names(tmp_path: Path) -> None:
    # A hosted sparse VMDK's own descriptor names itself; qemu reads no extent from it. One that
    # names an entry keeps it (the safe side) and is only stat()ed.
    host = host_with(tmp_path)
    raw_entry(host, A)
    disk = qemu.make_vmdk(host.instances / "inst-1" / "disk.vmdk")
    with disk.open("r+b") as f:  # the embedded descriptor: 20 sectors from sector 1
        f.seek(512)
        text = f.read(20 * 512).split(b"\0", 1)[0]
        line = b'RW 2048 SPARSE "disk.vmdk"'
        assert line in text
        f.seek(512)
        f.write(
            text.replace(line, f'RW 2048 SPARSE "{host.path(A)}"'.encode()).ljust(20 * 512, b"\0")
        )
    assert qemu_extents(disk) == [str(disk)]
    with OpenWatch(host.path(A)) as watch:
        disks, problems = sources.scan_instances(Layout(str(host.instances)))
        assert watch.opened() == set()
    assert problems == ()
    assert disks[0].extents == ((0, str(host.path(A))),)


def _cowd(path: Path, parent: Path) -> Path:
    """An ESX sparse extent (VMDK3, ``COWD``) of 1 MiB, all unallocated, whose parent hint (where
    qemu reads one, the sectors from 0x200) names ``parent``. qemu-img cannot make one."""
    header = b"COWD" + struct.pack("<10I", 1, 3, 2048, 16, 40, 4, 64, 2, 16, 63)
    data = bytearray(64 * 512)
    data[: len(header)] = header
    cid = qemu.info(parent)["format-specific"]["data"]["cid"]  # qemu reads through a matching one
    hint = f'CID=12345678\nparentCID={cid:08x}\nparentFileNameHint="{parent}"\n'.encode()
    data[0x200 : 0x200 + len(hint)] = hint
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_cowd_vmdk_is_a_vmdk_and_its_parent_is_in_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # qemu probes COWD as vmdk and follows its parent hint; the parser read it as raw.
    host = host_with(tmp_path)
    qemu.make_vmdk(host.path(A), "1M")
    qemu.write_pattern(host.path(A), 0xD4, fmt="vmdk")
    disk = _cowd(host.instances / "inst-1" / "disk", host.path(A))
    age(host.path(A))
    assert qemu.info(disk)["backing-filename"] == str(host.path(A))

    code, doc = cli(host, capsys, "clean")

    assert reasons(doc) == {A: "in-use"} and details(doc, A) == ["direct backing file"]
    assert code == 0 and qemu.reads_pattern(disk, 0xD4, fmt="vmdk")


def test_a_sparse_vmdk_parent_hint_is_read_where_qemu_reads_it(tmp_path: Path) -> None:
    # The header may place its descriptor anywhere; qemu reads the parent hint at 0x200 anyway.
    # A descriptor moved to the end of the file, without a hint, hid the parent from the parser.
    host = host_with(tmp_path)
    qemu.make_vmdk(host.path(A))
    disk = qemu.make_vmdk(host.instances / "inst-1" / "disk", backing=host.path(A))
    data = bytearray(disk.read_bytes())
    moved = data[512 : 512 + 512].split(b"\0", 1)[0].replace(b"parentFileNameHint", b"# no-hint")
    sector = len(data) // 512
    data += moved.ljust(512, b"\0")
    struct.pack_into("<QQ", data, 4 + 4 + 4 + 8 + 8, sector, 1)  # descriptorOffset, -Size
    disk.write_bytes(bytes(data))
    assert qemu.info(disk)["backing-filename"] == str(host.path(A))
    disks, problems = sources.scan_instances(Layout(str(host.instances)))
    assert problems == ()
    assert disks[0].chain == (str(host.path(A)),)

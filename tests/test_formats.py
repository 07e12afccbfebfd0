"""Header parsing, checked against the real qemu-img on real images, and against broken ones."""

from __future__ import annotations

import os
import random
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imagecache.errors import ImageFormatError
from imagecache.formats import HEAD_BYTES, ImageHeader, parse_header, read_header
from tests import qemu

Builder = Callable[[Path], Path]


def _descriptor(create_type: str, extent: str, *, parent: str | None = None) -> str:
    hint = f'parentCID=24bf84be\nparentFileNameHint="{parent}"\n' if parent else ""
    return (
        "# Disk DescriptorFile\nversion=1\nCID=86df7033\n"
        f'createType="{create_type}"\n{hint}'
        f"# Extent description\n{extent}\n\n# The Disk Data Base\n#DDB\n"
        'ddb.adapterType = "ide"\n'
    )


def _flat_child(tmp: Path) -> Path:
    """A hand-written monolithicFlat descriptor with a parent hint (qemu-img opens it)."""
    qemu.make_raw(tmp / "child-flat.vmdk", "1M")
    desc = tmp / "child.vmdk"
    desc.write_text(
        _descriptor("monolithicFlat", 'RW 2048 FLAT "child-flat.vmdk" 0', parent="parent.vmdk")
    )
    return desc


def _vmdk_parent(tmp: Path) -> str:
    """A VMDK parent, named relatively (qemu-img create resolves it against the child's dir)."""
    qemu.make_vmdk(tmp / "p.vmdk")
    return "p.vmdk"


def _overlay_on_qcow2(tmp: Path, name: str, backing: str, *, compat: str = "1.1") -> Path:
    qemu.make_qcow2(tmp / "base.qcow2")
    return qemu.make_overlay(tmp / name, backing, backing_fmt="qcow2", compat=compat)


# Each fixture is made by qemu-img; qemu-img info (which does not open the backing file) is the
# reference for every field we report.
HEADER_FIXTURES: dict[str, Builder] = {
    "raw": lambda t: qemu.make_raw(t / "a.raw"),
    "qcow2-v3": lambda t: qemu.make_qcow2(t / "a.qcow2", "3G"),
    "qcow2-v2": lambda t: qemu.make_qcow2(t / "a.qcow2", "5M", compat="0.10"),
    "overlay-v3-relative": lambda t: _overlay_on_qcow2(t, "o.qcow2", "base.qcow2"),
    "overlay-v2-relative": lambda t: _overlay_on_qcow2(t, "o.qcow2", "base.qcow2", compat="0.10"),
    "overlay-absolute": lambda t: _overlay_on_qcow2(t, "o.qcow2", str(t / "base.qcow2")),
    "overlay-parent-dir": lambda t: _overlay_on_qcow2(t, "sub/o.qcow2", "../base.qcow2"),
    "overlay-raw-base": lambda t: qemu.make_overlay(t / "o.qcow2", qemu.make_raw(t / "b.raw")),
    "overlay-missing": lambda t: qemu.make_overlay(
        t / "o.qcow2", "gone.qcow2", backing_fmt="qcow2", unsafe_size="1M"
    ),
    "overlay-no-format": lambda t: qemu.drop_backing_format(
        _overlay_on_qcow2(t, "o.qcow2", "base.qcow2")
    ),
    "overlay-v2-no-format": lambda t: qemu.drop_backing_format(
        _overlay_on_qcow2(t, "o.qcow2", "base.qcow2", compat="0.10")
    ),
    "data-file": lambda t: _data_file(t, backing=False),
    "data-file-and-backing": lambda t: _data_file(t, backing=True),
    "json-backing": lambda t: qemu.rebase_unsafe(
        qemu.make_qcow2(t / "o.qcow2"),
        'json:{"driver":"qcow2","file":{"driver":"file","filename":"/nowhere/b.qcow2"}}',
    ),
    "vmdk-sparse": lambda t: qemu.make_vmdk(t / "a.vmdk", "2M"),
    "vmdk-sparse-child": lambda t: qemu.make_vmdk(t / "c.vmdk", backing=_vmdk_parent(t)),
    "vmdk-split-child": lambda t: qemu.make_vmdk(
        t / "c.vmdk", backing=_vmdk_parent(t), subformat="twoGbMaxExtentSparse"
    ),
    "vmdk-flat": lambda t: qemu.make_vmdk(t / "f.vmdk", subformat="monolithicFlat"),
    "vmdk-hand-written-child": _flat_child,
}


def _data_file(tmp: Path, *, backing: bool) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    args: list[str | Path] = ["create", "-q", "-f", "qcow2", "-o", "data_file=data.raw"]
    if backing:
        qemu.make_raw(tmp / "b.raw")
        args += ["-F", "raw", "-b", "b.raw"]
    qemu.qemu_img(*args, tmp / "o.qcow2", "1M", cwd=tmp)
    return tmp / "o.qcow2"


@pytest.mark.parametrize("fixture", HEADER_FIXTURES, ids=list(HEADER_FIXTURES))
def test_header_matches_qemu_img_info(tmp_path: Path, fixture: str) -> None:
    image = HEADER_FIXTURES[fixture](tmp_path)
    ours = read_header(image)
    ref = qemu.info(image)
    specific: dict[str, Any] = ref.get("format-specific", {}).get("data", {})

    assert ours.format == ref["format"]
    assert ours.backing_file == ref.get("backing-filename")
    assert ours.is_disk_image == (ref["format"] != "raw")
    if ours.format == "qcow2":
        assert ours.backing_format == ref.get("backing-filename-format")
        assert ours.data_file == specific.get("data-file")
        assert ours.version == {"0.10": 2, "1.1": 3}[specific["compat"]]
        assert ours.virtual_size == ref["virtual-size"]
        assert ours.create_type is None
    elif ours.format == "vmdk":
        # qemu reports "vmdk" as the format of a VMDK parent; the header itself stores none.
        assert ours.backing_format is None
        assert ours.create_type == specific["create-type"]
        assert ours.version is None
        if specific["create-type"] == "monolithicSparse":
            assert ours.virtual_size == ref["virtual-size"]
    else:
        assert ours == ImageHeader("raw")


def test_fixtures_cover_what_the_issue_asks_for(tmp_path: Path) -> None:
    """The matrix above really contains the cases it is named after (it could silently drift)."""
    seen = {name: read_header(build(tmp_path / name)) for name, build in HEADER_FIXTURES.items()}
    assert seen["qcow2-v2"].version == 2
    assert seen["overlay-v2-relative"].version == 2
    assert seen["overlay-v3-relative"].version == 3
    assert seen["overlay-no-format"].backing_file == "base.qcow2"
    assert seen["overlay-no-format"].backing_format is None
    assert seen["overlay-v2-no-format"].backing_format is None
    assert seen["overlay-raw-base"].backing_format == "raw"
    assert seen["overlay-parent-dir"].backing_file == "../base.qcow2"
    assert seen["overlay-absolute"].backing_file == str(tmp_path / "overlay-absolute/base.qcow2")
    assert seen["data-file"].data_file == "data.raw"
    assert seen["data-file-and-backing"].backing_file == "b.raw"
    assert seen["vmdk-sparse-child"].backing_file == "p.vmdk"
    assert seen["vmdk-split-child"].create_type == "twoGbMaxExtentSparse"
    assert seen["vmdk-hand-written-child"].backing_file == "parent.vmdk"


@pytest.mark.parametrize("create_type", ["monolithicSparse", "vmfsSparse", "twoGbMaxExtentFlat"])
def test_hand_written_descriptor_parent_hint(tmp_path: Path, create_type: str) -> None:
    desc = tmp_path / "snap.vmdk"
    desc.write_text(
        _descriptor(create_type, 'RW 2048 VMFSSPARSE "snap-delta.vmdk"', parent="../base.vmdk")
    )
    assert read_header(desc) == ImageHeader(
        "vmdk", backing_file="../base.vmdk", create_type=create_type
    )


def test_descriptor_without_parent_and_with_empty_parent(tmp_path: Path) -> None:
    plain = _descriptor("monolithicFlat", 'RW 2048 FLAT "x-flat.vmdk" 0').encode()
    assert parse_header(plain) == ImageHeader("vmdk", create_type="monolithicFlat")
    # qemu treats an empty hint as no parent.
    empty = plain.replace(b"version=1\n", b'version=1\nparentFileNameHint=""\n')
    assert parse_header(empty).backing_file is None


def test_descriptor_found_by_version_line_after_comments() -> None:
    data = b'# a comment\n   \n\nversion=2\r\ncreateType="vmfs"\r\nparentFileNameHint="p.vmdk"\r\n'
    assert parse_header(data) == ImageHeader("vmdk", backing_file="p.vmdk", create_type="vmfs")


# --- broken headers ---------------------------------------------------------------------------


def _v3_overlay(tmp_path: Path) -> bytes:
    return _overlay_on_qcow2(tmp_path, "o.qcow2", "base.qcow2").read_bytes()[:HEAD_BYTES]


def _reader(whole: bytes) -> Callable[[int, int], bytes]:
    """``read_at`` over a whole file's bytes: short at its end, like ``os.pread``."""
    return lambda offset, length: whole[offset : offset + length]


def _patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def test_read_at_is_used_only_beyond_the_buffer(tmp_path: Path) -> None:
    data = _v3_overlay(tmp_path)
    calls: list[tuple[int, int]] = []

    def read_at(offset: int, length: int) -> bytes:
        calls.append((offset, length))
        return data[offset : offset + length]

    assert parse_header(data, read_at=read_at).backing_file == "base.qcow2"
    assert calls == []
    # The backing name lies after the extensions, beyond the first 112 bytes.
    with pytest.raises(ImageFormatError, match="beyond the 112 bytes read"):
        parse_header(data[:112])
    assert parse_header(data[:112], read_at=read_at) == parse_header(data)
    assert calls


# damage -> the reason the parser must give (so each check is exercised, not a neighbour)
QCOW2_DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated-fixed-header": (
        lambda d: d[:20],
        r"qcow2 header at offset 0 \(\+32\) lies beyond the end",
    ),
    "truncated-before-header-length": (lambda d: d[:100], "header_length at offset 100"),
    "truncated-in-extensions": (lambda d: d[:120], "backing format at offset 120"),
    "version-1": (lambda d: _patch(d, 4, ">I", 1), "unsupported qcow2 version 1"),
    "version-4": (lambda d: _patch(d, 4, ">I", 4), "unsupported qcow2 version 4"),
    "cluster-bits-too-small": (lambda d: _patch(d, 20, ">I", 8), "cluster_bits 8"),
    "cluster-bits-too-large": (lambda d: _patch(d, 20, ">I", 22), "cluster_bits 22"),
    "header-length-too-small": (lambda d: _patch(d, 100, ">I", 96), "96 is too small"),
    "header-length-beyond-cluster": (
        lambda d: _patch(d, 100, ">I", 65544),
        "65544 exceeds the cluster size",
    ),
    "backing-offset-beyond-cluster": (
        lambda d: _patch(d, 8, ">Q", 65536 + 8),
        "backing file offset 65544 is out of bounds",
    ),
    "backing-offset-inside-header": (
        lambda d: _patch(d, 8, ">Q", 16),
        "backing file offset 16 is out of bounds",
    ),
    "backing-offset-huge": (lambda d: _patch(d, 8, ">Q", 2**64 - 8), "out of bounds"),
    "backing-size-over-1023": (lambda d: _patch(d, 16, ">I", 1024), "length 1024 is too large"),
    # 8 bytes left in the 64 KiB cluster for a 10-byte name
    "backing-name-past-cluster": (
        lambda d: _patch(d, 8, ">Q", 65536 - 8),
        "name length 10 is too large",
    ),
    "backing-name-with-nul": (
        lambda d: d.replace(b"base.qcow2", b"base\0qcow2"),
        "backing file name contains a NUL",
    ),
    "extension-longer-than-area": (
        lambda d: _patch(d, 112 + 4, ">I", 60000),
        "extension 0xe2792aca is too large",
    ),
    "extension-header-past-area": (
        # the backing name moved to 4 bytes after the extension area starts
        lambda d: _patch(d, 8, ">Q", 116),
        "extension at 112 is too large",
    ),
    "backing-format-too-long": (
        lambda d: _patch(d, 112 + 4, ">I", 16),
        "format name length 16 is too large",
    ),
    "backing-format-not-utf8": (
        lambda d: d.replace(b"qcow2\0\0\0", b"qc\xffw2\0\0\0", 1),
        "backing format is not valid UTF-8",
    ),
}


@pytest.mark.parametrize("damage", QCOW2_DAMAGE, ids=list(QCOW2_DAMAGE))
def test_damaged_qcow2_is_an_image_format_error(tmp_path: Path, damage: str) -> None:
    good = _v3_overlay(tmp_path)
    assert good[112:116] == b"\xe2\x79\x2a\xca"  # the offsets patched above are the real ones
    spoil, reason = QCOW2_DAMAGE[damage]
    bad = spoil(good)
    assert bad != good
    with pytest.raises(ImageFormatError, match=reason):
        parse_header(bad, read_at=_reader(bad))
    # The same bytes on disk: read_header sees them through the file, pread included.
    image = tmp_path / "bad.qcow2"
    image.write_bytes(bad)
    with pytest.raises(ImageFormatError, match=reason):
        read_header(image)


def test_empty_backing_name_means_no_backing(tmp_path: Path) -> None:
    assert parse_header(_patch(_v3_overlay(tmp_path), 16, ">I", 0)).backing_file is None


def test_garbage_after_qcow2_magic(tmp_path: Path) -> None:
    rng = random.Random(4)
    for _ in range(200):
        data = b"QFI\xfb" + rng.randbytes(rng.randrange(0, 4096))
        with pytest.raises(ImageFormatError):
            parse_header(data)


def test_out_of_bounds_backing_offset_in_a_real_file(tmp_path: Path) -> None:
    """The name offset is valid for the cluster but lies beyond the end of the (short) file."""
    overlay = _overlay_on_qcow2(tmp_path, "o.qcow2", "base.qcow2")
    data = _patch(overlay.read_bytes()[:4096], 8, ">Q", 8192)
    overlay.write_bytes(data)
    with pytest.raises(ImageFormatError, match="beyond the end of the file"):
        read_header(overlay)


VMDK_DAMAGE: dict[str, bytes] = {
    "sparse-truncated": b"KDMV\x01\x00\x00\x00",
    "sparse-version-4": struct.pack("<4sIIQQQQ", b"KDMV", 4, 3, 2048, 128, 1, 20),
    "sparse-descriptor-beyond-file": struct.pack("<4sIIQQQQ", b"KDMV", 1, 3, 2048, 128, 1000, 20),
    "sparse-descriptor-huge-offset": struct.pack("<4sIIQQQQ", b"KDMV", 1, 3, 2048, 128, 2**63, 20),
    "sparse-descriptor-too-large": struct.pack("<4sIIQQQQ", b"KDMV", 1, 3, 2048, 128, 1, 2**40),
    "descriptor-without-create-type": b"# Disk DescriptorFile\nversion=1\nCID=1\n",
    "descriptor-unquoted-parent": _descriptor("vmfsSparse", "").encode()
    + b"parentFileNameHint=base.vmdk\n",
    "descriptor-unterminated-quote": _descriptor("vmfsSparse", "").encode()
    + b'parentFileNameHint="base.vmdk\n',
}


@pytest.mark.parametrize("damage", VMDK_DAMAGE, ids=list(VMDK_DAMAGE))
def test_damaged_vmdk_is_an_image_format_error(tmp_path: Path, damage: str) -> None:
    image = tmp_path / "bad.vmdk"
    image.write_bytes(VMDK_DAMAGE[damage])
    with pytest.raises(ImageFormatError):
        read_header(image)


def test_sparse_vmdk_descriptor_read_beyond_the_first_bytes(tmp_path: Path) -> None:
    data = qemu.make_vmdk(tmp_path / "c.vmdk", backing=_vmdk_parent(tmp_path))
    head = data.read_bytes()[:HEAD_BYTES]
    with pytest.raises(ImageFormatError, match="beyond the 512 bytes read"):
        parse_header(head[:512])
    whole = parse_header(head[:512], read_at=_reader(head))
    assert whole.backing_file == "p.vmdk"


# --- files that are not images ----------------------------------------------------------------


def test_empty_and_random_files_are_raw(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.touch()
    noise = tmp_path / "noise"
    noise.write_bytes(random.Random(1).randbytes(200_000))
    assert read_header(empty) == ImageHeader("raw")
    assert read_header(noise) == ImageHeader("raw")
    assert not read_header(noise).is_disk_image


def test_fifo_is_raw_and_never_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[ImageHeader] = []
    # A blocking open would hang this thread (not the test run): it is a daemon thread.
    reader = threading.Thread(target=lambda: result.append(read_header(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "read_header blocked on a FIFO"
    assert result == [ImageHeader("raw")]


def test_directory_and_character_device_are_raw(tmp_path: Path) -> None:
    assert read_header(tmp_path) == ImageHeader("raw")
    assert read_header("/dev/zero") == ImageHeader("raw")


def test_missing_file_raises_os_error_unchanged(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "nope")


# --- robustness -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qcow2-v3", "qcow2-v2", "vmdk-sparse", "vmdk-descriptor"])
def test_random_mutations_raise_only_image_format_error(tmp_path: Path, kind: str) -> None:
    if kind == "vmdk-sparse":
        image = qemu.make_vmdk(tmp_path / "c.vmdk", backing=_vmdk_parent(tmp_path))
        span = 2048  # header and embedded descriptor
    elif kind == "vmdk-descriptor":
        image = _flat_child(tmp_path)
        span = image.stat().st_size
    else:
        compat = "1.1" if kind == "qcow2-v3" else "0.10"
        image = _overlay_on_qcow2(tmp_path, "o.qcow2", "base.qcow2", compat=compat)
        span = 512  # fixed header, extensions and backing name
    good = image.read_bytes()[:HEAD_BYTES]
    assert parse_header(good).is_disk_image
    rng = random.Random(20240611)
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(span)
            # Mostly single bytes; sometimes a whole big-endian word set to an extreme value.
            if rng.random() < 0.2 and at + 4 <= len(data):
                data[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\0\0\x10\0"])
            else:
                data[at] = rng.randrange(256)
        cut = bytes(data[: rng.choice([len(data), rng.randrange(len(data) + 1)])])
        try:
            parse_header(cut, read_at=_reader(bytes(data)))
            parse_header(cut)
            outcomes["parsed"] += 1
        except ImageFormatError:
            outcomes["refused"] += 1
    # Both branches are exercised, so the loop really tests something.
    assert outcomes["parsed"] > 100
    assert outcomes["refused"] > 100


# --- VMDK descriptors read the way qemu reads them (CVE-2024-32498) ---------------------------


def _flat_over(tmp: Path, *create_lines: str) -> Path:
    """A descriptor whose extent is a plain host file, with the given createType lines."""
    (tmp / "host-file").write_bytes(b"HOST-SECRET".ljust(1 << 20, b"\0"))
    desc = tmp / "evil.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        + "".join(f"{line}\n" for line in create_lines)
        + f'RW 2048 FLAT "{tmp / "host-file"}" 0\n'
    )
    return desc


@pytest.mark.parametrize(
    "lines",
    [
        ['createType="monolithicFlat"', 'createType="monolithicSparse"'],
        ['#createType="monolithicFlat"', 'createType="monolithicSparse"'],
        ['createType = "monolithicSparse"'],
        ['createType="monolithicSparse" "x"'],
    ],
    ids=["duplicate", "commented-first", "spaced", "trailing-quote"],
)
def test_descriptor_qemu_reads_differently_is_refused(tmp_path: Path, lines: list[str]) -> None:
    desc = _flat_over(tmp_path, *lines)
    with pytest.raises(ImageFormatError, match="createType"):
        read_header(desc)


def test_qemu_takes_the_first_create_type(tmp_path: Path) -> None:
    # Why the duplicate is refused: qemu keeps the first, a last-wins parser the second.
    desc = _flat_over(tmp_path, 'createType="monolithicFlat"', 'createType="monolithicSparse"')
    assert qemu.info(desc)["format-specific"]["data"]["create-type"] == "monolithicFlat"


def test_sparse_header_of_capacity_zero_with_a_descriptor_is_refused(tmp_path: Path) -> None:
    # qemu opens such a file's embedded descriptor as a descriptor file, extents included.
    image = qemu.make_vmdk(tmp_path / "z.vmdk")
    with image.open("r+b") as f:
        f.seek(12)  # capacity (sectors), after magic, version, flags
        f.write(struct.pack("<Q", 0))
    with pytest.raises(ImageFormatError, match="capacity 0"):
        read_header(image)

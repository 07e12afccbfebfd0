"""Speed without a change of meaning: one read per base per scan, and a short first read."""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path

from imagecache.formats import HEAD_BYTES, ImageHeader, parse_header, read_header, resolve_chain
from imagecache.formats.chain import HeaderCache
from tests import qemu


def _host(tmp: Path) -> tuple[Path, list[Path]]:
    """Two bases (one a qcow2 on the other), six overlays on them, one on a missing base."""
    raw = qemu.make_raw(tmp / "_base" / "raw")
    snap = qemu.make_overlay(tmp / "_base" / "snap", raw)
    disks = [qemu.make_overlay(tmp / f"i{n}" / "disk", raw) for n in range(3)]
    disks += [
        qemu.make_overlay(tmp / f"j{n}" / "disk", snap, backing_fmt="qcow2") for n in range(2)
    ]
    disks.append(qemu.make_overlay(tmp / "k" / "disk", "../_base/raw"))
    gone = tmp / "_base" / "gone"
    disks.append(qemu.make_overlay(tmp / "m" / "disk", gone, unsafe_size="1M"))
    return raw, disks


def test_a_shared_cache_gives_the_same_chains(tmp_path: Path) -> None:
    _, disks = _host(tmp_path)
    headers = HeaderCache()
    assert [resolve_chain(d, headers=headers) for d in disks] == [resolve_chain(d) for d in disks]
    # raw, snap, gone (missing is remembered too), and ../_base/raw by the name it was opened as.
    assert len(headers) == 4


def test_each_base_is_read_once_per_cache(tmp_path: Path) -> None:
    raw, disks = _host(tmp_path)
    headers = HeaderCache()
    first = resolve_chain(disks[0], headers=headers)
    raw.unlink()
    # Within one scan the base is what it was when first read; a new scan (cache) sees it gone.
    assert resolve_chain(disks[1], headers=headers).links == first.links
    assert resolve_chain(disks[1], headers=headers).missing is None
    assert resolve_chain(disks[1]).missing == str(raw)


def test_short_first_read_parses_names_far_into_the_header(tmp_path: Path) -> None:
    """A backing name beyond the first 4 KiB (qemu allows it anywhere in the first cluster)."""
    base = qemu.make_qcow2(tmp_path / "base.qcow2")
    disk = qemu.make_overlay(tmp_path / "disk", base, backing_fmt="qcow2")
    far = 40000
    name = str(base).encode()
    with disk.open("r+b") as fh:
        fh.seek(far)
        fh.write(name)
        fh.seek(8)
        fh.write(struct.pack(">QI", far, len(name)))
    assert qemu.info(disk)["backing-filename"] == str(base)
    assert read_header(disk).backing_file == str(base)


def _parse_first_64k(path: Path) -> ImageHeader:
    """What the header parser made of a file before: all of its first 64 KiB at once."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return parse_header(os.read(fd, HEAD_BYTES), read_at=functools.partial(_pread, fd))
    finally:
        os.close(fd)


def _pread(fd: int, offset: int, length: int) -> bytes:
    return os.pread(fd, length, offset)


def test_short_first_read_changes_nothing(tmp_path: Path) -> None:
    long_text = tmp_path / "desc.vmdk"
    comments = b"# padding\n" * 600  # the version line lies beyond the first 4 KiB
    long_text.write_bytes(
        comments + b'version=1\ncreateType="monolithicFlat"\nparentFileNameHint="p.vmdk"\n'
    )
    files = [
        long_text,
        qemu.make_vmdk(tmp_path / "sparse.vmdk"),
        qemu.make_vmdk(tmp_path / "child.vmdk", backing=tmp_path / "sparse.vmdk"),
        qemu.make_overlay(tmp_path / "o.qcow2", qemu.make_raw(tmp_path / "b.raw")),
        tmp_path / "b.raw",
    ]
    for path in files:
        assert read_header(path) == _parse_first_64k(path), path
    assert read_header(long_text).backing_file == "p.vmdk"


def test_a_base_declared_raw_by_one_overlay_and_qcow2_by_another(tmp_path: Path) -> None:
    """Found by stat alone for the first, the header is still read for the second (either order)."""
    raw = qemu.make_raw(tmp_path / "_base" / "raw")
    snap = qemu.make_overlay(tmp_path / "_base" / "snap", raw)
    as_raw = qemu.make_overlay(tmp_path / "a" / "disk", snap, backing_fmt="raw")
    as_qcow2 = qemu.make_overlay(tmp_path / "b" / "disk", snap, backing_fmt="qcow2")
    for order in ((as_raw, as_qcow2), (as_qcow2, as_raw)):
        headers = HeaderCache()
        chains = {top: resolve_chain(top, headers=headers) for top in order}
        assert chains[as_raw].links == (str(snap),)
        assert chains[as_qcow2].links == (str(snap), str(raw))
        assert all(chain.complete for chain in chains.values())

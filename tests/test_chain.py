"""Backing chains followed through headers, checked against ``qemu-img info --backing-chain``."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from imagecache.errors import ImageFormatError
from imagecache.formats import MAX_CHAIN_DEPTH, BackingChain, resolve_chain
from tests import qemu
from tests.opens import OpenWatch

Builder = Callable[[Path], Path]


def _norm(path: str | Path) -> str:
    # qemu's filenames are the overlay's path joined with the backing name, never normalised.
    return os.path.normpath(Path.cwd() / path)


def _qcow2_base(tmp: Path, name: str = "base.qcow2", *, compat: str = "1.1") -> Path:
    return qemu.make_qcow2(tmp / name, compat=compat)


def _three_deep(tmp: Path) -> Path:
    """raw base <- v2 overlay (absolute name) <- v3 overlay (../ name) <- v3 top (relative)."""
    base = qemu.make_raw(tmp / "_base" / "0a1b")
    qemu.make_overlay(tmp / "mid" / "m.qcow2", base, compat="0.10")
    qemu.make_overlay(tmp / "up" / "u.qcow2", "../mid/m.qcow2", backing_fmt="qcow2")
    return qemu.make_overlay(tmp / "up" / "top.qcow2", "u.qcow2", backing_fmt="qcow2")


def _vmdk(tmp: Path, name: str) -> str:
    qemu.make_vmdk(tmp / name)
    return name


def _data_file_overlay(tmp: Path) -> Path:
    qemu.make_raw(tmp / "b.raw")
    args = ["create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "-F", "raw", "-b", "b.raw"]
    qemu.qemu_img(*args, tmp / "o.qcow2", "1M", cwd=tmp)
    return tmp / "o.qcow2"


CHAIN_FIXTURES: dict[str, Builder] = {
    "no-backing": _qcow2_base,
    "raw-alone": lambda t: qemu.make_raw(t / "r.raw"),
    "v3-relative": lambda t: qemu.make_overlay(
        t / "o.qcow2", _qcow2_base(t).name, backing_fmt="qcow2"
    ),
    "v2-relative": lambda t: qemu.make_overlay(
        t / "o.qcow2", _qcow2_base(t, compat="0.10").name, backing_fmt="qcow2", compat="0.10"
    ),
    "raw-base": lambda t: qemu.make_overlay(t / "o.qcow2", qemu.make_raw(t / "b.raw").name),
    "absolute": lambda t: qemu.make_overlay(t / "i/disk", _qcow2_base(t), backing_fmt="qcow2"),
    "parent-dir": lambda t: qemu.make_overlay(
        t / "i/disk", f"../{_qcow2_base(t).name}", backing_fmt="qcow2"
    ),
    "dot-segments": lambda t: qemu.make_overlay(
        t / "i/disk", f"./../i/../{_qcow2_base(t).name}", backing_fmt="qcow2"
    ),
    "three-deep": _three_deep,
    "no-backing-format": lambda t: qemu.drop_backing_format(
        qemu.make_overlay(t / "o.qcow2", _qcow2_base(t).name, backing_fmt="qcow2")
    ),
    "data-file-and-backing": _data_file_overlay,
    "vmdk-child": lambda t: qemu.make_vmdk(t / "c.vmdk", backing=_vmdk(t, "p.vmdk")),
    "vmdk-split-child": lambda t: qemu.make_vmdk(
        t / "c.vmdk", backing=_vmdk(t, "p.vmdk"), subformat="twoGbMaxExtentSparse"
    ),
    "qcow2-on-vmdk-child": lambda t: qemu.make_overlay(
        t / "o.qcow2",
        qemu.make_vmdk(t / "c.vmdk", backing=_vmdk(t, "p.vmdk")).name,
        backing_fmt="vmdk",
    ),
    "file-protocol": lambda t: qemu.rebase_unsafe(
        qemu.make_qcow2(t / "o.qcow2"), f"file:{_qcow2_base(t)}"
    ),
}


@pytest.mark.parametrize("fixture", CHAIN_FIXTURES, ids=list(CHAIN_FIXTURES))
def test_chain_matches_qemu_img_backing_chain(tmp_path: Path, fixture: str) -> None:
    top = CHAIN_FIXTURES[fixture](tmp_path)
    ref = qemu.info_chain(top)
    chain = resolve_chain(top)

    assert chain.complete, chain.error
    assert chain.missing is None
    assert chain.path == _norm(ref[0]["filename"])
    assert list(chain.links) == [_norm(image["filename"]) for image in ref[1:]]
    assert chain.header.backing_file == ref[0].get("backing-filename")
    assert chain.header.format == ref[0]["format"]
    if chain.header.format == "qcow2":
        assert chain.header.backing_format == ref[0].get("backing-filename-format")


def test_chain_fixtures_are_as_deep_as_named(tmp_path: Path) -> None:
    depth = {
        name: len(resolve_chain(build(tmp_path / name)).links)
        for name, build in CHAIN_FIXTURES.items()
    }
    assert depth["three-deep"] == 3
    assert depth["qcow2-on-vmdk-child"] == 2
    assert depth["no-backing"] == depth["raw-alone"] == 0
    assert all(depth[name] == 1 for name in ("v3-relative", "absolute", "parent-dir", "vmdk-child"))


def test_relative_top_resolves_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _three_deep(tmp_path)
    monkeypatch.chdir(tmp_path / "mid")
    chain = resolve_chain("../up/top.qcow2")
    assert chain.path == str(tmp_path / "up/top.qcow2")
    assert chain.links == (
        str(tmp_path / "up/u.qcow2"),
        str(tmp_path / "mid/m.qcow2"),
        str(tmp_path / "_base/0a1b"),
    )


def test_link_ids_are_the_files_found_through_each_name(tmp_path: Path) -> None:
    top = _three_deep(tmp_path)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "current").symlink_to(tmp_path / "_base" / "0a1b")
    qemu.rebase_unsafe(tmp_path / "mid" / "m.qcow2", "../links/current", backing_fmt="raw")
    chain = resolve_chain(top)
    assert chain.complete and chain.links[-1] == str(tmp_path / "links" / "current")
    stats = [os.stat(link) for link in chain.links]
    assert chain.link_ids == tuple((st.st_dev, st.st_ino) for st in stats)
    assert chain.link_ids[-1] == _file_id(tmp_path / "_base" / "0a1b")
    # A missing last link has no id; the links before it keep theirs.
    os.unlink(tmp_path / "_base" / "0a1b")
    chain = resolve_chain(top)
    assert chain.missing == chain.links[-1]
    assert chain.link_ids == tuple((st.st_dev, st.st_ino) for st in stats[:-1])


def _file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


# --- symlinks: qemu resolves a relative name against the path it opened -------------------------


def test_symlinked_top_is_not_resolved(tmp_path: Path) -> None:
    real = qemu.make_overlay(
        tmp_path / "real/disk", "base.qcow2", backing_fmt="qcow2", unsafe_size="1M"
    )
    (tmp_path / "view").mkdir()
    link = tmp_path / "view/disk"
    link.symlink_to(real)
    # qemu looks for the backing file next to the symlink, not next to its target.
    with pytest.raises(subprocess.CalledProcessError) as refused:
        qemu.info_chain(link)
    assert "view/base.qcow2" in refused.value.stderr
    chain = resolve_chain(link)
    assert chain.path == str(link)
    assert chain.missing == str(tmp_path / "view/base.qcow2")
    _qcow2_base(tmp_path / "view")
    ref = qemu.info_chain(link)
    assert resolve_chain(link).links == (_norm(ref[1]["filename"]),)


def test_dot_dot_after_a_symlinked_directory_follows_the_link(tmp_path: Path) -> None:
    """``link/../base`` is the base next to the link's target, where qemu and the kernel look."""
    _qcow2_base(tmp_path / "real")
    qemu.make_overlay(tmp_path / "real/inst/disk", "../base.qcow2", backing_fmt="qcow2")
    _qcow2_base(tmp_path / "elsewhere")  # what a lexical normpath would wrongly name
    (tmp_path / "elsewhere/inst").symlink_to(tmp_path / "real/inst")
    top = tmp_path / "elsewhere/inst/disk"
    ref = qemu.info_chain(top)
    chain = resolve_chain(top)
    assert chain.complete
    assert chain.links == (os.path.realpath(ref[1]["filename"]),)
    assert chain.links == (str(tmp_path / "real/base.qcow2"),)


# --- a backing file declared raw is a guest's bytes: never parsed, as qemu never parses it ------


@pytest.mark.parametrize("declared", ["raw", "file"])
def test_forged_header_in_a_declared_raw_base_is_not_followed(
    tmp_path: Path, declared: str
) -> None:
    """A guest writes its raw base's bytes; a qcow2 header it forges there names a host file."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"root's")
    base = qemu.rebase_unsafe(
        qemu.make_qcow2(tmp_path / "_base" / "0a1b"), str(secret), backing_fmt="raw"
    )
    top = qemu.make_overlay(tmp_path / "i" / "disk", base, backing_fmt=declared)
    ref = qemu.info_chain(top)
    assert [(image["filename"], image["format"]) for image in ref[1:]] == [(str(base), declared)]
    with OpenWatch(secret, base) as watch:
        chain = resolve_chain(top)
        assert watch.opened() == set()
    assert chain.complete, chain.error
    assert chain.links == (str(base),)
    assert chain.header.backing_format == declared


def test_garbage_header_in_a_declared_raw_base_is_not_an_error(tmp_path: Path) -> None:
    """Otherwise any tenant could make the view incomplete, and stop every removal on its host."""
    base = tmp_path / "_base" / "0a1b"
    base.parent.mkdir()
    base.write_bytes(b"QFI\xfb" + b"\xff" * 1020)
    top = qemu.make_overlay(tmp_path / "i" / "disk", base, backing_fmt="raw")
    assert [image["format"] for image in qemu.info_chain(top)] == ["qcow2", "raw"]
    chain = resolve_chain(top)
    assert chain.complete, chain.error
    assert chain.links == (str(base),)


def test_declared_raw_base_still_needs_to_exist_and_be_a_file(tmp_path: Path) -> None:
    gone = qemu.make_overlay(tmp_path / "a.qcow2", "gone", backing_fmt="raw", unsafe_size="1M")
    assert resolve_chain(gone).missing == str(tmp_path / "gone")
    (tmp_path / "dir").mkdir()
    odd = qemu.make_overlay(tmp_path / "b.qcow2", "dir", backing_fmt="raw", unsafe_size="1M")
    assert resolve_chain(odd).error == (
        f"backing file {tmp_path / 'dir'} is not a regular file or block device"
    )


# --- incomplete and dangling chains -------------------------------------------------------------


def test_missing_backing_file_is_recorded_not_an_error(tmp_path: Path) -> None:
    top = qemu.make_overlay(
        tmp_path / "i/disk", "../_base/gone", backing_fmt="raw", unsafe_size="1M"
    )
    with pytest.raises(subprocess.CalledProcessError):
        qemu.info_chain(top)
    ref = qemu.info(top)
    chain = resolve_chain(top)
    assert chain.header.backing_file == ref["backing-filename"] == "../_base/gone"
    assert chain.complete
    assert chain.missing == str(tmp_path / "_base/gone") == _norm(ref["full-backing-filename"])
    assert chain.links == (chain.missing,)


def test_missing_file_deeper_in_the_chain(tmp_path: Path) -> None:
    mid = qemu.make_overlay(tmp_path / "mid.qcow2", "gone.raw", unsafe_size="1M")
    top = qemu.make_overlay(tmp_path / "top.qcow2", mid.name, backing_fmt="qcow2", unsafe_size="1M")
    chain = resolve_chain(top)
    assert chain.links == (str(mid), str(tmp_path / "gone.raw"))
    assert chain.missing == str(tmp_path / "gone.raw")
    assert chain.complete


def test_json_pseudo_filename_cannot_be_resolved(tmp_path: Path) -> None:
    base = _qcow2_base(tmp_path)
    name = f'json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{base}"}}}}'
    top = qemu.rebase_unsafe(qemu.make_qcow2(tmp_path / "o.qcow2"), name)
    # qemu itself can follow it; we cannot, so the view must be marked incomplete.
    assert len(qemu.info_chain(top)) == 2
    chain = resolve_chain(top)
    assert chain.header.backing_file == name
    assert not chain.complete
    assert chain.error is not None
    assert "json:" in chain.error
    assert chain.links == ()
    assert chain.missing is None


@pytest.mark.parametrize("name", ["nbd://localhost:10809/disk", "rbd:pool/image", "file:rel.qcow2"])
def test_protocol_names_cannot_be_resolved(tmp_path: Path, name: str) -> None:
    top = qemu.rebase_unsafe(qemu.make_qcow2(tmp_path / "o.qcow2"), name)
    chain = resolve_chain(top)
    assert chain.header.backing_file == name
    assert chain.error == f"backing file is not a local path: {name}"
    assert chain.links == ()


def test_loop_is_an_error(tmp_path: Path) -> None:
    _qcow2_base(tmp_path)
    a = qemu.make_overlay(tmp_path / "a.qcow2", "base.qcow2", backing_fmt="qcow2")
    b = qemu.make_overlay(tmp_path / "b.qcow2", "a.qcow2", backing_fmt="qcow2")
    qemu.rebase_unsafe(a, "b.qcow2")
    with pytest.raises(subprocess.CalledProcessError) as refused:
        qemu.info_chain(b)
    assert "infinite loop" in refused.value.stderr
    chain = resolve_chain(b)
    assert chain.error == f"backing chain loops back to {b}"
    assert chain.links == (str(a),)


def test_self_loop_through_a_symlink_is_an_error(tmp_path: Path) -> None:
    top = qemu.rebase_unsafe(qemu.make_qcow2(tmp_path / "o.qcow2"), "alias.qcow2")
    (tmp_path / "alias.qcow2").symlink_to("o.qcow2")
    chain = resolve_chain(top)
    assert chain.error == f"backing chain loops back to {tmp_path / 'alias.qcow2'}"
    assert chain.links == ()


def _ladder(tmp: Path, overlays: int) -> Path:
    top = qemu.make_raw(tmp / "l0")
    for n in range(1, overlays + 1):
        fmt = "raw" if n == 1 else "qcow2"
        top = qemu.make_overlay(tmp / f"l{n}", top.name, backing_fmt=fmt)
    return top


def test_depth_limit(tmp_path: Path) -> None:
    top = _ladder(tmp_path, 3)
    assert resolve_chain(top, max_depth=3).complete
    shallow = resolve_chain(top, max_depth=2)
    assert shallow.error == "backing chain is deeper than 2 files"
    assert shallow.links == (str(tmp_path / "l2"), str(tmp_path / "l1"))


def test_default_depth_limit(tmp_path: Path) -> None:
    top = _ladder(tmp_path, MAX_CHAIN_DEPTH + 1)
    assert len(qemu.info_chain(top)) == MAX_CHAIN_DEPTH + 2  # qemu itself has no such limit
    chain = resolve_chain(top)
    assert chain.error == f"backing chain is deeper than {MAX_CHAIN_DEPTH} files"
    assert len(chain.links) == MAX_CHAIN_DEPTH


def test_garbage_backing_header_is_recorded(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb\x00\x00\x00\x07" + bytes(200))
    top = qemu.make_overlay(tmp_path / "o.qcow2", bad.name, backing_fmt="qcow2", unsafe_size="1M")
    chain = resolve_chain(top)
    assert chain.links == (str(bad),)
    assert chain.error == f"cannot read backing file {bad}: unsupported qcow2 version 7"
    assert not chain.complete


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_backing_that_is_not_a_file_is_an_error(tmp_path: Path, kind: str) -> None:
    odd = tmp_path / "odd"
    if kind == "directory":
        odd.mkdir()
    else:
        os.mkfifo(odd)
    top = qemu.make_overlay(tmp_path / "o.qcow2", odd.name, unsafe_size="1M")
    result: list[BackingChain] = []
    worker = threading.Thread(target=lambda: result.append(resolve_chain(top)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "resolve_chain blocked"
    assert result[0].links == (str(odd),)
    assert result[0].error == f"backing file {odd} is not a regular file or block device"


@pytest.mark.parametrize("via", ["itself", "a symlink"])
def test_backing_that_is_not_a_file_is_never_opened(tmp_path: Path, via: str) -> None:
    """A backing name comes from a header: opening a device it names has effects (a watchdog
    arms, a tape rewinds), so it is refused on ``stat`` alone. A FIFO shows whether it was."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    name = fifo.name
    if via == "a symlink":
        (tmp_path / "alias").symlink_to(fifo)
        name = "alias"
    top = qemu.make_overlay(tmp_path / "o.qcow2", name, unsafe_size="1M")
    with OpenWatch(fifo) as watch:
        chain = resolve_chain(top)
        assert watch.opened() == set()
        os.close(os.open(tmp_path / name, os.O_RDONLY | os.O_NONBLOCK))
        assert watch.opened() == {fifo}  # the watch does see an open through that name
    link = tmp_path / name
    assert chain.links == (str(link),)
    assert chain.error == f"backing file {link} is not a regular file or block device"


def test_character_device_backing_is_refused(tmp_path: Path) -> None:
    top = qemu.make_overlay(tmp_path / "o.qcow2", "/dev/null", unsafe_size="1M")
    chain = resolve_chain(top)
    assert chain.links == ("/dev/null",)
    assert chain.error == "backing file /dev/null is not a regular file or block device"


def test_problems_with_the_top_image_propagate(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        resolve_chain(tmp_path / "nope")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb\x00\x00\x00\x03")
    with pytest.raises(ImageFormatError):
        resolve_chain(bad)


def test_a_backing_name_that_is_not_utf8_is_followed_as_the_bytes_it_is(tmp_path: Path) -> None:
    # Linux names are bytes and qemu opens them as stored; refusing one made every pass on a
    # host with such an instance directory incomplete (found by the hostile-host property test).
    odd = tmp_path / os.fsdecode(b"inst-\xff\n")
    odd.mkdir()
    base = qemu.make_raw(odd / os.fsdecode(b"base-\xfe"))
    top = qemu.make_overlay(odd / "disk", base, backing_fmt="raw")
    chain = resolve_chain(top)
    assert chain.complete and chain.links == (str(base),) and chain.missing is None
    assert chain.link_ids == ((base.stat().st_dev, base.stat().st_ino),)

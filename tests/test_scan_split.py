"""The scan split over two processes finds exactly what one process finds, on hostile hosts.

Real files, real qcow2 overlays made by qemu-img, a real bind mount where the machine allows it,
real forks: ``split_at`` only says from how many directories the second process is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecache import naming
from imagecache.layout import Layout
from imagecache.model import Disk, Problem, ProblemCode
from imagecache.sources import disks, split
from tests.qemu import make_overlay, make_raw

FP = naming.fingerprint("img-1")
GARBAGE = b"QFI\xfb" + b"\xff" * 100


@contextlib.contextmanager
def forks() -> Iterator[list[int]]:
    """The pids of the processes forked meanwhile (seen by the interpreter, not patched)."""
    seen: list[int] = []
    active = [True]

    def after() -> None:
        if active[0]:
            seen.append(os.getpid())

    os.register_at_fork(after_in_parent=after)
    try:
        yield seen
    finally:
        active[0] = False  # hooks cannot be unregistered: this one goes quiet


Scanned = tuple[tuple[Disk, ...], tuple[Problem, ...]]


def both(inst: Path, skip: frozenset[str] = frozenset()) -> tuple[Scanned, Scanned]:
    layout = Layout(str(inst), "_base")
    one = disks.scan_instances(layout, split_at=None, skip=skip)
    two = disks.scan_instances(layout, split_at=2, skip=skip)
    return one, two


def hostile_host(tmp_path: Path, n: int = 24) -> Path:
    inst = tmp_path / "instances"
    base = inst / "_base"
    make_raw(base / FP)
    template = make_overlay(tmp_path / "template.qcow2", base / FP)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i in range(n):
        d = inst / f"u{i:03d}"
        d.mkdir(parents=True)
        (d / "disk").write_bytes(template.read_bytes())
        (d / "console.log").write_bytes(GARBAGE if i % 5 == 0 else b"booted\n")
        info = {str(d / "disk"): "raw" if i % 7 == 0 else "qcow2"}
        (d / "disk.info").write_text(json.dumps(info))
        if i % 3 == 0:
            (d / "disk.local").write_bytes(GARBAGE)  # a garbage header: blocking
        if i % 4 == 0:
            (d / "disk.swap").symlink_to(tmp_path / "missing" / "swap")  # dangling
        if i % 6 == 0:
            (d / "snap" / "deeper").mkdir(parents=True)
            (d / "snap" / "deeper" / "delta").write_bytes(template.read_bytes())
            (d / "out").symlink_to(elsewhere)  # leads out of the tree
        if i % 8 == 0:
            os.mkfifo(d / "fifo")
        if i % 9 == 0:
            (d / os.fsdecode(b"disk.\xff\x1b[31m")).write_bytes(template.read_bytes())
    (inst / "linked").symlink_to(elsewhere)  # a symlinked instance directory
    make_overlay(elsewhere / "disk", base / FP)
    (inst / "gone").symlink_to(tmp_path / "nothing")
    os.chmod(inst / "u005", 0)  # unlistable (root still lists it: then just one more dir)
    return inst


def test_split_and_one_process_find_the_same_on_a_hostile_host(tmp_path: Path) -> None:
    inst = hostile_host(tmp_path)
    with forks() as forked:
        one, two = both(inst)
    assert forked, "the scan was not split"
    assert one == two
    found, problems = one
    assert len(found) > 24 and any(p.blocking for p in problems)  # the host is what it claims


def test_skipped_directories_stay_skipped(tmp_path: Path) -> None:
    inst = hostile_host(tmp_path, 12)
    skip = frozenset({"u001", "u010", "u011"})
    one, two = both(inst, skip=skip)
    assert one == two
    assert not any("/u010/" in d.path for d in one[0])


@pytest.fixture
def bind_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    source, target = tmp_path / "instances" / "a" / "sub", tmp_path / "instances" / "z" / "sub"
    source.mkdir(parents=True)
    target.mkdir(parents=True)
    argv = ["mount", "--bind", str(source), str(target)]
    done = subprocess.run(argv, capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    try:
        yield source, target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_directory_both_halves_meet_is_scanned_once_as_in_one_process(
    tmp_path: Path, bind_mount: tuple[Path, Path]
) -> None:
    source, _ = bind_mount
    inst = tmp_path / "instances"
    make_raw(inst / "_base" / FP)
    make_overlay(source / "disk", inst / "_base" / FP)
    for name in ("a", "z"):
        make_overlay(inst / name / "disk", inst / "_base" / FP)
    one, two = both(inst)  # a in the parent's half, z (with the same sub) in the child's
    assert one == two
    paths = [d.path for d in one[0]]
    assert paths == [f"{inst}/a/disk", f"{inst}/a/sub/disk", f"{inst}/z/disk"]


def test_no_fork_while_another_thread_runs(tmp_path: Path) -> None:
    inst = hostile_host(tmp_path, 6)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with forks() as forked:
            one, two = both(inst)
    finally:
        stop.set()
        other.join()
    assert forked == [] and one == two


def test_few_directories_are_scanned_in_one_process(tmp_path: Path) -> None:
    inst = hostile_host(tmp_path, 6)
    with forks() as forked:
        disks.scan_instances(Layout(str(inst), "_base"))  # the default threshold: 2,000
    assert forked == []


def test_the_child_writes_nothing_and_prints_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    inst = hostile_host(tmp_path, 16)
    before = sorted((p, p.lstat().st_mtime_ns) for p in tmp_path.rglob("*"))
    capfd.readouterr()
    with forks() as forked:
        both(inst)
    assert forked
    assert capfd.readouterr() == ("", "")
    assert sorted((p, p.lstat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


# -- a child that fails is ignored: the parent scans that half --------------------------------


def _found(n: int) -> split.Found:
    disk = Disk("/i/u/disk", "u", "qcow2", ("/i/_base/x",), None, ((1, 2),), (1, 3))
    problem = Problem(ProblemCode.HEADER_GARBAGE, os.fsdecode(b"/i/u/\xff"), "garbage\n")
    return split.Found([disk] * n, [problem], {(1, 2), None})


def test_an_answer_comes_back_whole() -> None:
    child = split.start(lambda: _found(100_000))  # megabytes: more than a pipe holds
    assert child is not None
    assert split.collect(child) == _found(100_000)


def _raises() -> split.Found:
    raise KeyboardInterrupt


def _dies() -> split.Found:
    os.kill(os.getpid(), 9)
    raise AssertionError("unreachable")


def _unencodable() -> split.Found:
    return split.Found([object()], [], set())  # type: ignore[list-item]


@pytest.mark.parametrize("scan", [_raises, _dies, _unencodable])
def test_a_failed_child_is_none(scan: object) -> None:
    child = split.start(scan)  # type: ignore[arg-type]
    assert child is not None
    assert split.collect(child) is None


@pytest.mark.parametrize(
    "answer",
    [None, (), ([], []), ([("x",)], [], []), ([], [("no-such-code", "r", "m")], []), ([], [], [1])],
)
def test_a_malformed_answer_is_refused(answer: object) -> None:
    with pytest.raises((ValueError, TypeError, KeyError, IndexError)):
        split._decode(answer)


# -- property: any small hostile host, any split point ------------------------------------------

_NAMES = st.sampled_from(["disk", "disk.local", "disk.info", "console.log", "x.part", "sub"])
_KINDS = st.sampled_from(["overlay", "garbage", "raw", "dangling", "fifo", "dir", "info-raw"])
_ODD = st.sampled_from(["", "\x1b", os.fsdecode(b"\xfe"), "\n", " "])


@st.composite
def _hosts(draw: st.DrawFn) -> list[tuple[str, list[tuple[str, str]]]]:
    dirs = []
    for i in range(draw(st.integers(2, 7))):
        files = draw(st.lists(st.tuples(_NAMES, _KINDS), max_size=4, unique_by=lambda f: f[0]))
        dirs.append((f"d{i}{draw(_ODD)}", files))
    return dirs


def _build(root: Path, host: list[tuple[str, list[tuple[str, str]]]], template: bytes) -> Path:
    inst = root / "instances"
    for name, files in host:
        d = inst / name
        d.mkdir(parents=True)
        for fname, kind in files:
            path = d / fname
            if kind == "overlay":
                path.write_bytes(template)
            elif kind == "garbage":
                path.write_bytes(GARBAGE)
            elif kind == "raw":
                path.write_bytes(b"\0" * 512)
            elif kind == "dangling":
                path.symlink_to(root / "nowhere")
            elif kind == "fifo":
                os.mkfifo(path)
            elif kind == "dir":
                path.mkdir()
                (path / "disk").write_bytes(template)
            else:
                path.write_text(json.dumps({"disk": "raw", "disk.local": "raw"}))
    return inst


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    root = tmp_path_factory.mktemp("template")
    make_raw(root / FP)
    return root / FP, make_overlay(root / "t.qcow2", root / FP).read_bytes()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(host=_hosts(), at=st.integers(2, 8))
def test_any_split_finds_what_one_process_finds(
    tmp_path_factory: pytest.TempPathFactory,
    template: tuple[Path, bytes],
    host: list[tuple[str, list[tuple[str, str]]]],
    at: int,
) -> None:
    inst = _build(tmp_path_factory.mktemp("host"), host, template[1])
    layout = Layout(str(inst), "_base")
    one = disks.scan_instances(layout, split_at=None)
    assert disks.scan_instances(layout, split_at=at) == one

"""A file a process holds open is never removed, whatever the records say (issue 11, part 2):
every observation sees it in use (``open-file`` users, one walk of ``/proc``), and the executor
checks again under the entry lock just before acting (``/proc`` and qemu's image locks).

Real holders: a ``qemu-io`` process with the base open through an overlay (qemu's image locks),
a plain process with a descriptor on it (``/proc/*/fd``), one that mmapped it and closed the
descriptor (``/proc/*/maps``), and a qemu-io in another PID namespace (``unshare``), whose
``/proc`` entry we may not see but whose lock we do. The ``maps`` parser is also fed hostile and
random tables through a fake ``/proc`` (the ``proc=`` edge of ``openfiles.holders``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecache.sources import openfiles
from tests.test_executor import cli, make_host, put

A = "a" * 40
DAY = 86400.0


@contextmanager
def holding(argv: list[str], ready: str) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert ready in line, line
            yield proc
        finally:
            proc.kill()


def outcomes(doc: dict[str, object]) -> list[tuple[str, str]]:
    return [(o["result"], o["reason"]) for o in doc["outcomes"]]  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["descriptor", "mapping", "qemu-io", "qemu-io-other-pid-namespace"])
def test_a_base_held_open_is_kept_and_removable_once_let_go(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    host = make_host(tmp_path, quarantine_seconds=0)
    base = put(host, A, 2 * DAY, now=time.time())
    if how == "descriptor":
        argv = [sys.executable, "-c",
                f"f = open({str(base)!r}, 'rb'); print('open', flush=True); input()"]  # fmt: skip
        ready = "open"
    elif how == "mapping":
        argv = [sys.executable, "-c", MAP_AND_CLOSE, str(base)]
        ready = "mapped"
    else:
        qemu_io = shutil.which("qemu-io")
        if qemu_io is None:
            pytest.skip("qemu-io is not installed")
        # Interactive qemu-io keeps the image open (and locked, as qemu does) until stdin ends.
        argv = [qemu_io, "-f", "raw", str(base)]
        if how == "qemu-io-other-pid-namespace":
            if shutil.which("unshare") is None:
                pytest.skip("unshare is not installed")
            argv = ["unshare", "--pid", "--fork", "--mount-proc", *argv]
        ready = ""
    with holding(argv, ready) if ready else _qemu_io(argv) as proc:
        if how == "mapping":
            skip_unless_maps_match_stat(proc.pid, base)
        code, plan = cli(host, capsys, "plan", now=time.time())
        (entry,) = plan["entries"]
        assert (entry["action"], entry["reason"]) == ("keep", "in-use")
        assert [u["source"] for u in entry["users"]] == ["open-file"]
        if how != "qemu-io-other-pid-namespace":  # there, the holder is unshare's child
            assert entry["users"][0]["ref"].startswith(f"pid {proc.pid} ")
        code, doc = cli(host, capsys, "clean", now=time.time())
        assert code == 0, doc
        assert [o for o in outcomes(doc) if o[0] != "touched"] == []
        assert base.exists()
    # In use, it was touched as every in-use entry is: it goes once unused for its threshold.
    code, doc = cli(host, capsys, "clean", now=time.time() + 2 * DAY)
    assert outcomes(doc) == [("removed", "unused-expired")]
    assert not base.exists()


@contextmanager
def _qemu_io(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("read 0 512\n")
            proc.stdin.flush()
            deadline = time.monotonic() + 30
            while "read 512/512" not in proc.stdout.readline():
                assert time.monotonic() < deadline and proc.poll() is None, "qemu-io never read"
            yield proc
        finally:
            children = _children(proc.pid)
            proc.kill()
    # Under unshare, qemu-io is unshare's child and outlives it until it reads the end of its
    # stdin (closed just now): the image is let go once that child has exited, not before.
    deadline = time.monotonic() + 30
    while any(_alive(child) for child in children):
        assert time.monotonic() < deadline, f"{children} outlived their parent"
        time.sleep(0.01)


def _stat_fields(pid: int) -> list[bytes]:
    """``/proc/PID/stat`` from the state on (after the command name, which may hold anything)."""
    return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()


def _children(pid: int) -> list[int]:
    children = []
    for other in os.listdir("/proc"):
        with suppress(OSError):
            if other.isdigit() and int(_stat_fields(int(other))[1]) == pid:
                children.append(int(other))
    return children


def _alive(pid: int) -> bool:
    try:
        return _stat_fields(pid)[0] != b"Z"  # a zombie has closed its files
    except OSError:
        return False


def test_qemus_image_lock_is_seen_without_proc(tmp_path: Path) -> None:
    """The lock test alone (what works when qemu runs in a PID namespace whose /proc we cannot
    see): qemu-io's OFD locks on the image, from another PID namespace, and none once it ends."""
    qemu_io, unshare = shutil.which("qemu-io"), shutil.which("unshare")
    if qemu_io is None or unshare is None:
        pytest.skip("qemu-io or unshare is not installed")
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * (1 << 20))
    assert not openfiles.ofd_locked(str(base))
    argv = [unshare, "--pid", "--fork", "--mount-proc", qemu_io, "-f", "raw", str(base)]
    with _qemu_io(argv):
        assert openfiles.ofd_locked(str(base))
    assert not openfiles.ofd_locked(str(base))


# --- /proc/*/maps: a file mapped by a process is held, descriptor or not. ------------------------

# mmap(2) the file named by argv[1] and close the descriptor: only the mapping holds it then.
# Through libc, as Python's mmap module keeps a dup of the descriptor (until 3.13's trackfd).
MAP_AND_CLOSE = """
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
]
fd = os.open(sys.argv[1], os.O_RDONLY)
addr = libc.mmap(None, mmap.PAGESIZE, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
os.close(fd)
print("mapped", flush=True)
input()
"""

# Open the file named by argv[1] and mmap it with Python's mmap (which dups the descriptor):
# two descriptors and a mapping, one process.
OPEN_AND_MAP = """
import mmap, sys
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
print("mapped", flush=True)
input()
"""


def key_of(path: Path) -> tuple[int, int]:
    st_ = path.stat()
    return st_.st_dev, st_.st_ino


def descriptors_on(pid: int, path: Path) -> int:
    """How many of ``pid``'s descriptors are ``path`` (read here, not by the code under test)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(OSError):  # a descriptor closed meanwhile
            count += os.path.samefile(f"/proc/{pid}/fd/{fd}", path)
    return count


def skip_unless_maps_match_stat(pid: int, path: Path) -> None:
    """``pid`` maps ``path``; skip where ``maps`` names another device or inode than ``stat``
    (``tmp_path`` on overlayfs: the mapping is of the underlying file, as openfiles says)."""
    numbers = set()
    for line in Path(f"/proc/{pid}/maps").read_bytes().splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5] == os.fsencode(path):
            major, minor = (int(x, 16) for x in fields[3].split(b":"))
            numbers.add((os.makedev(major, minor), int(fields[4])))
    assert numbers, f"pid {pid} does not map {path}"
    if numbers != {key_of(path)}:
        pytest.skip(f"maps says {numbers} for {path}, stat {key_of(path)} (overlayfs?)")


def test_a_file_mapped_with_its_descriptor_closed_is_held_until_the_process_ends(
    tmp_path: Path,
) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * (1 << 20))
    key = key_of(base)
    assert openfiles.holders({key}) == {}
    with holding([sys.executable, "-c", MAP_AND_CLOSE, str(base)], "mapped") as proc:
        assert descriptors_on(proc.pid, base) == 0
        skip_unless_maps_match_stat(proc.pid, base)
        held = openfiles.holders({key, (key[0], key[1] + 1)})
        assert list(held) == [key]
        (holder,) = held[key]
        assert holder.startswith(f"pid {proc.pid} (")
    assert openfiles.holders({key}) == {}  # killed and reaped: its mapping went with it


def test_a_file_both_open_and_mapped_is_one_holder_for_the_process(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * (1 << 20))
    key = key_of(base)
    with holding([sys.executable, "-c", OPEN_AND_MAP, str(base)], "mapped") as proc:
        assert descriptors_on(proc.pid, base) == 2  # its own and the mmap module's dup
        skip_unless_maps_match_stat(proc.pid, base)
        held = openfiles.holders({key})
        assert list(held) == [key]
        (holder,) = held[key]
        assert holder.startswith(f"pid {proc.pid} (")
    assert openfiles.holders({key}) == {}


# A fake /proc: PID directories with a maps (and a comm); no fd, so only maps can hold.

ME = os.getpid()
A_DEV, B_DEV = os.makedev(8, 1), os.makedev(0xFE, 0x10)


def fake_proc(root: Path, tables: dict[int, bytes]) -> str:
    for pid, maps in tables.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "maps").write_bytes(maps)
        (root / str(pid) / "comm").write_bytes(b"fake\n")
    return str(root)


def maps_line(
    major: int, minor: int, inode: int, path: bytes, *, start: int = 0x1000, perms: bytes = b"r--p"
) -> bytes:
    """A line as the kernel writes it (``show_map_vma``): the path padded to column 73 and only
    its newlines escaped, none when nothing is mapped."""
    head = b"%08x-%08x %s %08x %02x:%02x %d " % (start, start + 4096, perms, 0, major, minor, inode)
    return head.ljust(73) + path.replace(b"\n", b"\\012") if path else head


def test_a_hostile_maps_table_never_raises_and_only_well_formed_mappings_count(
    tmp_path: Path,
) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"x")
    lines = [
        maps_line(8, 1, 11, b"/plain"),  # found
        maps_line(8, 1, 0, b"[heap]", start=0x2000),  # inode 0: nothing mapped
        maps_line(
            0xFE, 0x10, 12, b"/a path\nwith spaces (deleted)", start=0x3000, perms=b"r-xp"
        ),  # found
        maps_line(8, 1, 13, b"/\xff\xfe\x80 not utf-8\x00", start=0x4000),  # found
        # A path with a carriage return then what looks like a line: still the path.
        maps_line(8, 1, 11, b"/x\r7f-7f r--p 0 08:01 14 /forged", start=0x5000),
        maps_line(8, 1, 15, b"/tab\tthen 08:01 16 /forged", start=0x6000),  # found: 15 only
        b"",
        b"   \t ",
        b"\xff\xfe\xfd garbage \x00\x01",
        b"7f-7f r--p 00000000 08:01",  # no inode field
        b"7f-7f r--p 00000000 08:01 31",  # no space after the inode
        b"7f-7f  r--p 00000000 08:01 32 /two spaces",  # the device is read where perms are
        b"7f-7f r--p 08:01 17 /one field short",  # the device is read where the offset is
        b"7f-7f r--p 00000000 08:01 99999999999999999999999999 /huge inode",
        b"7f-7f r--p 00000000 08:01 " + b"1" * 5000 + b" /more digits than int() takes",
        b"7f-7f r--p 00000000 08:01 -18 /negative",
        b"7f-7f r--p 00000000 08:01 1_9 /underscore",
        b"7f-7f r--p 00000000 08:01 0000 /zero, padded",
        b"7f-7f r--p 00000000 08:01 0019 /padded, which the kernel never writes",
        b"7f-7f r--p 00000000 08:01 \xd9\xa2\xd9\xa0 /arabic-indic digits",
        b"7f-7f r--p 00000000 zz:01 20 /non-hex major",
        b"7f-7f r--p 00000000 0x8:1 21 /prefixed",
        b"7f-7f r--p 00000000 -8:1 22 /negative major",
        b"7f-7f r--p 00000000 +8:1 23 /signed major",
        b"7f-7f r--p 00000000 8_0:1 24 /underscored major",
        b"7f-7f r--p 00000000 08:01:02 25 /three parts",
        b"7f-7f r--p 00000000 0801 26 /no colon",
        b"7f-7f r--p 00000000 :01 27 /no major",
        b"7f-7f r--p 00000000 08: 28 /no minor",
        b"7f-7f r--p 00000000 ffffffff:ffffffff 29 /too big for makedev",
        b"7f-7f r--p 00000000 123456789:1 30 /nine hex digits",
    ]
    wanted = {(A_DEV, n) for n in range(10, 34)} | {(B_DEV, 12), (A_DEV, 0), (B_DEV, 0)}
    wanted |= {(os.makedev(0xFFFFFFF, 0xFFFFFFF), 29), (os.makedev(8, 0), 24), (0, 26)}
    wanted.add(key_of(real))
    # Other blanks than one space between the fields, which the kernel never writes: not found.
    blanks = b"7f-7f\tr--p  00000000\x0b08:01\r33\x0c/other blanks between fields"
    proc = fake_proc(
        tmp_path / "proc", {101: b"\n".join(lines) + b"\n", 102: lines[0], 106: blanks}
    )
    # 103 has the real file both open (fd) and mapped: one holder. 104's maps is a directory,
    # 105 has none, "self" and our own pid are not walked (ours maps everything wanted).
    (tmp_path / "proc" / "103" / "fd").mkdir(parents=True)
    (tmp_path / "proc" / "103" / "fd" / "3").symlink_to(real)
    (tmp_path / "proc" / "103" / "fd" / "4").symlink_to(real)
    (tmp_path / "proc" / "103" / "fd" / "5").symlink_to(tmp_path / "gone")
    dev, ino = key_of(real)
    (tmp_path / "proc" / "103" / "maps").write_bytes(
        maps_line(os.major(dev), os.minor(dev), ino, b"/real", perms=b"r--s") + b"\n"
    )
    (tmp_path / "proc" / "104" / "maps").mkdir(parents=True)
    (tmp_path / "proc" / "105").mkdir()
    for other in ("self", str(ME)):
        (tmp_path / "proc" / other).mkdir()
        (tmp_path / "proc" / other / "maps").write_bytes(b"\n".join(lines))
    found = openfiles.holders(wanted, proc=proc)
    assert {k: sorted(hs) for k, hs in found.items()} == {
        (A_DEV, 11): ["pid 101 (fake)", "pid 102 (fake)"],
        (B_DEV, 12): ["pid 101 (fake)"],
        (A_DEV, 13): ["pid 101 (fake)"],
        (A_DEV, 15): ["pid 101 (fake)"],
        key_of(real): ["pid 103 (?)"],  # no comm
    }
    # Asked about one file at a time, the tables are searched for its inode before any line is
    # split: the same answers.
    for key in wanted:
        alone = openfiles.holders({key}, proc=proc)
        assert {k: sorted(hs) for k, hs in alone.items()} == (
            {key: sorted(found[key])} if key in found else {}
        )


def test_a_maps_table_longer_than_the_cap_counts_up_to_the_cap(tmp_path: Path) -> None:
    """Past the cap nothing counts, and the line the cap cuts is not misread: its inode cut
    short (``123`` of ``1234567``) would name another file, but lacks the space after it."""
    cap = openfiles._MAPS_CAP
    first = maps_line(8, 1, 11, b"/first") + b"\n"
    cut = maps_line(8, 1, 1234567, b"/cut", start=0x2000) + b"\n"
    after = maps_line(8, 1, 12, b"/after", start=0x3000) + b"\n"
    anon = maps_line(0, 0, 0, b"", start=0x4000, perms=b"rw-p") + b"\n"
    at = cut.index(b" 1234567 ") + len(b" 123")  # where in ``cut`` the cap falls
    room = cap - at - len(first)
    filler = anon * (room // len(anon))
    filler += b" " * (room - len(filler) - 1) + b"\n"
    table = first + filler + cut + after
    assert table[:cap].endswith(b" 123")
    proc = fake_proc(tmp_path, {101: table})
    wanted = {(A_DEV, 11), (A_DEV, 123), (A_DEV, 1234567), (A_DEV, 12)}
    many = wanted | {(A_DEV, n) for n in range(1000, 1010)}  # beyond a search: lines are split
    for asked in (wanted, many, {(A_DEV, 11)}):
        assert openfiles.holders(asked, proc=proc) == {(A_DEV, 11): ["pid 101 (fake)"]}
    for key in wanted - {(A_DEV, 11)}:
        assert openfiles.holders({key}, proc=proc) == {}


PIDS = st.integers(1, 10**7).filter(lambda p: p != ME)
DEVICES = st.tuples(
    st.sampled_from([0, 8, 0xFE, 0xFFF]) | st.integers(0, 0xFFF),
    st.sampled_from([0, 1, 0x10]) | st.integers(0, (1 << 20) - 1),
)
INODES = st.integers(0, 3) | st.integers(0, (1 << 64) - 1)
RECORDS = st.tuples(DEVICES, INODES, st.sampled_from([b"r--p", b"r-xp", b"rw-s"]), st.binary())
# A line with no colon cannot have a device field: whatever else it holds, it maps nothing.
JUNK = st.binary().map(lambda b: b.replace(b"\n", b"").replace(b":", b""))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tables=st.dictionaries(PIDS, st.lists(RECORDS | JUNK, max_size=12), max_size=4),
    extra=st.sets(st.tuples(st.integers(0, 1 << 32), INODES), max_size=4),
    data=st.data(),
)
def test_any_kernel_maps_table_yields_exactly_its_wanted_file_mappings(
    tables: dict[int, list[tuple[tuple[int, int], int, bytes, bytes] | bytes]],
    extra: set[tuple[int, int]],
    data: st.DataObject,
) -> None:
    """Tables as the kernel writes them (any path bytes, newlines escaped), interleaved with junk:
    each pid holds exactly the wanted files it maps with a nonzero inode, once."""
    expected: dict[tuple[int, int], set[str]] = {}
    mapped: set[tuple[int, int]] = set()
    written: dict[int, bytes] = {}
    for pid, lines in tables.items():
        out = []
        for n, line in enumerate(lines):
            if isinstance(line, bytes):
                out.append(line)
                continue
            (major, minor), inode, perms, path = line
            out.append(maps_line(major, minor, inode, path, start=0x1000 * (n + 1), perms=perms))
            key = (os.makedev(major, minor), inode)
            mapped.add(key)
            if inode:
                expected.setdefault(key, set()).add(f"pid {pid} (fake)")
        written[pid] = b"\n".join(out) + b"\n"
    wanted = data.draw(st.sets(st.sampled_from(sorted(mapped)))) if mapped else set()
    wanted |= extra
    with tempfile.TemporaryDirectory() as root:
        found = openfiles.holders(wanted, proc=fake_proc(Path(root), written))
    assert all(len(hs) == len(set(hs)) for hs in found.values())
    assert {k: set(hs) for k, hs in found.items()} == {
        k: hs for k, hs in expected.items() if k in wanted
    }


# Word soup around the fields' edges: lines of words that are almost fields (signs, prefixes,
# leading zeros, too many digits, bytes that are not UTF-8), as many as there are blanks after
# them, blanks that are almost one space. What counts is restated here as one regular
# expression, the parser's specification.
WORDS = [b"", b"7f-7f", b"r--p", b"00000000", b"0", b"1", b"08:01", b"\\012", b"(deleted)",
         b"\xff", b"\x00"]  # fmt: skip
DEVICE_WORDS = [b"08:01", b"fe:10", b"FE:1", b"8:1", b"0:0", b"103:2", b"fff:fffff",
                b"7fffffff:1", b"zz:1", b"0x8:1", b"+8:1", b"-1:1", b"8_0:1", b":", b"::", b"8:",
                b":1", b"08:01:02", b"80000000:1", b"123456789:1", b"\xd9\xa2:1",
                b"123"]  # fmt: skip
INODE_WORDS = [b"0", b"00", b"1", b"123", b"4567", b"260386", b"0123", b"-1", b"+1", b"1_0",
               b"12a", b"\xd9\xa2", b"18446744073709551615", b"99999999999999999999",
               b"999999999999999999999", b"08:01"]  # fmt: skip
BLANKS = [b" "] * 40 + [b"  ", b"\t", b"\r", b"\x0b", b"\x0c", b""]
LINE = st.builds(
    lambda words, blanks: b"".join(w + blank for w, blank in zip(words, blanks, strict=False)),
    st.tuples(
        *(st.sampled_from(WORDS),) * 3,
        st.sampled_from(DEVICE_WORDS),
        st.sampled_from(INODE_WORDS),
        st.sampled_from(WORDS),
    ),
    st.lists(st.sampled_from(BLANKS), min_size=3, max_size=6),
)
SOUP = st.lists(LINE, max_size=8).map(b"\n".join)
SPEC = re.compile(rb"[^ ]* [^ ]* [^ ]* ([0-9a-fA-F]{1,8}):([0-9a-fA-F]{1,8}) ([1-9][0-9]{0,19}) ")


def spec_keys(maps: bytes) -> set[tuple[int, int]]:
    keys = set()
    for line in maps.split(b"\n"):
        m = SPEC.match(line)
        if m:
            with suppress(OverflowError):  # no device makedev can make: none
                keys.add((os.makedev(int(m[1], 16), int(m[2], 16)), int(m[3])))
    return keys


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    maps=SOUP | st.binary(max_size=400),
    extra=st.sets(st.tuples(st.integers(0, 1 << 32), INODES), max_size=8),
)
def test_any_bytes_in_maps_never_raise_and_count_as_the_spec_says(
    maps: bytes, extra: set[tuple[int, int]]
) -> None:
    keys = spec_keys(maps)
    with tempfile.TemporaryDirectory() as root:
        found = openfiles.holders(keys | extra, proc=fake_proc(Path(root), {101: maps}))
    assert found == {key: ["pid 101 (fake)"] for key in keys}

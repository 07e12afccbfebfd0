"""Whole hostile hosts, generated: a ``clean`` with zero thresholds never loses a guest's data.

Hypothesis draws a host: cache entries of real bytes, and instance disks that use them in every
way QEMU can — qcow2 overlays (absolute and relative backing names, two-deep chains, in
subdirectories, directly in the instances path, in the cache itself), qcow2 external data files,
VMDK descriptors with flat extents, raw disks that are hard links or symlinks to an entry — plus
what a hostile or unlucky host adds: a chain link
outside the cache that went missing, symlinks out of the tree, names with undecodable bytes and
control characters. Every disk QEMU can read before the pass must read the same bytes after it
(``qemu-io -c 'read -P'``), and no file outside the instances tree may change (inode, size,
mtime). ``IMAGECACHE_PROPERTY_EXAMPLES`` sets how many hosts (the README gives a long run's
counts).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from imagecache.cli import main
from tests.qemu import qemu_img

NOW = 2_000_000_000.0
MIB = 1 << 20
EXAMPLES = int(os.environ.get("IMAGECACHE_PROPERTY_EXAMPLES", "12"))

USES = (
    "overlay",
    "relative",
    "chain",
    "subdir",
    "data-file",
    "vmdk-extent",
    "hard-link",
    "symlink",
    "missing-link",
    "outside-link",
    "stray-disk",
    "golden-entry",
)


@dataclass(frozen=True)
class Use:
    how: str
    base: int  # which cache entry it uses
    odd_name: bool  # the instance directory's name has undecodable bytes and a newline


@dataclass(frozen=True)
class Readable:
    """A disk and the pattern byte its first 64 KiB must read as, through the whole chain."""

    path: Path
    fmt: str
    pattern: int


hosts = st.tuples(
    st.integers(min_value=1, max_value=4),  # cache entries
    st.lists(
        st.builds(Use, st.sampled_from(USES), st.integers(0, 3), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    st.integers(min_value=0, max_value=2),  # unused entries, to be removed
)


def _entry_name(i: int) -> str:
    return hashlib.sha1(f"image-{i}".encode(), usedforsecurity=False).hexdigest()


def _pattern_file(path: Path, pattern: int, size: int = MIB) -> None:
    path.write_bytes(bytes([pattern]) * size)


def _qemu_io_reads(disk: Readable) -> bool:
    done = subprocess.run(
        ["qemu-io", "-r", "-f", disk.fmt, "-c", f"read -P {disk.pattern} 0 64k", str(disk.path)],
        capture_output=True,
        text=True,
        errors="replace",  # qemu-io prints the path, undecodable bytes and all
        check=False,
    )
    return done.returncode == 0 and "verification failed" not in done.stdout + done.stderr


def _instance_dir(instances: Path, n: int, odd: bool) -> Path:
    name = os.fsdecode(b"inst-%d-\xff\n" % n) if odd else f"inst-{n}"
    path = instances / name
    path.mkdir(exist_ok=True)
    return path


def _build(root: Path, entries: int, uses: list[Use], unused: int) -> list[Readable]:
    instances, outside = root / "instances", root / "outside"
    cache = instances / "_base"
    cache.mkdir(parents=True)
    outside.mkdir()
    _pattern_file(outside / "host-file", 0x5A, 4096)
    for i in range(entries + unused):
        _pattern_file(cache / _entry_name(i), 0x41 + i)
    readable: list[Readable] = []
    for n, use in enumerate(uses):
        i = use.base % entries
        base, pattern = cache / _entry_name(i), 0x41 + i
        inst = _instance_dir(instances, n, use.odd_name)
        disk = inst / "disk"
        if use.how == "overlay":
            qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, disk)
        elif use.how == "relative":
            qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", f"../_base/{base.name}",
                     disk, cwd=inst)  # fmt: skip
        elif use.how in ("chain", "subdir"):
            where = inst / "snapshots" / "tmp" if use.how == "subdir" else inst
            where.mkdir(parents=True, exist_ok=True)
            mid = where / "disk.delta"
            qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, mid)
            if use.how == "subdir":
                disk = mid
            else:
                qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", mid, disk)
        elif use.how == "data-file":
            # The guest's bytes live in the data file, which is the cache entry itself.
            name = _entry_name(100 + n)
            qemu_img("create", "-q", "-f", "qcow2", "-o",
                     f"data_file={cache / name},data_file_raw=on", disk, "1M")  # fmt: skip
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {0x61 + n} 0 64k",
                            str(disk)], check=True, capture_output=True)  # fmt: skip
            os.utime(cache / name, (NOW - 10 * 86400,) * 2)
            pattern = 0x61 + n
        elif use.how == "vmdk-extent":
            disk = inst / "disk.vmdk"
            disk.write_text(
                "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
                'createType="monolithicFlat"\n\n'
                f'RW 2048 FLAT "../_base/{base.name}" 0\n\n'
                'ddb.adapterType = "ide"\n'
            )
        elif use.how == "hard-link":
            disk = inst / "disk.raw"
            os.link(base, disk)
        elif use.how == "symlink":
            disk = inst / "disk.config"
            disk.symlink_to(base)
        elif use.how == "missing-link":
            # An external snapshot outside the cache, unreachable now: the view is incomplete.
            ext = root / "external" / f"snap-{n}.qcow2"
            ext.parent.mkdir(exist_ok=True)
            qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, ext)
            qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", ext, disk)
            ext.unlink()
        elif use.how == "stray-disk":
            # Parked directly in the instances path, in no instance directory.
            disk = instances / f"stray-{n}.qcow2"
            qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, disk)
        elif use.how == "golden-entry":
            # An image in the cache itself (an operator's golden qcow2) on an entry.
            disk = cache / f"golden-{n}.qcow2"
            qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, disk)
        elif use.how == "outside-link":
            (inst / "console.log").symlink_to(outside / "host-file")
            qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, disk)
        fmt = {"disk.vmdk": "vmdk", "disk.raw": "raw", "disk.config": "raw"}.get(disk.name, "qcow2")
        readable.append(Readable(disk, fmt, pattern))
    for path in cache.iterdir():  # every entry old: only users may keep it
        os.utime(path, (NOW - 10 * 86400,) * 2, follow_symlinks=False)
    (root / "nova.conf").write_text(
        f"[DEFAULT]\ninstances_path = {instances}\nhost = h1\n"
        "[image_cache]\nremove_unused_original_minimum_age_seconds = 0\n"
        "remove_unused_resized_minimum_age_seconds = 0\n"
        f"[imagecache]\nquarantine_seconds = 0\nstale_temp_seconds = 0\n"
        f"audit_log = {root / 'log' / 'audit.jsonl'}\nlock_timeout_seconds = 5\n"
    )
    return readable


def _outside_snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime_ns) of every file under ``root`` but the instances tree and our log."""
    found = {}
    for top, dirs, files in os.walk(root):
        if Path(top) == root:
            dirs[:] = [d for d in dirs if d not in ("instances", "log")]
        for name in files:
            st = os.lstat(os.path.join(top, name))
            found[os.path.join(top, name)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


@contextlib.contextmanager
def _host_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="imagecache-prop-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(hosts)
def test_clean_never_leaves_a_disk_unable_to_read_its_data(
    host: tuple[int, list[Use], int],
) -> None:
    entries, uses, unused = host
    for how in sorted({u.how for u in uses}):
        event(how)  # --hypothesis-show-statistics: how many hosts had each kind of use
    if any(u.odd_name for u in uses):
        event("undecodable instance name")
    with _host_root() as root:
        disks = _build(root, entries, uses, unused)
        readable = [d for d in disks if _qemu_io_reads(d)]
        outside = _outside_snapshot(root)
        argv = ["--config-file", str(root / "nova.conf"), "--json", "clean"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(argv, clock=lambda: NOW)
        doc = json.loads(out.getvalue())
        assert code in (0, 1), doc
        lost = [str(d.path) for d in readable if not _qemu_io_reads(d)]
        assert lost == [], f"guest data lost after clean: {lost} ({[u.how for u in uses]})"
        assert _outside_snapshot(root) == outside
        # Safe is not the same as idle: a host whose every link is there is seen whole, and
        # what nothing uses goes.
        hows = {u.how for u in uses}
        assert doc["complete"] is ("missing-link" not in hows), doc["problems"]
        cache = root / "instances" / "_base"
        gone = [not (cache / _entry_name(i)).exists() for i in range(entries, entries + unused)]
        assert gone == [doc["complete"]] * unused

"""Filesystem mutations on real files, including SIGKILL at random moments."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagecache import naming
from imagecache.errors import EntryChanged
from imagecache.model import Kind
from imagecache.store import fsops
from imagecache.store import trash as trash_store
from tests._fsops_child import PAYLOADS, payload

CHILD = Path(__file__).with_name("_fsops_child.py")
SHA = naming.fingerprint("image-1")
NOW = 2_000_000_000.0


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    path = tmp_path / "_base"
    path.mkdir()
    return path


def _file(path: Path, data: bytes = b"x" * 10000) -> Path:
    path.write_bytes(data)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# atomic_write


def test_atomic_write_creates_and_replaces_with_the_exact_mode(tmp_path: Path) -> None:
    path = tmp_path / "compute_nodes"
    old_umask = os.umask(0o077)
    try:
        fsops.atomic_write(path, b"one", mode=0o640)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"one"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    fsops.atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["compute_nodes"]


def test_atomic_write_cleans_up_when_it_cannot_replace(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError):
        fsops.atomic_write(tmp_path / "taken", b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    with pytest.raises(FileNotFoundError):
        fsops.atomic_write(tmp_path / "missing" / "file", b"data")


# atomic_publish


def test_atomic_publish_moves_a_finished_file_into_place(cache: Path) -> None:
    temp = _file(cache / naming.temp_name(SHA, 1, "a"), b"image")
    fsops.atomic_publish(temp, cache / SHA)
    assert (cache / SHA).read_bytes() == b"image"
    assert not temp.exists()


def test_atomic_publish_never_replaces_an_entry(cache: Path) -> None:
    temp = _file(cache / naming.temp_name(SHA, 1, "a"), b"ours")
    _file(cache / SHA, b"theirs")
    with pytest.raises(EntryChanged, match=rf"{SHA} already exists"):
        fsops.atomic_publish(temp, cache / SHA)
    assert (cache / SHA).read_bytes() == b"theirs"
    assert temp.read_bytes() == b"ours"


def test_the_link_fallback_never_replaces_either(cache: Path) -> None:
    # What atomic_publish, quarantine and restore fall back to where renameat2 cannot help (NFS).
    src, dst = _file(cache / "a", b"a"), _file(cache / "b", b"b")
    with pytest.raises(FileExistsError):
        fsops._link_and_unlink(src, dst)
    assert (src.read_bytes(), dst.read_bytes()) == (b"a", b"b")
    fsops._link_and_unlink(src, cache / "c")
    assert not src.exists()
    assert (cache / "c").read_bytes() == b"a"


# touch


def test_touch_sets_times_and_never_follows_a_symlink(cache: Path) -> None:
    target = _file(cache / SHA)
    os.utime(target, (1000, 1000))
    fsops.touch(target, NOW)
    assert target.stat().st_mtime == NOW
    link = cache / "swap_1"
    link.symlink_to(target)
    fsops.touch(link, NOW + 5)
    assert target.stat().st_mtime == NOW
    assert link.lstat().st_mtime == NOW + 5
    with pytest.raises(FileNotFoundError):
        fsops.touch(cache / "gone", NOW)


# quarantine, restore, purge, remove, list_trash


def test_quarantine_and_restore_round_trip(cache: Path) -> None:
    entry = _file(cache / SHA)
    inode = entry.stat().st_ino
    trash_name = trash_store.quarantine(cache, SHA, now=NOW + 0.7)
    assert trash_name == f"{SHA}@{int(NOW)}"
    assert not entry.exists()
    assert (cache / ".imagecache/trash" / trash_name).stat().st_ino == inode
    [trashed] = trash_store.list_trash(cache)
    assert trashed.name == SHA
    assert trashed.trash_name == trash_name
    assert trashed.quarantined_at == int(NOW)
    assert trashed.inode == inode
    assert (
        trashed.bytes_allocated
        == entry.parent.joinpath(".imagecache/trash", trash_name).stat().st_blocks * 512
    )
    assert trashed.bytes_allocated > 0

    assert trash_store.restore(cache, trash_name) == SHA
    assert entry.stat().st_ino == inode
    assert trash_store.list_trash(cache) == ()


def test_restore_never_clobbers_an_entry_that_came_back(cache: Path) -> None:
    _file(cache / SHA, b"old")
    trash_name = trash_store.quarantine(cache, SHA, now=NOW)
    _file(cache / SHA, b"fetched again")
    with pytest.raises(EntryChanged, match=f"an entry named {SHA} exists again"):
        trash_store.restore(cache, trash_name)
    assert (cache / SHA).read_bytes() == b"fetched again"
    assert (cache / ".imagecache/trash" / trash_name).read_bytes() == b"old"


def test_quarantine_refuses_a_vanished_entry_or_a_taken_trash_name(cache: Path) -> None:
    with pytest.raises(EntryChanged, match="gone"):
        trash_store.quarantine(cache, SHA, now=NOW)
    _file(cache / SHA, b"first")
    trash_store.quarantine(cache, SHA, now=NOW)
    _file(cache / SHA, b"second")
    with pytest.raises(EntryChanged, match="already holds"):
        trash_store.quarantine(cache, SHA, now=NOW)
    assert (cache / SHA).read_bytes() == b"second"
    assert (cache / ".imagecache/trash" / f"{SHA}@{int(NOW)}").read_bytes() == b"first"


@pytest.mark.parametrize("name", ["", "..", "a/b", f"../{SHA}"])
def test_quarantine_takes_only_plain_names(cache: Path, name: str) -> None:
    with pytest.raises(ValueError, match="not a valid entry name"):
        trash_store.quarantine(cache, name, now=NOW)


@pytest.mark.parametrize("trash_name", [SHA, f"{SHA}@", f"@{int(NOW)}", f"{SHA}@1x", "..@1"])
def test_restore_and_purge_take_only_trash_names(cache: Path, trash_name: str) -> None:
    with pytest.raises(ValueError, match="not a trash name"):
        trash_store.restore(cache, trash_name)
    with pytest.raises(ValueError, match="not a trash name"):
        trash_store.purge(cache, trash_name)


def test_purge_and_remove_return_the_bytes_they_freed(cache: Path) -> None:
    entry = _file(cache / SHA, os.urandom(100_000))
    allocated = entry.stat().st_blocks * 512
    assert allocated >= 100_000
    trash_name = trash_store.quarantine(cache, SHA, now=NOW)
    assert trash_store.purge(cache, trash_name) == allocated
    assert trash_store.list_trash(cache) == ()
    with pytest.raises(FileNotFoundError):
        trash_store.purge(cache, trash_name)

    swap = _file(cache / "swap_1", os.urandom(50_000))
    allocated = swap.stat().st_blocks * 512
    assert fsops.remove(swap) == allocated
    assert not swap.exists()


def test_removing_one_of_two_hard_links_frees_nothing(cache: Path) -> None:
    entry = _file(cache / SHA)
    os.link(entry, cache / "other")
    assert fsops.remove(entry) == 0
    assert (cache / "other").exists()


def test_list_trash_skips_what_is_not_ours(cache: Path) -> None:
    assert trash_store.list_trash(cache) == ()
    trash = cache / ".imagecache/trash"
    trash.mkdir(parents=True)
    for junk in ("README", f"{SHA}@", f"@{int(NOW)}", f"{SHA}@12x", f"{SHA}@-1"):
        _file(trash / junk)
    (trash / f"dir@{int(NOW)}").mkdir()
    _file(trash / f"swap_1@{int(NOW)}")
    _file(trash / f"odd@name@{int(NOW)}")
    assert [(e.name, e.quarantined_at) for e in trash_store.list_trash(cache)] == [
        ("odd@name", NOW),
        ("swap_1", NOW),
    ]


# crash safety: SIGKILL at random moments


def _kill_at_random(args: list[str], rng: random.Random) -> None:
    with subprocess.Popen(
        [sys.executable, str(CHILD), *args], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0, 0.03))  # let it run for a random while, then crash it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # Anything else means the child failed on its own, which is a bug too.
    assert proc.returncode == -signal.SIGKILL


def test_quarantine_and_restore_survive_sigkill(cache: Path) -> None:
    names = [naming.fingerprint(str(i)) for i in range(4)] + ["swap_512"]
    digests = {name: _digest(_file(cache / name, os.urandom(64 * 1024))) for name in names}
    rng = random.Random(20261121)
    states = set()
    for _round in range(20):
        _kill_at_random(["quarantine", str(cache), *names], rng)
        listed = trash_store.list_trash(cache)
        trashed = {entry.name: entry for entry in listed}
        assert len(trashed) == len(listed), f"a name is in the trash twice: {listed}"
        for name in names:
            in_place, in_trash = (cache / name).exists(), name in trashed
            assert in_place != in_trash, f"{name}: in place {in_place}, in trash {in_trash}"
            path = (
                cache / name if in_place else cache / ".imagecache/trash" / trashed[name].trash_name
            )
            assert _digest(path) == digests[name]
        assert {p.name for p in cache.iterdir()} <= {*names, ".imagecache"}
        states.add(frozenset(trashed))
    assert len(states) > 1, "the child never got to move anything"


def test_atomic_write_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "record"
    fsops.atomic_write(path, payload(0))
    expected = {hashlib.sha256(payload(i)).hexdigest() for i in range(PAYLOADS)}
    rng = random.Random(20261122)
    seen = set()
    for _round in range(20):
        _kill_at_random(["write", str(path)], rng)
        digest = _digest(path)
        assert digest in expected
        seen.add(digest)
    assert len(seen) > 1, "the child never got to replace the file"
    # A killed writer may leave its temp file behind, under a name the reaper recognises.
    for leftover in tmp_path.iterdir():
        assert leftover == path or naming.classify(leftover.name) is Kind.TEMP


# temp_path / temp_file


def test_temp_file_is_a_unique_temp_name_with_the_exact_mode(cache: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        with fsops.temp_file(cache, SHA) as (one, f), fsops.temp_file(cache, SHA) as (two, _):
            f.write(b"data")
    finally:
        os.umask(old_umask)
    assert one != two and one.parent == cache
    assert naming.classify(one.name) is Kind.TEMP and naming.entry_of_temp(one.name) == SHA
    assert one.name.startswith(f"{SHA}.{os.getpid()}.") and one.name != f"{SHA}.part"
    assert one.read_bytes() == b"data" and stat.S_IMODE(one.stat().st_mode) == 0o644


def test_temp_file_is_removed_when_the_block_raises(cache: Path) -> None:
    with pytest.raises(RuntimeError), fsops.temp_file(cache, SHA) as (temp, f):
        f.write(b"half")
        raise RuntimeError("download failed")
    assert not temp.exists() and list(cache.iterdir()) == []


def test_temp_path_creates_nothing_and_cleans_what_the_block_made(cache: Path) -> None:
    with fsops.temp_path(cache, SHA) as temp:
        assert not temp.exists()
    with pytest.raises(KeyboardInterrupt), fsops.temp_path(cache, SHA) as temp:
        temp.write_bytes(b"converted")
        raise KeyboardInterrupt
    assert list(cache.iterdir()) == []


def test_temp_file_then_publish_leaves_only_the_final_name(cache: Path) -> None:
    with fsops.temp_file(cache, SHA) as (temp, f):
        f.write(b"image")
    fsops.atomic_publish(temp, cache / SHA)
    assert [p.name for p in cache.iterdir()] == [SHA]


def test_temp_names_refuse_paths(cache: Path) -> None:
    with pytest.raises(ValueError), fsops.temp_path(cache, "../x"):
        pass


def test_ensure_dir_makes_parents_and_accepts_existing(tmp_path: Path) -> None:
    fsops.ensure_dir(tmp_path / "a" / "b")
    fsops.ensure_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    _file(tmp_path / "f")
    with pytest.raises(OSError):
        fsops.ensure_dir(tmp_path / "f" / "x")

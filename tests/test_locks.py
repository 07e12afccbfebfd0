"""The entry lock against the real thing: oslo.concurrency, as nova-compute uses it, in a child."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from imagecache import lockfiles, locks, naming
from imagecache.errors import LockTimeout

CHILD = Path(__file__).with_name("_lock_child.py")
SHA = naming.fingerprint("image-1")
NOW = 2_000_000_000.0
DAY = 86400.0


@pytest.fixture
def instances(tmp_path: Path) -> Path:
    path = tmp_path / "instances"
    path.mkdir()
    return path


@contextmanager
def nova_holds(
    instances: Path, name: str, marker: Path | None = None
) -> Iterator[Callable[[], None]]:
    """Nova's lock on ``name``, held by another process until the yielded release() is called."""
    args = [sys.executable, str(CHILD), "hold", str(instances / "locks"), name]
    if marker is not None:
        args.append(str(marker))
    with subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        release = proc.stdin.close  # the child releases at end of input
        try:
            assert proc.stdout.readline() == "held\n"
            yield release
        finally:
            release()
            proc.wait(timeout=30)
        assert proc.stdout.read() == "released\n"
    assert proc.returncode == 0


def nova_tries(instances: Path, name: str) -> str:
    """One non-blocking attempt by Nova's lock in another process: "got" or "busy"."""
    args = [sys.executable, str(CHILD), "try", str(instances / "locks"), name]
    done = subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def test_take_entry_locks_never_waits_while_holding_one(instances: Path) -> None:
    """Two callers that each took half of the same names and then waited for the other half
    would wait each other out until their deadlines: a caller that took some returns at once
    with the rest busy; one that took none waits until one comes free."""
    other = naming.fingerprint("image-2")
    slept: list[float] = []
    with nova_holds(instances, SHA) as release, ExitStack() as held:
        missed = locks.take_entry_locks(held, instances, [SHA, other], wait=30, sleep=slept.append)
        assert set(missed) == {SHA} and isinstance(missed[SHA], LockTimeout)
        assert slept == []  # holding ``other``: no wait at all
        assert nova_tries(instances, other) == "busy"
        held.close()
        with ExitStack() as second:
            timer = threading.Timer(0.3, release)
            timer.start()
            try:  # holding nothing: it waits, and takes the lock that comes free
                assert locks.take_entry_locks(second, instances, [SHA], wait=30) == {}
                assert nova_tries(instances, SHA) == "busy"
            finally:
                timer.join()


def test_lock_path_is_novas(instances: Path) -> None:
    path = locks.lock_path(instances, SHA)
    assert path == f"{instances}/locks/nova-{SHA}"
    assert not Path(path).exists()
    assert nova_tries(instances, SHA) == "got"
    assert [p.name for p in (instances / "locks").iterdir()] == [f"nova-{SHA}"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\0b"])
def test_lock_path_rejects_names_that_are_not_entries(instances: Path, name: str) -> None:
    with pytest.raises(ValueError, match="not a valid entry name"):
        locks.lock_path(instances, name)


def test_a_lock_nova_holds_makes_us_skip_or_wait(instances: Path, tmp_path: Path) -> None:
    marker = tmp_path / "nova-was-done"
    with nova_holds(instances, SHA, marker) as release:
        assert locks.is_locked(instances, SHA)
        with (
            pytest.raises(LockTimeout, match=rf"entry {SHA}: .* another process; .* 0\.3 s"),
            locks.entry_lock(instances, SHA, timeout=0.3),
        ):
            pytest.fail("got a lock that Nova holds")
        # Nova finishes a moment after we started waiting: the wait must outlast it.
        timer = threading.Timer(0.3, release)
        timer.start()
        try:
            with locks.entry_lock(instances, SHA, timeout=20):
                assert marker.exists()
        finally:
            timer.join()
    assert not locks.is_locked(instances, SHA)


def test_nova_cannot_take_a_lock_we_hold(instances: Path) -> None:
    with locks.entry_lock(instances, SHA, timeout=0):
        assert nova_tries(instances, SHA) == "busy"
        assert locks.is_locked(instances, SHA)
    assert nova_tries(instances, SHA) == "got"
    assert not locks.is_locked(instances, SHA)


def test_threads_of_one_process_exclude_each_other(instances: Path) -> None:
    held, done = threading.Event(), threading.Event()

    def worker() -> None:
        with locks.entry_lock(instances, SHA, timeout=0):
            held.set()
            done.wait(timeout=30)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert held.wait(timeout=30)
        with (
            pytest.raises(LockTimeout, match=rf"entry {SHA}: .* another thread"),
            locks.entry_lock(instances, SHA, timeout=0.1),
        ):
            pytest.fail("two threads of one process held one entry lock")
        assert locks.is_locked(instances, SHA)
        # Neither attempt may have dropped the worker's POSIX lock (closing any descriptor of
        # the file would): Nova still finds it taken.
        assert nova_tries(instances, SHA) == "busy"
    finally:
        done.set()
        thread.join()
    with locks.entry_lock(instances, SHA, timeout=0):
        pass


def test_relative_and_absolute_paths_share_one_guard(
    instances: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(instances.parent)
    with locks.entry_lock(instances, SHA, timeout=0):
        assert locks.is_locked(instances.name, SHA)
        with (
            pytest.raises(LockTimeout, match="another thread"),
            locks.entry_lock(instances.name, SHA, timeout=0),
        ):
            pytest.fail("one entry lock held twice in one process")
        assert nova_tries(instances, SHA) == "busy"


def test_is_locked_does_not_create_lock_files(instances: Path) -> None:
    assert not locks.is_locked(instances, SHA)
    assert not (instances / "locks").exists()


def test_entry_lock_creates_the_directory_and_records_when_it_was_held(instances: Path) -> None:
    with locks.entry_lock(instances, SHA, timeout=0):
        path = Path(locks.lock_path(instances, SHA))
        assert path.is_file()
    os.utime(path, (1000, 1000))
    with locks.entry_lock(instances, SHA, timeout=0):
        pass
    assert path.stat().st_mtime > 1000
    assert path.exists()  # lock files of live names are never unlinked


def test_entry_lock_rejects_nonsense_waits(instances: Path) -> None:
    with pytest.raises(ValueError, match="timeout"), locks.entry_lock(instances, SHA, timeout=-1):
        pass


def cache_of(instances: Path) -> Path:
    """The cache directory ``instances/_base``, created."""
    cache = instances / "_base"
    cache.mkdir(exist_ok=True)
    return cache


def _lock_file(instances: Path, name: str, *, mtime: float) -> Path:
    path = instances / "locks" / f"nova-{name}"
    path.parent.mkdir(exist_ok=True)
    path.touch()
    os.utime(path, (mtime, mtime))
    return path


def test_stale_lock_files_of_gone_entries_are_collected(instances: Path) -> None:
    old, young = NOW - 8 * DAY, NOW - 1 * DAY
    live = naming.fingerprint("live")
    gone = naming.fingerprint("gone")
    recent = naming.fingerprint("recent")
    nova_busy = naming.fingerprint("nova-busy")
    we_busy = naming.fingerprint("we-busy")
    temp = naming.temp_name(naming.fingerprint("t"), 7, "x")
    for name in (live, gone, nova_busy, we_busy, "swap_512", temp, "storage-registry-lock"):
        _lock_file(instances, name, mtime=old)
    _lock_file(instances, recent, mtime=young)
    other = instances / "locks" / "unrelated"
    other.touch()
    os.utime(other, (old, old))
    directory = instances / "locks" / f"nova-{naming.fingerprint('dir')}"
    directory.mkdir()
    os.utime(directory, (old, old))

    with nova_holds(instances, nova_busy), locks.entry_lock(instances, we_busy, timeout=0):
        os.utime(locks.lock_path(instances, we_busy), (old, old))
        removed = lockfiles.collect_stale_lock_files(
            instances, {live}, cache_dir=cache_of(instances), now=NOW
        )

    expected = sorted([gone, "swap_512", temp])
    assert removed == [locks.lock_path(instances, name) for name in expected]
    left = {p.name for p in (instances / "locks").iterdir()}
    kept = (live, recent, nova_busy, we_busy, "storage-registry-lock")
    assert left == {f"nova-{name}" for name in kept} | {"unrelated", directory.name}


def test_the_age_threshold_is_inclusive_and_configurable(instances: Path) -> None:
    _lock_file(instances, "swap_1", mtime=NOW - 100)
    cache = cache_of(instances)
    assert (
        lockfiles.collect_stale_lock_files(instances, (), cache_dir=cache, now=NOW, min_age=101)
        == []
    )
    assert lockfiles.collect_stale_lock_files(
        instances, (), cache_dir=cache, now=NOW, min_age=100
    ) == [locks.lock_path(instances, "swap_1")]


def test_no_locks_directory_means_nothing_to_collect(instances: Path) -> None:
    assert (
        lockfiles.collect_stale_lock_files(instances, (), cache_dir=cache_of(instances), now=NOW)
        == []
    )


def test_a_lock_file_is_kept_while_anything_of_its_name_is_in_the_cache(instances: Path) -> None:
    # ``live_names`` was observed before the locks were taken: under the lock, the cache itself
    # is asked again. An entry, a temp of it (ours or Nova's .part) or a quarantined copy all
    # mean the name is alive.
    cache = cache_of(instances)
    entry, ours, novas, trashed, gone = (naming.fingerprint(f"n{i}") for i in range(5))
    (cache / entry).write_bytes(b"fetched since the plan")
    (cache / naming.temp_name(ours, 7, "beef")).write_bytes(b"a download of ours")
    (cache / f"{novas}.part").write_bytes(b"a download of Nova's")
    (cache / ".imagecache" / "trash").mkdir(parents=True)
    (cache / ".imagecache" / "trash" / f"{trashed}@1999999000").write_bytes(b"quarantined")
    for name in (entry, ours, novas, trashed, gone):
        _lock_file(instances, name, mtime=NOW - 8 * DAY)

    removed = lockfiles.collect_stale_lock_files(instances, (), cache_dir=cache, now=NOW)

    assert removed == [locks.lock_path(instances, gone)]
    left = {p.name for p in (instances / "locks").iterdir()}
    assert left == {f"nova-{name}" for name in (entry, ours, novas, trashed)}


def test_a_missing_cache_directory_collects_nothing(instances: Path) -> None:
    # An unmounted share or a wrong path shows no entry at all: that is not "every name is gone".
    _lock_file(instances, naming.fingerprint("gone"), mtime=NOW - 8 * DAY)
    missing = instances / "_base"
    assert lockfiles.collect_stale_lock_files(instances, (), cache_dir=missing, now=NOW) == []
    missing.mkdir()
    assert len(lockfiles.collect_stale_lock_files(instances, (), cache_dir=missing, now=NOW)) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: handing files to another owner")
def test_lock_files_root_makes_belong_to_the_owner_of_the_tree(tmp_path: Path) -> None:
    """A root `clean` must not leave nova-compute a lock file it cannot open for writing."""
    instances = tmp_path / "instances"
    instances.mkdir()
    os.chown(instances, 65534, 65534)
    with locks.entry_lock(instances, "a" * 40, timeout=1):
        pass
    for made in (instances / "locks", instances / "locks" / ("nova-" + "a" * 40)):
        st = made.stat()
        assert (st.st_uid, st.st_gid) == (65534, 65534), made
    (instances / "locks" / "nova-mine").touch()  # made by someone else: left as it is
    with locks.entry_lock(instances, "mine", timeout=1):
        pass
    assert (instances / "locks" / "nova-mine").stat().st_uid == 0

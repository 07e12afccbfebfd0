"""The entry lock never goes through a link: attacks on ``locks/`` and ``locks/nova-<name>``.

A symlink planted for the lock directory or a lock file must make the lock fail with an OSError
(which callers turn into a failed outcome), and nothing it points at may be created, locked,
truncated or touched. The lock itself stays oslo.concurrency's: tests/test_locks.py proves that
against real oslo in another process.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from imagecache import locks, naming
from tests.test_locks import nova_holds, nova_tries

SHA = naming.fingerprint("image-1")


@pytest.fixture
def instances(tmp_path: Path) -> Path:
    path = tmp_path / "instances"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "precious"
    path.mkdir()
    return path


def _state(path: Path) -> tuple[int, int, int, bytes]:
    st = path.lstat()
    return st.st_ino, st.st_size, st.st_mtime_ns, path.read_bytes()


def _attempts(instances: Path, match: str) -> None:
    """Every way to take the lock fails with ``match``; none of them holds anything."""
    with pytest.raises(OSError, match=match), locks.entry_lock(instances, SHA, timeout=0):
        pytest.fail("locked through a link")
    with pytest.raises(OSError, match=match):
        locks.is_locked(instances, SHA)
    with ExitStack() as stack:
        failed = locks.take_entry_locks(stack, instances, [SHA], wait=0)
    assert list(failed) == [SHA]
    assert isinstance(failed[SHA], OSError)
    assert match in str(failed[SHA])


def test_a_symlinked_lock_file_is_not_followed(instances: Path, outside: Path) -> None:
    target = outside / "important"
    target.write_bytes(b"someone else's data")
    os.utime(target, (1000, 1000))
    (instances / "locks").mkdir()
    (instances / "locks" / f"nova-{SHA}").symlink_to(target)
    before = _state(target)

    _attempts(instances, "lock file is a symlink; not followed")

    assert _state(target) == before  # not truncated, not touched
    assert (instances / "locks" / f"nova-{SHA}").is_symlink()


def test_a_dangling_lock_file_link_creates_nothing(instances: Path, outside: Path) -> None:
    (instances / "locks").mkdir()
    (instances / "locks" / f"nova-{SHA}").symlink_to(outside / "created-through-a-link")
    _attempts(instances, "lock file is a symlink; not followed")
    assert list(outside.iterdir()) == []


def test_a_symlinked_lock_directory_is_not_followed(instances: Path, outside: Path) -> None:
    (outside / "unrelated").write_bytes(b"x")
    (instances / "locks").symlink_to(outside)
    _attempts(instances, "lock directory is a symlink; not followed")
    assert [p.name for p in outside.iterdir()] == ["unrelated"]


def test_a_lock_directory_that_is_a_file_is_refused(instances: Path) -> None:
    (instances / "locks").write_bytes(b"not a directory")
    _attempts(instances, "lock directory is not a directory")
    assert (instances / "locks").read_bytes() == b"not a directory"


def test_a_lock_file_that_is_not_a_regular_file_is_refused(instances: Path) -> None:
    (instances / "locks").mkdir()
    os.mkfifo(instances / "locks" / f"nova-{SHA}")
    failures: list[BaseException] = []

    def attempt() -> None:
        try:
            with locks.entry_lock(instances, SHA, timeout=0):
                pass
        except BaseException as exc:
            failures.append(exc)

    # Opening a FIFO for writing only (as fasteners does) would block for ever: a thread keeps
    # that from hanging the suite.
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "opening the lock file blocked"
    [failure] = failures
    assert isinstance(failure, OSError)
    assert "lock file is not a regular file" in str(failure)


def test_lock_files_are_created_with_mode_0644(instances: Path) -> None:
    old_umask = os.umask(0)
    try:
        with locks.entry_lock(instances, SHA, timeout=0):
            pass
    finally:
        os.umask(old_umask)
    path = instances / "locks" / f"nova-{SHA}"
    assert stat.S_ISREG(path.lstat().st_mode)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o644


def _has_open(path: Path) -> bool:
    """Whether this process has ``path`` open (it waits on its lock)."""
    fds = Path("/proc/self/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) == str(path):
                return True
        except OSError:
            continue
    return False


def test_a_lock_file_unlinked_while_we_wait_is_not_what_we_lock(instances: Path) -> None:
    # A collector (another imagecache) unlinks the lock file while we wait for it. When it lets
    # go we would lock an inode nobody else can see any more, and Nova would lock a new file of
    # that name at the same time. Once locked, we check the name and lock what it names now.
    path = instances / "locks" / f"nova-{SHA}"
    held, done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with locks.entry_lock(instances, SHA, timeout=30, poll=0.01):
                held.set()
                done.wait(timeout=30)
        except BaseException as exc:
            errors.append(exc)
            held.set()

    with nova_holds(instances, SHA) as release:
        thread = threading.Thread(target=worker)
        thread.start()
        try:
            for _ in range(3000):
                if _has_open(path):
                    break
                time.sleep(0.01)  # until the worker is waiting on the lock, not for time
            else:
                pytest.fail("the worker never opened the lock file")
            path.unlink()  # under the holder's lock, as the collector does
            release()
            assert held.wait(timeout=30)
            assert errors == []
            assert path.is_file(), "the lock file was not created again"
            assert nova_tries(instances, SHA) == "busy", "we hold a lock on an unlinked inode"
        finally:
            done.set()
            thread.join()
    assert nova_tries(instances, SHA) == "got"

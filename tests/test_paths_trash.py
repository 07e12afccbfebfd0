"""The trash is never reached through a link: attacks on ``.imagecache`` and ``trash``, real files.

Each attack plants a symlink (or a mount) where the trash directories belong, pointing at a
directory outside the cache that holds files named like trash entries, then quarantines, lists,
restores and purges. Nothing outside may be moved, unlinked or changed, and every operation must
fail with an OSError that says why.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imagecache import naming
from imagecache.model import ProblemCode
from imagecache.sources.cache import scan_trash
from imagecache.store import trash as trash_store

SHA = naming.fingerprint("image-1")
NOW = 2_000_000_000
TRASH_NAME = f"{SHA}@{NOW}"

Snapshot = dict[str, tuple[int, int, int, int, str]]


def snapshot(root: Path) -> Snapshot:
    """Every file under ``root``: inode, size, mtime, links, content digest (no link followed)."""
    found: Snapshot = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            st = path.lstat()
            digest = "" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path.relative_to(root))] = (
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                st.st_nlink,
                digest,
            )
    return found


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    path = tmp_path / "_base"
    path.mkdir()
    (path / SHA).write_bytes(b"an entry of the cache")
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the cache, holding files named like trash entries and like entries."""
    path = tmp_path / "precious"
    (path / "trash").mkdir(parents=True)
    for directory in (path, path / "trash"):
        (directory / TRASH_NAME).write_bytes(b"not the cache's: never to be purged")
        (directory / f"swap_1@{NOW}").write_bytes(b"nor this")
        os.utime(directory / TRASH_NAME, (1000, 1000))
    return path


def _everything_fails(cache: Path, match: str) -> None:
    entry = (cache / SHA).stat().st_ino
    with pytest.raises(OSError, match=match):
        trash_store.quarantine(cache, SHA, now=NOW)
    assert (cache / SHA).stat().st_ino == entry, "the entry moved"
    with pytest.raises(OSError, match=match):
        trash_store.list_trash(cache)
    with pytest.raises(OSError, match=match):
        trash_store.purge(cache, TRASH_NAME)
    (cache / SHA).unlink()  # so that a restore would have somewhere to go
    with pytest.raises(OSError, match=match):
        trash_store.restore(cache, TRASH_NAME)
    assert not (cache / SHA).exists(), "a file from outside was restored into the cache"


def test_a_symlinked_trash_is_never_followed(cache: Path, outside: Path) -> None:
    (cache / ".imagecache").mkdir()
    (cache / ".imagecache" / "trash").symlink_to(outside)
    before = snapshot(outside)
    _everything_fails(cache, "a symlink, not a real directory; not followed")
    assert snapshot(outside) == before
    assert (cache / ".imagecache" / "trash").is_symlink()  # refused, not replaced either


def test_a_symlinked_state_directory_is_never_followed(cache: Path, outside: Path) -> None:
    (cache / ".imagecache").symlink_to(outside)
    before = snapshot(outside)
    _everything_fails(cache, "a symlink, not a real directory; not followed")
    assert snapshot(outside) == before


def test_a_dangling_trash_link_creates_nothing_outside(cache: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (cache / ".imagecache").mkdir()
    (cache / ".imagecache" / "trash").symlink_to(target)
    with pytest.raises(OSError, match="symlink"):
        trash_store.quarantine(cache, SHA, now=NOW)
    assert not target.exists()
    assert (cache / SHA).exists()


def test_the_scanner_reports_a_symlinked_trash_as_blocking(cache: Path, outside: Path) -> None:
    (cache / ".imagecache").mkdir()
    (cache / ".imagecache" / "trash").symlink_to(outside)
    entries, problems = scan_trash(str(cache))
    assert entries == ()
    [problem] = problems
    assert problem.code is ProblemCode.TRASH_UNLISTED
    assert problem.blocking
    assert "not followed" in problem.message


# A symlink swapped in while quarantines and restores run: the descriptors pin the real trash.

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

_CHURN = """
import sys
from imagecache.errors import EntryChanged
from imagecache.store import trash as trash_store

cache, rounds, *names = sys.argv[1:]
moved = refused = 0
for now in range(1, int(rounds) + 1):
    try:
        trashed = {e.name: e.trash_name for e in trash_store.list_trash(cache)}
    except OSError:
        refused += 1
        continue
    for name in names:
        try:
            if name in trashed:
                trash_store.restore(cache, trashed[name])
            else:
                trash_store.quarantine(cache, name, now=now)
            moved += 1
        except (OSError, EntryChanged):
            refused += 1
print(moved, refused)
"""


def _exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        pytest.skip("no renameat2 in libc")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE):
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            pytest.skip("this filesystem cannot exchange names")
        raise OSError(code, os.strerror(code), str(a))


def test_a_symlink_swapped_in_mid_flight_never_redirects_a_move(cache: Path, outside: Path) -> None:
    names = [SHA, "swap_1", naming.fingerprint("image-2")]
    digests = {}
    for name in names:
        (cache / name).write_bytes(os.urandom(4096))
        digests[name] = hashlib.sha256((cache / name).read_bytes()).hexdigest()
    trash = cache / ".imagecache" / "trash"
    trash.mkdir(parents=True)
    decoy = cache / ".imagecache" / "decoy"
    decoy.symlink_to(outside)
    rounds = 400
    # Outside files under every trash name the child will use: bait for a restore or a purge
    # that resolves its trash name through the link.
    for name in names:
        for epoch in range(1, rounds + 1):
            (outside / naming.trash_name(name, epoch)).write_bytes(b"bait")
    before = snapshot(outside)
    with subprocess.Popen(
        [sys.executable, "-c", _CHURN, str(cache), str(rounds), *names],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        swaps = 0
        while child.poll() is None:
            _exchange(trash, decoy)  # atomically: the trash is now the symlink, and back
            swaps += 1
        out, _ = child.communicate()
    assert child.returncode == 0
    if trash.is_symlink():
        _exchange(trash, decoy)
    moved, refused = map(int, out.split())
    assert moved > 0, "the child never moved anything"
    assert refused > 0, "the child never met the symlink: no attack took place"
    assert swaps > 0

    assert snapshot(outside) == before, "a move or a listing went through the symlink"
    listed = {e.name: e.trash_name for e in trash_store.list_trash(cache)}
    for name in names:
        in_place, in_trash = (cache / name).exists(), name in listed
        assert in_place != in_trash, f"{name}: in place {in_place}, in trash {in_trash}"
        path = cache / name if in_place else trash / listed[name]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digests[name]
    assert {p.name for p in trash.iterdir()} == set(listed.values())


# A trash on another filesystem (a mount over it): refused, even though it is a real directory.

_ON_A_MOUNT = """
import errno, sys
from imagecache.store import trash as trash_store
cache = sys.argv[1]
for call, args in (
    (trash_store.quarantine, ("{sha}",)),
    (trash_store.list_trash, ()),
    (trash_store.purge, ("{trash_name}",)),
    (trash_store.restore, ("{trash_name}",)),
):
    try:
        call(cache, *args, **({{"now": {now}}} if call is trash_store.quarantine else {{}}))
    except OSError as exc:
        print(call.__name__, errno.errorcode.get(exc.errno), exc.strerror)
    else:
        print(call.__name__, "done")
"""


def _in_a_mount_namespace(
    mountpoint: Path, code: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child with a fresh tmpfs on ``mountpoint``, in its own mount namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1)")
    script = 'mount -t tmpfs imagecache-test "$0" && printf x > "$0/$1" && shift && exec "$@"'
    trash_file = args[0]
    for flags in (["--mount"], ["--user", "--map-root-user", "--mount"]):
        command = [unshare, *flags, "sh", "-c", script, str(mountpoint), trash_file]
        done = subprocess.run(
            [*command, sys.executable, "-c", code, *args[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode == 0:
            return done
    pytest.skip(f"cannot mount a tmpfs in a new mount namespace: {done.stderr.strip()}")


def test_a_trash_on_another_filesystem_is_refused(cache: Path) -> None:
    trash = cache / ".imagecache" / "trash"
    trash.mkdir(parents=True)
    code = _ON_A_MOUNT.format(sha=SHA, trash_name=TRASH_NAME, now=NOW)
    done = _in_a_mount_namespace(trash, code, TRASH_NAME, str(cache))
    message = f"on another filesystem than the cache {cache}"
    assert done.stdout.splitlines() == [
        f"{call} EXDEV {message}" for call in ("quarantine", "list_trash", "purge", "restore")
    ]
    assert (cache / SHA).read_bytes() == b"an entry of the cache"

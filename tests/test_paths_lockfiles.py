"""Lock-file collection on shared storage and through links: a live lock file is never unlinked.

All hosts on one shared ``instances_path`` lock their entries in the one ``locks/``, each host's
cache being ``_base`` or ``_base_<ip>`` (or the configured cache under another name). A lock file
is collected only when nothing of its name is left in any of them; in doubt it stays. Nothing is
ever unlinked through a symlink.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagecache import lockfiles, locks, naming

NOW = 2_000_000_000.0
OLD = NOW - 8 * 86400
GONE = naming.fingerprint("gone")
PEERS = naming.fingerprint("peer's")


@pytest.fixture
def instances(tmp_path: Path) -> Path:
    path = tmp_path / "instances"
    (path / "_base").mkdir(parents=True)
    return path


def _lock_file(instances: Path, name: str) -> Path:
    path = instances / "locks" / f"nova-{name}"
    path.parent.mkdir(exist_ok=True)
    path.touch()
    os.utime(path, (OLD, OLD))
    return path


def _collect(instances: Path, cache: str = "_base") -> list[str]:
    return lockfiles.collect_stale_lock_files(instances, (), cache_dir=instances / cache, now=NOW)


def _left(instances: Path) -> set[str]:
    return {p.name for p in (instances / "locks").iterdir()}


@pytest.mark.parametrize(
    "peer_file",
    [PEERS, f"{PEERS}.part", naming.temp_name(PEERS, 7, "beef"), f".imagecache/trash/{PEERS}@1"],
)
def test_a_peers_entry_keeps_its_lock_file(instances: Path, peer_file: str) -> None:
    peer = instances / "_base_10.0.0.2"
    (peer / peer_file).parent.mkdir(parents=True, exist_ok=True)
    (peer / peer_file).write_bytes(b"the peer's entry, in use on the peer")
    _lock_file(instances, PEERS)
    _lock_file(instances, GONE)

    assert _collect(instances) == [locks.lock_path(instances, GONE)]
    assert _left(instances) == {f"nova-{PEERS}"}

    (peer / peer_file).unlink()
    assert _collect(instances) == [locks.lock_path(instances, PEERS)]


def test_every_cache_counts_whatever_its_name(instances: Path) -> None:
    # The configured cache under another name, the usual _base of a peer, and a peer's _base_<ip>.
    (instances / "images").mkdir()
    names = [naming.fingerprint(f"n{i}") for i in range(3)]
    for cache, name in zip(("images", "_base", "_base_10.0.0.3"), names, strict=True):
        (instances / cache).mkdir(exist_ok=True)
        (instances / cache / name).write_bytes(b"entry")
        _lock_file(instances, name)
    _lock_file(instances, GONE)
    (instances / "_base.notes").write_text("a file, not a cache: it holds no entry")

    assert _collect(instances, "images") == [locks.lock_path(instances, GONE)]
    assert _left(instances) == {f"nova-{name}" for name in names}


def test_a_cache_that_cannot_be_listed_keeps_every_lock_file(
    instances: Path, tmp_path: Path
) -> None:
    _lock_file(instances, GONE)
    # A peer's cache behind a link that leads nowhere (its share is not mounted): in doubt.
    (instances / "_base_10.0.0.4").symlink_to(tmp_path / "unmounted")
    assert _collect(instances) == []
    (instances / "_base_10.0.0.4").unlink()

    # A peer's trash that is a symlink: not listed through the link, so nothing is known gone.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (instances / "_base_10.0.0.5" / ".imagecache").mkdir(parents=True)
    (instances / "_base_10.0.0.5" / ".imagecache" / "trash").symlink_to(elsewhere)
    with pytest.raises(OSError, match="a symlink, not a real directory; not followed"):
        _collect(instances)
    assert _left(instances) == {f"nova-{GONE}"}

    (instances / "_base_10.0.0.5" / ".imagecache" / "trash").unlink()
    assert _collect(instances) == [locks.lock_path(instances, GONE)]


def test_a_symlinked_lock_directory_is_not_followed(instances: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / f"nova-{GONE}"
    victim.write_bytes(b"not a lock file of ours")
    os.utime(victim, (OLD, OLD))
    (instances / "locks").symlink_to(outside)
    with pytest.raises(OSError, match="a symlink, not a real directory; not followed"):
        _collect(instances)
    assert victim.read_bytes() == b"not a lock file of ours"
    assert victim.stat().st_mtime == OLD


def test_a_symlinked_lock_file_is_never_unlinked_nor_its_target(
    instances: Path, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"someone's file")
    os.utime(target, (OLD, OLD))
    link = instances / "locks" / f"nova-{GONE}"
    link.parent.mkdir()
    link.symlink_to(target)
    os.utime(link, (OLD, OLD), follow_symlinks=False)
    before = target.stat()
    assert _collect(instances) == []
    assert link.is_symlink()
    after = target.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )

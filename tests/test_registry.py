"""`clean` registers its host in Nova's `compute_nodes` under Nova's lock, never resetting it."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from imagecache.layout import Layout
from imagecache.model import Manifest
from imagecache.store.manifests import write_manifest
from tests.test_executor import NOW, Host, cli, make_host
from tests.test_locks import nova_holds


def registry(host: Host) -> Path:
    return host.instances / "compute_nodes"


def snapshot(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns


def live_peers(host: Host, *names: str) -> None:
    """Peers sharing the storage that run imagecache: a fresh manifest each, claiming nothing
    (a registered host without one blocks every removal: tests/test_shared.py)."""
    for name in names:
        write_manifest(Layout(str(host.instances)), Manifest(name, NOW, complete=True))


def test_clean_registers_this_host_and_keeps_every_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    path = registry(host)
    path.write_text(json.dumps({"h0": 1_500_000_000, "h2": NOW - 100.5, "h1": NOW - 3600}))
    live_peers(host, "h0", "h2")
    before = snapshot(path)
    for command in ("plan", "status"):  # read-only commands stay read-only
        cli(host, capsys, command)
        assert snapshot(path) == before

    code, doc = cli(host, capsys, "clean")
    assert code == 0 and doc["apply_problems"] == []
    assert json.loads(path.read_text()) == {"h0": 1_500_000_000, "h1": NOW, "h2": NOW - 100.5}
    assert path.stat().st_ino != before[1]  # replaced by rename, never rewritten in place
    assert {p.name for p in host.instances.iterdir()} == {"_base", "locks", "compute_nodes"}
    assert (host.instances / "locks" / "nova-storage-registry-lock").is_file()


def test_a_missing_registry_is_created_with_this_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    code, _ = cli(host, capsys, "clean")
    assert code == 0 and json.loads(registry(host).read_text()) == {"h1": NOW}
    assert stat.S_IMODE(registry(host).stat().st_mode) == 0o644


def test_the_registry_keeps_its_owner_and_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nova (user nova) rewrites the file in place: a root-owned replacement would lock it out.
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    host = make_host(tmp_path)
    path = registry(host)
    path.write_text('{"h0": 1500000000.0}')
    live_peers(host, "h0")
    os.chown(path, 4321, 4322)
    path.chmod(0o640)
    code, _ = cli(host, capsys, "clean")
    st = path.stat()
    assert code == 0 and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 4322, 0o640)
    assert json.loads(path.read_text()) == {"h0": 1500000000.0, "h1": NOW}


@pytest.mark.parametrize(
    "content",
    [b'{"h0": 1500000000.0, "h2": 1899', b"", b'["h0"]', b'{"h0": "yesterday"}'],
    ids=["truncated", "empty", "not-an-object", "not-epochs"],
)
def test_an_undecodable_registry_is_left_untouched_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    # Nova reset such a file to its own entry (LP 1252659): every other host's instances then
    # stopped protecting their bases. Left as it is, the plan is incomplete and removes nothing.
    host = make_host(tmp_path)
    path = registry(host)
    path.write_bytes(content)
    before = snapshot(path)
    code, doc = cli(host, capsys, "clean")
    assert code == 1 and doc["complete"] is False
    [problem] = doc["apply_problems"]
    assert problem["source"] == "registry" and problem["ref"] == str(path)
    assert problem["message"].endswith("left as it is, h1 not registered")
    assert snapshot(path) == before


def test_the_registry_lock_nova_holds_is_waited_for_then_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, lock_timeout_seconds=0.3)
    path = registry(host)
    path.write_text('{"h0": 1500000000.0}')
    before = snapshot(path)
    with nova_holds(host.instances, "storage-registry-lock"):
        code, doc = cli(host, capsys, "clean")
    assert code == 1 and snapshot(path) == before
    [problem] = doc["apply_problems"]
    assert problem["source"] == "registry"
    assert "h1 not registered this pass" in problem["message"]
    assert "held by another process; gave up after 0.3 s" in problem["message"]

    # Nova lets go while we wait: registered within the same pass.
    host = make_host(tmp_path / "again", lock_timeout_seconds=30)
    registry(host).write_text('{"h0": 1500000000.0}')
    live_peers(host, "h0")
    with nova_holds(host.instances, "storage-registry-lock") as release:
        timer = threading.Timer(0.3, release)
        timer.start()
        try:
            code, doc = cli(host, capsys, "clean")
        finally:
            timer.join()
    assert code == 0 and doc["apply_problems"] == []
    assert json.loads(registry(host).read_text()) == {"h0": 1500000000.0, "h1": NOW}

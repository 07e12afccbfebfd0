"""Hostile review of the cleaner lock's wiring into a pass (manager._Cleaner, _touch_only).

Each test runs real ``imagecache`` processes on one shared storage (tests/test_shared.py's
``pool``) while another process holds the storage's cleaner lock through a real backend
(file, Redis, etcd: the ``coordination_url`` fixture). The claim under test, from
coordination.py: "Removing entries does [need coordination]: one host at a time per storage,
the *cleaner*, holds a distributed lock while it removes". A host that is not the cleaner must
remove nothing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.test_shared import _HOLDER, DAY, Pool, pool
from tests.test_verify import rot

pytest.importorskip("tooz", reason="the coordination extra is not installed")

X, Y = "1" * 40, "2" * 40


@contextmanager
def cleaner_held_by(url: str, member: str, cache: Path) -> Iterator[None]:
    """Another host (a real process) holds the storage's cleaner lock meanwhile."""
    from imagecache.layout import Layout
    from imagecache.store.identity import storage_id

    storage = storage_id(Layout(str(cache.parent), cache.name))  # what every pass names it by
    argv = [sys.executable, "-c", _HOLDER, url, member, storage]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as b:
        assert b.stdout is not None and b.stdin is not None
        assert b.stdout.readline().strip() == "held"
        try:
            yield
        finally:  # a clean exit: the lock is released, not left to expire
            b.stdin.write("\n")
            b.stdin.flush()
            try:
                b.wait(timeout=30)
            except subprocess.TimeoutExpired:
                b.kill()


def _two_live_hosts(tmp_path: Path, url: str, **options: object) -> Pool:
    p = pool(tmp_path, "ha", "hb", coordination_url=url, **options)
    for node in ("ha", "hb"):
        code, _, err = p.nodes[node].run("clean")
        assert code == 0, err  # both have manifests: live peers, nothing blocks
    return p


def _removed_lines(p: Pool, node: str) -> list[str]:
    import json

    audit = p.nodes[node].audit
    if not audit.exists():
        return []
    return [json.loads(x)["action"] for x in audit.read_text().splitlines()]


# --- bugs (failing on HEAD a48ac06) -----------------------------------------------------


def _stale_lock_file(p: Pool) -> Path:
    locks = p.instances / "locks"
    locks.mkdir(exist_ok=True)
    stale = locks / f"nova-{X}"  # the lock file of an entry gone for long
    stale.write_bytes(b"")
    os.utime(stale, (time.time() - 8 * DAY,) * 2)
    return stale


@pytest.mark.parametrize("saved", [False, True], ids=["clean", "clean--plan"])
def test_a_non_leader_collects_stale_lock_files_in_the_shared_locks_dir(
    tmp_path: Path, coordination_url: str, saved: bool
) -> None:
    """Was a bug (fixed: executor.apply(collect_lock_files=cleaner.leading)): _touch_only drops the
    plan's removals but leaves ``plan.complete`` true, and the
    executor's housekeeping (_collect_lock_files) is gated on plan.complete and remove_unused
    only: a host told "another host cleans the storage now" still unlinks files in the shared
    ``locks/``, concurrently with the cleaner (``clean`` and ``clean --plan`` alike)."""
    p = _two_live_hosts(tmp_path, coordination_url)
    stale = _stale_lock_file(p)
    args = ["clean"]
    if saved:
        plan = tmp_path / "plan.json"
        p.nodes["ha"].run("plan", "-o", str(plan))
        args += ["--plan", str(plan)]
    with cleaner_held_by(coordination_url, "hb", p.cache):
        code, _doc, err = p.nodes["ha"].run(*args)
        assert code == 0, err
        assert stale.exists(), "a host that is not the cleaner removed a shared lock file"
    _, _, err = p.nodes["ha"].run(*args)  # control: the cleaner does collect it
    assert not stale.exists(), err


def test_clean_with_a_saved_plan_collects_lock_files_when_coordination_is_down(
    tmp_path: Path,
) -> None:
    """Was a bug (fixed likewise): in apply_plan, coordination-unavailable is only a problem of the
    report: the saved
    plan stays ``complete`` (run_pass puts it in the plan, so there it blocks), and the executor
    collects lock files in the shared ``locks/`` with no cleaner lock at all."""
    from tests.services import free_port

    url = f"redis://127.0.0.1:{free_port()}?timeout=2"  # nothing listens there
    p = pool(tmp_path, "ha", "hb", coordination_url=url)
    plan = tmp_path / "plan.json"
    p.nodes["ha"].run("plan", "-o", str(plan))
    stale = _stale_lock_file(p)
    _code, doc, err = p.nodes["ha"].run("clean", "--plan", str(plan))
    found = [q["code"] for q in (*doc["problems"], *doc.get("apply_problems", []))]
    assert "coordination-unavailable" in found, err
    assert stale.exists(), "clean --plan removed a shared lock file without the cleaner lock"


# --- fixed by a48ac06 while this review ran: kept as regression tests ----------------------


def test_clean_with_a_saved_plan_removes_while_another_host_holds_the_cleaner_lock(
    tmp_path: Path, coordination_url: str
) -> None:
    """Was a bug at review start (apply_plan never entered _Cleaner: two hosts removed from one
    storage at once); fixed by a48ac06 during the review. Kept as its regression test."""
    p = _two_live_hosts(tmp_path, coordination_url)
    (p.cache / Y).write_bytes(b"y" * 65536)
    p.old(Y)
    saved = tmp_path / "plan.json"
    _, _, err = p.nodes["ha"].run("plan", "-o", str(saved))
    assert saved.exists(), err
    with cleaner_held_by(coordination_url, "hb", p.cache):
        _code, _doc, err = p.nodes["ha"].run("clean", "--plan", str(saved))
        assert (p.cache / Y).exists(), (
            "clean --plan removed an entry while another host held the cleaner lock"
        )
        assert "removed" not in _removed_lines(p, "ha")


def test_verify_quarantines_while_another_host_holds_the_cleaner_lock(
    tmp_path: Path, coordination_url: str
) -> None:
    """Was a bug at review start (verify_entries quarantined without the cleaner lock); fixed by
    a48ac06 during the review. Kept as its regression test."""
    p = _two_live_hosts(tmp_path, coordination_url)
    entry = p.cache / Y
    entry.write_bytes(os.urandom(65536))
    code, _, err = p.nodes["ha"].run("verify", "--all")  # first seen: recorded good
    assert code == 0, err
    rot(entry)
    with cleaner_held_by(coordination_url, "hb", p.cache):
        code, _doc, err = p.nodes["ha"].run("verify", "--all")
        assert entry.exists(), (
            "verify quarantined an entry while another host held the cleaner lock"
        )


# --- what held ----------------------------------------------------------------------------


class _Silent:
    """A TCP server that accepts every connection and never answers (a hung backend)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)

    def close(self) -> None:
        self._stop = True
        self.thread.join()
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.parametrize("scheme", ["redis", "etcd3+http"])
def test_a_backend_that_accepts_and_never_answers_does_not_hang_the_pass(
    tmp_path: Path, scheme: str
) -> None:
    silent = _Silent()
    try:
        url = f"{scheme}://127.0.0.1:{silent.port}?timeout=2"
        p = pool(tmp_path, "ha", coordination_url=url)
        (p.cache / Y).write_bytes(b"y" * 65536)
        p.old(Y)
        started = time.monotonic()
        code, doc, err = p.nodes["ha"].run("clean")
        took = time.monotonic() - started
        assert took < 60, f"the pass took {took:.0f} s against a silent backend"
        assert code == 1 and (p.cache / Y).exists(), err
        assert "coordination-unavailable" in [q["code"] for q in doc["problems"]]
        assert "ha" in p.manifests()
    finally:
        silent.close()


def test_a_non_leader_neither_removes_nor_reaps_nor_purges(
    tmp_path: Path, coordination_url: str
) -> None:
    """_touch_only turns every removal, reap and purge into keep (another-cleaner)."""
    p = _two_live_hosts(tmp_path, coordination_url)
    (p.cache / Y).write_bytes(b"y" * 65536)
    temp = p.cache / f"{X}.part"
    temp.write_bytes(b"t" * 1024)
    p.old(Y, temp.name)
    trash = p.cache / ".imagecache" / "trash"
    trash.mkdir(parents=True, exist_ok=True)
    old = trash / f"{X}@{int(time.time() - 30 * DAY)}"
    old.write_bytes(b"q" * 1024)
    os.utime(old, (time.time() - 30 * DAY,) * 2)
    with cleaner_held_by(coordination_url, "hb", p.cache):
        code, _doc, err = p.nodes["ha"].run("clean")
        assert code == 0, err
        assert (p.cache / Y).exists() and temp.exists() and old.exists()
        assert not any(a in ("removed", "reaped", "purged", "quarantined")
                       for a in _removed_lines(p, "ha"))  # fmt: skip


def test_consecutive_passes_lead_again_and_the_lock_is_free_between_them(
    tmp_path: Path, coordination_url: str
) -> None:
    """Each pass takes the lock and gives it up at its end: the next pass of the same host
    leads again, and another host can take it between two passes."""
    p = _two_live_hosts(tmp_path, coordination_url)
    for _ in range(2):
        (p.cache / Y).write_bytes(b"y" * 65536)
        p.old(Y)
        code, _, err = p.nodes["ha"].run("clean")
        assert code == 0, err
        assert not (p.cache / Y).exists()
        with cleaner_held_by(coordination_url, "hb", p.cache):  # free between passes
            pass

"""Hostile review of shared-storage coordination, round 2 (coordination.py, manager._Cleaner,
retire_peer, usage.peers, the daemon).

Every host is a separate ``imagecache`` process on one real shared directory
(tests/test_shared.py's ``pool``); backends are real (a file directory, a private Redis).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imagecache.layout import Layout
from imagecache.store.manifests import read_manifests
from tests.test_shared import Node, Pool, codes, pool

Y = "2" * 40
NAMES = [c * 40 for c in "56789"]
LOCK_CHILD = str(Path(__file__).with_name("_lock_child.py"))


def _set(node: Node, option: str, value: object) -> None:
    """Set ``[imagecache] option`` in ``node``'s nova.conf (replacing it if present)."""
    lines = [
        line for line in node.config.read_text().splitlines() if not line.startswith(f"{option} =")
    ]
    at = lines.index("[imagecache]") + 1
    lines.insert(at, f"{option} = {value}")
    node.config.write_text("\n".join(lines) + "\n")


def _argv(node: Node, *args: str) -> list[str]:
    return [sys.executable, "-m", "imagecache", "--config-file", str(node.config),
            "--inventory", str(node.inventory), "--json", *args]  # fmt: skip


def _audited(node: Node, action: str) -> list[str]:
    if not node.audit.exists():
        return []
    lines = [json.loads(x) for x in node.audit.read_text().splitlines()]
    return sorted(x["entry"] for x in lines if x["action"] == action)


@contextmanager
def nova_holds(p: Pool, name: str) -> Iterator[Callable[[], None]]:
    """nova-compute (a real process, oslo.concurrency) holds ``name``'s entry lock until the
    callable it yields is called (or the block ends)."""
    argv = [sys.executable, LOCK_CHILD, "hold", str(p.instances / "locks"), name]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as nova:
        assert nova.stdin is not None and nova.stdout is not None
        assert nova.stdout.readline().strip() == "held"

        def release() -> None:
            if nova.poll() is None and nova.stdin is not None and not nova.stdin.closed:
                nova.stdin.write("\n")
                nova.stdin.close()
                nova.wait(timeout=30)

        try:
            yield release
        finally:
            release()


def _manifest_written(p: Pool, host: str) -> float:
    found, _ = read_manifests(Layout(str(p.instances)))
    return next((m.written for m in found if m.host == host), 0.0)


def _wait_for_manifest(p: Pool, host: str, since: float, proc: subprocess.Popen[str]) -> None:
    """Until ``host``'s pass (``proc``) has written its manifest: it is past its _Cleaner entry,
    so holds the cleaner lock if it got it."""
    deadline = time.monotonic() + 30
    while _manifest_written(p, host) < since:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{host} never wrote its manifest"
        time.sleep(0.05)
    time.sleep(0.5)  # from its manifest to its first removal


# --- double clean: the storage id is a path of this host --------------------------------------


@pytest.mark.parametrize("backend", ["default", "redis"])
def test_hosts_mounting_the_storage_at_different_paths_still_clean_one_at_a_time(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """The same NFS export mounted at /var/lib/nova/instances on one host and reached through
    another path (a symlink, another mount point) on the next. _Cleaner passes
    ``storage=settings.cache_dir``, a path of *this* host, as "a stable id of the shared storage,
    the same on every host": the two hosts are in different groups and take different cleaner
    locks (file://: two lock files in the same directory), and both remove at once."""
    options: dict[str, object] = {"lock_timeout_seconds": 30}
    if backend == "redis":
        pytest.importorskip("tooz", reason="the coordination extra is not installed")
        options["coordination_url"] = request.getfixturevalue("redis_service").url
    p = pool(tmp_path, "ha", "hb", **options)
    mount_b = tmp_path / "mnt" / "nova-instances"
    mount_b.parent.mkdir()
    mount_b.symlink_to(p.instances)  # hb reaches the same directory by another path
    b = p.nodes["hb"]
    b.config.write_text(b.config.read_text().replace(
        f"instances_path = {p.instances}\n", f"instances_path = {mount_b}\n"))  # fmt: skip
    _set(p.nodes["ha"], "lock_timeout_seconds", 1)
    for node in ("ha", "hb"):
        code, _, err = p.nodes[node].run("clean")
        assert code == 0, err  # both live peers
    for name in NAMES:
        (p.cache / name).write_bytes(name.encode() * 1024)
    p.old(*NAMES)
    late = "4" * 40  # cached long ago, seen by ha's pass only (after hb's plan was made)
    with nova_holds(p, NAMES[0]) as release:  # hb, the cleaner, waits for it half-way
        since = time.time()
        with subprocess.Popen(_argv(b, "clean"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as cb:  # fmt: skip
            _wait_for_manifest(p, "hb", since - 1, cb)
            (p.cache / late).write_bytes(b"z" * 4096)
            p.old(late)
            _, doc, _ = p.nodes["ha"].run("clean")  # ha's whole pass, during hb's
            release()
            cb.communicate(timeout=60)
    kept = {e["name"]: e["reason"] for e in doc["entries"] if e["name"] in [*NAMES, late]}
    by_a = _audited(p.nodes["ha"], "removed")
    assert by_a == [], f"ha removed {by_a} while hb held the cleaner lock ({kept})"
    assert set(kept.values()) == {"another-cleaner"}, kept


# --- retire a host whose pass runs -------------------------------------------------------------


def _record(node: Node, **fields: object) -> None:
    doc = json.loads(node.inventory.read_text())
    doc["instances"].append({"host": node.name, **fields})
    node.inventory.write_text(json.dumps(doc))


def test_a_host_in_the_coordination_group_is_never_retired(tmp_path: Path) -> None:
    """retire_peer refuses "a group member: it is alive" (_refuse_unless_gone checks
    ``peer.member``), but it judges the peer with peers_of(), which never asks the group:
    ``member`` is always False. A pass that runs longer than peer_stale_seconds (waiting for an
    entry Nova holds) has a stale manifest and is in the group (coordination.py: "every host
    is a member of that storage's group while its pass runs"): it is retired mid-pass, dropped
    from compute_nodes, its manifest tombstoned; its pass ends without writing another, and
    the next pass of its peer removes what only its instance records protect."""
    pytest.importorskip("tooz", reason="the coordination extra is not installed")
    import hashlib

    p = pool(tmp_path, "ha", "hb", peer_stale_seconds=3, lock_timeout_seconds=30)
    kernel = hashlib.sha1(b"kernel-of-hb").hexdigest()
    (p.cache / kernel).write_bytes(b"k" * 65536)
    _record(p.nodes["hb"], uuid="inst-hb", kernel_id="kernel-of-hb")  # hb's records alone
    for name in NAMES[:2]:
        (p.cache / name).write_bytes(name.encode() * 1024)
    assert p.nodes["hb"].run("clean")[0] == 0
    p.old(kernel, *NAMES[:2])
    assert p.nodes["ha"].run("clean")[0] == 0  # both live; ha's manifest fresh for hb's pass
    for name in NAMES[:2]:
        (p.cache / name).write_bytes(name.encode() * 1024)
    p.old(*NAMES[:2])
    b = p.nodes["hb"]
    with nova_holds(p, NAMES[0]) as release:
        since = time.time()
        with subprocess.Popen(_argv(b, "clean"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as cb:  # fmt: skip
            _wait_for_manifest(p, "hb", since - 1, cb)
            time.sleep(4)  # hb's pass still runs (a member), its manifest is stale now
            assert cb.poll() is None
            code, _, err = p.nodes["ha"].run("peers", "retire", "hb")
            retired = code == 0
            release()
            cb.communicate(timeout=60)
    p.old(kernel)
    p.nodes["ha"].run("clean")
    assert not retired, f"hb was retired while its pass ran (a member of the group): {err[-300:]}"
    assert (p.cache / kernel).exists(), "hb's kernel (its records) removed after a bad retire"


# --- a cache path the default file:// URL cannot carry -------------------------------------------


def test_a_cache_path_with_a_hash_sign_is_a_problem_of_the_pass_not_an_aborted_pass(
    tmp_path: Path,
) -> None:
    """instances_path = /srv/nova#2/instances, coordination_url unset, a peer on the storage:
    _Cleaner._url() calls default_url() outside its try, so its CoordinationError (bad-url)
    aborts the whole pass: `clean --json` prints nothing, exit 1, no manifest is written (the
    peers find this host stale and stop removing, for good: every daemon pass dies the same
    way). Expected: a coordination-unavailable problem, nothing removed, manifest written."""
    pytest.importorskip("tooz", reason="the coordination extra is not installed")
    root = tmp_path / "nova#2"
    root.mkdir()
    p = pool(root, "ha", "hb")
    assert p.nodes["hb"].run("clean")[0] == 0  # a peer: coordination is needed
    (p.cache / Y).write_bytes(b"y" * 65536)
    p.old(Y)
    code, doc, err = p.nodes["ha"].run("clean")
    assert (p.cache / Y).exists()
    assert doc, f"no JSON document (exit {code}): {err.strip()[-300:]}"
    assert "coordination-unavailable" in [q["code"] for q in doc.get("problems", [])], doc
    assert "ha" in {m.host for m in read_manifests(Layout(str(p.instances)))[0]}


# --- the backend goes away mid-pass ---------------------------------------------------------------


def test_a_backend_lost_mid_pass_is_a_problem_of_the_report(tmp_path: Path) -> None:
    """The cleaner waits for an entry Nova holds; its (private) Redis dies meanwhile. The pass
    stops removing (good: _Cleaner.lost() via should_stop), but the report says only that the
    entry was ``skipped``/``stopped``, as after a SIGTERM: no problem, ``ok`` true, exit 0. The
    reason (Coordination.problem: backend-unavailable, lock-lost) is dropped: the operator and
    ``imagecache health`` see a good pass that removed less than it planned."""
    pytest.importorskip("tooz", reason="the coordination extra is not installed")
    from tests.services import running_redis

    with running_redis(timeout=2) as redis:
        p = pool(tmp_path, "ha", coordination_url=redis.url, lock_timeout_seconds=30)
        assert p.nodes["ha"].run("clean")[0] == 0
        for name in NAMES:
            (p.cache / name).write_bytes(name.encode() * 1024)
        p.old(*NAMES)
        with nova_holds(p, NAMES[0]) as release:
            since = time.time()
            with subprocess.Popen(_argv(p.nodes["ha"], "clean"), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) as ca:  # fmt: skip
                _wait_for_manifest(p, "ha", since, ca)
                redis.stop()  # the backend is gone, the cleaner lock with it
                release()
                started = time.monotonic()
                out, err = ca.communicate(timeout=120)
                took = time.monotonic() - started
    doc = json.loads(out)
    assert (p.cache / NAMES[0]).exists()  # it stopped removing: good
    assert took < 30, f"the pass took {took:.0f} s to end after its backend went away"
    found = {q["code"] for q in (*doc["problems"], *doc.get("apply_problems", []))}
    assert "coordination-unavailable" in found or "lock-lost" in found, (found, err[-1500:])
    assert ca.returncode == 1 and not doc["ok"]


# --- hostile URLs -------------------------------------------------------------------------------


def test_a_sentinel_password_in_the_url_stays_out_of_the_report(tmp_path: Path) -> None:
    """tooz's redis driver takes ``sentinel_password`` from the URL's query
    (redis://HOST:PORT?sentinel=NAME&sentinel_password=...). redact() hides only the netloc's
    password: the query's is printed in the problem's ``ref`` and message (JSON, logs). (With
    ``sentinel=NAME`` too the same leak takes a minute to show: see the next test.)"""
    pytest.importorskip("tooz", reason="the coordination extra is not installed")
    from tests.services import free_port

    url = f"redis://:n3tl0c@127.0.0.1:{free_port()}?sentinel_password=s3cret&timeout=1"
    p = pool(tmp_path, "ha", coordination_url=url)
    code, doc, err = p.nodes["ha"].run("clean")
    assert code == 1
    assert "coordination-unavailable" in [q["code"] for q in doc["problems"]]
    text = json.dumps(doc) + err
    assert "n3tl0c" not in text  # held
    assert "s3cret" not in text, [q["ref"] for q in doc["problems"]]


def test_a_redis_sentinel_that_is_down_does_not_stall_the_pass(tmp_path: Path) -> None:
    """``redis://HOST:PORT?sentinel=NAME&timeout=1`` with nothing listening: the pass needs
    ~55 s to give up (coordination-unavailable), even with socket_connect_timeout=0.2.
    _without_client_retries() takes the retries off the client tooz makes, but with
    ``sentinel`` that client is the master's: the Sentinel's own clients keep redis-py's
    retries (with backoff), inside each of tooz's 15 tries on a ConnectionError
    (MasterNotFoundError is one). A plain Redis that is down fails in well under a second."""
    pytest.importorskip("tooz", reason="the coordination extra is not installed")
    from tests.services import free_port

    url = f"redis://127.0.0.1:{free_port()}?sentinel=mymaster&timeout=1"
    p = pool(tmp_path, "ha", coordination_url=url)
    argv = _argv(p.nodes["ha"], "clean")
    done: subprocess.CompletedProcess[str] | None = None
    with contextlib.suppress(subprocess.TimeoutExpired):  # then killed
        done = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    assert done is not None, "the pass was still connecting to a Sentinel that is down after 15 s"
    assert done.returncode == 1 and "coordination-unavailable" in done.stdout, done.stderr


def test_a_negative_timeout_in_a_file_url_does_not_spin_the_heart(tmp_path: Path) -> None:
    """``file://DIR?timeout=-1`` is taken as it is: the file driver's heartbeat returns -1, the
    heart waits ``-1 / 2`` s between beats, i.e. not at all: a whole CPU spent on utime() of a
    file on the shared storage for the whole pass (each daemon pass), holding the lock every
    other call into the driver needs. Expected: the URL refused (bad-url/bad-timeout), or at
    least a heart that waits."""
    pytest.importorskip("tooz", reason="the coordination extra is not installed")
    import resource

    from imagecache.coordination import Coordination, CoordinationError

    directory = tmp_path / "coordination"
    host = Coordination(f"file://{directory}?timeout=-1", member="h", storage="s")
    try:
        host.__enter__()
    except CoordinationError as exc:
        assert exc.reason in ("bad-url", "bad-timeout"), exc
        return
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(1.0)
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        host.__exit__(None, None, None)
    spent = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    assert spent < 0.3, f"{spent:.2f} s of CPU in 1 s while idle: the heart spins"


# --- what held --------------------------------------------------------------------------------

_MEMBER = """
import sys
from imagecache.coordination import Coordination
url, member, storage = sys.argv[1:4]
with Coordination(url, member=member, storage=storage, timeout=2.0):
    print("joined", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("member", ["hz", "../hosts/host-ha.json/" + "\u00e9" * 300])
def test_a_group_member_without_a_manifest_blocks_removal_and_is_named(
    tmp_path: Path, member: str
) -> None:
    """A host in the group (its pass runs, or a stray process) that never wrote a manifest and
    is in no compute_nodes: peer-manifest-missing naming it, nothing removed; a hostile name
    (a path, 600 bytes) is only a name."""
    pytest.importorskip("tooz", reason="the coordination extra is not installed")
    url = f"file://{tmp_path / 'coordination'}?timeout=5"
    p = pool(tmp_path, "ha", coordination_url=url)
    assert p.nodes["ha"].run("clean")[0] == 0  # the storage's id is made by its first pass
    storage = (p.cache / ".imagecache" / "storage-id").read_text().strip()
    (p.cache / Y).write_bytes(b"y" * 65536)
    p.old(Y)
    argv = [sys.executable, "-c", _MEMBER, url, member, storage]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as z:
        assert z.stdin is not None and z.stdout is not None
        assert z.stdout.readline().strip() == "joined"
        code, doc, err = p.nodes["ha"].run("clean")
        z.stdin.write("\n")
        z.stdin.flush()
    assert code == 1 and (p.cache / Y).exists(), err
    assert ("peer-manifest-missing", member) in codes(doc)
    [problem] = [q for q in doc["problems"] if q["code"] == "peer-manifest-missing"]
    assert "in the coordination group" in problem["message"]
    assert os.listdir(p.cache / ".imagecache" / "hosts") == ["host-ha.json"]

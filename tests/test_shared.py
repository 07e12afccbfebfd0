"""Shared storage (issue 12): several hosts on one ``_base``, each a separate ``imagecache``
process with its own host name, instance directories and records, on one shared directory.

Each host's pass writes its manifest (``_base/.imagecache/hosts/<host>.json``); a peer's users
count for every host; a peer whose manifest is missing, unreadable, stale or from an incomplete
view stops every removal until it comes back or is retired; a host skips the directories a
live peer owns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagecache import naming
from imagecache.layout import Layout
from imagecache.model import Manifest
from imagecache.store.identity import storage_id
from imagecache.store.manifests import read_manifests, write_manifest
from tests.opens import OpenWatch
from tests.qemu import make_overlay
from tests.test_executor import make_host

X, Y, Z = "1" * 40, "2" * 40, "3" * 40
DAY = 86400.0


@dataclass(frozen=True)
class Node:
    """One host of the pool: its configuration and its instance records."""

    name: str
    config: Path
    inventory: Path
    audit: Path

    def run(self, *args: str) -> tuple[int, dict[str, Any], str]:
        argv = [sys.executable, "-m", "imagecache", "--config-file", str(self.config),
                "--inventory", str(self.inventory), "--json", *args]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        doc = json.loads(done.stdout) if done.stdout.strip() else {}
        return done.returncode, doc, done.stderr


@dataclass(frozen=True)
class Pool:
    instances: Path
    cache: Path
    nodes: dict[str, Node]

    def instance(self, node: str, uuid: str, base: str) -> Path:
        """An instance of ``node``: a qcow2 overlay on entry ``base``, and its record."""
        entry = self.cache / base
        st = entry.stat()
        disk = make_overlay(self.instances / uuid / "disk", entry)
        os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns))
        n = self.nodes[node]
        doc = json.loads(n.inventory.read_text())
        doc["instances"].append({"uuid": uuid, "host": node})
        n.inventory.write_text(json.dumps(doc))
        return disk

    def old(self, *names: str) -> None:
        for name in names:
            os.utime(self.cache / name, (time.time() - 2 * DAY,) * 2)

    def manifests(self) -> dict[str, Manifest]:
        found, problems = read_manifests(Layout(str(self.instances)))
        assert not problems, problems
        return {m.host: m for m in found}


def pool(tmp_path: Path, *names: str, **options: object) -> Pool:
    """Hosts sharing one instances path and its ``_base``, Nova's manager off on each."""
    first = make_host(tmp_path, quarantine_seconds=0, **options)
    text = first.config.read_text()
    nodes = {}
    for name in names:
        root = tmp_path / name
        root.mkdir()
        audit = root / "audit.jsonl"
        config = root / "nova.conf"
        config.write_text(
            text.replace("host = h1\n", f"host = {name}\n").replace(str(first.audit), str(audit))
        )
        inventory = root / "inventory.json"
        inventory.write_text('{"instances": []}')
        nodes[name] = Node(name, config, inventory, audit)
    return Pool(first.instances, first.cache, nodes)


def codes(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["code"], p["ref"]) for p in doc["problems"]]


def users(doc: dict[str, Any], name: str) -> list[tuple[str, str]]:
    entry = next(e for e in doc["entries"] if e["name"] == name)
    return [(u["source"], u["ref"]) for u in entry["users"]]


def test_a_base_used_only_by_host_b_is_kept_when_host_a_cleans(
    tmp_path: Path, coordination_url: str
) -> None:
    p = pool(tmp_path, "ha", "hb", coordination_url=coordination_url)
    (p.cache / X).write_bytes(b"x" * 65536)
    (p.cache / Y).write_bytes(b"y" * 65536)
    disk_b = p.instance("hb", "inst-b", X)
    p.old(X, Y)
    # Made long ago: a directory changed just before its owner's manifest is scanned anyway.
    os.utime(disk_b.parent, (time.time() - DAY,) * 2)
    code, _, err = p.nodes["hb"].run("clean")
    assert code == 0, err
    assert (p.cache / X).exists() and not (p.cache / Y).exists()  # B removes what no one uses
    (p.cache / Y).write_bytes(b"y" * 65536)
    p.old(X, Y)
    manifest_b = p.manifests()["hb"]
    assert manifest_b.complete and manifest_b.instance_dirs == ("inst-b",)
    assert [e[0] for e in manifest_b.entries] == [X]

    with OpenWatch(disk_b) as watch:  # A skips the directory a live peer owns
        code, doc, err = p.nodes["ha"].run("clean")
        assert watch.opened() == set(), "host A scanned host B's instance directory"
    assert code == 0, err
    assert (p.cache / X).exists() and not (p.cache / Y).exists()
    assert ("peer", "hb") in users(doc, X)
    # A's manifest says what A's own sources use: not B's claims (no echo between hosts).
    assert p.manifests()["ha"].entries == ()


def test_a_registered_host_without_a_manifest_blocks_removal_until_it_runs(
    tmp_path: Path,
    coordination_url: str,
) -> None:
    """The upgrade case: compute_nodes lists a host that never ran imagecache."""
    p = pool(tmp_path, "ha", "hb", coordination_url=coordination_url)
    (p.instances / "compute_nodes").write_text(json.dumps({"hb": time.time() - 60}))
    (p.cache / Y).write_bytes(b"y" * 65536)
    p.old(Y)
    code, doc, _ = p.nodes["ha"].run("clean")
    assert code == 1 and (p.cache / Y).exists()
    [problem] = [q for q in doc["problems"] if q["code"] == "peer-manifest-missing"]
    assert problem["ref"] == "hb" and problem["blocking"]
    assert "run imagecache there" in problem["message"] and "peers retire hb" in problem["message"]

    # B upgraded: it writes its manifest, and A has one since its blocked pass: both are live,
    # and whichever cleans next removes what neither uses.
    code, _, err = p.nodes["hb"].run("clean")
    assert code == 0, err
    assert not (p.cache / Y).exists()
    code, doc, err = p.nodes["ha"].run("clean")
    assert code == 0 and not [q for q in doc["problems"] if q["blocking"]], err


def test_a_stale_peer_blocks_until_it_is_retired_and_its_instances_are_then_scanned(
    tmp_path: Path,
    coordination_url: str,
) -> None:
    p = pool(tmp_path, "ha", "hb", peer_stale_seconds=600, coordination_url=coordination_url)
    (p.cache / X).write_bytes(b"x" * 65536)
    (p.cache / Y).write_bytes(b"y" * 65536)
    p.instance("hb", "inst-b", X)
    p.old(X, Y)
    assert p.nodes["hb"].run("clean")[0] == 0
    # B is killed (or its host died): its last manifest, written long ago, is all there is.
    last = p.manifests()["hb"]
    write_manifest(Layout(str(p.instances)), Manifest(
        "hb", time.time() - 3600, True, last.entries, last.instance_dirs))  # fmt: skip
    (p.cache / Y).write_bytes(b"y" * 65536)
    p.old(X, Y)

    code, doc, _ = p.nodes["ha"].run("clean")
    assert code == 1 and (p.cache / X).exists() and (p.cache / Y).exists()
    assert ("peer-stale", "hb") in codes(doc)

    code, doc, err = p.nodes["ha"].run("peers", "list")
    assert code == 0, err
    assert [(q["host"], q["state"]) for q in doc["peers"]] == [("hb", "stale")]
    code, doc, err = p.nodes["ha"].run("peers", "retire", "hb")
    assert code == 0, err
    assert [(q["host"], q["state"]) for q in doc["peers"]] == [("hb", "retired")]
    audit = [json.loads(line) for line in p.nodes["ha"].audit.read_text().splitlines()]
    assert [(a["action"], a["peer"]) for a in audit if a["action"] == "retire-peer"] == [
        ("retire-peer", "hb")
    ]

    p.old(X, Y)
    code, doc, err = p.nodes["ha"].run("clean")
    assert code == 0, err
    # B's instance directory is unclaimed now: A scans it, and its disk keeps X.
    assert (p.cache / X).exists() and not (p.cache / Y).exists()
    assert ("backing", str(p.instances / "inst-b" / "disk")) in users(doc, X)

    assert p.nodes["hb"].run("clean")[0] == 0  # B comes back: a peer again
    code, doc, _ = p.nodes["ha"].run("peers", "list")
    assert [(q["host"], q["state"]) for q in doc["peers"]] == [("hb", "live")]


def test_a_live_peer_is_never_retired(tmp_path: Path) -> None:
    p = pool(tmp_path, "ha", "hb")
    (p.cache / X).write_bytes(b"x" * 65536)
    p.instance("hb", "inst-b", X)
    assert p.nodes["hb"].run("clean")[0] == 0
    before = p.manifests()["hb"]
    code, _, err = p.nodes["ha"].run("peers", "retire", "hb")
    assert code == 1 and "it is alive" in err
    assert p.manifests()["hb"] == before


def test_a_corrupt_or_incomplete_manifest_never_loses_its_host(tmp_path: Path) -> None:
    p = pool(tmp_path, "ha", "hb", "hc")
    (p.cache / Y).write_bytes(b"y" * 65536)
    for node in ("hb", "hc"):
        assert p.nodes[node].run("clean")[0] == 0
    hosts = p.cache / ".imagecache" / "hosts"
    (hosts / "host-hb.json").write_text('{"schema": 1, "host": "hb", "entries": [')
    found, _ = read_manifests(Layout(str(p.instances)))
    hc = next(m for m in found if m.host == "hc")
    write_manifest(Layout(str(p.instances)), Manifest("hc", hc.written, False))
    p.old(Y)
    code, doc, _ = p.nodes["ha"].run("clean")
    assert code == 1 and (p.cache / Y).exists()
    assert {("peer-manifest-unreadable", "hb"), ("peer-incomplete", "hc")} <= set(codes(doc))


def test_a_cache_per_host_is_not_blocked_by_the_other_hosts_of_compute_nodes(
    tmp_path: Path,
) -> None:
    """``_base_$my_ip``: the hosts of compute_nodes share the instances path, not this cache."""
    p = pool(tmp_path, "ha")
    config = p.nodes["ha"].config
    config.write_text(
        config.read_text()
        .replace("[image_cache]\n", "[image_cache]\nsubdirectory_name = _base_$my_ip\n", 1)
        .replace("[DEFAULT]\n", "[DEFAULT]\nmy_ip = 192.0.2.7\n", 1)
    )
    cache = p.instances / "_base_192.0.2.7"
    cache.mkdir()
    (cache / Y).write_bytes(b"y" * 65536)
    os.utime(cache / Y, (time.time() - 2 * DAY,) * 2)
    (p.instances / "compute_nodes").write_text(json.dumps({"hb": time.time() - 60}))
    code, doc, err = p.nodes["ha"].run("clean")
    assert code == 0, (err, doc.get("problems"))
    assert not (cache / Y).exists()


def test_a_disk_a_peer_made_since_its_manifest_is_seen_in_the_directory_it_owns(
    tmp_path: Path,
) -> None:
    """B rebuilds its instance on another base after its last pass: the directory it owns
    changed since its manifest, so A scans it rather than trusting the manifest, and keeps Z."""
    p = pool(tmp_path, "ha", "hb")
    for name in (X, Z):
        (p.cache / name).write_bytes(name.encode() * 4096)
    disk = p.instance("hb", "inst-b", X)
    os.utime(disk.parent, (time.time() - DAY,) * 2)
    p.old(X, Z)
    assert p.nodes["hb"].run("clean")[0] == 0
    assert not (p.cache / Z).exists()  # nothing used it then
    (p.cache / Z).write_bytes(Z.encode() * 4096)
    last = p.manifests()["hb"]  # B's manifest as of a while ago: before the rebuild
    write_manifest(Layout(str(p.instances)), Manifest(
        "hb", time.time() - 120, True, last.entries, last.instance_dirs))  # fmt: skip
    disk.unlink()
    p.instance("hb", "inst-b", Z)  # the rebuild: a new disk file, the directory's mtime moves
    p.old(X, Z)

    code, doc, err = p.nodes["ha"].run("clean")
    assert code == 0, err
    assert (p.cache / Z).exists(), "a peer's rebuild since its manifest lost its base"
    assert ("backing", str(p.instances / "inst-b" / "disk")) in users(doc, Z)


_HOLDER = """
import sys
from imagecache.coordination import Coordination
url, member, storage = sys.argv[1:4]
with Coordination(url, member=member, storage=storage, timeout=2.0) as c:
    assert c.lead(wait=10.0)
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_one_cleaner_at_a_time_through_the_coordination_backend(
    tmp_path: Path, coordination_url: str
) -> None:
    """Host B holds the storage's cleaner lock: host A's pass touches and writes its manifest
    but removes nothing (another-cleaner, exit 0); B SIGKILLed, its lock expires (file: at once,
    Redis and etcd: after the URL's timeout) and A's next pass cleans."""
    pytest.importorskip("tooz", reason="the coordination extra is not installed")
    p = pool(tmp_path, "ha", "hb", coordination_url=coordination_url)
    assert p.nodes["hb"].run("clean")[0] == 0  # B has a manifest: a live peer
    (p.cache / Y).write_bytes(b"y" * 65536)
    p.old(Y)
    storage = storage_id(Layout(str(p.instances)))  # what every pass names the storage by
    argv = [sys.executable, "-c", _HOLDER, coordination_url, "hb", storage]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as b:
        assert b.stdout is not None and b.stdout.readline().strip() == "held"
        code, doc, err = p.nodes["ha"].run("clean")
        assert code == 0, err
        assert (p.cache / Y).exists()
        entry = next(e for e in doc["entries"] if e["name"] == Y)
        assert (entry["action"], entry["reason"]) == ("keep", "another-cleaner")
        assert "ha" in p.manifests()  # the manifest is written all the same
        b.kill()
    deadline = time.monotonic() + 30
    while True:
        p.old(Y)
        code, doc, err = p.nodes["ha"].run("clean")
        if not (p.cache / Y).exists():
            break
        assert time.monotonic() < deadline, "the killed holder's lock never expired"
        time.sleep(0.5)
    assert code == 0, err


def test_a_coordination_backend_that_is_down_stops_removals_not_the_pass(tmp_path: Path) -> None:
    pytest.importorskip("tooz", reason="the coordination extra is not installed")
    from tests.services import free_port

    url = f"redis://127.0.0.1:{free_port()}?timeout=2"  # nothing listens there
    p = pool(tmp_path, "ha", coordination_url=url)
    (p.cache / Y).write_bytes(b"y" * 65536)
    p.old(Y)
    code, doc, _ = p.nodes["ha"].run("clean")
    assert code == 1 and (p.cache / Y).exists()
    [problem] = [q for q in doc["problems"] if q["code"] == "coordination-unavailable"]
    assert problem["blocking"]
    assert "ha" in p.manifests()  # the pass went on: its manifest is written


def test_every_audit_line_carries_the_time_of_its_own_action(tmp_path: Path) -> None:
    """Lines of several hosts are compared by time: each is stamped when its action is taken,
    not with its batch's start."""
    from imagecache.cli import main

    host = make_host(tmp_path, quarantine_seconds=0)
    names = [c * 40 for c in "456"]
    start = time.time()
    for name in names:
        (host.cache / name).write_bytes(name.encode() * 1024)
        os.utime(host.cache / name, (start - 2 * DAY,) * 2)
    ticks = iter(range(10**6))
    code = main(["--config-file", str(host.config), "--json", "clean"],
                clock=lambda: start + next(ticks))  # fmt: skip
    assert code == 0
    lines = [json.loads(x) for x in host.audit.read_text().splitlines()]
    epochs = [line["epoch"] for line in lines if line["action"] == "removed"]
    assert len(epochs) == 3 and len(set(epochs)) == 3 and epochs == sorted(epochs)


def test_a_cleaner_killed_mid_pass_is_taken_over_and_nothing_is_half_done(
    tmp_path: Path, coordination_url: str
) -> None:
    """Host B cleans, holds the cleaner lock and waits for an entry Nova holds, half-way through
    its removals; B is SIGKILLed. After the lock's TTL host A cleans: the rest goes, what B did
    stays done, nothing is left half-way (no temp file, no trash entry, no second removal)."""
    pytest.importorskip("tooz", reason="the coordination extra is not installed")
    p = pool(tmp_path, "ha", "hb", coordination_url=coordination_url, lock_timeout_seconds=60)
    for node in ("ha", "hb"):
        assert p.nodes[node].run("clean")[0] == 0  # both live peers
    names = [c * 40 for c in "56789"]
    for name in names:
        (p.cache / name).write_bytes(name.encode() * 1024)
    p.old(*names)
    child = [sys.executable, str(Path(__file__).with_name("_lock_child.py"))]
    hold = [*child, "hold", str(p.instances / "locks"), names[-1]]
    with subprocess.Popen(hold, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as nova:
        assert nova.stdin is not None and nova.stdout is not None
        assert nova.stdout.readline().strip() == "held"
        b = p.nodes["hb"]
        argv = [sys.executable, "-m", "imagecache", "--config-file", str(b.config),
                "--inventory", str(b.inventory), "--json", "clean"]  # fmt: skip
        with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as cb:
            deadline = time.monotonic() + 60
            while sum((p.cache / n).exists() for n in names) > 1:  # B is waiting for Nova
                assert cb.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            cb.kill()
        nova.stdin.write("\n")
        nova.stdin.flush()
    removed_by_b = [json.loads(x)["entry"] for x in b.audit.read_text().splitlines()
                    if json.loads(x)["action"] == "removed"]  # fmt: skip
    assert sorted(removed_by_b) == names[:-1]
    deadline = time.monotonic() + 30
    while (p.cache / names[-1]).exists():  # the killed cleaner's lock expires after its TTL
        assert time.monotonic() < deadline, "host A never took over"
        p.old(names[-1])
        code, doc, err = p.nodes["ha"].run("clean")
        # Exit 0, or 1 only for a lock lost on the way (a loaded machine can let a 2 s lease
        # lapse): removals stop, the next pass goes on.
        lost = {q["code"] for q in doc.get("problems", []) if q["blocking"]}
        assert code == 0 or (code == 1 and lost == {"coordination-unavailable"}), err
        time.sleep(0.3)
    left = {q.name for q in p.cache.iterdir()} - {".imagecache"}
    assert left == set(), left  # no temp file, nothing of B's half-way
    trash = p.cache / ".imagecache" / "trash"
    assert not trash.exists() or not list(trash.iterdir())
    by_a = [json.loads(x)["entry"] for x in p.nodes["ha"].audit.read_text().splitlines()
            if json.loads(x)["action"] == "removed"]  # fmt: skip
    assert by_a == [names[-1]]  # nothing B did is done again


def test_while_one_host_cleans_another_hosts_pass_removes_nothing(
    tmp_path: Path, coordination_url: str
) -> None:
    """Two real passes at once: B's clean is half-way (waiting for an entry Nova holds, its
    cleaner lock held) when A's clean runs from start to end: A removes nothing (another-cleaner)
    and B, let go, removes the rest; no entry is removed by both and none by A."""
    pytest.importorskip("tooz", reason="the coordination extra is not installed")
    p = pool(tmp_path, "ha", "hb", coordination_url=coordination_url, lock_timeout_seconds=60)
    for node in ("ha", "hb"):
        assert p.nodes[node].run("clean")[0] == 0
    names = [c * 40 for c in "56789"]
    for name in names:
        (p.cache / name).write_bytes(name.encode() * 1024)
    p.old(*names)
    child = [sys.executable, str(Path(__file__).with_name("_lock_child.py"))]
    hold = [*child, "hold", str(p.instances / "locks"), names[0]]  # B waits for it
    b = p.nodes["hb"]
    argv = [sys.executable, "-m", "imagecache", "--config-file", str(b.config),
            "--inventory", str(b.inventory), "--json", "clean"]  # fmt: skip
    with subprocess.Popen(hold, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as nova:
        assert nova.stdin is not None and nova.stdout is not None
        assert nova.stdout.readline().strip() == "held"
        with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as cb:
            time.sleep(3.0)  # B: started, the cleaner lock taken, waiting for names[0]
            assert cb.poll() is None
            code, doc, err = p.nodes["ha"].run("clean")  # A's whole pass, during B's
            assert code == 0, err
            kept = {e["name"]: e["reason"] for e in doc["entries"] if e["name"] in names}
            # What B has not removed yet (at least the entry Nova holds) A keeps for B.
            assert names[0] in kept and set(kept.values()) == {"another-cleaner"}, kept
            nova.stdin.write("\n")
            nova.stdin.flush()
            assert cb.wait(timeout=60) == 0
    assert not any((p.cache / n).exists() for n in names)

    def removed(node: Node) -> list[str]:
        text = node.audit.read_text() if node.audit.exists() else ""  # none: it did nothing
        lines = map(json.loads, text.splitlines())
        return sorted(x["entry"] for x in lines if x["action"] == "removed")

    assert removed(p.nodes["ha"]) == [] and removed(b) == names


def _rounds_of_cleans_at_once(p: Pool, *, rounds: int, entries: int, refuse: str = "") -> list[str]:
    """``rounds`` times: ``entries`` new old entries, then every host's clean started at once
    (separate processes); each must exit 0 (and not say ``refuse``). The names made."""
    made: list[str] = []
    for _ in range(rounds):
        for _ in range(entries):
            name = f"{len(made):040x}"
            (p.cache / name).write_bytes(b"x" * 4096)
            made.append(name)
        p.old(*made[-entries:])
        argvs = [[sys.executable, "-m", "imagecache", "--config-file", str(n.config),
                  "--inventory", str(n.inventory), "--json", "clean"]
                 for n in p.nodes.values()]  # fmt: skip
        procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for a in argvs]  # fmt: skip
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0 and not (refuse and refuse in err), err[-3000:]
    return made


def test_no_two_hosts_passes_overlap_over_many_rounds(
    tmp_path: Path, coordination_url: str
) -> None:
    """Rounds of three hosts' cleans started together, as separate processes, on a storage with
    hundreds of old entries each round. Each pass's removals (the audit lines of one host and
    plan id, each stamped when its action was taken) span an interval: no two passes' intervals
    overlap and no entry is removed twice. Fails when every host may lead (the passes then race
    through the same entries)."""
    pytest.importorskip("tooz", reason="the coordination extra is not installed")
    hosts = ("ha", "hb", "hc")
    p = pool(tmp_path, *hosts, coordination_url=coordination_url, lock_timeout_seconds=60)
    for node in hosts:
        assert p.nodes[node].run("clean")[0] == 0  # every host a live peer
    made = _rounds_of_cleans_at_once(p, rounds=3, entries=300)
    spans: dict[tuple[str, str], list[float]] = {}
    removed: list[str] = []
    for node in hosts:
        audit = p.nodes[node].audit
        for line in map(json.loads, audit.read_text().splitlines() if audit.exists() else ()):
            if line["action"] == "removed":
                removed.append(line["entry"])
                spans.setdefault((node, line["plan_id"]), []).append(line["epoch"])
    assert len(removed) == len(set(removed)) and len(removed) > len(made) // 2
    # What none removed is still there (the hosts' processes run on this one machine: another's
    # header read of an entry is an open file, so in use and touched, now and then).
    assert all((p.cache / n).exists() for n in set(made) - set(removed))
    intervals = sorted((min(t), max(t), node) for (node, _), t in spans.items())
    for i, (start_a, end_a, a) in enumerate(intervals):
        for start_b, end_b, b in intervals[i + 1 :]:
            assert end_a < start_b or end_b < start_a, f"{a}'s pass overlaps {b}'s: {intervals}"


def test_cleaners_without_coordination_never_wait_each_other_out(tmp_path: Path) -> None:
    """Without coordination (``none``) hosts may clean at once; Nova's entry locks keep each
    removal to one of them. None may hold some entry locks while waiting for the others':
    both then waited for their whole lock timeout and gave up (exit 1, ``lock-timeout``). No
    entry is removed twice, and none goes without its audit line. (Whether the passes meet at
    all is timing: the rule is attacked deterministically in test_locks.)"""
    p = pool(tmp_path, "ha", "hb", "hc", coordination_url="none", lock_timeout_seconds=20)
    for node in p.nodes:
        assert p.nodes[node].run("clean")[0] == 0
    made = _rounds_of_cleans_at_once(p, rounds=3, entries=300, refuse="lock-timeout")
    removed: list[str] = []
    for peer in p.nodes.values():
        for line in map(json.loads, peer.audit.read_text().splitlines()):
            removed += [line["entry"]] if line["action"] == "removed" else []
    assert len(removed) == len(set(removed)) and len(removed) > len(made) // 2
    # What neither removed is still there (both hosts' processes run on this one machine: the
    # other's header read of an entry is an open file, so in use and touched, now and then).
    assert all((p.cache / n).exists() for n in set(made) - set(removed))


def test_two_machines_given_one_host_name_stop_removing(tmp_path: Path) -> None:
    """Two machines both configured as host ``ha``: each would take the other's manifest for
    its own, and remove what only the other's instance records protect. Their manifests carry
    their machine ids ([imagecache] machine_id_file): nothing is removed, and the problem says
    why, until they are renamed."""
    p = pool(tmp_path, "ha", "hb", coordination_url="none")
    twin = p.nodes["hb"]
    for node, machine in ((p.nodes["ha"], "a" * 32), (twin, "b" * 32)):
        ids = tmp_path / f"{node.name}.machine-id"
        ids.write_text(machine + "\n")
        option = f"[imagecache]\nmachine_id_file = {ids}\n"
        text = node.config.read_text().replace("[imagecache]\n", option, 1)
        node.config.write_text(text.replace("host = hb\n", "host = ha\n"))
    base = naming.fingerprint("img-only-in-a-record")
    (p.cache / base).write_bytes(b"b" * 65536)
    p.old(base)
    doc = json.loads(p.nodes["ha"].inventory.read_text())
    doc["instances"].append({"uuid": "u-a", "host": "ha", "image_ref": "img-only-in-a-record"})
    p.nodes["ha"].inventory.write_text(json.dumps(doc))
    assert p.nodes["ha"].run("clean")[0] == 0  # the first machine: its record keeps the base
    code, doc, err = twin.run("clean")  # the second one, under the same name, has no record
    assert code == 1 and (p.cache / base).exists(), err
    assert ("host-name-shared", "ha") in codes(doc)
    code, doc, _ = p.nodes["ha"].run("clean")  # and the first one now sees the second's
    assert code == 1 and ("host-name-shared", "ha") in codes(doc)
    assert (p.cache / base).exists()

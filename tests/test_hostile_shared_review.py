"""Hostile review of shared storage (issue 12, part 1: manifests, peers, retire).

Every test is a host pool on one real shared directory, each host a separate ``imagecache``
process (``tests.test_shared.pool``); hostile manifests and registries are real files. Each test
names the requirement it holds the code to.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from imagecache import locks
from imagecache.layout import REGISTRY_LOCK, Layout
from imagecache.model import Manifest
from imagecache.store.manifests import read_manifests, write_manifest
from tests.qemu import make_overlay
from tests.test_shared import Pool, X, Y, codes, pool, users

DAY = 86400.0


def fingerprint(image_id: str) -> str:
    return hashlib.sha1(image_id.encode()).hexdigest()


def record(p: Pool, node: str, **fields: object) -> None:
    """An instance record of ``node`` (``fields``: image_ref, kernel_id...), no disk."""
    n = p.nodes[node]
    doc = json.loads(n.inventory.read_text())
    doc["instances"].append({"host": node, **fields})
    n.inventory.write_text(json.dumps(doc))


def hosts_dir(p: Pool) -> Path:
    return p.cache / ".imagecache" / "hosts"


def manifest_doc(p: Pool, file: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((hosts_dir(p) / file).read_text())
    return doc


# --- a host is never forgotten while its manifest exists ---------------------------------------


def test_a_host_named_with_a_leading_dot_is_not_forgotten_when_it_leaves_compute_nodes(
    tmp_path: Path,
) -> None:
    """`host = .hb` writes `.hb.json`, which read_manifests skips as a hidden file: once the host
    is gone from compute_nodes (Nova's LP 1252659 reset, an operator's edit), nothing says it
    exists, and what only its records protect is removed."""
    p = pool(tmp_path, "ha", ".hb")
    image = fingerprint("img-shelved")
    (p.cache / image).write_bytes(b"k" * 65536)
    record(p, ".hb", uuid="inst-hb", image_ref="img-shelved")
    p.old(image)
    code, _, err = p.nodes[".hb"].run("clean")
    assert code == 0, err
    assert (hosts_dir(p) / "host-.hb.json").exists()  # written: the host did its part
    assert (p.cache / image).exists()  # its record keeps it on .hb itself
    found, problems = read_manifests(Layout(str(p.instances)))
    # Nova reset compute_nodes to one host (LP 1252659): the manifest is all that remains.
    (p.instances / "compute_nodes").write_text(json.dumps({"ha": time.time()}))
    p.old(image)
    code, _doc, _ = p.nodes["ha"].run("clean")
    assert (p.cache / image).exists(), "host .hb's shelved image was removed: .hb was forgotten"
    assert ".hb" in {m.host for m in found} | {q.ref for q in problems}


# --- staleness: a manifest from the future -------------------------------------------------------


def test_a_manifest_written_in_the_future_does_not_keep_a_dead_peer_live_forever(
    tmp_path: Path,
) -> None:
    """A peer whose clock ran 30 days ahead wrote its last manifest, then died. `now - written` is
    negative, so it is `live` for 30 days: its directories are not scanned, nothing says it is
    gone, and what its instances came to use after that manifest is removed."""
    p = pool(tmp_path, "ha", "hb", peer_stale_seconds=600)
    (p.cache / X).write_bytes(b"x" * 65536)
    p.instance("hb", "inst-b", X)
    p.old(X)
    assert p.nodes["hb"].run("clean")[0] == 0
    (p.cache / Y).write_bytes(b"y" * 65536)  # cached long ago (made old below)
    path = hosts_dir(p) / "host-hb.json"
    doc = json.loads(path.read_text())
    doc["written_epoch"] += 30 * DAY  # what hb's pass writes with its clock 30 days ahead
    path.write_text(json.dumps(doc))
    # hb rebuilt inst-b on Y and died before its next pass.
    st = (p.cache / Y).stat()
    make_overlay(p.instances / "inst-b" / "disk", p.cache / Y)
    os.utime(p.cache / Y, ns=(st.st_atime_ns, st.st_mtime_ns))
    p.old(X, Y)

    code, doc_list, err = p.nodes["ha"].run("peers", "list")
    assert code == 0, err
    [state] = [q["state"] for q in doc_list["peers"] if q["host"] == "hb"]
    code, doc, _ = p.nodes["ha"].run("clean")
    assert (p.cache / Y).exists(), "Y removed: inst-b's disk uses it (hb 'live' from the future)"
    assert state != "live", "a manifest 30 days in the future is live"


# --- retire -------------------------------------------------------------------------------------


def test_a_host_writing_fresh_manifests_is_never_retired_even_from_an_incomplete_view(
    tmp_path: Path,
) -> None:
    """hb is up and writing its manifest every pass, but its view is incomplete (libvirt down,
    an unreadable disk): `peers retire hb` tombstones it anyway, and until hb's next pass its
    entries protect nothing and it blocks nothing."""
    p = pool(tmp_path, "ha", "hb")
    image = fingerprint("img-b")
    (p.cache / image).write_bytes(b"b" * 65536)
    record(p, "hb", uuid="inst-hb", image_ref="img-b")
    p.old(image)
    assert p.nodes["hb"].run("clean")[0] == 0
    [hb] = [m for m in read_manifests(Layout(str(p.instances)))[0] if m.host == "hb"]
    assert [e[0] for e in hb.entries] == [image]
    # hb's next pass, a second ago, from an incomplete view: it is alive and says what it uses.
    write_manifest(Layout(str(p.instances)), Manifest(
        "hb", time.time() - 1, False, hb.entries, hb.instance_dirs))  # fmt: skip

    code, _, _err = p.nodes["ha"].run("peers", "retire", "hb")
    retired = code == 0
    p.old(image)
    p.nodes["ha"].run("clean")
    assert (p.cache / image).exists(), "hb's image removed while hb was alive"
    assert not retired, "a host that wrote its manifest a second ago was retired"


def test_retire_does_not_tombstone_a_host_that_came_back_while_it_waited_for_novas_lock(
    tmp_path: Path,
) -> None:
    """retire judges the peer (stale), then waits for Nova's registry lock; the host comes back
    and writes a fresh manifest meanwhile; retire then replaces that fresh manifest with a
    tombstone (and drops the host from compute_nodes) without looking again."""
    p = pool(tmp_path, "ha", "hb", lock_timeout_seconds=60, peer_stale_seconds=600)
    image = fingerprint("img-b")
    (p.cache / image).write_bytes(b"b" * 65536)
    record(p, "hb", uuid="inst-hb", image_ref="img-b")
    assert p.nodes["hb"].run("clean")[0] == 0
    [hb] = [m for m in read_manifests(Layout(str(p.instances)))[0] if m.host == "hb"]
    layout = Layout(str(p.instances))
    write_manifest(layout, Manifest("hb", time.time() - 3600, True, hb.entries, hb.instance_dirs))

    n = p.nodes["ha"]
    argv = [sys.executable, "-m", "imagecache", "--config-file", str(n.config),
            "--inventory", str(n.inventory), "--json", "peers", "retire", "hb"]  # fmt: skip
    with locks.entry_lock(str(p.instances), REGISTRY_LOCK, timeout=5):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4)  # retire has read hb's state (stale) and waits for the lock
        assert proc.poll() is None
        # hb is back: its pass writes a fresh, complete manifest (its registration waits too).
        write_manifest(layout, Manifest("hb", time.time(), True, hb.entries, hb.instance_dirs))
    proc.communicate(timeout=60)
    [after] = [m for m in read_manifests(layout)[0] if m.host == "hb"]
    assert not after.retired, "hb's fresh manifest, written while retire waited, was tombstoned"


def test_a_retired_host_back_in_compute_nodes_is_a_peer_again_whatever_its_clock(
    tmp_path: Path,
) -> None:
    """retire drops the host from compute_nodes under Nova's lock: any entry of it there since is
    its coming back. peers() instead compares its registration time (its clock) with the
    tombstone's (the retiring host's clock): a host whose clock is a few minutes behind stays
    `retired` while it runs Nova again, and its records' images are removed."""
    p = pool(tmp_path, "ha", "hb", peer_stale_seconds=600)
    image = fingerprint("img-b")
    (p.cache / image).write_bytes(b"b" * 65536)
    (p.instances / "compute_nodes").write_text(json.dumps({"hb": time.time() - 7200}))
    code, _, err = p.nodes["ha"].run("peers", "retire", "hb")
    assert code == 0, err
    tombstone = manifest_doc(p, "host-hb.json")
    assert tombstone["retired"] is True
    # hb is reinstalled with Nova's manager on (no imagecache yet); its clock is 5 minutes slow.
    registry = json.loads((p.instances / "compute_nodes").read_text())
    registry["hb"] = float(tombstone["written_epoch"]) - 300
    (p.instances / "compute_nodes").write_text(json.dumps(registry))
    record(p, "hb", uuid="inst-hb", image_ref="img-b")  # hb's instance: only hb knows
    p.old(image)

    code, doc, err = p.nodes["ha"].run("peers", "list")
    assert code == 0, err
    [state] = [q["state"] for q in doc["peers"] if q["host"] == "hb"]
    assert state == "missing", f"hb is registered again since its retirement, yet {state}"
    code, doc, _ = p.nodes["ha"].run("clean")
    assert ("peer-manifest-missing", "hb") in codes(doc)


def test_a_host_only_in_the_manifests_still_has_its_records_counted(tmp_path: Path) -> None:
    """ "A host's users count for every host that shares the storage" and "a host that only
    disappeared from compute_nodes is never forgotten while its manifest exists": yet
    counted_records() counts a peer's instance records only while it is in compute_nodes. hb is
    live (a fresh, complete manifest), Nova reset compute_nodes (LP 1252659), and the record
    ha's inventory holds for hb's shelved instance protects nothing any more."""
    p = pool(tmp_path, "ha", "hb")
    image = fingerprint("img-shelved-on-hb")
    (p.cache / image).write_bytes(b"s" * 65536)
    record(p, "ha", uuid="inst-hb", image_ref="img-shelved-on-hb")  # ha's (shared) inventory
    doc = json.loads(p.nodes["ha"].inventory.read_text())
    doc["instances"][-1]["host"] = "hb"  # ...lists hb's instance
    p.nodes["ha"].inventory.write_text(json.dumps(doc))
    assert p.nodes["ha"].run("clean")[0] == 0
    assert p.nodes["hb"].run("clean")[0] == 0  # hb is live
    p.old(image)
    code, doc, err = p.nodes["ha"].run("plan")
    assert code == 0, err
    assert ("instance", "inst-hb") in users(doc, image)  # while hb is in compute_nodes
    (p.instances / "compute_nodes").write_text(json.dumps({"ha": time.time()}))  # Nova's reset
    code, doc, _ = p.nodes["ha"].run("clean")
    assert (p.cache / image).exists(), "hb's shelved instance's image was removed"
    assert ("records-unregistered-host", "hb") not in codes(doc)


# --- a per-host cache ---------------------------------------------------------------------------


def test_an_escaped_dollar_is_no_per_host_cache(tmp_path: Path) -> None:
    """`subdirectory_name = _base_$$my_ip` is the literal `_base_$my_ip` on every host (oslo's
    `$$`): one shared cache. _cache_per_host's regex sees `$my_ip` and drops compute_nodes' hosts
    as cache peers: a registered host without a manifest (the upgrade case) no longer blocks."""
    p = pool(tmp_path, "ha")
    config = p.nodes["ha"].config
    config.write_text(
        config.read_text()
        .replace("[image_cache]\n", "[image_cache]\nsubdirectory_name = _base_$$my_ip\n", 1)
        .replace("[DEFAULT]\n", "[DEFAULT]\nmy_ip = 192.0.2.7\n", 1)
    )
    cache = p.instances / "_base_$my_ip"  # the same name on every host
    cache.mkdir()
    (cache / Y).write_bytes(b"y" * 65536)
    os.utime(cache / Y, (time.time() - 2 * DAY,) * 2)
    (p.instances / "compute_nodes").write_text(json.dumps({"hb": time.time() - 60}))
    _code, doc, _err = p.nodes["ha"].run("clean")
    assert (cache / Y).exists(), "removed while hb, sharing this very cache, never wrote a manifest"
    assert ("peer-manifest-missing", "hb") in codes(doc)


# --- a saved plan (clean --plan) ----------------------------------------------------------------


def _saved_plan_and_missing_peer(tmp_path: Path) -> tuple[Pool, dict[str, Any], int]:
    p = pool(tmp_path, "ha", "hb")
    (p.cache / Y).write_bytes(b"y" * 65536)
    assert p.nodes["hb"].run("clean")[0] == 0
    (p.cache / Y).write_bytes(b"y" * 65536)
    p.old(Y)
    saved = tmp_path / "plan.json"
    code, doc, err = p.nodes["ha"].run("plan", "-o", str(saved))
    assert code == 0 and [e["action"] for e in doc["entries"]] == ["remove"], err
    (hosts_dir(p) / "host-hb.json").unlink()  # hb's manifest is gone since (hb is in compute_nodes)
    code, doc, _ = p.nodes["ha"].run("clean", "--plan", str(saved))
    return p, doc, code


def test_a_saved_plan_kept_for_a_missing_peer_says_which_peer(tmp_path: Path) -> None:
    """The act-time decision keeps Y (good), but says only `incomplete-view`: the peer gap is
    added inside decide(), never to the act-time inventory, so _report_gaps has nothing to
    report. Issue 12: "the report names the peer and what to do"."""
    p, doc, code = _saved_plan_and_missing_peer(tmp_path)
    assert code == 1 and (p.cache / Y).exists()
    problems = [(q["code"], q["ref"]) for q in doc["apply_problems"]]
    assert ("peer-manifest-missing", "hb") in problems, problems


def test_clean_with_a_saved_plan_writes_this_hosts_manifest(tmp_path: Path) -> None:
    """Issue 12: "every clean/daemon pass writes its host's manifest". `clean --plan` registers
    the host in compute_nodes but writes no manifest: a host run by plan/apply only is `missing`
    to its peers forever, and every peer stops removing."""
    p, _, _ = _saved_plan_and_missing_peer(tmp_path)
    assert (hosts_dir(p) / "host-ha.json").exists()


def test_a_registered_host_with_an_empty_name_can_be_retired(tmp_path: Path) -> None:
    """compute_nodes is hostile input: `{"": ...}` (a Nova written with an empty `host`) is a
    `missing` peer that blocks every removal, and the only way out the report gives, `peers
    retire`, refuses the empty name (a usage error, exit 2): the storage is blocked for good. (Its
    manifest, `.json`, would be skipped as a hidden file too.)"""
    p = pool(tmp_path, "ha")
    (p.instances / "compute_nodes").write_text(json.dumps({"": time.time() - 60}))
    code, doc, _ = p.nodes["ha"].run("clean")
    assert ("peer-manifest-missing", "") in codes(doc)
    code, _, err = p.nodes["ha"].run("peers", "retire", "")
    assert code == 0, err

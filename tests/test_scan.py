"""The observer on real files: real qcow2 overlays made by qemu-img, real garbage."""

from __future__ import annotations

import json
import os
from pathlib import Path

from imagecache import naming
from imagecache import sources as scan
from imagecache.formats import MAX_CHAIN_DEPTH
from imagecache.layout import Layout
from imagecache.model import FileType, Kind, ProblemCode
from imagecache.plan import Reason
from imagecache.policy import decide
from imagecache.sources import disks
from tests.defaults import policy
from tests.opens import OpenWatch
from tests.qemu import make_overlay, make_raw

FP = naming.fingerprint("img-1")


def host(tmp_path: Path) -> tuple[Path, Path]:
    inst = tmp_path / "instances"
    base = inst / "_base"
    base.mkdir(parents=True)
    return inst, base


def test_cache_scan_uses_lstat_and_classifies(tmp_path: Path) -> None:
    _, base = host(tmp_path)
    (base / FP).write_bytes(b"x" * 10000)
    (base / "latest").symlink_to(FP)
    (base / "subdir").mkdir()
    (base / ".imagecache").mkdir()  # our own state is not an entry
    entries, problems = scan.scan_cache(str(base))
    assert problems == ()
    by_name = {e.name: e for e in entries}
    assert set(by_name) == {FP, "latest", "subdir"}
    assert by_name[FP].kind is Kind.ORIGINAL and by_name[FP].bytes_apparent == 10000
    assert by_name[FP].bytes_allocated >= 10000
    assert by_name["latest"].file_type is FileType.SYMLINK
    assert by_name["latest"].kind is Kind.UNKNOWN
    assert by_name["subdir"].file_type is FileType.DIRECTORY


def test_missing_cache_dir_is_an_empty_cache(tmp_path: Path) -> None:
    entries, problems = scan.scan_cache(str(tmp_path / "nope"))
    assert entries == () and len(problems) == 1 and not problems[0].blocking


def test_every_disk_of_every_instance_dir_whatever_its_name(tmp_path: Path) -> None:
    inst, base = host(tmp_path)
    make_raw(base / FP)
    make_raw(base / "swap_512")
    for name in ("disk", "disk.local", "disk.swap", "disk.rescue", "disk.eph3", "odd-name"):
        make_overlay(inst / "u1" / name, base / (FP if name != "disk.swap" else "swap_512"))
    (inst / "u1" / "console.log").write_text("hello")
    (inst / "u1" / "disk.info").write_text("{}")
    make_overlay(inst / "not-in-any-inventory" / "disk", base / FP)
    make_overlay(inst / "locks" / "disk", base / FP)  # not an instance dir
    disks, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert problems == ()
    got = sorted((d.instance, os.path.basename(d.path)) for d in disks)
    assert got == [
        ("not-in-any-inventory", "disk"),
        ("u1", "disk"), ("u1", "disk.eph3"), ("u1", "disk.local"), ("u1", "disk.rescue"),
        ("u1", "disk.swap"), ("u1", "odd-name"),
    ]  # fmt: skip
    swap = next(d for d in disks if d.path.endswith("disk.swap"))
    assert swap.chain == (str(base / "swap_512"),)


def test_relative_and_deep_chains_resolve_to_cache_paths(tmp_path: Path) -> None:
    inst, base = host(tmp_path)
    make_raw(base / FP)
    make_overlay(base / "snap", base / FP)
    make_overlay(inst / "u1" / "mid", Path("..") / "_base" / "snap", backing_fmt="qcow2")
    make_overlay(inst / "u1" / "disk", "mid", backing_fmt="qcow2")
    disks, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert problems == ()
    top = next(d for d in disks if d.path.endswith("/disk"))
    assert top.chain == (str(inst / "u1" / "mid"), str(base / "snap"), str(base / FP))


def test_unreadable_headers_are_problems_not_crashes(tmp_path: Path) -> None:
    inst, base = host(tmp_path)
    make_raw(base / FP)
    make_overlay(inst / "good" / "disk", base / FP)
    bad = inst / "bad" / "disk"
    bad.parent.mkdir()
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 100)  # qcow2 magic, garbage after it
    truncated = inst / "bad" / "disk.local"
    truncated.write_bytes((inst / "good" / "disk").read_bytes()[:30])
    disks, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert [d.instance for d in disks] == ["good"]
    assert sorted(p.ref for p in problems) == sorted([str(bad), str(truncated)])
    assert all(p.blocking and p.source == "disk" for p in problems)


def test_json_backing_name_makes_the_view_incomplete_for_that_disk(tmp_path: Path) -> None:
    inst, _ = host(tmp_path)
    target = inst / "u1" / "disk"
    spec = 'json:{"file": {"driver": "file", "filename": "/x"}}'
    make_overlay(target, spec, unsafe_size="1M")
    _, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert len(problems) == 1 and problems[0].ref == str(target) and problems[0].blocking


def test_missing_backing_file_is_reported_but_does_not_block(tmp_path: Path) -> None:
    inst, base = host(tmp_path)
    make_overlay(inst / "u1" / "disk", base / FP, unsafe_size="1M")
    disks, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert disks[0].missing == str(base / FP) and disks[0].chain == (str(base / FP),)
    assert len(problems) == 1 and not problems[0].blocking


def test_inventory_file_records_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "inv.json"
    good.write_text(json.dumps({"instances": [
        {"uuid": "u1", "image_ref": "1", "kernel_id": "21", "swap_mb": 256, "extra": [1]},
        {"uuid": "u2", "swap_mb": "lots"},
        {"name": "no uuid"},
    ]}))  # fmt: skip
    records, problems = scan.load_instance_records(str(good))
    assert [r.uuid for r in records] == ["u1"] and records[0].swap_mb == 256
    assert len(problems) == 2 and all(p.blocking for p in problems)
    (tmp_path / "bad.json").write_text("{not json")
    assert scan.load_instance_records(str(tmp_path / "bad.json"))[1][0].blocking
    assert scan.load_instance_records(str(tmp_path / "missing.json"))[1][0].blocking


def test_registry_read_and_corruption(tmp_path: Path) -> None:
    inst, _ = host(tmp_path)
    assert scan.observe_registry(Layout(str(inst))) == ((), ())
    (inst / "compute_nodes").write_text(json.dumps({"h2": 5, "h1": 7.5}))
    assert scan.observe_registry(Layout(str(inst))) == ((("h1", 7.5), ("h2", 5.0)), ())
    (inst / "compute_nodes").write_text("")  # LP 1252659: an empty file is not "no peers"
    registry, problems = scan.observe_registry(Layout(str(inst)))
    assert registry == () and problems[0].blocking


def test_disk_vanished_between_listing_and_reading_is_a_problem(tmp_path: Path) -> None:
    # The listing saw it; by the time the header is read it is gone (instance deleted mid-scan).
    gone = tmp_path / "u1" / "disk"
    disk, problem = disks._inspect_disk(str(gone), "u1", layout=Layout(str(tmp_path)))
    assert disk is None and problem is not None
    assert (
        problem.blocking and problem.code is ProblemCode.DISK_VANISHED and problem.ref == str(gone)
    )


GARBAGE = b"QFI\xfb" + b"\xff" * 100  # a qcow2 magic with nonsense after it


def test_guest_written_garbage_warns_but_does_not_block(tmp_path: Path) -> None:
    # A guest controls its console log and the bytes of disks Nova recorded as raw: a garbage
    # header there must not stop every removal on the host.
    inst, _ = host(tmp_path)
    d = inst / "u1"
    d.mkdir()
    (d / "console.log").write_bytes(GARBAGE)
    (d / "console.log.0").write_bytes(GARBAGE)
    (d / "disk").write_bytes(GARBAGE)
    (d / "disk.info").write_text(json.dumps({str(d / "disk"): "raw"}))
    _, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert sorted(os.path.basename(p.ref) for p in problems) == [
        "console.log", "console.log.0", "disk"]  # fmt: skip
    assert not any(p.blocking for p in problems)


def test_guest_written_valid_header_still_protects(tmp_path: Path) -> None:
    # Keeping too much is the safe side: a qcow2 header in a "raw" disk still counts as a user.
    inst, base = host(tmp_path)
    make_raw(base / FP)
    disk = make_overlay(inst / "u1" / "disk", base / FP)
    (inst / "u1" / "disk.info").write_text(json.dumps({str(disk): "raw"}))
    disks, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert problems == () and disks[0].chain == (str(base / FP),)


def test_garbage_in_a_disk_nova_did_not_record_as_raw_blocks(tmp_path: Path) -> None:
    inst, _ = host(tmp_path)
    d = inst / "u1"
    d.mkdir()
    (d / "disk").write_bytes(GARBAGE)
    (d / "disk.local").write_bytes(GARBAGE)
    (d / "disk.info").write_text(json.dumps({str(d / "disk"): "qcow2"}))
    (inst / "u2").mkdir()
    (inst / "u2" / "disk").write_bytes(GARBAGE)
    (inst / "u2" / "disk.info").write_text("{not json")  # believed: headers decide
    _, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert len(problems) == 3 and all(p.blocking for p in problems)


def test_devices_and_fifos_linked_into_an_instance_dir_are_never_opened(tmp_path: Path) -> None:
    inst, base = host(tmp_path)
    make_raw(base / FP)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    d = inst / "u1"
    make_overlay(d / "disk", base / FP)
    (d / "disk.local").symlink_to(fifo)
    (d / "disk.swap").symlink_to("/dev/null")
    make_overlay(d / "disk.eph0", fifo, unsafe_size="1M")  # and as a backing file
    with OpenWatch(fifo) as watch:
        disks, problems = scan.scan_instances(Layout(str(inst), "_base"))
        assert watch.opened() == set()
    assert sorted(os.path.basename(d.path) for d in disks) == ["disk", "disk.eph0"]
    assert [(os.path.basename(p.ref), p.blocking) for p in problems] == [("disk.eph0", True)]
    assert "not a regular file or block device" in problems[0].message


def test_a_guest_cannot_block_removals_with_a_forged_header_in_its_raw_base(tmp_path: Path) -> None:
    inst, base = host(tmp_path)
    (base / FP).write_bytes(GARBAGE)  # a raw base: the guest wrote these bytes
    make_overlay(inst / "u1" / "disk", base / FP, backing_fmt="raw")
    disks, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert problems == ()
    assert [d.chain for d in disks] == [(str(base / FP),)]


DAY = 86400.0


def _reasons(inst: Path, base: Path) -> dict[str, Reason]:
    inventory = scan.observe(Layout(str(inst), base.name), host="h1")
    assert inventory.complete, inventory.problems
    now = max(e.mtime for e in inventory.entries) + 30 * DAY
    return {d.entry.name: d.reason for d in decide(inventory, policy(), now).decisions}


def test_a_base_named_through_a_symlink_is_in_use(tmp_path: Path) -> None:
    """Operators point overlays at ``/x/links/current-base``; the entry it names must stay."""
    inst, base = host(tmp_path)
    make_raw(base / FP)
    make_raw(base / naming.fingerprint("img-2"))
    links = tmp_path / "links"
    links.mkdir()
    (links / "current-base").symlink_to(base / FP)
    make_overlay(inst / "u1" / "disk", links / "current-base")
    assert _reasons(inst, base) == {
        FP: Reason.IN_USE,
        naming.fingerprint("img-2"): Reason.UNUSED_EXPIRED,
    }


def test_a_hard_link_to_an_entry_protects_it(tmp_path: Path) -> None:
    inst, base = host(tmp_path)
    make_raw(base / FP)
    (tmp_path / "golden").mkdir()
    os.link(base / FP, tmp_path / "golden" / "base.raw")
    make_overlay(inst / "u1" / "disk", tmp_path / "golden" / "base.raw")
    assert _reasons(inst, base) == {FP: Reason.IN_USE}


def test_a_symlinked_instance_dir_is_scanned_under_the_links_name(tmp_path: Path) -> None:
    """Operators move instance directories onto other volumes and leave a symlink behind."""
    inst, base = host(tmp_path)
    make_raw(base / FP)
    moved = make_overlay(tmp_path / "volume2" / "u2" / "disk", base / FP)
    (inst / "u2").symlink_to(moved.parent)
    disks, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert problems == ()
    assert [(d.instance, d.path, d.chain) for d in disks] == [
        ("u2", str(inst / "u2" / "disk"), (str(base / FP),))
    ]
    assert _reasons(inst, base) == {FP: Reason.IN_USE}


def test_each_instance_dir_is_scanned_once_and_links_make_no_loops(tmp_path: Path) -> None:
    inst, base = host(tmp_path)
    make_raw(base / FP)
    make_overlay(inst / "u1" / "disk", base / FP)
    make_overlay(tmp_path / "volume2" / "u2" / "disk", base / FP)
    (inst / "a-alias-of-u1").symlink_to("u1")  # sorts before it: the real name still wins
    (inst / "u2").symlink_to(tmp_path / "volume2" / "u2")
    (inst / "u2-again").symlink_to(tmp_path / "volume2" / "u2")
    (inst / "self").symlink_to(".")
    (inst / "parent-self").symlink_to(inst)
    (inst / "cache-alias").symlink_to("_base")
    make_overlay(inst / "locks" / "disk", base / FP)
    (inst / "locks-alias").symlink_to("locks")
    (inst / "a-file").symlink_to(base / FP)  # a link to a file is not an instance dir
    disks, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert problems == ()
    assert [(d.instance, os.path.basename(d.path)) for d in disks] == [
        ("u1", "disk"),
        ("u2", "disk"),
    ]


def test_a_symlinked_instance_dir_that_cannot_be_resolved_blocks(tmp_path: Path) -> None:
    inst, base = host(tmp_path)
    make_raw(base / FP)
    make_overlay(inst / "u1" / "disk", base / FP)
    (inst / "unmounted").symlink_to(tmp_path / "volume2" / "gone")
    (inst / "loop").symlink_to("loop")
    disks, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert [d.instance for d in disks] == ["u1"]
    assert [(p.source, os.path.basename(p.ref), p.blocking) for p in problems] == [
        ("instance", "loop", True),
        ("instance", "unmounted", True),
    ]
    assert "Too many levels of symbolic links" in problems[0].message
    assert "No such file or directory" in problems[1].message
    inventory = scan.observe(Layout(str(inst), base.name), host="h1")
    assert not inventory.complete


def _truncated_qcow2(path: Path, base: Path) -> Path:
    """A download or conversion cut short: a real qcow2's first 30 bytes (magic, then nothing)."""
    full = make_overlay(path.parent / "full.tmp", base, unsafe_size="1M")
    path.write_bytes(full.read_bytes()[:30])
    full.unlink()
    return path


def test_peer_hosts_caches_on_shared_storage_are_not_instance_dirs(tmp_path: Path) -> None:
    # subdirectory_name = _base_$my_ip: every host sharing instances_path has its own cache.
    inst = tmp_path / "instances"
    mine, peer = inst / "_base_10.0.0.1", inst / "_base_10.0.0.2"
    make_raw(mine / FP)
    make_raw(peer / FP)
    _truncated_qcow2(peer / f"{naming.fingerprint('img-2')}.part", peer / FP)  # peer downloading
    make_overlay(peer / "snap", peer / FP)  # no instance's disk either
    make_overlay(inst / "u1" / "disk", mine / FP)
    disks, problems = scan.scan_instances(Layout(str(inst), mine.name))
    assert problems == ()
    assert [(d.instance, os.path.basename(d.path)) for d in disks] == [("u1", "disk")]
    assert scan.observe(Layout(str(inst), mine.name), host="h1").complete


def test_a_cache_linked_to_a_real_directory_is_not_scanned_under_its_real_name(
    tmp_path: Path,
) -> None:
    inst = tmp_path / "instances"
    real = inst / "realbase"
    make_raw(real / FP)
    make_overlay(real / "snap", real / FP)
    _truncated_qcow2(real / "bad", real / FP)
    (inst / "_base").symlink_to("realbase")
    make_overlay(inst / "u1" / "disk", inst / "_base" / "snap", backing_fmt="qcow2")
    disks, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert problems == ()
    assert [(d.instance, os.path.basename(d.path)) for d in disks] == [("u1", "disk")]


def test_a_temp_file_in_an_instance_dir_warns_but_a_valid_one_still_protects(
    tmp_path: Path,
) -> None:
    # An interrupted copy (disk.part, disk.converted) is attached to no VM: its broken header
    # must not stop every removal, but a complete one still keeps its base (the safe side).
    inst, base = host(tmp_path)
    make_raw(base / FP)
    make_raw(base / naming.fingerprint("img-2"))
    _truncated_qcow2(inst / "u1" / "disk.part", base / FP)
    (inst / "u1" / "disk.local.converted").write_bytes(GARBAGE)
    make_overlay(inst / "u2" / "disk.converted", base / naming.fingerprint("img-2"))
    disks, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert [d.chain for d in disks] == [(str(base / naming.fingerprint("img-2")),)]
    assert sorted((os.path.basename(p.ref), p.blocking) for p in problems) == [
        ("disk.local.converted", False), ("disk.part", False)]  # fmt: skip
    assert all(p.message.startswith("temporary file") for p in problems)
    # Only the temp name is excused: garbage in the instance's own disk still blocks.
    (inst / "u1" / "disk").write_bytes(GARBAGE)
    _, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert [(os.path.basename(p.ref), p.blocking) for p in problems if p.blocking] == [
        ("disk", True)]  # fmt: skip


def test_a_chain_deeper_than_the_limit_blocks_but_is_no_bad_header(tmp_path: Path) -> None:
    # A long run of external snapshots is legitimate: unresolved, so blocking (safe), but the
    # message must not call a valid header bad; a guest or a partial write still only warns.
    inst, base = host(tmp_path)
    top = make_raw(base / FP)
    for n in range(1, MAX_CHAIN_DEPTH + 2):
        fmt = "raw" if n == 1 else "qcow2"
        top = make_overlay(inst / "u1" / f"snap{n}", top, backing_fmt=fmt)
    (inst / "u1" / f"snap{MAX_CHAIN_DEPTH + 1}").rename(inst / "u1" / "disk")
    _, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert [(os.path.basename(p.ref), p.blocking) for p in problems] == [("disk", True)]
    message = problems[0].message
    assert "bad" not in message and f"deeper than {MAX_CHAIN_DEPTH} files" in message
    assert problems[0].code is ProblemCode.CHAIN_TOO_DEEP
    (inst / "u1" / "disk").rename(inst / "u1" / "disk.part")
    _, problems = scan.scan_instances(Layout(str(inst), "_base"))
    assert [(os.path.basename(p.ref), p.blocking) for p in problems] == [("disk.part", False)]
    assert f"deeper than {MAX_CHAIN_DEPTH} files" in problems[0].message

"""decide() is pure: these tests build observations as values, no files."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pytest

from imagecache import naming
from imagecache.model import (
    CacheEntry,
    Disk,
    FileType,
    InstanceRecord,
    Inventory,
    Kind,
    Problem,
    ProblemCode,
    Source,
    User,
)
from imagecache.plan import Action, Policy, Reason
from imagecache.policy import decide
from tests.defaults import policy as make_policy

NOW = 1_800_000_000.0
IMAGE = "fd0cb2f1-8375-44c9-b1f4-3e1f4c4a8ef0"
FP = naming.fingerprint(IMAGE)
POLICY = make_policy(quarantine_seconds=0)


def entry(name: str, age: float, file_type: FileType = FileType.FILE) -> CacheEntry:
    return CacheEntry(
        name=name,
        kind=naming.classify(name, file_type),
        file_type=file_type,
        bytes_allocated=4096,
        bytes_apparent=4096,
        mtime=NOW - age,
        inode=1,
        device=1,
    )


def inventory(
    entries: Iterable[CacheEntry],
    *,
    disks: Iterable[Disk] = (),
    records: Iterable[InstanceRecord] = (),
    problems: Iterable[Problem] = (),
    registry: Iterable[tuple[str, float]] = (),
) -> Inventory:
    return Inventory(
        host="h1",
        instances_path="/i",
        cache_dir="/i/_base",
        entries=tuple(entries),
        disks=tuple(disks),
        instances=tuple(records),
        problems=tuple(problems),
        registry=tuple(registry),
    )


def one(inv: Inventory, policy: Policy = POLICY) -> tuple[Action, Reason]:
    (d,) = decide(inv, policy, NOW).decisions
    return d.action, d.reason


@pytest.mark.parametrize(
    ("name", "age", "expected"),
    [
        # Nova's boundary: removal at age >= threshold (3601 s with 3600 -> removed).
        (FP, 86400, (Action.REMOVE, Reason.UNUSED_EXPIRED)),
        (FP, 86399, (Action.KEEP, Reason.TOO_YOUNG)),
        (FP + "_sm", 3600, (Action.REMOVE, Reason.UNUSED_EXPIRED)),
        (FP + "_sm", 3599, (Action.KEEP, Reason.TOO_YOUNG)),
        (FP + "_10", 3601, (Action.REMOVE, Reason.UNUSED_EXPIRED)),
        (FP + "_5", 3601, (Action.REMOVE, Reason.UNUSED_EXPIRED)),
        ("swap_512", 3601, (Action.KEEP, Reason.TOO_YOUNG)),  # swap uses the original age
        ("swap_512", 86400, (Action.REMOVE, Reason.UNUSED_EXPIRED)),
        ("ephemeral_4_40d1d2c", 86400, (Action.REMOVE, Reason.UNUSED_EXPIRED)),
        (IMAGE, 10 * 86400, (Action.KEEP, Reason.LEGACY_ID_DISABLED)),
        ("notes.txt", 10 * 86400, (Action.KEEP, Reason.UNKNOWN_KIND)),
        (FP + ".part", 86400, (Action.REAP, Reason.STALE_TEMP)),
        (FP + ".part", 60, (Action.KEEP, Reason.TEMP_TOO_YOUNG)),
        (FP, -5, (Action.KEEP, Reason.CLOCK_SKEW)),
    ],
)
def test_thresholds_and_kinds(name: str, age: float, expected: tuple[Action, Reason]) -> None:
    assert one(inventory([entry(name, age)])) == expected


def test_symlinks_and_directories_are_never_removed() -> None:
    for ft in (FileType.SYMLINK, FileType.DIRECTORY):
        assert one(inventory([entry(FP, 10 * 86400, ft)])) == (Action.KEEP, Reason.NOT_A_FILE)


def test_legacy_id_removed_only_with_remove_unused_kernels() -> None:
    inv = inventory([entry(IMAGE, 86400)])
    policy = make_policy(quarantine_seconds=0, remove_unused_kernels=True)
    assert one(inv, policy) == (Action.REMOVE, Reason.UNUSED_EXPIRED)


def test_quarantine_instead_of_remove_when_configured() -> None:
    inv = inventory([entry(FP, 86400)])
    assert one(inv, make_policy(quarantine_seconds=60)) == (
        Action.QUARANTINE,
        Reason.UNUSED_EXPIRED,
    )


def test_report_only_removes_nothing() -> None:
    inv = inventory([entry(FP, 10 * 86400), entry(FP + ".part", 10 * 86400)])
    plan = decide(inv, make_policy(remove_unused=False), NOW)
    assert {(d.action, d.reason) for d in plan.decisions} == {
        (Action.KEEP, Reason.REMOVAL_DISABLED)
    }


def test_incomplete_view_removes_nothing_but_still_reports() -> None:
    problem = Problem(ProblemCode.HEADER_GARBAGE, "/i/x/disk", "unparsable header")
    inv = inventory([entry(FP, 10 * 86400), entry("swap_1", 60)], problems=[problem])
    plan = decide(inv, POLICY, NOW)
    assert not plan.complete
    assert [(d.action, d.reason) for d in plan.decisions] == [
        (Action.KEEP, Reason.INCOMPLETE_VIEW),
        (Action.KEEP, Reason.TOO_YOUNG),
    ]


def test_non_blocking_problem_does_not_stop_removal() -> None:
    warning = Problem(ProblemCode.BACKING_MISSING, "/i/x/disk", "backing file missing")
    assert one(inventory([entry(FP, 86400)], problems=[warning]))[0] is Action.REMOVE


def test_backing_chain_protects_every_link_by_basename() -> None:
    disk = Disk(
        path="/i/u1/disk.local",
        instance="u1",
        format="qcow2",
        chain=("/i/u1/disk.snap", "/other/_base_10.0.0.1/" + FP, "/i/_base/swap_512"),
    )
    plan = decide(inventory([entry(FP, 9e6), entry("swap_512", 9e6)], disks=[disk]), POLICY, NOW)
    for d in plan.decisions:
        assert (d.action, d.reason) == (Action.KEEP, Reason.IN_USE)
        assert d.users[0].source is Source.BACKING and d.users[0].ref == "/i/u1/disk.local"
    assert plan.decisions[1].users[0].detail == "backing chain depth 3"


def test_backing_chain_protects_the_same_file_whatever_its_name() -> None:
    """A link that is the entry's (st_dev, st_ino): a symlink to it, or a hard link elsewhere."""
    target = replace(entry(FP, 9e6), device=5, inode=70)
    other = replace(entry(FP + "_sm", 9e6), device=5, inode=71)
    via_symlink = Disk(
        "/i/u1/disk", "u1", "qcow2", chain=("/x/links/current-base",), chain_ids=((5, 70),)
    )
    plan = decide(inventory([target, other], disks=[via_symlink]), POLICY, NOW)
    assert [(d.entry.name, d.reason) for d in plan.decisions] == [
        (FP, Reason.IN_USE),
        (FP + "_sm", Reason.UNUSED_EXPIRED),
    ]
    assert plan.decisions[0].users == (
        User(Source.BACKING, "/i/u1/disk", "direct backing file via /x/links/current-base"),
    )


def test_a_link_that_matches_by_name_and_by_identity_is_one_user() -> None:
    target = replace(entry(FP, 9e6), device=5, inode=70)
    direct = Disk("/i/u1/disk", "u1", "qcow2", chain=(f"/i/_base/{FP}",), chain_ids=((5, 70),))
    (d,) = decide(inventory([target], disks=[direct]), POLICY, NOW).decisions
    assert d.users == (User(Source.BACKING, "/i/u1/disk", "direct backing file"),)


def test_resized_copy_is_not_protected_by_image_id_alone() -> None:
    record = InstanceRecord(uuid="u1", host="h1", image_ref=IMAGE)
    plan = decide(
        inventory(
            [entry(FP, 9e6), entry(FP + "_sm", 9e6), entry(FP + "_20", 9e6)], records=[record]
        ),
        POLICY,
        NOW,
    )
    assert [d.reason for d in plan.decisions] == [
        Reason.IN_USE,
        Reason.IN_USE,
        Reason.UNUSED_EXPIRED,
    ]


def test_instance_records_protect_image_kernel_ramdisk_swap_ephemeral_and_raw_ids() -> None:
    kernel, ramdisk = "k-1", "r-1"
    record = InstanceRecord(
        uuid="u1",
        image_ref=IMAGE,
        kernel_id=kernel,
        ramdisk_id=ramdisk,
        swap_mb=256,
        ephemeral_gb=4,
        ephemeral_format="ext4",
    )
    names = [
        FP,
        naming.fingerprint(kernel),
        naming.fingerprint(ramdisk),
        "swap_256",
        "ephemeral_4_40d1d2c",
        IMAGE,
    ]
    plan = decide(
        inventory([entry(n, 9e6) for n in names], records=[record]),
        make_policy(quarantine_seconds=0, remove_unused_kernels=True),
        NOW,
    )
    assert all(d.reason is Reason.IN_USE for d in plan.decisions)
    assert {u.detail for d in plan.decisions for u in d.users} >= {
        f"kernel_id={kernel}",
        f"ramdisk_id={ramdisk}",
        "swap_mb=256",
    }


def test_ephemeral_tag_follows_default_format() -> None:
    record = InstanceRecord(uuid="u1", ephemeral_gb=4)
    inv = inventory(
        [entry("ephemeral_4_40d1d2c", 9e6), entry("ephemeral_4_0706d66", 9e6)], records=[record]
    )
    vfat = decide(inv, POLICY, NOW)
    assert [d.reason for d in vfat.decisions] == [Reason.UNUSED_EXPIRED, Reason.IN_USE]
    ext4 = decide(inv, make_policy(quarantine_seconds=0, default_ephemeral_format="ext4"), NOW)
    assert [d.reason for d in ext4.decisions] == [Reason.IN_USE, Reason.UNUSED_EXPIRED]


def test_records_of_other_hosts_count_only_when_they_share_the_storage() -> None:
    record = InstanceRecord(uuid="u9", host="h2", image_ref=IMAGE)
    alone = inventory([entry(FP, 9e6)], records=[record])
    shared = inventory([entry(FP, 9e6)], records=[record], registry=[("h1", NOW), ("h2", 0.0)])
    assert one(alone)[1] is Reason.UNUSED_EXPIRED
    assert one(shared)[1] is Reason.IN_USE  # a stale heartbeat still counts


def test_volume_booted_empty_image_ref_protects_nothing() -> None:
    record = InstanceRecord(uuid="u1", image_ref="")
    empty = naming.fingerprint("")
    assert one(inventory([entry(empty, 9e6)], records=[record]))[1] is Reason.UNUSED_EXPIRED


def test_temp_files_are_not_protected_by_their_entry_users() -> None:
    record = InstanceRecord(uuid="u1", image_ref=IMAGE)
    assert one(inventory([entry(FP + ".part", 9e6)], records=[record]))[1] is Reason.STALE_TEMP


def test_removable_at_says_when() -> None:
    (d,) = decide(inventory([entry(FP, 3600)]), POLICY, NOW).decisions
    assert d.removable_at == NOW - 3600 + 86400
    assert d.entry.kind is Kind.ORIGINAL

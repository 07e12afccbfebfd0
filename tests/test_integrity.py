"""The pure half of integrity: what a pass hashes, the verdict, and what the policy does with it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagecache import naming
from imagecache.integrity import (
    LOCAL,
    Check,
    CheckReason,
    Digest,
    DigestRecord,
    DigestSource,
    Verdict,
    algorithms_for,
    integrity_of,
    judge,
    select,
)
from imagecache.model import CacheEntry, Disk, FileType, Integrity, Problem, ProblemCode
from imagecache.plan import Action, Reason
from imagecache.policy import decide
from tests.test_policy import NOW, POLICY, entry, inventory

A, B, C = ("a" * 40, "b" * 40, "c" * 40)
GOOD = "0123456789abcdef0123456789abcdef"
BAD = "f" * 32


def record(e: CacheEntry, *, age: float = 0, **changes: object) -> DigestRecord:
    base = DigestRecord(e.name, GOOD, e.device, e.inode, e.bytes_apparent, NOW - age,
                        Verdict.GOOD, DigestSource.GLANCE)  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


def sized(name: str, size: int, inode: int = 1) -> CacheEntry:
    return replace(entry(name, 3600), bytes_apparent=size, inode=inode)


def test_an_unchanged_cache_with_fresh_records_hashes_nothing() -> None:
    entries = [sized(A, 10), sized(B, 20, inode=2)]
    records = {e.name: record(e, age=60) for e in entries}
    assert select(entries, records, now=NOW, interval=3600, max_bytes=None) == ((), ())


def test_rewrites_first_then_new_then_oldest_due() -> None:
    a, b, c, d = sized(A, 10), sized(B, 10, 2), sized(C, 10, 3), sized("d" * 40, 10, 4)
    records = {
        A: record(a, age=7200),  # due, verified 2 h ago
        B: record(b, age=9000),  # due, older
        C: record(c, inode=99),  # rewritten: another inode
    }
    todo, deferred = select([a, b, c, d], records, now=NOW, interval=3600, max_bytes=None)
    assert [(x.entry.name, x.reason) for x in todo] == [
        (C, CheckReason.CHANGED), ("d" * 40, CheckReason.NEW),
        (B, CheckReason.DUE), (A, CheckReason.DUE),
    ]  # fmt: skip
    assert deferred == ()


def test_the_byte_budget_defers_the_rest_but_always_hashes_one() -> None:
    entries = [sized(A, 100), sized(B, 100, 2), sized(C, 100, 3)]
    todo, deferred = select(entries, {}, now=NOW, interval=3600, max_bytes=250)
    assert [c.entry.name for c in todo] == [A, B] and [c.entry.name for c in deferred] == [C]
    todo, deferred = select(entries, {}, now=NOW, interval=3600, max_bytes=1)
    assert len(todo) == 1 and len(deferred) == 2  # a file larger than the budget still goes


def test_only_images_and_generated_files_are_verified() -> None:
    names = [A, A + "_sm", A + "_10", "swap_512", naming.ephemeral_name(1, None), "notes.txt",
             A + ".part"]  # fmt: skip
    entries = [sized(n, 10, i) for i, n in enumerate(names)]
    entries.append(replace(sized(B, 10, 99), file_type=FileType.SYMLINK))
    todo, _ = select(entries, {}, now=NOW, interval=3600, max_bytes=None)
    assert {c.entry.name for c in todo} == set(names[:5])


def test_the_operator_can_ask_for_any_entry_whatever_its_record() -> None:
    a = sized(A, 10)
    records = {A: record(a, age=1)}
    todo, _ = select([a], records, now=NOW, interval=3600, max_bytes=1, names=[A])
    assert [(c.entry.name, c.reason) for c in todo] == [(A, CheckReason.REQUESTED)]
    todo, _ = select([a], records, now=NOW, interval=3600, max_bytes=None, every=True)
    assert len(todo) == 1


def test_a_record_from_the_future_is_due() -> None:
    a = sized(A, 10)
    todo, _ = select([a], {A: record(a, age=-86400)}, now=NOW, interval=3600, max_bytes=None)
    assert [c.reason for c in todo] == [CheckReason.DUE]


@pytest.mark.parametrize(
    ("source", "got", "reason", "verdict"),
    [
        (DigestSource.GLANCE, GOOD, CheckReason.DUE, Verdict.GOOD),
        (DigestSource.GLANCE, BAD, CheckReason.DUE, Verdict.CORRUPT),  # bit rot
        (DigestSource.GLANCE, BAD, CheckReason.CHANGED, Verdict.CORRUPT),  # images never change
        (DigestSource.CONVERTED, BAD, CheckReason.CHANGED, Verdict.CORRUPT),
        (DigestSource.FIRST_SEEN, BAD, CheckReason.DUE, Verdict.CORRUPT),
        (DigestSource.FIRST_SEEN, BAD, CheckReason.CHANGED, Verdict.GOOD),  # trusted afresh
    ],
)
def test_the_verdict(source: DigestSource, got: str, reason: CheckReason, verdict: Verdict) -> None:
    a = sized(A, 10)
    old = record(a, age=7200, source=source)
    new = judge(Check(a, old, reason), {LOCAL: got}, now=NOW)
    assert new.verdict is verdict
    assert new.verified_at == NOW
    if verdict is Verdict.CORRUPT:
        assert new.xxh3 == GOOD and new.observed == got  # the reference is kept
    assert integrity_of(a, new) is (
        Integrity.GOOD if verdict is Verdict.GOOD else Integrity.CORRUPT
    )


def test_a_first_hash_trusts_what_it_sees_unless_nova_left_a_sha1() -> None:
    a = sized(A, 10)
    fresh = judge(Check(a, None, CheckReason.NEW), {LOCAL: GOOD}, now=NOW)
    assert (fresh.verdict, fresh.source, fresh.xxh3) == (
        Verdict.GOOD,
        DigestSource.FIRST_SEEN,
        GOOD,
    )
    sha1 = Digest("sha1", "1" * 40)
    check = Check(a, None, CheckReason.NEW)
    assert algorithms_for(check, sha1) == (LOCAL, "sha1")
    good = judge(check, {LOCAL: GOOD, "sha1": "1" * 40}, now=NOW, legacy=sha1)
    assert (good.verdict, good.source, good.expected) == (
        Verdict.GOOD,
        DigestSource.NOVA_INFO,
        sha1,
    )
    bad = judge(check, {LOCAL: BAD, "sha1": "2" * 40}, now=NOW, legacy=sha1)
    assert (bad.verdict, bad.xxh3, bad.observed) == (Verdict.CORRUPT, "", BAD)
    # Until the bytes match Nova's sha1 again, every verification must compute it.
    again = Check(a, bad, CheckReason.DUE)
    assert algorithms_for(again, None) == (LOCAL, "sha1")
    healed = judge(again, {LOCAL: GOOD, "sha1": "1" * 40}, now=NOW + 1)
    assert (healed.verdict, healed.xxh3) == (Verdict.GOOD, GOOD)


def test_a_record_of_another_file_says_nothing() -> None:
    a = sized(A, 10)
    assert integrity_of(a, record(a, inode=2, verdict=Verdict.CORRUPT)) is Integrity.UNVERIFIED
    assert integrity_of(a, record(a, size=11, verdict=Verdict.CORRUPT)) is Integrity.UNVERIFIED
    assert integrity_of(a, None) is Integrity.UNVERIFIED


# What the policy does with a corrupt entry.


def corrupt(name: str, age: float = 60) -> CacheEntry:
    return replace(entry(name, age), integrity=Integrity.CORRUPT)


def disk_on(name: str) -> Disk:
    return Disk(path="/i/inst-1/disk", instance="inst-1", format="qcow2",
                chain=(f"/i/_base/{name}",))  # fmt: skip


def test_an_unused_corrupt_entry_is_quarantined_whatever_its_age() -> None:
    plan = decide(inventory([corrupt(A, age=60)]), POLICY, NOW)
    (d,) = plan.decisions
    assert (d.action, d.reason) == (Action.QUARANTINE, Reason.CORRUPT)
    assert plan.ok


def test_an_in_use_corrupt_entry_is_kept_and_reported_with_its_users() -> None:
    plan = decide(inventory([corrupt(A)], disks=[disk_on(A)]), POLICY, NOW)
    (d,) = plan.decisions
    assert (d.action, d.reason) == (Action.KEEP, Reason.IN_USE)
    (p,) = [p for p in plan.problems if p.code is ProblemCode.ENTRY_CORRUPT]
    assert p.ref == A and "/i/inst-1/disk" in p.message
    assert plan.complete and not plan.ok  # exit 1, and still every other removal goes ahead


def test_a_corrupt_entry_is_kept_on_an_incomplete_view_or_in_report_only_mode() -> None:
    blocking = Problem(ProblemCode.DISK_UNREADABLE, "/i/x/disk", "unreadable")
    (d,) = decide(inventory([corrupt(A)], problems=[blocking]), POLICY, NOW).decisions
    assert d.action is Action.KEEP
    (d,) = decide(inventory([corrupt(A)]), replace(POLICY, remove_unused=False), NOW).decisions
    assert d.action is Action.KEEP


@given(st.sampled_from(list(Integrity)), st.booleans(), st.floats(-1e6, 1e7))
def test_integrity_never_removes_an_entry_in_use(
    integrity: Integrity, used: bool, age: float
) -> None:
    e = replace(entry(A, age), integrity=integrity)
    disks = [disk_on(A)] if used else []
    (d,) = decide(inventory([e], disks=disks), POLICY, NOW).decisions
    if used:
        assert d.action is Action.KEEP
    if integrity is Integrity.CORRUPT and not used:
        assert (d.action, d.reason) == (Action.QUARANTINE, Reason.CORRUPT)

"""The capacity rules (issue 13), pure: decide() on observations built as values, no files.

Over the size limit or the high watermark, a plan frees, until it is under the limit and the low
watermark: what goes anyway, quarantined entries early, then unused entries least recently used
first, an original with its copies as one unit; never an entry in use, pinned, too young
(``min_unused_seconds``), unknown, or anything on an incomplete view.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from imagecache import naming
from imagecache.model import (
    CacheEntry,
    FileType,
    FsUsage,
    InstanceRecord,
    Inventory,
    Kind,
    Pin,
    Problem,
    ProblemCode,
    Source,
    TrashEntry,
    Upstream,
)
from imagecache.plan import Action, Plan, Policy, Reason, plan_from_dict, plan_to_dict
from imagecache.policy import decide
from tests.defaults import policy as make_policy

NOW = 1_800_000_000.0
HOUR, DAY = 3600.0, 86400.0
MIB = 1 << 20
# Nothing is old enough to go by age (a week): only the capacity rules remove.
POLICY = make_policy(quarantine_seconds=86400, original_age=7 * 86400, resized_age=7 * 86400)


def fp(image: str) -> str:
    return naming.fingerprint(image)


def entry(
    name: str, age: float, size: int = MIB, file_type: FileType = FileType.FILE
) -> CacheEntry:
    return CacheEntry(
        name=name,
        kind=naming.classify(name, file_type),
        file_type=file_type,
        bytes_allocated=size,
        bytes_apparent=size,
        mtime=NOW - age,
        inode=abs(hash(name)) % (1 << 40) + 1,
        device=1,
    )


def host(
    entries: Iterable[CacheEntry],
    *,
    records: Iterable[InstanceRecord] = (),
    trash: Iterable[TrashEntry] = (),
    problems: Iterable[Problem] = (),
    fs: FsUsage | None = None,
    pins: Iterable[Pin] = (),
    upstream: Upstream | None = None,
) -> Inventory:
    return Inventory(
        host="h1",
        instances_path="/i",
        cache_dir="/i/_base",
        entries=tuple(entries),
        instances=tuple(records),
        trash=tuple(trash),
        problems=tuple(problems),
        filesystem=fs,
        pins=tuple(pins),
        upstream=upstream,
    )


def limited(**changes: object) -> Policy:
    return make_policy(
        quarantine_seconds=86400, original_age=7 * 86400, resized_age=7 * 86400, **changes
    )


def evicted(plan: Plan) -> list[tuple[str, Reason]]:
    """What a plan removes, in the order of its decisions (the cache's listing order)."""
    return [(d.entry.name, d.reason) for d in plan.decisions if d.action is Action.REMOVE]


def test_no_limit_no_capacity_state_and_nothing_changes() -> None:
    inv = host([entry(fp("a"), 2 * DAY)])
    plan = decide(inv, POLICY, NOW)
    assert plan.capacity is None
    assert [d.action for d in plan.decisions] == [Action.KEEP]


def test_over_the_size_limit_the_least_recently_used_go_first_until_under() -> None:
    ages = {"a": 5 * HOUR, "b": 3 * HOUR, "c": 2 * DAY, "d": 1 * HOUR}
    inv = host([entry(fp(i), age) for i, age in ages.items()])
    plan = decide(inv, limited(max_cache_bytes=2 * MIB), NOW)
    # 4 MiB held, 2 allowed: the two least recently used go, c (2 days) then a (5 hours).
    assert evicted(plan) == [(fp("a"), Reason.OVER_SIZE), (fp("c"), Reason.OVER_SIZE)]
    cap = plan.capacity
    assert cap is not None
    assert (cap.cache_bytes, cap.need_bytes, cap.freeing_bytes, cap.shortfall_bytes) == (
        4 * MIB, 2 * MIB, 2 * MIB, 0,
    )  # fmt: skip
    assert cap.over == (Reason.OVER_SIZE,)
    assert cap.next == (fp("b"), fp("d"))  # what would go next, in order
    assert plan.ok


def test_at_the_limit_nothing_goes() -> None:
    inv = host([entry(fp(i), 2 * DAY) for i in "ab"])
    plan = decide(inv, limited(max_cache_bytes=2 * MIB), NOW)
    assert evicted(plan) == []
    assert plan.capacity is not None and plan.capacity.over == ()


def test_in_use_pinned_too_young_and_unknown_entries_are_never_evicted() -> None:
    used = InstanceRecord(uuid="u1", host="h1", image_ref="used")
    entries = [
        entry(fp("used"), 9 * DAY),
        entry(fp("pinned"), 9 * DAY),
        entry(fp("config-pin"), 9 * DAY),
        entry(fp("young"), 60),  # unused for a minute: a spawn may be about to use it
        entry("not-an-image-name", 9 * DAY),
        entry(fp("dir"), 9 * DAY, file_type=FileType.DIRECTORY),
        entry(fp("free"), 2 * HOUR),
    ]
    pin = Pin("pinned", NOW - DAY, "h2")
    policy = limited(max_cache_bytes=1, pinned_images=("config-pin",))
    plan = decide(host(entries, records=[used], pins=[pin]), policy, NOW)
    assert evicted(plan) == [(fp("free"), Reason.OVER_SIZE)]
    cap = plan.capacity
    assert cap is not None and cap.shortfall_bytes > 0
    (short,) = [p for p in plan.problems if p.code is ProblemCode.CAPACITY_SHORTFALL]
    assert not plan.ok  # exit 1
    protected = dict(cap.protected)
    assert protected["pinned"] == 2 * MIB and protected["in-use"] == MIB
    assert protected["too-young"] == MIB and protected["unknown-kind"] == MIB
    for word in ("pinned", "in-use", "too-young", "short"):
        assert word in short.message
    pinned = next(d for d in plan.decisions if d.entry.name == fp("pinned"))
    assert [u.source for u in pinned.users] == [Source.PIN]


def test_an_original_and_its_copies_go_together_ordered_by_their_newest_use() -> None:
    a, b = fp("a"), fp("b")
    entries = [
        entry(a, 9 * HOUR), entry(a + "_sm", 8 * HOUR), entry(a + "_20", 1 * HOUR),
        entry(b, 5 * HOUR),
    ]  # fmt: skip
    assert evicted(decide(host(entries), limited(max_cache_bytes=3 * MIB), NOW)) == [
        (b, Reason.OVER_SIZE)
    ]  # a's family was used an hour ago (its resized copy), b five hours ago: b goes first
    plan = decide(host(entries), limited(max_cache_bytes=2 * MIB), NOW)
    # One more MiB is needed: a's whole family goes, not just its oldest member.
    assert sorted(evicted(plan)) == sorted(
        [(b, Reason.OVER_SIZE), (a, Reason.OVER_SIZE), (a + "_sm", Reason.OVER_SIZE),
         (a + "_20", Reason.OVER_SIZE)]
    )  # fmt: skip
    # One member in use keeps the whole family.
    used = InstanceRecord(uuid="u1", host="h1", image_ref="a")  # protects a and a_sm
    plan = decide(host(entries, records=[used]), limited(max_cache_bytes=1), NOW)
    assert evicted(plan) == [(b, Reason.OVER_SIZE)]
    assert plan.capacity is not None
    assert dict(plan.capacity.protected)["copy-of-a-protected-entry"] == MIB  # a_20


def test_quarantined_entries_are_purged_early_before_any_entry_is_evicted() -> None:
    old_q = TrashEntry(
        fp("q1"), naming.trash_name(fp("q1"), NOW - 2 * HOUR), MIB, NOW - 2 * HOUR, 7
    )
    new_q = TrashEntry(fp("q2"), naming.trash_name(fp("q2"), NOW - HOUR), MIB, NOW - HOUR, 8)
    entries = [entry(fp("x"), 9 * HOUR), entry(fp("y"), 8 * HOUR)]
    plan = decide(host(entries, trash=[new_q, old_q]), limited(max_cache_bytes=3 * MIB), NOW)
    purged = [(t.entry.name, t.reason) for t in plan.trash if t.action is Action.PURGE]
    assert purged == [(fp("q1"), Reason.OVER_SIZE)]  # the longest quarantined, and enough
    assert evicted(plan) == []


def test_what_goes_by_age_anyway_counts_first() -> None:
    policy = make_policy(quarantine_seconds=0, max_cache_bytes=2 * MIB)
    entries = [entry(fp("old"), 2 * DAY), entry(fp("a"), 3 * HOUR), entry(fp("b"), 2 * HOUR)]
    plan = decide(host(entries), policy, NOW)
    assert evicted(plan) == [(fp("old"), Reason.UNUSED_EXPIRED)]  # enough: nothing else goes


def test_an_entry_expired_by_age_is_removed_not_quarantined_when_capacity_needs_it() -> None:
    policy = make_policy(quarantine_seconds=86400, max_cache_bytes=MIB)
    entries = [entry(fp("old"), 2 * DAY), entry(fp("older"), 3 * DAY)]
    plan = decide(host(entries), policy, NOW)
    actions = {d.entry.name: (d.action, d.reason) for d in plan.decisions}
    # One MiB must go: the least recently used goes now (a quarantine would free nothing); the
    # other still expires by age, into the quarantine.
    assert actions == {
        fp("older"): (Action.REMOVE, Reason.OVER_SIZE),
        fp("old"): (Action.QUARANTINE, Reason.UNUSED_EXPIRED),
    }


def test_the_watermark_frees_down_to_the_low_mark() -> None:
    # 90 MiB used of 100: over 85 %, down to 70 % means 20 MiB.
    fs = FsUsage(used_bytes=90 * MIB, available_bytes=10 * MIB)
    entries = [entry(fp(str(i)), (30 - i) * HOUR, size=8 * MIB) for i in range(5)]
    policy = limited(high_watermark_percent=85.0, low_watermark_percent=70.0)
    plan = decide(host(entries, fs=fs), policy, NOW)
    assert evicted(plan) == [(fp(str(i)), Reason.OVER_WATERMARK) for i in range(3)]  # 24 >= 20
    assert plan.capacity is not None and plan.capacity.need_bytes == 20 * MIB
    # Under the high mark nothing goes, even above the low one (hysteresis).
    calm = FsUsage(used_bytes=80 * MIB, available_bytes=20 * MIB)
    assert evicted(decide(host(entries, fs=calm), policy, NOW)) == []


def test_the_reason_names_the_rule_still_unmet() -> None:
    fs = FsUsage(used_bytes=90 * MIB, available_bytes=10 * MIB)
    entries = [entry(fp(str(i)), (30 - i) * HOUR, size=10 * MIB) for i in range(4)]
    policy = limited(high_watermark_percent=85.0, low_watermark_percent=80.0,
                     max_cache_bytes=15 * MIB)  # fmt: skip
    plan = decide(host(entries, fs=fs), policy, NOW)
    # The watermark needs 10 MiB, the size limit 25: the first eviction serves both (named
    # for the watermark), the next two only the size limit.
    assert evicted(plan) == [
        (fp("0"), Reason.OVER_WATERMARK), (fp("1"), Reason.OVER_SIZE), (fp("2"), Reason.OVER_SIZE)
    ]  # fmt: skip


def test_an_incomplete_view_evicts_nothing_and_says_it_is_short() -> None:
    gap = Problem(ProblemCode.DISK_UNREADABLE, "/i/x/disk", "unreadable")
    entries = [entry(fp("a"), 9 * HOUR), entry(fp("b"), 8 * HOUR)]
    plan = decide(host(entries, problems=[gap]), limited(max_cache_bytes=MIB), NOW)
    assert evicted(plan) == [] and not plan.complete
    assert plan.capacity is not None and plan.capacity.shortfall_bytes == MIB
    assert dict(plan.capacity.protected) == {"removal-blocked": 2 * MIB}


def test_removal_disabled_evicts_nothing() -> None:
    entries = [entry(fp("a"), 9 * HOUR)]
    policy = limited(max_cache_bytes=1, remove_unused=False)
    assert evicted(decide(host(entries), policy, NOW)) == []


def test_images_deleted_or_deactivated_upstream_go_first() -> None:
    entries = [entry(fp(i), age) for i, age in (("kept", 9 * HOUR), ("gone", HOUR), ("off", HOUR))]
    up = Upstream(statuses=(("kept", "active"), ("off", "deactivated")), complete=True)
    policy = limited(max_cache_bytes=MIB, evict_deleted_first=True)
    assert sorted(evicted(decide(host(entries, upstream=up), policy, NOW))) == sorted(
        [(fp("gone"), Reason.OVER_SIZE), (fp("off"), Reason.OVER_SIZE)]
    )
    # An incomplete listing says nothing of what it does not list: only the deactivated one
    # goes first, then the least recently used (kept, nine hours).
    partial = Upstream(statuses=(("off", "deactivated"),), complete=False)
    order = evicted(decide(host(entries, upstream=partial), policy, NOW))
    assert sorted(order) == sorted([(fp("off"), Reason.OVER_SIZE), (fp("kept"), Reason.OVER_SIZE)])
    # Without the option (or without a listing): plain LRU.
    assert evicted(decide(host(entries, upstream=up), limited(max_cache_bytes=2 * MIB), NOW)) == [
        (fp("kept"), Reason.OVER_SIZE)
    ]


def test_a_capacity_plan_round_trips_through_its_document() -> None:
    fs = FsUsage(used_bytes=90 * MIB, available_bytes=10 * MIB)
    entries = [entry(fp(str(i)), (30 - i) * HOUR, size=8 * MIB) for i in range(5)]
    policy = limited(high_watermark_percent=85.0, low_watermark_percent=70.0, max_cache_bytes=1,
                     pinned_images=("3",), evict_deleted_first=True)  # fmt: skip
    plan = decide(host(entries, fs=fs), policy, NOW)
    assert plan.capacity is not None and plan.capacity.protected
    assert plan_from_dict(plan_to_dict(plan)) == plan


# -- the property: whatever the host, capacity never evicts what a keep rule protects ----------

_IMAGES = [str(i) for i in range(6)]
_names = st.one_of(
    st.sampled_from([fp(i) for i in _IMAGES]),
    st.sampled_from([fp(i) + "_sm" for i in _IMAGES]),
    st.builds(lambda i, n: f"{fp(i)}_{n}", st.sampled_from(_IMAGES), st.integers(1, 99)),
    st.sampled_from(["swap_256", "junk", "x.part", _IMAGES[0]]),
)
_entries = st.lists(
    st.builds(
        entry,
        _names,
        st.floats(-HOUR, 10 * DAY),
        st.integers(0, 64 * MIB),
        st.sampled_from([FileType.FILE, FileType.FILE, FileType.SYMLINK, FileType.DIRECTORY]),
    ),
    max_size=14,
    unique_by=lambda e: e.name,
)


@settings(max_examples=300, deadline=None)
@given(
    entries=_entries,
    used=st.sets(st.sampled_from(_IMAGES), max_size=3),
    pinned=st.sets(st.sampled_from(_IMAGES), max_size=2),
    max_bytes=st.integers(0, 200 * MIB),
    used_pct=st.floats(0, 100),
    high=st.sampled_from([0.0, 50.0, 90.0]),
    min_unused=st.sampled_from([0, 600, DAY]),
    blocked=st.booleans(),
)
def test_capacity_never_evicts_a_protected_entry(  # noqa: PLR0917 (hypothesis's arguments)
    entries: list[CacheEntry],
    used: set[str],
    pinned: set[str],
    max_bytes: int,
    used_pct: float,
    high: float,
    min_unused: float,
    blocked: bool,
) -> None:
    records = [InstanceRecord(uuid=f"u{i}", host="h1", image_ref=i) for i in used]
    fs = FsUsage(used_bytes=int(used_pct * MIB), available_bytes=int((100 - used_pct) * MIB))
    problems = [Problem(ProblemCode.DISK_UNREADABLE, "/i/d", "x")] if blocked else []
    policy = limited(max_cache_bytes=max_bytes, high_watermark_percent=high,
                     low_watermark_percent=high / 2, min_unused_seconds=int(min_unused),
                     pinned_images=tuple(pinned))  # fmt: skip
    inv = host(entries, records=records, fs=fs, problems=problems)
    plan = decide(inv, policy, NOW)
    # The same policy without its limits: what the keep rules and age alone decide.
    unlimited = dataclasses.replace(policy, max_cache_bytes=0, high_watermark_percent=0.0,
                                    low_watermark_percent=0.0)  # fmt: skip
    baseline = decide(inv, unlimited, NOW)
    families = {naming.image_prefix(d.entry.name) for d in plan.decisions if d.users}
    for d, base in zip(plan.decisions, baseline.decisions, strict=True):
        if d.reason not in (Reason.OVER_SIZE, Reason.OVER_WATERMARK):
            assert (d.action, d.reason) == (base.action, base.reason)  # untouched
            continue
        e = d.entry
        assert d.action is Action.REMOVE and not d.users and not blocked
        assert e.file_type is FileType.FILE and e.kind not in (
            Kind.UNKNOWN,
            Kind.TEMP,
        )
        assert d.age_seconds >= min_unused and d.age_seconds >= 0
        assert base.reason in (Reason.TOO_YOUNG, Reason.UNUSED_EXPIRED)
        if e.kind in (Kind.ORIGINAL, Kind.SMALL, Kind.RESIZED):
            assert naming.image_prefix(e.name) not in families  # no member of its unit is used
    cap = plan.capacity
    assert (cap is None) == (not policy.capacity_limited)
    if cap is None:
        return
    gone = (Action.REMOVE, Action.REAP)
    freed = sum(d.entry.bytes_allocated for d in plan.decisions if d.action in gone)
    freed += sum(t.entry.bytes_allocated for t in plan.trash if t.action is Action.PURGE)
    assert cap.freeing_bytes == freed
    assert (cap.shortfall_bytes > 0) == any(
        p.code is ProblemCode.CAPACITY_SHORTFALL for p in plan.problems
    )
    if cap.over and not cap.shortfall_bytes:
        assert freed >= cap.need_bytes

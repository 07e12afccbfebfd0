"""The executor's clock and stop switch are parameters: lock deadlines tested without sleeping.

Nova really holds the locks here (``nova_holds``, oslo.concurrency in another process); only the
passing of time is fake: :class:`tests.defaults.FakeClock`'s ``sleep`` advances its monotonic
clock at once, so an hour-long deadline takes no time at all, and what the pass waited is exact.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from imagecache import manager
from imagecache.config import load_settings
from imagecache.results import Report
from tests.defaults import FakeClock
from tests.test_executor import DAY, NOW, A, B, C, D, Host, make_host, put
from tests.test_locks import nova_holds

HOUR = 3600


def _clean(host: Host, fake: FakeClock, **kw: object) -> Report:
    settings = load_settings([str(host.config)])
    _, report = manager.run_pass(
        settings,
        inventory_files=[str(host.inventory)],
        clock=fake.clock,
        **kw,  # type: ignore[arg-type]
    )
    return report


def _results(report: Report) -> dict[str, tuple[str, str]]:
    return {o.name: (str(o.result), str(o.reason)) for o in report.outcomes}


def test_one_deadline_for_the_whole_pass_without_sleeping(tmp_path: Path) -> None:
    # Three busy entries, an hour's deadline: the pass waits one hour in all, not three, and
    # does the free entry first. Real waiting would take an hour; this takes none.
    host = make_host(tmp_path, quarantine_seconds=0, lock_timeout_seconds=HOUR)
    for name in (A, B, C, D):
        put(host, name, 2 * DAY)
    fake = FakeClock(wall=NOW)
    with ExitStack() as nova:
        for name in (A, B, C):
            nova.enter_context(nova_holds(host.instances, name))
        report = _clean(host, fake)
    assert _results(report) == {
        A: ("skipped", "lock-timeout"),
        B: ("skipped", "lock-timeout"),
        C: ("skipped", "lock-timeout"),
        D: ("removed", "unused-expired"),
    }
    assert HOUR <= fake.slept < HOUR + 1, fake.slept
    assert {o.name: "whole pass" in o.message for o in report.outcomes} == {
        A: True,
        B: True,
        C: True,
        D: False,
    }
    assert not report.ok and all(host.path(n).exists() for n in (A, B, C))


def test_a_zero_deadline_never_waits(tmp_path: Path) -> None:
    host = make_host(tmp_path, quarantine_seconds=0, lock_timeout_seconds=0)
    put(host, A, 2 * DAY)
    fake = FakeClock(wall=NOW)
    with nova_holds(host.instances, A):
        report = _clean(host, fake)
    assert _results(report) == {A: ("skipped", "lock-timeout")} and fake.slept == 0


def test_should_stop_leaves_every_remaining_entry_as_it_is(tmp_path: Path) -> None:
    host = make_host(tmp_path, quarantine_seconds=0)
    for name in (A, B, C):
        put(host, name, 2 * DAY)
    asked: list[bool] = []

    def should_stop() -> bool:
        asked.append(True)
        return any(not host.path(n).exists() for n in (A, B, C))  # one through, then stop

    report = _clean(host, FakeClock(wall=NOW), should_stop=should_stop)
    got = _results(report)
    assert sorted(got.values()) == [
        ("removed", "unused-expired"),
        ("skipped", "stopped"),
        ("skipped", "stopped"),
    ]
    assert {n for n in (A, B, C) if host.path(n).exists()} == {
        n for n, (result, _) in got.items() if result == "skipped"
    }
    assert report.ok  # stopping is not a problem: the next pass does the rest
    again = _clean(host, FakeClock(wall=NOW + 60))
    assert {r for r, _ in _results(again).values()} == {"removed"} and not any(
        host.path(n).exists() for n in (A, B, C)
    )

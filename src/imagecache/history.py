"""What the passes did, as values: the last pass's summary and running totals since the first.

Pure: built from a pass's :class:`~imagecache.plan.Plan` and :class:`~imagecache.results.Report`
(never pushed from deep code), kept in the cache's state file by :mod:`imagecache.store.state`,
and read back by ``imagecache health`` and the metrics. Counters keep counting across one-shot
``clean`` runs and daemon restarts because they live in that file, not in a process.

Labels are the stable codes of the plan and report (kind, entry state, action, reason, problem
code), so a dashboard built on them survives a rewording.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from imagecache import naming
from imagecache.model import Integrity, Kind
from imagecache.plan import Decision, Plan
from imagecache.results import Report, Result

__all__ = [
    "ENTRY_STATES",
    "Figures",
    "History",
    "PassRecord",
    "Totals",
    "entry_state",
    "pass_outcome",
    "record_fetches",
    "record_pass",
    "record_verifications",
    "summarize",
]

# What an entry is, for the entries/bytes figures.
ENTRY_STATES = ("in-use", "unused", "quarantined", "temp", "corrupt")

_MOVED = frozenset({Result.REMOVED, Result.REAPED, Result.QUARANTINED})

# (label, label) -> (count, bytes)
Figures = Mapping[tuple[str, str], tuple[int, int]]


def _frozen(counts: Mapping[tuple[str, str], tuple[int, int]]) -> Figures:
    return MappingProxyType(dict(sorted(counts.items())))


@dataclass(frozen=True, slots=True)
class PassRecord:
    """One pass: when, whether its view was complete, what it saw and did.

    ``entries``: (kind, state) -> (entries, allocated bytes), quarantined ones under their kind.
    ``actions``: (result, reason) -> (outcomes, bytes freed). ``ok``: the view was complete, the
    pass was not stopped, and no action failed or was refused — a *successful* pass.
    """

    started: float
    finished: float
    complete: bool
    stopped: bool
    ok: bool
    plan_id: str | None
    entries: Figures = field(default_factory=lambda: _frozen({}))
    actions: Figures = field(default_factory=lambda: _frozen({}))
    problems: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    bytes_freed: int = 0
    # Capacity (None: no limit configured): the cache's bytes, what had to go, what could not.
    capacity: tuple[int, int, int] | None = None  # (cache_bytes, need_bytes, shortfall_bytes)

    @property
    def duration(self) -> float:
        return max(0.0, self.finished - self.started)


@dataclass(frozen=True, slots=True)
class Totals:
    """Running totals since the state file was created.

    ``passes``: outcome ("ok", "incomplete", "failed", "stopped") -> passes. ``actions``:
    (result, reason) -> (outcomes, bytes freed). ``fetches``: (result, "") -> (images, bytes).
    ``verifications``: (verdict or "unreadable", "") -> (entries hashed, bytes read).
    """

    passes: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    actions: Figures = field(default_factory=lambda: _frozen({}))
    fetches: Figures = field(default_factory=lambda: _frozen({}))
    verifications: Figures = field(default_factory=lambda: _frozen({}))


@dataclass(frozen=True, slots=True)
class History:
    """The state a cache keeps about its passes; empty before the first."""

    last_pass: PassRecord | None = None
    last_success: float | None = None  # ``finished`` of the newest ok pass
    incomplete_streak: int = 0  # passes in a row whose view was incomplete
    totals: Totals = field(default_factory=Totals)


def entry_state(decision: Decision) -> str:
    """The state label of a cache entry: in use, a temporary file, or unused."""
    if decision.entry.integrity is Integrity.CORRUPT:
        return "corrupt"  # whether used or not: the alarming one
    if decision.users:
        return "in-use"
    if decision.entry.kind is Kind.TEMP:
        return "temp"
    return "unused"


def pass_outcome(record: PassRecord) -> str:
    """ "ok", "stopped", "incomplete" or "failed": how a pass is counted in the totals."""
    if record.ok:
        return "ok"
    if record.stopped:
        return "stopped"
    return "failed" if record.complete else "incomplete"


def summarize(
    plan: Plan, report: Report | None, *, started: float, finished: float, stopped: bool = False
) -> PassRecord:
    """The record of one pass. ``report`` None: the pass only planned (nothing was applied).

    The entry figures are the cache as the pass left it: what it removed, reaped or purged is
    gone, what it quarantined counts as quarantined.
    """
    outcomes = report.outcomes if report is not None else ()
    moved = {o.name: o.result for o in outcomes if o.result in _MOVED}
    purged = {o.trash_name for o in outcomes if o.result is Result.PURGED}
    entries: Counter[tuple[str, str]] = Counter()
    sizes: Counter[tuple[str, str]] = Counter()

    def count(kind: object, state: str, nbytes: int) -> None:
        entries[str(kind), state] += 1
        sizes[str(kind), state] += nbytes

    for d in plan.decisions:
        result = moved.get(d.entry.name)
        if result is None:
            count(d.entry.kind, entry_state(d), d.entry.bytes_allocated)
        elif result is Result.QUARANTINED:
            count(d.entry.kind, "quarantined", d.entry.bytes_allocated)
    for t in plan.trash:
        if t.entry.trash_name not in purged:
            count(naming.classify(t.entry.name), "quarantined", t.entry.bytes_allocated)
    actions: dict[tuple[str, str], tuple[int, int]] = {}
    problems: Counter[str] = Counter(str(p.code) for p in plan.problems)
    if report is not None:
        for o in report.outcomes:
            key = (str(o.result), str(o.reason))
            n, freed = actions.get(key, (0, 0))
            actions[key] = (n + 1, freed + o.bytes_freed)
        # The plan's problems are the observation's; the report's are the acting's own.
        problems.update(str(p.code) for p in report.problems)
    failed = report is not None and not report.ok
    return PassRecord(
        started=started,
        finished=finished,
        complete=plan.complete,
        stopped=stopped,
        ok=plan.complete and not stopped and not failed,
        plan_id=report.plan_id if report is not None else None,
        entries=_frozen({k: (entries[k], sizes[k]) for k in entries}),
        actions=_frozen(actions),
        problems=MappingProxyType(dict(sorted(problems.items()))),
        bytes_freed=sum(freed for _, freed in actions.values()),
        capacity=None
        if plan.capacity is None
        else (plan.capacity.cache_bytes, plan.capacity.need_bytes, plan.capacity.shortfall_bytes),
    )


def _add(total: Figures, more: Iterable[tuple[tuple[str, str], tuple[int, int]]]) -> Figures:
    out = dict(total)
    for key, (n, b) in more:
        n0, b0 = out.get(key, (0, 0))
        out[key] = (n0 + n, b0 + b)
    return _frozen(out)


def record_pass(history: History, record: PassRecord) -> History:
    """``history`` after ``record``: it becomes the last pass and is added to the totals."""
    totals = history.totals
    passes = Counter(totals.passes)
    passes[pass_outcome(record)] += 1
    return replace(
        history,
        last_pass=record,
        last_success=record.finished if record.ok else history.last_success,
        incomplete_streak=0 if record.complete else history.incomplete_streak + 1,
        totals=replace(
            totals,
            passes=MappingProxyType(dict(sorted(passes.items()))),
            actions=_add(totals.actions, record.actions.items()),
        ),
    )


def record_fetches(history: History, fetched: Iterable[tuple[Result, int]]) -> History:
    """``history`` with fetch results (result, bytes downloaded) added to the totals."""
    rows = [((str(result), ""), (1, max(0, n))) for result, n in fetched]
    return replace(
        history, totals=replace(history.totals, fetches=_add(history.totals.fetches, rows))
    )


def record_verifications(history: History, checked: Iterable[tuple[str, int]]) -> History:
    """``history`` with verification results (verdict, bytes read) added to the totals."""
    rows = [((verdict, ""), (1, max(0, n))) for verdict, n in checked]
    totals = history.totals
    return replace(history, totals=replace(totals, verifications=_add(totals.verifications, rows)))

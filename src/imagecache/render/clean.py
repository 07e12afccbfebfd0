"""Render what ``clean`` and ``restore`` did: the JSON document and the human lines. Pure.

The ``clean --json`` document is the plan document (:func:`imagecache.plan.plan_to_dict`) plus
``outcomes`` (one per entry acted on, skipped or failed, touches included) and ``totals``. An
operator reads the plan and what became of it in one place.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from imagecache.plan import Plan, iso, plan_to_dict, problem_to_dict
from imagecache.render.plan import problems_text
from imagecache.render.text import human_bytes, printable, render_table
from imagecache.results import Outcome, Report, Result

__all__ = ["clean_to_dict", "render_clean", "render_restore", "report_to_dict"]

_ON_TRASH = (Result.PURGED, Result.RESTORED)


def _outcome(o: Outcome) -> dict[str, Any]:
    return {
        "name": o.name,
        "kind": str(o.kind),
        "result": str(o.result),
        "reason": str(o.reason),
        "bytes": o.bytes,
        "bytes_freed": o.bytes_freed,
        "trash_name": o.trash_name,
        "problem": o.problem,
        "message": o.message,
    }


def _totals(rep: Report) -> dict[str, Any]:
    return {
        "bytes_freed": rep.bytes_freed,
        "bytes_quarantined": sum(o.bytes for o in rep.outcomes if o.result is Result.QUARANTINED),
        "bytes_restored": sum(o.bytes for o in rep.outcomes if o.result is Result.RESTORED),
        "results": dict(sorted(Counter(str(o.result) for o in rep.outcomes).items())),
        "skipped": dict(
            sorted(
                Counter(str(o.reason) for o in rep.outcomes if o.result is Result.SKIPPED).items()
            )
        ),
        "problems": sum(1 for o in rep.outcomes if o.problem) + len(rep.problems),
    }


def report_to_dict(rep: Report) -> dict[str, Any]:
    """What was done: ``outcomes``, ``totals``, ``ok`` and the problems outside any entry."""
    return {
        "applied_at": iso(rep.now),
        "applied_at_epoch": rep.now,
        "ok": rep.ok,
        "outcomes": [_outcome(o) for o in rep.outcomes],
        "totals": _totals(rep),
        "apply_problems": [problem_to_dict(p) for p in rep.problems],
    }


def clean_to_dict(plan: Plan, rep: Report) -> dict[str, Any]:
    """The ``clean --json`` document: the plan document plus what was done."""
    return {**plan_to_dict(plan), **report_to_dict(rep)}


def _rows(rep: Report) -> list[list[str]]:
    # Touches are routine and many: one line in the footer, unless one failed.
    shown = [o for o in rep.outcomes if o.result is not Result.TOUCHED]
    return [
        [
            str(o.result) + (" (!)" if o.problem else ""),
            # Purges and restores act on a trash name; the rest on the entry's own name.
            f"trash/{o.trash_name}" if o.result in _ON_TRASH and o.trash_name else o.name,
            str(o.kind),
            human_bytes(o.bytes),
            str(o.reason) + (f": {o.message}" if o.message and o.problem else ""),
        ]
        for o in shown
    ]


def _footer(rep: Report) -> list[str]:
    t = _totals(rep)
    results = ", ".join(f"{k} {v}" for k, v in t["results"].items()) or "nothing to do"
    lines = [
        f"{results}; {human_bytes(t['bytes_freed'])} freed, "
        f"{human_bytes(t['bytes_quarantined'])} moved to the trash"
    ]
    restored = [o for o in rep.outcomes if o.result is Result.RESTORED and o.problem]
    for o in restored:
        lines.append(f"RESTORED {printable(o.name)} from the trash: {printable(o.message)}")
    for p in rep.problems:
        lines.append(f"PROBLEM {p.source} {printable(p.ref)}: {printable(p.message)}")
    if not rep.ok:
        lines.append("done with problems (exit 1)")
    return lines


def render_clean(plan: Plan, rep: Report) -> str:
    head = [printable(f"clean {rep.plan_id} of {plan.cache_dir} on {plan.host} at {iso(rep.now)}")]
    rows = _rows(rep)
    table = [render_table(rows, ["RESULT", "NAME", "KIND", "SIZE", "REASON"])] if rows else []
    problems = problems_text(plan)
    return "\n".join([*head, *table, *_footer(rep), *problems])


def render_restore(rep: Report) -> str:
    rows = _rows(rep)
    return "\n".join([render_table(rows, ["RESULT", "NAME", "KIND", "SIZE", "REASON"])])

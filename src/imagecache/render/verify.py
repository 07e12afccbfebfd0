"""Render what ``imagecache verify`` found and did: the JSON document and the table. Pure."""

from __future__ import annotations

from typing import Any

from imagecache.model import ProblemCode
from imagecache.plan import Plan, problem_to_dict
from imagecache.render.text import document, human_bytes, printable, render_table
from imagecache.results import Report, Result
from imagecache.verify import VerifyReport

__all__ = ["render_verify", "verify_to_dict"]


def _corrupt_in_use(plan: Plan | None) -> list[Any]:
    return [p for p in (plan.problems if plan else ()) if p.code is ProblemCode.ENTRY_CORRUPT]


def _quarantined(done: Report | None) -> list[str]:
    return [o.name for o in (done.outcomes if done else ()) if o.result is Result.QUARANTINED]


def verify_to_dict(checked: VerifyReport, plan: Plan | None, done: Report | None) -> dict[str, Any]:
    """``results`` (one per entry hashed), what was left for later, what was quarantined, and
    the corrupt entries kept because they are in use (with their users)."""
    return document(
        {
            "results": [r.to_dict() for r in checked.results],
            "bytes": checked.bytes,
            "deferred": checked.deferred,
            "deferred_bytes": checked.deferred_bytes,
            "stopped": checked.stopped,
            "problem": checked.problem,
            "unknown": list(checked.unknown),
            "corrupt": list(checked.corrupt),
            "quarantined": _quarantined(done),
            "corrupt_in_use": [problem_to_dict(p) for p in _corrupt_in_use(plan)],
            "outcomes": [
                {"name": o.name, "result": str(o.result), "reason": str(o.reason)}
                for o in (done.outcomes if done else ())
            ],
        }
    )


def render_verify(checked: VerifyReport, plan: Plan | None, done: Report | None) -> str:
    rows = [
        [
            str(r.verdict or "unreadable"),
            r.name,
            str(r.kind),
            human_bytes(r.bytes),
            str(r.reason),
            str(r.source or "") + (f": {r.message}" if r.message else ""),
        ]
        for r in checked.results
    ]
    out = (
        [render_table(rows, ["verdict", "entry", "kind", "size", "why", "record"])] if rows else []
    )
    good = sum(r.verdict is not None and r.name not in checked.corrupt for r in checked.results)
    out.append(
        f"{len(checked.results)} verified ({human_bytes(checked.bytes)} read): {good} good, "
        f"{len(checked.corrupt)} corrupt"
        + (f"; {checked.deferred} left for later passes" if checked.deferred else "")
        + ("; stopped" if checked.stopped else "")
    )
    if checked.problem:
        out.append(f"  ! {printable(checked.problem)}")
    for name in _quarantined(done):
        out.append(f"  quarantined {printable(name)}: corrupt and unused")
    for p in _corrupt_in_use(plan):
        out.append(f"  ! {printable(p.ref)}: {printable(p.message)}")
    for name in checked.unknown:
        out.append(f"  ? {printable(name)}: no verifiable entry of that name")
    return "\n".join(out)

"""``imagecache health``: is the periodic pass alive? For monitoring systems that run a command.

Healthy when the last successful pass (complete view, not stopped, no failed action) finished
less than two intervals ago (plus the daemon's jitter and the last pass's duration), by the
cache's state file. The document says why either way.
"""

from __future__ import annotations

from typing import Any

from imagecache._version import __version__
from imagecache.plan import iso
from imagecache.render.text import printable
from imagecache.settings import Settings
from imagecache.store import state

__all__ = ["SCHEMA", "check", "render"]

SCHEMA = 1


def check(settings: Settings, *, now: float) -> dict[str, Any]:
    """The health document: ``healthy``, ``reason``, and the figures it was judged on."""
    interval = settings.daemon.pass_interval
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "version": __version__,
        "host": settings.host,
        "cache_dir": settings.cache_dir,
        "now": iso(now),
        "now_epoch": now,
        "interval_seconds": interval,
        "healthy": False,
    }
    try:
        history = state.read_state(settings.layout)
    except state.StateError as exc:
        return {**doc, "reason": f"the pass state cannot be read: {exc}"}
    last = history.last_pass
    doc["last_success"] = iso(history.last_success) if history.last_success else None
    doc["last_success_epoch"] = history.last_success
    doc["incomplete_streak"] = history.incomplete_streak
    doc["last_pass"] = (
        {"finished": iso(last.finished), "finished_epoch": last.finished, "ok": last.ok,
         "complete": last.complete, "stopped": last.stopped, "problems": dict(last.problems)}
        if last else None
    )  # fmt: skip
    if interval is None:
        return {
            **doc,
            "reason": "the periodic pass is disabled ([imagecache] manager_interval < 0)",
        }
    if history.last_success is None:
        return {**doc, "reason": f"no successful pass recorded{_why(last)}"}
    age = now - history.last_success
    # Two intervals between two finished passes, plus what the daemon adds: its jitter, and the
    # time the pass itself takes (a pass of a minute on a host passed every minute is healthy).
    limit = 2 * (interval + settings.daemon.max_jitter) + (last.duration if last else 0.0)
    doc["age_seconds"] = age
    doc["limit_seconds"] = limit
    if age < 0:
        return {**doc, "reason": f"the last successful pass is {-age:.0f} s in the future (clock)"}
    if age >= limit:
        return {
            **doc,
            "reason": f"the last successful pass was {age:.0f} s ago; two intervals (with "
            f"jitter and the pass's own time) are {limit:.0f} s{_why(last)}",
        }
    return {**doc, "healthy": True, "reason": f"last successful pass {age:.0f} s ago"}


def _why(last: Any) -> str:
    if last is None:
        return ""
    if last.stopped:
        return "; the last pass was stopped"
    if not last.complete:
        codes = ", ".join(sorted(last.problems)) or "unknown"
        return f"; the last pass had an incomplete view ({codes})"
    return "; the last pass had failures" if not last.ok else ""


def render(doc: dict[str, Any]) -> str:
    word = "healthy" if doc["healthy"] else "UNHEALTHY"
    return f"{word}: {printable(doc['reason'])}"

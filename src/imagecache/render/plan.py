"""Render a plan: the JSON document of DESIGN.md §6 and the human tables. Pure: values to text.

``status``, ``plan``, ``explain`` and (later) ``clean`` all render the same :class:`Plan`, so what
an operator reads is exactly what a pass would do.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from imagecache import naming
from imagecache.model import (
    Action,
    Decision,
    Plan,
    Problem,
    Reason,
    TrashDecision,
    User,
)

__all__ = [
    "REASON_TEXT",
    "find_decisions",
    "find_trash",
    "human_bytes",
    "human_seconds",
    "iso",
    "plan_id",
    "plan_to_dict",
    "printable",
    "problem_to_dict",
    "problems_text",
    "render_explain",
    "render_plan",
    "render_status",
    "render_table",
    "trash_rows",
]

REASON_TEXT: dict[Reason, str] = {
    Reason.IN_USE: "in use",
    Reason.TOO_YOUNG: "unused, not old enough yet",
    Reason.REMOVAL_DISABLED: "unused and old, but removal is disabled (report only)",
    Reason.UNUSED_EXPIRED: "unused longer than its threshold",
    Reason.UNKNOWN_KIND: "name matches no known kind: never removed",
    Reason.NOT_A_FILE: "symlink or directory: never removed",
    Reason.INCOMPLETE_VIEW: "unused and old, but the view is incomplete: nothing is removed",
    Reason.LEGACY_ID_DISABLED: "legacy kernel/ramdisk under its raw id: remove_unused_kernels off",
    Reason.STALE_TEMP: "stale partial download or conversion",
    Reason.TEMP_TOO_YOUNG: "partial download or conversion, maybe still being written",
    Reason.CLOCK_SKEW: "modified in the future (clock step?): kept",
    Reason.IN_QUARANTINE: "quarantined, waiting for its purge",
    Reason.QUARANTINE_EXPIRED: "quarantine expired",
    Reason.REFERENCED_AGAIN: "quarantined, but referenced again: restored",
}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    sign, s = ("-", -seconds) if seconds < 0 else ("", seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{sign}{s / size:.1f}{unit}"
    return f"{sign}{s:.0f}s"


def _user(u: User) -> dict[str, str]:
    out = {"source": str(u.source), "ref": u.ref}
    if u.detail:
        out["detail"] = u.detail
    return out


def problem_to_dict(p: Problem) -> dict[str, Any]:
    return {"source": p.source, "ref": p.ref, "message": p.message, "blocking": p.blocking}


def _entry(d: Decision) -> dict[str, Any]:
    e = d.entry
    return {
        "name": e.name,
        "kind": str(e.kind),
        "file_type": str(e.file_type),
        "bytes": e.bytes_allocated,
        "apparent_bytes": e.bytes_apparent,
        "mtime": e.mtime,
        "inode": e.inode,
        "device": e.device,
        "age_seconds": round(d.age_seconds, 3),
        "threshold_seconds": d.threshold,
        "in_use": d.in_use,
        "users": [_user(u) for u in d.users],
        "action": str(d.action),
        "reason": str(d.reason),
        "removable_at": iso(d.removable_at) if d.removable_at is not None else None,
    }


def _trash(t: TrashDecision) -> dict[str, Any]:
    e = t.entry
    return {
        "name": e.name,
        "trash_name": e.trash_name,
        "kind": str(naming.classify(e.name)),
        "bytes": e.bytes_allocated,
        "inode": e.inode,
        "quarantined_at": iso(e.quarantined_at),
        "quarantined_at_epoch": e.quarantined_at,
        "users": [_user(u) for u in t.users],
        "action": str(t.action),
        "reason": str(t.reason),
        "purge_at": iso(t.purge_at),
    }


def plan_id(plan: Plan) -> str:
    """A stable id of what a plan decided (same observations and decisions, same id)."""
    digest = hashlib.sha256()
    # File names are bytes: a name that is not UTF-8 arrives surrogate-escaped, and must hash
    # as the bytes it is rather than stop every pass on the host.
    digest.update(os.fsencode(f"{plan.host}\0{plan.cache_dir}\0{plan.now}"))
    for d in plan.decisions:
        e = d.entry
        digest.update(os.fsencode(f"\0{e.name}\0{e.inode}\0{e.mtime}\0{d.action}"))
    for t in plan.trash:
        digest.update(os.fsencode(f"\0{t.entry.trash_name}\0{t.entry.inode}\0{t.action}"))
    return digest.hexdigest()[:16]


def _summary(decisions: Iterable[Decision], trash: Iterable[TrashDecision] = ()) -> dict[str, Any]:
    decisions, trash = list(decisions), list(trash)
    # Quarantined bytes still take space: they count in every size figure until purged, so a
    # quarantine frees nothing yet; what is freed now is removals, reaps and purges.
    freeing = (Action.REMOVE, Action.REAP)
    freed = sum(d.entry.bytes_allocated for d in decisions if d.action in freeing)
    freed += sum(t.entry.bytes_allocated for t in trash if t.action is Action.PURGE)
    moved = sum(d.entry.bytes_allocated for d in decisions if d.action is Action.QUARANTINE)
    trash_bytes = sum(t.entry.bytes_allocated for t in trash)
    return {
        "entries": len(decisions),
        "bytes": sum(d.entry.bytes_allocated for d in decisions) + trash_bytes,
        "trash_entries": len(trash),
        "trash_bytes": trash_bytes,
        "in_use": sum(1 for d in decisions if d.in_use),
        "actions": dict(sorted(Counter(str(d.action) for d in decisions).items())),
        "reasons": dict(sorted(Counter(str(d.reason) for d in decisions).items())),
        "bytes_to_free": freed,
        "bytes_to_quarantine": moved,
    }


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The ``plan --json`` document (DESIGN.md §6)."""
    return {
        "plan_id": plan_id(plan),
        "host": plan.host,
        "cache_dir": plan.cache_dir,
        "now": iso(plan.now),
        "now_epoch": plan.now,
        "complete": plan.complete,
        "problems": [problem_to_dict(p) for p in plan.problems],
        "policy": {
            "remove_unused": plan.policy.remove_unused,
            "original_age_seconds": plan.policy.original_age,
            "resized_age_seconds": plan.policy.resized_age,
            "remove_unused_kernels": plan.policy.remove_unused_kernels,
            "stale_temp_seconds": plan.policy.stale_temp_age,
            "quarantine_seconds": plan.policy.quarantine_seconds,
        },
        "summary": _summary(plan.decisions, plan.trash),
        "entries": [_entry(d) for d in plan.decisions],
        "trash": [_trash(t) for t in plan.trash],
    }


def dumps(doc: Any, *, pretty: bool = False) -> str:
    return json.dumps(doc, indent=2 if pretty else None)


def printable(text: str) -> str:
    """``text`` with control characters and undecodable bytes escaped, for one table cell.

    A file named ``swap_10\\nswap_20`` must not print as two entries, nor a name that is not
    UTF-8 (surrogate-escaped by Python) stop the output.
    """
    if text.isprintable():
        return text
    return "".join(_escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    if 0xDC80 <= ord(c) <= 0xDCFF:  # an undecodable byte, as os.fsdecode carries it
        return f"\\x{ord(c) - 0xDC00:02x}"
    return c if c.isprintable() else c.encode("unicode_escape").decode("ascii")


def render_table(rows: list[list[str]], header: list[str]) -> str:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


_NOUNS = {"backing": "disk", "instance": "record", "libvirt": "domain", "peer": "peer"}


def _short_users(users: tuple[User, ...]) -> str:
    """``2 disks (u1/disk, ...), 1 record (4f9e8d7c)``: counts per source, first ref of each."""
    if not users:
        return "-"
    groups: dict[str, list[str]] = {}
    for u in users:
        groups.setdefault(str(u.source), []).append(u.ref)
    parts = []
    for source, refs in groups.items():
        noun = _NOUNS.get(source, source)
        first = _short_ref(refs[0])
        more = ", ..." if len(refs) > 1 else ""
        parts.append(f"{len(refs)} {noun}{'s' if len(refs) > 1 else ''} ({first}{more})")
    return ", ".join(parts)


def _short_ref(ref: str) -> str:
    # A disk path reads best as <instance dir>/<disk>; uuids by their first group.
    parts = ref.rsplit(os.sep, 2)
    if len(parts) >= 3:
        return f"{parts[-2][:8]}/{parts[-1]}"
    return ref[:8] if len(ref) == 36 else ref


def problems_text(plan: Plan) -> list[str]:
    lines = []
    if not plan.complete:
        lines.append("VIEW INCOMPLETE: nothing will be removed until these are fixed:")
    for p in plan.problems:
        mark = "!" if p.blocking else "~"
        lines.append(f"  {mark} {p.source} {p.ref}: {p.message}")
    return lines


def _footer(plan: Plan) -> list[str]:
    s = _summary(plan.decisions, plan.trash)
    acts = ", ".join(f"{k} {v}" for k, v in s["actions"].items()) or "nothing"
    trash = (
        f" (of which {s['trash_entries']} quarantined, {human_bytes(s['trash_bytes'])})"
        if s["trash_entries"]
        else ""
    )
    trash_acts = Counter(str(t.action) for t in plan.trash if t.action is not Action.KEEP)
    acts += "".join(f", {k} {v}" for k, v in sorted(trash_acts.items()))
    return [
        f"{s['entries']} entries, {human_bytes(s['bytes'])} on disk{trash}, "
        f"{s['in_use']} in use; {acts}; {human_bytes(s['bytes_to_free'])} to free"
        + (f", {human_bytes(moved)} to quarantine" if (moved := s["bytes_to_quarantine"]) else ""),
    ]


def trash_rows(plan: Plan) -> list[list[str]]:
    """Rows (action, ``trash/<trash name>``, kind, size, reason) for the quarantined entries."""
    return [
        [
            str(t.action),
            f"trash/{t.entry.trash_name}",
            str(naming.classify(t.entry.name)),
            human_bytes(t.entry.bytes_allocated),
            f"{t.reason}"
            + (
                f", purge in {human_seconds(t.purge_at - plan.now)}"
                if t.action is Action.KEEP
                else ""
            ),
        ]
        for t in plan.trash
    ]


def render_status(plan: Plan) -> str:
    rows = [
        [
            d.entry.name,
            str(d.entry.kind),
            human_bytes(d.entry.bytes_allocated),
            human_seconds(d.age_seconds),
            _short_users(d.users),
            str(d.action),
        ]
        for d in plan.decisions
    ] + [
        [
            f"trash/{t.entry.trash_name}",
            str(naming.classify(t.entry.name)),
            human_bytes(t.entry.bytes_allocated),
            human_seconds(plan.now - t.entry.quarantined_at),
            _short_users(t.users),
            str(t.action),
        ]
        for t in plan.trash
    ]
    head = [f"cache {plan.cache_dir} on {plan.host} at {iso(plan.now)}"]
    table = render_table(rows, ["NAME", "KIND", "SIZE", "AGE", "USED BY", "ACTION"])
    return "\n".join([*head, table, *_footer(plan), *problems_text(plan)])


def render_plan(plan: Plan) -> str:
    rows = [
        [
            str(d.action),
            d.entry.name,
            str(d.entry.kind),
            human_bytes(d.entry.bytes_allocated),
            _reason_line(d, plan.now),
        ]
        for d in sorted(plan.decisions, key=lambda d: (d.action is Action.KEEP, d.entry.name))
    ] + trash_rows(plan)
    head = [f"plan {plan_id(plan)} for {plan.cache_dir} on {plan.host} at {iso(plan.now)}"]
    table = render_table(rows, ["ACTION", "NAME", "KIND", "SIZE", "REASON"])
    return "\n".join([*head, table, *_footer(plan), *problems_text(plan)])


def _reason_line(d: Decision, now: float) -> str:
    text = str(d.reason)
    if d.reason is Reason.IN_USE:
        text += f" ({_short_users(d.users)})"
    if d.removable_at is not None:
        text += f", removable in {human_seconds(d.removable_at - now)}"
    return text


def find_decisions(plan: Plan, query: str) -> list[Decision]:
    """Decisions for a name or an image id (its original, ``_sm``, resized and raw-id entries)."""
    fp = naming.fingerprint(query)
    return [
        d
        for d in plan.decisions
        if d.entry.name in (query, fp) or naming.image_prefix(d.entry.name) in (query, fp)
    ]


def find_trash(plan: Plan, query: str) -> list[TrashDecision]:
    """Quarantined entries for a name, a trash name or an image id (as :func:`find_decisions`)."""
    fp = naming.fingerprint(query)
    keys = (query, fp)
    return [
        t
        for t in plan.trash
        if t.entry.name in keys
        or t.entry.trash_name == query
        or naming.image_prefix(t.entry.name) in keys
    ]


def _used_by(users: tuple[User, ...]) -> list[str]:
    return [f"  used by {u.source} {u.ref}" + (f" ({u.detail})" if u.detail else "") for u in users]


def render_explain(plan: Plan, query: str) -> str:
    found = find_decisions(plan, query)
    trashed = find_trash(plan, query)
    if not found and not trashed:
        return (
            f"no cache entry named {query} (nor for image id {query}: {naming.fingerprint(query)})"
        )
    out: list[str] = []
    for t in trashed:
        out.append(
            f"{t.entry.name}: quarantined at {iso(t.entry.quarantined_at)} as "
            f"{t.entry.trash_name}, {human_bytes(t.entry.bytes_allocated)} on disk"
        )
        out.append(f"  decision: {t.action} ({t.reason})")
        out.extend(_used_by(t.users))
        if t.action is Action.KEEP and t.reason is Reason.IN_QUARANTINE:
            out.append(
                f"  purged at {iso(t.purge_at)} unless referenced again; "
                f"`imagecache restore {t.entry.name}` brings it back"
            )
    for d in found:
        e = d.entry
        out.append(
            f"{e.name}: {e.kind}, {human_bytes(e.bytes_allocated)} on disk, "
            f"last used {iso(d.last_used)} ({human_seconds(d.age_seconds)} ago)"
        )
        out.append(f"  decision: {d.action} ({d.reason}: {REASON_TEXT[d.reason]})")
        out.extend(_used_by(d.users))
        if d.threshold is not None and not d.users:
            out.append(f"  threshold: unused for {human_seconds(d.threshold)}")
        if d.removable_at is not None:
            out.append(f"  becomes removable at {iso(d.removable_at)} if still unused")
        if d.reason is Reason.INCOMPLETE_VIEW:
            out.extend(problems_text(plan))
    return "\n".join(out)

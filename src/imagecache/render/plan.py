"""Render a plan for people: the ``status``, ``plan`` and ``explain`` text. Pure.

``status``, ``plan``, ``explain`` and ``clean`` all render the same :class:`Plan`, so what an
operator reads is exactly what a pass would do. The JSON document is the plan codec's
(:func:`imagecache.plan.plan_to_dict`).
"""

from __future__ import annotations

import posixpath
from collections import Counter

from imagecache import naming
from imagecache.model import User
from imagecache.plan import (
    Action,
    Capacity,
    Decision,
    Plan,
    Reason,
    TrashDecision,
    iso,
    plan_id,
    summary,
)
from imagecache.render.text import human_bytes, human_seconds, printable, render_table

__all__ = [
    "REASON_TEXT",
    "capacity_text",
    "find_decisions",
    "find_trash",
    "problems_text",
    "render_explain",
    "render_plan",
    "render_status",
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
    Reason.ANOTHER_CLEANER: "another host cleans this storage now: this one only touches",
    Reason.OVER_SIZE: "unused, least recently used, and the cache is over max_cache_bytes",
    Reason.OVER_WATERMARK: "unused, least recently used, and the filesystem is over its "
    "high watermark",
}


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
    parts = ref.rsplit(posixpath.sep, 2)
    if len(parts) >= 3:
        return f"{parts[-2][:8]}/{parts[-1]}"
    return ref[:8] if len(ref) == 36 else ref


def problems_text(plan: Plan) -> list[str]:
    lines = []
    if not plan.complete:
        lines.append("VIEW INCOMPLETE: nothing will be removed until these are fixed:")
    for p in plan.problems:
        mark = "!" if p.blocking else "~"
        lines.append(f"  {mark} {p.code} {printable(p.ref)}: {printable(p.message)}")
    return lines


def _footer(plan: Plan) -> list[str]:
    s = summary(plan.decisions, plan.trash)
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


def capacity_text(c: Capacity | None) -> list[str]:
    """The capacity state of a plan, in a line or two (none without a capacity limit)."""
    if c is None:
        return []
    parts = []
    if c.max_cache_bytes:
        parts.append(f"cache {human_bytes(c.cache_bytes)} of max {human_bytes(c.max_cache_bytes)}")
    if c.high_watermark_percent:
        used = "unknown" if c.used_percent is None else f"{c.used_percent:.1f}%"
        parts.append(
            f"filesystem {used} used (high {c.high_watermark_percent:g}%, "
            f"low {c.low_watermark_percent:g}%)"
        )
    state = (
        f"over: {', '.join(str(r) for r in c.over)}; {human_bytes(c.need_bytes)} must go, "
        f"this plan frees {human_bytes(c.freeing_bytes)}"
        if c.over
        else "under every limit"
    )
    lines = [f"capacity: {'; '.join(parts)}; {state}"]
    if c.shortfall_bytes:
        why = ", ".join(f"{w} {human_bytes(b)}" for w, b in c.protected)
        lines.append(f"  {human_bytes(c.shortfall_bytes)} short; protected: {why}")
    if c.next:
        lines.append(f"  next to go (least recently used first): {', '.join(c.next)}")
    return lines


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
    head = [printable(f"cache {plan.cache_dir} on {plan.host} at {iso(plan.now)}")]
    table = render_table(rows, ["NAME", "KIND", "SIZE", "AGE", "USED BY", "ACTION"])
    footer = [*_footer(plan), *capacity_text(plan.capacity)]
    return "\n".join([*head, table, *footer, *problems_text(plan)])


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
    head = [
        printable(f"plan {plan_id(plan)} for {plan.cache_dir} on {plan.host} at {iso(plan.now)}")
    ]
    table = render_table(rows, ["ACTION", "NAME", "KIND", "SIZE", "REASON"])
    footer = [*_footer(plan), *capacity_text(plan.capacity)]
    return "\n".join([*head, table, *footer, *problems_text(plan)])


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
        return printable(
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
        out.append(f"  decision: {d.action} ({d.reason}: {REASON_TEXT.get(d.reason, '')})")
        out.extend(_used_by(d.users))
        c = plan.capacity
        if c is not None and e.name in c.next:
            out.append(
                f"  capacity: next to go when over a limit (#{c.next.index(e.name) + 1}, "
                "least recently used first)"
            )
        if d.threshold is not None and not d.users:
            out.append(f"  threshold: unused for {human_seconds(d.threshold)}")
        if d.removable_at is not None:
            out.append(f"  becomes removable at {iso(d.removable_at)} if still unused")
        if d.reason is Reason.INCOMPLETE_VIEW:
            out.extend(problems_text(plan))
    if found:
        out.extend(capacity_text(plan.capacity))
    # Names, refs and details came from outside: escaped, so none can forge a line.
    return "\n".join(printable(line) for line in out)

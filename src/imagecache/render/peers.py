"""``imagecache peers``: the other hosts sharing this storage, and whether they block removal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imagecache.model import Problem
from imagecache.plan import iso, problem_to_dict
from imagecache.render.text import human_seconds, printable, render_table
from imagecache.usage import LIVE, RETIRED, Peer

__all__ = ["peers_to_dict", "render_peers"]


def peers_to_dict(
    host: str, found: Sequence[Peer], problems: Sequence[Problem], *, now: float
) -> dict[str, Any]:
    return {
        "host": host,
        "now": iso(now),
        "now_epoch": now,
        "blocking": any(p.blocking for p in problems),
        "peers": [
            {
                "host": p.host,
                "state": p.state,
                "registered_epoch": p.registered,
                "member": p.member,
                "manifest_written_epoch": None if p.manifest is None else p.manifest.written,
                "manifest_complete": None if p.manifest is None else p.manifest.complete,
                "entries": 0 if p.manifest is None else len(p.manifest.entries),
                "instance_dirs": 0 if p.manifest is None else len(p.manifest.instance_dirs),
                "retired_by": None if p.manifest is None else p.manifest.retired_by,
            }
            for p in found
        ],
        "problems": [problem_to_dict(p) for p in problems],
    }


def render_peers(found: Sequence[Peer], problems: Sequence[Problem], *, now: float) -> str:
    if not found:
        return "no other host shares this storage"
    rows = []
    for p in found:
        age = "-" if p.manifest is None else human_seconds(now - p.manifest.written) + " ago"
        blocks = "" if p.state in (LIVE, RETIRED) else "yes"
        rows.append([printable(p.host), p.state, age, "yes" if p.registered else "",
                     "yes" if p.member else "", blocks])  # fmt: skip
    table = render_table(rows, ["HOST", "STATE", "MANIFEST", "REGISTERED", "MEMBER", "BLOCKS"])
    notes = [f"  ! {p.code} {printable(p.ref)}: {printable(p.message)}" for p in problems]
    return "\n".join([table, *notes])

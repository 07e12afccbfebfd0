"""Saved plans: read a ``plan -o FILE`` document back into the :class:`Plan` it describes.

``clean --plan FILE`` applies exactly such a plan; the executor re-checks every entry against the
host as it is then, so a stale or hand-edited plan can only ever remove less.
"""

from __future__ import annotations

import json
from typing import Any

from imagecache.errors import UsageError
from imagecache.model import (
    Action,
    CacheEntry,
    Decision,
    FileType,
    Kind,
    Plan,
    Policy,
    Problem,
    Reason,
    Source,
    TrashDecision,
    TrashEntry,
    User,
)

__all__ = ["load_plan", "plan_from_dict"]


def load_plan(path: str) -> Plan:
    """Read the plan saved in ``path``.

    Raises:
        UsageError: the file cannot be read, is not JSON, or is not a plan document.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise UsageError(f"cannot read plan {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise UsageError(f"plan {path} is not valid JSON: {exc}") from exc
    try:
        return plan_from_dict(doc)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from exc


def plan_from_dict(doc: Any) -> Plan:
    """The :class:`Plan` a ``plan --json`` document describes (for ``clean --plan FILE``).

    Users and ages come back as saved; what the executor needs is each entry's identity (inode,
    size, mtime) and its planned action. Unknown fields are ignored.

    Raises:
        UsageError: the document is not a plan written by :func:`plan_to_dict`.
    """
    try:
        pol = doc["policy"]
        policy = Policy(
            remove_unused=bool(pol["remove_unused"]),
            original_age=int(pol["original_age_seconds"]),
            resized_age=int(pol["resized_age_seconds"]),
            remove_unused_kernels=bool(pol["remove_unused_kernels"]),
            stale_temp_age=int(pol["stale_temp_seconds"]),
            quarantine_seconds=int(pol["quarantine_seconds"]),
        )
        decisions = tuple(_decision_from(e) for e in doc["entries"])
        trash = tuple(_trash_from(t) for t in doc.get("trash", ()))
        return Plan(
            host=str(doc["host"]),
            cache_dir=str(doc["cache_dir"]),
            now=float(doc["now_epoch"]),
            complete=bool(doc["complete"]),
            decisions=decisions,
            problems=tuple(
                Problem(str(p["source"]), str(p["ref"]), str(p["message"]), bool(p["blocking"]))
                for p in doc["problems"]
            ),
            policy=policy,
            trash=trash,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"not a plan saved by `imagecache plan -o`: bad or missing {exc}") from exc


def _users_from(items: Any) -> tuple[User, ...]:
    return tuple(User(Source(u["source"]), str(u["ref"]), str(u.get("detail", ""))) for u in items)


def _decision_from(e: Any) -> Decision:
    entry = CacheEntry(
        name=str(e["name"]),
        kind=Kind(e["kind"]),
        file_type=FileType(e["file_type"]),
        bytes_allocated=int(e["bytes"]),
        bytes_apparent=int(e["apparent_bytes"]),
        mtime=float(e["mtime"]),
        inode=int(e["inode"]),
        device=int(e.get("device", 0)),
    )
    return Decision(
        entry=entry,
        action=Action(e["action"]),
        reason=Reason(e["reason"]),
        users=_users_from(e["users"]),
        last_used=entry.mtime,
        age_seconds=float(e["age_seconds"]),
        threshold=None if e["threshold_seconds"] is None else int(e["threshold_seconds"]),
    )


def _trash_from(t: Any) -> TrashDecision:
    entry = TrashEntry(
        name=str(t["name"]),
        trash_name=str(t["trash_name"]),
        bytes_allocated=int(t["bytes"]),
        quarantined_at=float(t["quarantined_at_epoch"]),
        inode=int(t["inode"]),
    )
    return TrashDecision(entry, Action(t["action"]), Reason(t["reason"]), _users_from(t["users"]))

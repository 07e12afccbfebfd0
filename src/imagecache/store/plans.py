"""Saved plans: ``plan -o FILE`` writes one, ``clean --plan FILE`` reads it back.

The document is the plan codec's (:mod:`imagecache.plan`); this module only moves it to and from
disk. A saved plan is untrusted input: the codec checks every field, and the executor re-decides
every entry under its lock, so a stale or hand-edited plan can only ever do less than a fresh
decision would.
"""

from __future__ import annotations

import json

from imagecache.errors import UsageError
from imagecache.plan import Plan, plan_from_dict, plan_to_dict
from imagecache.store import fsops
from imagecache.store.jsonfile import JsonFileError, read_json

__all__ = ["load_plan", "save_plan"]


def load_plan(path: str) -> Plan:
    """Read the plan saved in ``path``.

    Raises:
        UsageError: the file cannot be read, is not JSON, or is not a valid plan document.
    """
    try:
        doc = read_json(path, follow_symlinks=True)
    except JsonFileError as exc:
        raise UsageError(f"plan {path}: {exc}") from exc
    try:
        return plan_from_dict(doc)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from exc


def save_plan(path: str, plan: Plan) -> None:
    """Write ``plan``'s document to ``path`` atomically (temp name, fsync, rename).

    Raises:
        OSError: the directory does not exist or is not writable, or the disk is full.
    """
    text = json.dumps(plan_to_dict(plan), indent=2) + "\n"
    fsops.atomic_write(path, text.encode("utf-8"))

"""The pass state file, ``<cache>/.imagecache/state.json``: the last pass and running totals.

Written by every ``clean`` and ``run`` pass (and by ``precache`` for its fetch totals) under
``<cache>/.imagecache/state.lock``, replaced atomically (temp name, fsync, rename, all through the
directory's descriptor, so a symlink swapped in for ``.imagecache`` is refused, not followed).
Read by ``imagecache health`` and the metrics. A file that cannot be read is reported, never
trusted: a writer starts the totals afresh (a counter reset, which Prometheus handles) and says so.

The document carries ``schema`` and ``version``; times are ISO 8601 UTC with epoch seconds beside::

    {"schema": 1, "version": "0.1.0", "updated": "2026-12-01T10:00:00+00:00",
     "updated_epoch": 1796119200.0, "last_success": ..., "last_success_epoch": ...,
     "incomplete_streak": 0,
     "last_pass": {"started": ..., "started_epoch": ..., "finished": ..., "finished_epoch": ...,
                   "duration_seconds": 0.4, "complete": true, "stopped": false, "ok": true,
                   "plan_id": "3f2a...", "bytes_freed": 1048576,
                   "entries": [{"kind": "original", "state": "unused", "entries": 1,
                                "bytes": 1048576}],
                   "actions": [{"result": "removed", "reason": "unused-expired", "count": 1,
                                "bytes_freed": 1048576}],
                   "problems": {"disk-unreadable": 1}},
     "totals": {"passes": {"ok": 12}, "actions": [...], "fetches": [{"result": "cached",
                "count": 3, "bytes": 3145728}]}}
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

from imagecache import locks, naming
from imagecache._version import __version__
from imagecache.errors import ImageCacheError
from imagecache.history import Figures, History, PassRecord, Totals
from imagecache.layout import Layout
from imagecache.plan import iso
from imagecache.store import fsops
from imagecache.store.jsonfile import JsonFileError, read_json

__all__ = ["SCHEMA", "STATE_FILE", "StateError", "history_to_dict", "read_state", "update_state"]

SCHEMA = 1
STATE_FILE = "state.json"
STATE_LOCK = "state.lock"
MAX_BYTES = 1 << 20


class StateError(ImageCacheError):
    """The state file exists but cannot be read or is not a state document of this schema."""

    exit_code = 1


def state_file(layout: Layout) -> str:
    return os.path.join(layout.state_dir, STATE_FILE)


def read_state(layout: Layout) -> History:
    """The history kept in the cache's state file; a missing file is an empty history.

    Raises:
        StateError: it cannot be read (a symlink, not a regular file, too large, permissions) or
            is not a valid state document; the message says which.
    """
    path = state_file(layout)
    try:
        doc = read_json(path, max_bytes=MAX_BYTES)
    except JsonFileError as exc:
        if exc.missing:
            return History()
        raise StateError(f"{path}: {exc}") from exc
    try:
        return _history(doc)
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise StateError(f"{path}: not a state document: {str(exc)[:200]}") from exc


def update_state(
    layout: Layout, change: Callable[[History], History], *, now: float, timeout: float
) -> History:
    """Apply ``change`` to the stored history under the state lock and store the result.

    A state file that cannot be read is replaced (logged by the caller through the returned
    value's fresh totals): the state is a report, and must not stop the pass that writes it.

    Raises:
        LockTimeout: another writer held the state lock for ``timeout`` seconds.
        OSError: the state directory cannot be created or written.
    """
    with _locked(layout, timeout=timeout):
        try:
            old = read_state(layout)
        except StateError:
            old = History()
        new = change(old)
        _write(layout, history_to_dict(new, now=now))
        return new


@contextmanager
def _locked(layout: Layout, *, timeout: float) -> Iterator[None]:
    fd = fsops.open_dir(layout.state_dir, create=True)
    os.close(fd)
    path = os.path.join(layout.state_dir, STATE_LOCK)
    with locks.held_lock(path, timeout=timeout, poll=0.05, what="pass state"):
        yield


def _write(layout: Layout, doc: dict[str, Any]) -> None:
    data = (json.dumps(doc, sort_keys=False) + "\n").encode("utf-8")
    dir_fd = fsops.open_dir(layout.state_dir, create=True)
    try:
        temp = naming.temp_name(STATE_FILE, os.getpid(), secrets.token_hex(4))
        fsops.replace_at(dir_fd, STATE_FILE, data, temp=temp)
    finally:
        os.close(dir_fd)


def _when(name: str, ts: float | None) -> dict[str, Any]:
    return {name: iso(ts) if ts is not None else None, f"{name}_epoch": ts}


def _rows(figures: Figures, a: str, b: str, n: str, size: str) -> list[dict[str, Any]]:
    return [{a: k1, b: k2, n: count, size: nbytes} for (k1, k2), (count, nbytes) in figures.items()]


def _pass_to_dict(p: PassRecord) -> dict[str, Any]:
    return {
        **_when("started", p.started),
        **_when("finished", p.finished),
        "duration_seconds": p.duration,
        "complete": p.complete,
        "stopped": p.stopped,
        "ok": p.ok,
        "plan_id": p.plan_id,
        "bytes_freed": p.bytes_freed,
        "entries": _rows(p.entries, "kind", "state", "entries", "bytes"),
        "actions": _rows(p.actions, "result", "reason", "count", "bytes_freed"),
        "problems": dict(p.problems),
        "capacity": None
        if p.capacity is None
        else dict(zip(("cache_bytes", "need_bytes", "shortfall_bytes"), p.capacity, strict=True)),
    }


def history_to_dict(h: History, *, now: float) -> dict[str, Any]:
    """The state document of ``h``, written at ``now``."""
    t = h.totals
    return {
        "schema": SCHEMA,
        "version": __version__,
        **_when("updated", now),
        **_when("last_success", h.last_success),
        "incomplete_streak": h.incomplete_streak,
        "last_pass": _pass_to_dict(h.last_pass) if h.last_pass else None,
        "totals": {
            "passes": dict(t.passes),
            "actions": _rows(t.actions, "result", "reason", "count", "bytes_freed"),
            "fetches": [
                {"result": r, "count": c, "bytes": b} for (r, _), (c, b) in t.fetches.items()
            ],
            "verifications": [
                {"result": r, "count": c, "bytes": b} for (r, _), (c, b) in t.verifications.items()
            ],
        },
    }


# Reading back: every field checked, since the file sits in a directory others can write.


# Counts and bytes a real cache reaches in centuries stay below 2**63: a larger number is not
# ours (and would not fit a Prometheus sample); a label is a stable kebab-case code.
_MAX = 1 << 63
_LABEL = re.compile(r"(?:[a-z0-9][a-z0-9-]{0,63})?")  # empty: a fetch row's second label


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX:
        raise ValueError("expected a count")
    return value


def _epoch(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected epoch seconds")
    if not -_MAX < value < _MAX or not math.isfinite(value):  # ints compare exactly: no overflow
        raise ValueError("expected finite epoch seconds")
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise ValueError("expected a kebab-case code")
    return value


def _figures(rows: Any, a: str, b: str, n: str, size: str) -> Figures:
    if not isinstance(rows, list):
        raise ValueError("expected a list of rows")
    out = {(_str(r[a]), _str(r[b])): (_int(r[n]), _int(r[size])) for r in rows}
    return MappingProxyType(dict(sorted(out.items())))


def _keyed(row: Any) -> Any:
    """A fetch row, keyed like the two-label rows (fetches have one label, the result)."""
    return {**row, "_": ""} if isinstance(row, dict) else row


def _counts(doc: Any) -> Mapping[str, int]:
    if not isinstance(doc, dict):
        raise ValueError("expected {name: count}")
    return MappingProxyType({_str(k): _int(v) for k, v in sorted(doc.items())})


def _pass(doc: Any) -> PassRecord:
    if not isinstance(doc, dict):
        raise ValueError("last_pass: expected an object")
    plan_id = doc.get("plan_id")
    if plan_id is not None and not (
        isinstance(plan_id, str) and re.fullmatch(r"[0-9a-f]{1,64}", plan_id)
    ):
        raise ValueError("plan_id: expected hex digits")
    return PassRecord(
        started=_epoch(doc["started_epoch"]),
        finished=_epoch(doc["finished_epoch"]),
        complete=doc["complete"] is True,
        stopped=doc["stopped"] is True,
        ok=doc["ok"] is True,
        plan_id=plan_id,
        entries=_figures(doc["entries"], "kind", "state", "entries", "bytes"),
        actions=_figures(doc["actions"], "result", "reason", "count", "bytes_freed"),
        problems=_counts(doc["problems"]),
        bytes_freed=_int(doc["bytes_freed"]),
        capacity=_capacity(doc.get("capacity")),
    )


def _capacity(doc: Any) -> tuple[int, int, int] | None:
    if doc is None:  # no limit, or a state file from before capacity
        return None
    if not isinstance(doc, dict):
        raise ValueError("capacity: expected an object")
    return _int(doc["cache_bytes"]), _int(doc["need_bytes"]), _int(doc["shortfall_bytes"])


def _history(doc: Any) -> History:
    if not isinstance(doc, dict):
        raise ValueError("expected an object")
    schema = doc.get("schema")
    if type(schema) is not int or schema != SCHEMA:
        raise ValueError(f"schema {str(schema)[:20]} is not {SCHEMA}")
    totals = doc["totals"]
    if not isinstance(totals, dict):
        raise ValueError("totals: expected an object")
    fetches = totals["fetches"]
    verifications = totals.get("verifications", [])  # written since integrity checking
    if not isinstance(fetches, list) or not isinstance(verifications, list):
        raise ValueError("fetches, verifications: expected lists")
    success = doc.get("last_success_epoch")
    return History(
        last_pass=_pass(doc["last_pass"]) if doc.get("last_pass") is not None else None,
        last_success=_epoch(success) if success is not None else None,
        incomplete_streak=_int(doc["incomplete_streak"]),
        totals=Totals(
            passes=_counts(totals["passes"]),
            actions=_figures(totals["actions"], "result", "reason", "count", "bytes_freed"),
            fetches=_figures([_keyed(r) for r in fetches], "result", "_", "count", "bytes"),
            verifications=_figures(
                [_keyed(r) for r in verifications], "result", "_", "count", "bytes"
            ),
        ),
    )

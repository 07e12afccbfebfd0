"""The audit log: one JSON line per action taken on the cache, appended, durable.

``[imagecache] audit_log`` (default ``/var/log/imagecache/audit.jsonl``). Each line says when, on
which host, what was done to which entry, with how many bytes (measured), why, and under which plan
id, so an operator can answer "where did my base image go?" months later::

    {"schema": 1, "version": "0.1.0", "time": "2026-11-21T10:00:00+00:00",
     "epoch": 1795255200.0, "host": "h1",
     "entry": "356a...", "kind": "original", "bytes": 1048576, "bytes_freed": 0,
     "action": "quarantined", "reason": "unused-expired", "plan_id": "3f2a...",
     "trash_name": "356a...@1795255200"}

The file is opened for every line with ``O_APPEND`` (so rotating it by rename is safe and lines of
concurrent writers never interleave: a line is one ``write``) and fsynced before returning: a line
exists before the caller reports the action done.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from imagecache._version import __version__
from imagecache.results import Outcome

__all__ = ["SCHEMA", "AuditLog"]

SCHEMA = 1  # of one audit line; raised on any incompatible change


@dataclass(frozen=True, slots=True)
class AuditLog:
    """Appends audit lines to ``path`` on behalf of ``host``."""

    path: str
    host: str

    def record(self, outcome: Outcome, *, now: float, plan_id: str | None) -> None:
        """Append one line describing ``outcome``, creating the file and its directory if needed.

        Raises:
            OSError: the directory cannot be created, or the file cannot be opened, written or
                synced (a full disk, a read-only filesystem, permissions).
        """
        line = {
            **self._head(now),
            "entry": outcome.name,
            "kind": str(outcome.kind),
            "bytes": outcome.bytes,
            "bytes_freed": outcome.bytes_freed,
            "action": str(outcome.result),
            "reason": str(outcome.reason),
            "plan_id": plan_id,
            "trash_name": outcome.trash_name,
        }
        self._append(line)

    def record_event(self, action: str, *, now: float, **fields: object) -> None:
        """Append one line of an action on no entry (``retire-peer``), with its own fields.

        Raises:
            OSError: as :meth:`record`.
        """
        self._append({**self._head(now), "action": action, **fields})

    def _head(self, now: float) -> dict[str, object]:
        return {
            "schema": SCHEMA,
            "version": __version__,
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
            "epoch": now,
            "host": self.host,
        }

    def _append(self, line: dict[str, object]) -> None:
        data = (json.dumps(line, sort_keys=False) + "\n").encode("utf-8")
        fd = self._open()
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)

    def check_writable(self) -> None:
        """Open the log for append as :meth:`record` does (creating it and its directory), close it.

        Writes nothing. Called before a pass acts, so that no action goes unlogged because the
        log could never have been written (a directory that cannot be created, permissions).

        Raises:
            OSError: the directory cannot be created or the file cannot be opened for append.
        """
        os.close(self._open())

    def _open(self) -> int:
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, mode=0o750, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        return os.open(self.path, flags, 0o640)

"""Verification: hash the entries that are due, compare with their digest records, record.

What a pass (with ``[libvirt] checksum_base_images``) and ``imagecache verify`` do: list the cache
(``stat`` only), choose what to hash (:func:`imagecache.integrity.select`: rewrites, new entries,
then those verified longer than ``checksum_interval_seconds`` ago, oldest first, within
``[imagecache] verify_max_bytes_per_pass``), read each once at near page-cache speed
(:mod:`imagecache.images.hashing`, throttled to ``verify_max_bytes_per_second``), and write its
new record. Nothing is removed here: a corrupt entry becomes ``corrupt`` in the next observation,
and the policy quarantines it if unused, through the executor, under its lock, re-checked.

A file is opened ``O_NOFOLLOW | O_NONBLOCK`` and must still be the regular file that was listed
(device, inode, size by ``fstat``); anything else is skipped and said so.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from imagecache import integrity, locks
from imagecache.clock import Clock
from imagecache.images import hashing
from imagecache.integrity import Check, CheckReason, DigestSource, Verdict
from imagecache.layout import Layout
from imagecache.model import CacheEntry, Kind
from imagecache.settings import VerifySettings
from imagecache.sources import scan_cache, scan_trash
from imagecache.store import digests

__all__ = ["Verified", "VerifyReport", "verify"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Verified:
    """One entry verification checked: ``verdict`` None when it could not be hashed (why in
    ``message``)."""

    name: str
    kind: Kind
    bytes: int
    reason: CheckReason
    verdict: Verdict | None
    source: DigestSource | None = None
    message: str = ""
    skipped: bool = False  # being written (its lock held, or changed while read): a later pass

    @property
    def unreadable(self) -> bool:
        return self.verdict is None and not self.skipped

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": str(self.kind),
            "bytes": self.bytes,
            "why": str(self.reason),
            "verdict": str(self.verdict) if self.verdict else None,
            "source": str(self.source) if self.source else None,
            "message": self.message,
            "skipped": self.skipped,
        }


@dataclass(frozen=True, slots=True)
class VerifyReport:
    results: tuple[Verified, ...] = ()
    deferred: int = 0  # due, but beyond this pass's byte budget
    deferred_bytes: int = 0
    stopped: bool = False
    unknown: tuple[str, ...] = ()  # names asked for that are no verifiable entry
    problem: str | None = None  # why nothing could be verified at all

    @property
    def corrupt(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.results if r.verdict is Verdict.CORRUPT)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.results if r.verdict is not None)


class _Changed(Exception):
    """The name no longer leads to the file that was listed."""


def _read(
    layout: Layout,
    entry: CacheEntry,
    algorithms: Iterable[str],
    *,
    settings: VerifySettings,
    clock: Clock,
    on_bytes: Callable[[int], None] | None,
    should_stop: Callable[[], bool],
) -> dict[str, str]:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(layout.entry_path(entry.name), flags)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP):
            raise _Changed("gone or replaced by a symlink since it was listed") from exc
        raise
    try:
        st = os.fstat(fd)
        listed = (entry.device, entry.inode, entry.bytes_apparent)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino, st.st_size) != listed:
            raise _Changed("another file than the one listed")
        got = hashing.hash_file(
            fd,
            tuple(algorithms),
            max_rate=settings.max_bytes_per_second or None,
            clock=clock,
            on_bytes=on_bytes,
            should_stop=should_stop,
        )
        after = os.fstat(fd)
    finally:
        os.close(fd)
    # Written while we read (Nova makes swap and ephemeral files in place, under its lock):
    # what was read is no state of the file, and is recorded as nothing.
    if (after.st_mtime_ns, after.st_ctime_ns, after.st_size) != (
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_size,
    ):
        raise _Changed("written while it was being read")
    return got


def verify(
    layout: Layout,
    settings: VerifySettings,
    *,
    clock: Clock,
    names: Iterable[str] | None = None,
    every: bool = False,
    budget: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    on_start: Callable[[int, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_result: Callable[[Verified], None] | None = None,
) -> VerifyReport:
    """Hash what is due (or ``names``, or ``every`` verifiable entry) and record the verdicts.

    ``budget`` false ignores ``verify_max_bytes_per_pass`` (the operator's own ``verify``).
    ``should_stop`` is asked between files and between blocks: a file whose hashing is stopped
    keeps its old record. Never raises for one entry: what could not be read is a result with
    no verdict.
    """
    entries, listing = scan_cache(layout.cache_dir)
    try:
        digests.ensure_writable(layout)
    except OSError as exc:
        # Every entry would be hashed whole on every pass, and nothing recorded: refuse, loudly.
        return VerifyReport(problem=f"digest records cannot be kept: {exc}; nothing verified")
    records = digests.read_records(layout)
    if not any(p.hides_entries for p in listing):
        trash, trash_problems = scan_trash(layout.cache_dir)
        if not trash_problems:  # a record whose entry is gone, even from the trash, goes too
            live = {e.name for e in entries} | {t.name for t in trash}
            for name in digests.drop_records(layout, live, now=clock.wall()):
                records.pop(name, None)
    wanted = None if names is None else tuple(dict.fromkeys(names))
    limit = settings.max_bytes_per_pass if budget and settings.max_bytes_per_pass else None
    todo, deferred = integrity.select(entries, records, now=clock.wall(),
                                      interval=settings.checksum_interval, max_bytes=limit,
                                      names=wanted, every=every)  # fmt: skip
    if on_start is not None:
        on_start(len(todo), sum(c.entry.bytes_apparent for c in todo))
    found = {c.entry.name for c in todo}
    unknown = tuple(n for n in wanted or () if n not in found)
    results: list[Verified] = []
    stopped = False
    for check in todo:
        if should_stop():
            stopped = True
            break
        try:
            done = _verify_one(layout, check, settings=settings, clock=clock,
                               on_bytes=on_bytes, should_stop=should_stop)  # fmt: skip
        except hashing.HashStopped:
            stopped = True
            break
        results.append(done)
        if on_result is not None:
            on_result(done)
    return VerifyReport(
        results=tuple(results),
        deferred=len(deferred),
        deferred_bytes=sum(c.entry.bytes_apparent for c in deferred),
        stopped=stopped,
        unknown=unknown,
    )


def _verify_one(
    layout: Layout,
    check: Check,
    *,
    settings: VerifySettings,
    clock: Clock,
    on_bytes: Callable[[int], None] | None,
    should_stop: Callable[[], bool],
) -> Verified:
    e = check.entry
    try:
        busy = locks.is_locked(layout.instances_path, e.name)
    except OSError as exc:
        busy, why = True, f"its entry lock cannot be probed: {exc}"
    else:
        why = "its entry lock is held (being written): left for later"
    if busy:
        # Its writer (Nova making a swap or ephemeral file in place, a download) holds the
        # entry: its bytes are not final. Hashed by a later pass.
        return Verified(e.name, e.kind, e.bytes_apparent, check.reason, None, message=why,
                        skipped=True)  # fmt: skip
    legacy = digests.legacy_digest(layout, e.name) if check.record is None else None
    try:
        got = _read(layout, e, integrity.algorithms_for(check, legacy), settings=settings,
                    clock=clock, on_bytes=on_bytes, should_stop=should_stop)  # fmt: skip
    except _Changed as exc:
        return Verified(e.name, e.kind, e.bytes_apparent, check.reason, None, message=str(exc),
                        skipped=True)  # fmt: skip
    except OSError as exc:
        message = f"cannot read: {exc.strerror or exc}"
        return Verified(e.name, e.kind, e.bytes_apparent, check.reason, None, message=message)
    record = integrity.judge(check, got, now=clock.wall(), legacy=legacy)
    try:
        digests.write_record(layout, record)
    except (OSError, ValueError) as exc:
        message = f"verified {record.verdict}, but the record cannot be written: {exc}"
        LOG.warning("%s: %s", e.name, message)
        return Verified(e.name, e.kind, e.bytes_apparent, check.reason, None, message=message)
    if record.verdict is Verdict.CORRUPT:
        LOG.error("CORRUPT %s: its bytes hash to %s, its %s record says %s", e.name,
                  record.observed, record.source, record.xxh3 or record.expected)  # fmt: skip
    return Verified(e.name, e.kind, e.bytes_apparent, check.reason, record.verdict, record.source)

"""Integrity of cache entries, as values: digest records, which entries to hash, and the verdict.

Pure: no I/O, no clock. A :class:`DigestRecord` says what an entry's bytes hashed to when they were
known good (its *reference* ``xxh3``, xxh3-128: the fast local digest; bit rot is the threat, not
tampering, which a record beside the file could not stop anyway), the file's identity then
(device, inode, size), when it was last verified and with what verdict, and where the reference
came from (:class:`DigestSource`): the image service's own digest of the exact bytes published
(``glance``), imagecache's conversion of a verified download (``converted``), Nova's legacy
``<entry>.info`` / ``<entry>.sha1`` files (``nova-info``), or trust on first use (``first-seen``).

:func:`select` chooses what a pass hashes (rewritten files first, then new ones, then those whose
verification is older than the interval, oldest first, within a byte budget), so a pass over an
unchanged cache whose records are fresh costs ``stat`` calls, not reads; :func:`judge` turns the
digests read into the new record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from imagecache import naming
from imagecache.model import CacheEntry, FileType, Integrity, Kind

__all__ = [
    "LOCAL",
    "VERIFIABLE",
    "Check",
    "CheckReason",
    "Digest",
    "DigestRecord",
    "DigestSource",
    "Verdict",
    "algorithms_for",
    "integrity_of",
    "judge",
    "select",
]

LOCAL = "xxh3_128"  # the digest every record keeps, whatever else is known
# Kinds whose bytes never change once published: images, their copies, generated swap and
# ephemeral backing files. Temps are being written; unknown names are not ours.
VERIFIABLE = frozenset(
    {Kind.ORIGINAL, Kind.SMALL, Kind.RESIZED, Kind.SWAP, Kind.EPHEMERAL, Kind.LEGACY_ID}
)


class Verdict(StrEnum):
    GOOD = "good"
    CORRUPT = "corrupt"


class DigestSource(StrEnum):
    """Where a record's reference digest comes from, most authoritative first."""

    GLANCE = "glance"  # the image service's os_hash_value of these very bytes
    CONVERTED = "converted"  # our conversion output of a download Glance's digest verified
    NOVA_INFO = "nova-info"  # Nova's legacy <entry>.info {"sha1"} or Essex <entry>.sha1
    FIRST_SEEN = "first-seen"  # trusted on first use: someone else downloaded it

    @property
    def authoritative(self) -> bool:
        """Whether the reference is the image's own: a rewrite to other bytes is corruption."""
        return self is not DigestSource.FIRST_SEEN


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str  # a hashlib name or "xxh3_128"
    value: str  # lowercase hex


@dataclass(frozen=True, slots=True)
class DigestRecord:
    """What is known of one entry's bytes. ``xxh3`` is the reference (good) digest; ``observed``
    what the last verification read when it differed (a corrupt entry)."""

    name: str
    xxh3: str
    device: int
    inode: int
    size: int
    verified_at: float
    verdict: Verdict
    source: DigestSource
    expected: Digest | None = None  # an authoritative digest of the file's own bytes
    image: str | None = None  # the image ref it was fetched from (Glance id or URL)
    image_digest: Digest | None = None  # what the image service published for the download
    observed: str | None = None
    ctime_ns: int = 0  # the inode's ctime when it was hashed
    birth_ns: int = 0  # its birth time (statx), 0 when unknown

    def same_file(self, entry: CacheEntry) -> bool:
        """Still the file that was hashed: same device, inode, size and (where the filesystem
        says) birth time; not mtime or ctime, which every touch of an in-use entry changes."""
        listed = (entry.device, entry.inode, entry.bytes_apparent)
        if (self.device, self.inode, self.size) != listed:
            return False
        return not (self.birth_ns and entry.birth_ns) or self.birth_ns == entry.birth_ns


def integrity_of(entry: CacheEntry, record: DigestRecord | None) -> Integrity:
    """An entry's integrity by its record: unverified when there is none or the file changed.

    A corrupt verdict counts only while nothing changed the inode since it was reached (the same
    ctime, exactly): good bytes put back behind our back, or a touch, make it a question again,
    answered by the next verification (which re-hashes corrupt entries every pass), never a
    quarantine on an old verdict. A good verdict stays until its interval is due: in-use
    entries are touched every pass, and that is no reason to re-read them.
    """
    if record is None or not record.same_file(entry):
        return Integrity.UNVERIFIED
    if record.verdict is Verdict.GOOD:
        return Integrity.GOOD
    return Integrity.CORRUPT if entry.ctime_ns == record.ctime_ns else Integrity.UNVERIFIED


class CheckReason(StrEnum):
    CHANGED = "changed"  # another inode or size than hashed: a rewrite
    NEW = "new"  # no record yet
    DUE = "due"  # verified longer than the interval ago
    REQUESTED = "requested"  # named by the operator (`verify NAME`, `verify --all`)


@dataclass(frozen=True, slots=True)
class Check:
    entry: CacheEntry
    record: DigestRecord | None
    reason: CheckReason


_ORDER = {CheckReason.CHANGED: 0, CheckReason.NEW: 1, CheckReason.DUE: 2, CheckReason.REQUESTED: 3}


def _verifiable(entry: CacheEntry) -> bool:
    # A name no record can be written for (not valid text) would be hashed whole every pass.
    return (
        entry.file_type is FileType.FILE
        and entry.kind in VERIFIABLE
        and naming.encodable(entry.name)
    )


def select(
    entries: Iterable[CacheEntry],
    records: Mapping[str, DigestRecord],
    *,
    now: float,
    interval: float,
    max_bytes: int | None,
    names: Iterable[str] | None = None,
    every: bool = False,
) -> tuple[tuple[Check, ...], tuple[Check, ...]]:
    """(to hash now, deferred by the budget). ``names`` or ``every``: the operator's choice
    (``verify NAME...`` / ``--all``), hashed whatever their records say; otherwise what a pass
    hashes: rewrites, then new entries, then entries due, oldest verification first.
    ``max_bytes`` None: no budget; otherwise at least one file is hashed, however large."""
    wanted = None if names is None else set(names)
    checks: list[Check] = []
    for entry in entries:
        if not _verifiable(entry) or (wanted is not None and entry.name not in wanted):
            continue
        record = records.get(entry.name)
        if record is not None and not record.same_file(entry):
            checks.append(Check(entry, record, CheckReason.CHANGED))
        elif record is None:
            checks.append(Check(entry, None, CheckReason.NEW))
        elif wanted is not None or every:
            checks.append(Check(entry, record, CheckReason.REQUESTED))
        elif (
            now - record.verified_at >= interval
            or record.verified_at > now
            or record.verdict is Verdict.CORRUPT  # rare, and must not act on an old verdict
        ):
            checks.append(Check(entry, record, CheckReason.DUE))
    checks.sort(
        key=lambda c: (_ORDER[c.reason], c.record.verified_at if c.record else 0.0, c.entry.name)
    )
    if max_bytes is None or wanted is not None or every:
        return tuple(checks), ()
    now_checks: list[Check] = []
    spent = 0
    for i, check in enumerate(checks):
        if now_checks and spent + check.entry.bytes_apparent > max_bytes:
            return tuple(now_checks), tuple(checks[i:])
        now_checks.append(check)
        spent += check.entry.bytes_apparent
    return tuple(now_checks), ()


def algorithms_for(check: Check, legacy: Digest | None) -> tuple[str, ...]:
    """The digests to compute while reading the entry once: the local one, and the
    authoritative one a first verification must confirm (Nova's legacy sha1)."""
    record = check.record
    expected = legacy if record is None else (record.expected if not record.xxh3 else None)
    if expected is not None and expected.algorithm != LOCAL:
        return (LOCAL, expected.algorithm)
    return (LOCAL,)


def judge(
    check: Check, digests: Mapping[str, str], *, now: float, legacy: Digest | None = None
) -> DigestRecord:
    """The record after reading ``check.entry``'s bytes to ``digests`` (by algorithm) at ``now``.

    - No record: with Nova's legacy digest, good only if the bytes match it (``nova-info``);
      without, trusted as seen (``first-seen``).
    - The same file: good if it still hashes to the reference, else corrupt (the reference kept).
    - Rewritten (another inode or size): an authoritative reference is the image's own, whose
      bytes never change, so other bytes are corrupt; a first-seen one is trusted afresh.
    """
    e, got = check.entry, digests[LOCAL]
    seen = replace(
        check.record or _blank(e.name),
        device=e.device,
        inode=e.inode,
        size=e.bytes_apparent,
        verified_at=now,
        ctime_ns=e.ctime_ns,
        birth_ns=e.birth_ns,
    )
    record = check.record
    if record is None or (check.reason is CheckReason.CHANGED and not record.source.authoritative):
        if legacy is None:
            return replace(seen, xxh3=got, verdict=Verdict.GOOD, source=DigestSource.FIRST_SEEN,
                           expected=None, image=None, image_digest=None, observed=None)  # fmt: skip
        seen = replace(seen, xxh3="", source=DigestSource.NOVA_INFO, expected=legacy,
                       image=None, image_digest=None)  # fmt: skip
    reference = seen.xxh3
    if reference:
        good = got == reference
    else:  # a legacy reference (Nova's sha1) not matched yet: the bytes must match it
        good = (
            seen.expected is not None
            and digests.get(seen.expected.algorithm) == seen.expected.value
        )
    return replace(
        seen,
        xxh3=reference or (got if good else ""),
        verdict=Verdict.GOOD if good else Verdict.CORRUPT,
        observed=None if good else got,
    )


def _blank(name: str) -> DigestRecord:
    """A first-seen record of nothing yet: what :func:`judge` fills in."""
    return DigestRecord(name, "", 0, 0, 0, 0.0, Verdict.GOOD, DigestSource.FIRST_SEEN)

"""Entry names in the cache directory, as one table of patterns (DESIGN.md §2).

Nova classifies names with length checks and ``split('_')`` (see nova-imagecache.md §1.3) and so
misses ``<sha1>_5``, deletes any 40-character name and never collects ``.part`` leftovers. Here
every kind is one anchored regular expression; a name that matches none is ``unknown`` and is never
removed, and so is every symlink and directory whatever its name.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum

from imagecache.model import FileType, Kind

__all__ = [
    "LOCK_PREFIX",
    "TEMP_SUFFIX",
    "Threshold",
    "classify",
    "encodable",
    "entry_of_lock_file",
    "entry_of_temp",
    "ephemeral_name",
    "ephemeral_tag",
    "fingerprint",
    "fs_encodable",
    "image_prefix",
    "lock_file_name",
    "parse_trash_name",
    "swap_name",
    "temp_name",
    "threshold_of",
    "trash_name",
    "valid_entry_name",
]

TEMP_SUFFIX = ".part"
# oslo.concurrency's lock_file_prefix for Nova's entry locks: locks/nova-<entry name>.
LOCK_PREFIX = "nova-"


class Threshold(StrEnum):
    """Which configured age applies to a kind."""

    ORIGINAL = "original"
    RESIZED = "resized"
    TEMP = "temp"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class _Rule:
    kind: Kind
    pattern: re.Pattern[str]
    threshold: Threshold


_SHA1 = r"[0-9a-f]{40}"
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"

# First match wins; the order only matters for readability, the patterns are disjoint.
_RULES: tuple[_Rule, ...] = (
    _Rule(Kind.ORIGINAL, re.compile(rf"{_SHA1}"), Threshold.ORIGINAL),
    _Rule(Kind.SMALL, re.compile(rf"{_SHA1}_sm"), Threshold.RESIZED),
    _Rule(Kind.RESIZED, re.compile(rf"{_SHA1}_[0-9]+"), Threshold.RESIZED),
    _Rule(Kind.SWAP, re.compile(r"swap_[0-9]+"), Threshold.ORIGINAL),
    # Nova accepts any 7 characters as the tag (it recognises ephemeral_20_abcdefg).
    _Rule(Kind.EPHEMERAL, re.compile(r"ephemeral_[0-9]+_[^_]{7}"), Threshold.ORIGINAL),
    _Rule(Kind.LEGACY_ID, re.compile(_UUID), Threshold.ORIGINAL),
    _Rule(Kind.TEMP, re.compile(r"[^/]+\.(part|converted)"), Threshold.TEMP),
)

_THRESHOLDS = {rule.kind: rule.threshold for rule in _RULES} | {Kind.UNKNOWN: Threshold.NEVER}


def classify(name: str, file_type: FileType = FileType.FILE) -> Kind:
    """Return the kind of a cache directory entry; only regular files get a removable kind."""
    if file_type is not FileType.FILE:
        return Kind.UNKNOWN
    for rule in _RULES:
        if rule.pattern.fullmatch(name):
            return rule.kind
    return Kind.UNKNOWN


def threshold_of(kind: Kind) -> Threshold:
    return _THRESHOLDS[kind]


def fingerprint(image_id: str) -> str:
    """Nova's cache name of an image id: the SHA-1 hex digest of its UTF-8 bytes.

    Text that is not valid UTF-8 (a command-line argument of undecodable bytes arrives
    surrogate-escaped) is hashed as the bytes it came from, never a crash.
    """
    return hashlib.sha1(_as_bytes(image_id), usedforsecurity=False).hexdigest()


def _as_bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return text.encode("utf-8", "surrogatepass")


def encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode text (no lone surrogates), as a record's ids must be."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def fs_encodable(text: str) -> bool:
    """Whether ``text`` can be a file name's bytes: valid text, or undecodable bytes escaped.

    Python carries a byte that is not UTF-8 as a surrogate from U+DC80 to U+DCFF (``os.fsdecode``);
    any other lone surrogate (``"\\ud800"`` from JSON) stands for no byte at all.
    """
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def image_prefix(name: str) -> str | None:
    """The 40-hex fingerprint an original, small or resized name starts with, else None."""
    if len(name) >= 40 and re.fullmatch(_SHA1, name[:40]):
        return name[:40]
    return None


def swap_name(swap_mb: int) -> str:
    return f"swap_{swap_mb}"


def ephemeral_tag(fs_format: str | None) -> str:
    """Nova's 7-hex tag of an ephemeral backing file: MD5 of the filesystem name (default vfat)."""
    name = fs_format or "vfat"
    return hashlib.md5(_as_bytes(name), usedforsecurity=False).hexdigest()[:7]


def ephemeral_name(size_gb: int, fs_format: str | None) -> str:
    return f"ephemeral_{size_gb}_{ephemeral_tag(fs_format)}"


def entry_of_temp(name: str) -> str:
    """The entry a temp file belongs to (the part before the first dot): its lock name."""
    head = name.partition(".")[0]
    return head or name


def temp_name(entry: str, pid: int, token: str) -> str:
    """This project's temp name for ``entry``: unique per writer, classified as ``temp``.

    Nova's scanner ignores it (no ``_`` at index 40, not 40 characters long), and our own reaper
    finds it through the ``.part`` suffix and locks ``entry`` before touching it.
    """
    return f"{entry}.{pid}.{token}{TEMP_SUFFIX}"


def valid_entry_name(name: str) -> bool:
    """Whether ``name`` can be one plain name directly in a directory: the one check.

    Not empty, not ``.`` or ``..``, no ``/`` or NUL, and encodable as a file name (a lone
    surrogate that is not an undecodable byte cannot name a file). Every name from outside
    (a saved plan, a command line, a trash or lock file name) passes here before it is joined
    to a directory.
    """
    if not name or name in {".", ".."} or "/" in name or "\0" in name:
        return False
    return fs_encodable(name)


_TRASH_NAME = re.compile(r"(?P<name>.+)@(?P<epoch>[0-9]{1,12})")


def trash_name(name: str, epoch: float) -> str:
    """The name of entry ``name`` quarantined at ``epoch``: ``<name>@<int(epoch)>``."""
    return f"{name}@{int(epoch)}"


def parse_trash_name(trash: str) -> tuple[str, int] | None:
    """``(name, epoch)`` of a trash name ``<name>@<epoch>``, or None when it is not one."""
    match = _TRASH_NAME.fullmatch(trash)
    if match is None or not valid_entry_name(trash) or not valid_entry_name(match["name"]):
        return None
    return match["name"], int(match["epoch"])


def lock_file_name(name: str) -> str:
    """The file name of the lock of entry (or lock) ``name``: ``nova-<name>``.

    Raises:
        ValueError: ``name`` is not a plain entry name (oslo would silently turn ``/`` into
            ``_``; a cache entry name never contains one, so such a name is a caller's bug).
    """
    if not valid_entry_name(name):
        raise ValueError(f"not a valid entry name for a lock: {name!r}")
    return LOCK_PREFIX + name


def entry_of_lock_file(file_name: str) -> str | None:
    """The name whose lock ``file_name`` is, or None for a file that is not a ``nova-`` lock."""
    name = file_name.removeprefix(LOCK_PREFIX)
    return name if name != file_name and valid_entry_name(name) else None

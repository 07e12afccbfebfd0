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
    "TEMP_SUFFIX",
    "Threshold",
    "classify",
    "entry_of_temp",
    "ephemeral_name",
    "ephemeral_tag",
    "fingerprint",
    "image_prefix",
    "swap_name",
    "temp_name",
    "threshold_of",
]

TEMP_SUFFIX = ".part"


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
    """Nova's cache name of an image id: the SHA-1 hex digest of its UTF-8 bytes."""
    return hashlib.sha1(image_id.encode("utf-8"), usedforsecurity=False).hexdigest()


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
    return hashlib.md5(name.encode("utf-8"), usedforsecurity=False).hexdigest()[:7]


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

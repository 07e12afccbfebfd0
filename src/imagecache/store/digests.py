"""Digest records, one JSON file per entry in ``<cache>/.imagecache/digests/<entry>.json``, and
Nova's legacy digest files beside the entries.

Each record is replaced atomically (temp name, fsync, rename, all through the directory's
descriptor, so a symlink swapped in for ``.imagecache`` or ``digests`` is refused, never
followed): a crash leaves the old record or the new one, never half of one. Records are read as
hostile input: anything that is not a record of this schema is ignored (and the entry hashed
afresh), never trusted and never a traceback.

Nova's own digests, read as expected values where no record exists yet: ``<entry>.info``, the
JSON ``{"sha1": "<hex>"}`` Folsom to Havana wrote (``checksum_base_images``), and Essex's
``<entry>.sha1``, the bare hex digest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import stat
from collections.abc import Iterable
from typing import Any

from imagecache import naming
from imagecache._version import __version__
from imagecache.integrity import Digest, DigestRecord, DigestSource, Verdict
from imagecache.layout import Layout
from imagecache.model import Kind
from imagecache.plan import iso
from imagecache.store import fsops
from imagecache.store.jsonfile import JsonFileError, read_json, read_json_at

__all__ = [
    "DIGESTS_DIR",
    "SCHEMA",
    "legacy_digest",
    "read_records",
    "record_to_dict",
    "write_record",
]

LOG = logging.getLogger(__name__)

SCHEMA = 1
DIGESTS_DIR = "digests"
_SUFFIX = ".json"
_HEX = re.compile(r"[0-9a-f]{8,128}")
_ALGORITHM = re.compile(r"[a-z0-9_]{2,16}")
_MAX = 1 << 63
_MAX_RECORD = 64 << 10
_STALE_TEMP = 3600.0  # a record write takes milliseconds: older temps are a killed writer's


def _dir(layout: Layout) -> str:
    return os.path.join(layout.state_dir, DIGESTS_DIR)


def _digest(d: Digest | None) -> dict[str, str] | None:
    return None if d is None else {"algorithm": d.algorithm, "value": d.value}


def record_to_dict(r: DigestRecord) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "version": __version__,
        "entry": r.name,
        "xxh3_128": r.xxh3,
        "device": r.device,
        "inode": r.inode,
        "size": r.size,
        "verified": iso(r.verified_at),
        "verified_epoch": r.verified_at,
        "verdict": str(r.verdict),
        "source": str(r.source),
        "expected": _digest(r.expected),
        "image": r.image,
        "image_digest": _digest(r.image_digest),
        "observed_xxh3_128": r.observed,
        "ctime_ns": r.ctime_ns,
        "birth_ns": r.birth_ns,
    }


def _open(layout: Layout, *, create: bool) -> int:
    """The descriptor of the digests directory, through ``.imagecache``'s, neither followed
    through a symlink (``ELOOP``) nor anything but a real directory (``ENOTDIR``)."""
    state_fd = fsops.open_dir(layout.state_dir, create=create)
    try:
        return fsops.open_dir(DIGESTS_DIR, dir_fd=state_fd, create=create)
    finally:
        os.close(state_fd)


def ensure_writable(layout: Layout) -> None:
    """Make the digests directory if missing, and check it is a real directory.

    Raises:
        OSError: it cannot be made, or is a symlink or not a directory.
    """
    os.close(_open(layout, create=True))


def write_record(layout: Layout, record: DigestRecord) -> None:
    """Replace the record of ``record.name``, atomically.

    Raises:
        ValueError: the name is not a plain entry name.
        OSError: the state directory cannot be made or written (a symlink there: ``ELOOP``).
    """
    if not naming.valid_entry_name(record.name) or not naming.encodable(record.name):
        raise ValueError(f"not a plain entry name: {record.name!r}")
    data = (json.dumps(record_to_dict(record)) + "\n").encode("utf-8")
    dir_fd = _open(layout, create=True)
    try:
        name = record.name + _SUFFIX
        temp = naming.temp_name(name, os.getpid(), secrets.token_hex(4))
        fsops.replace_at(dir_fd, name, data, temp=temp)
    finally:
        os.close(dir_fd)


def drop_records(layout: Layout, keep: Iterable[str] | None, *, now: float) -> list[str]:
    """Remove the records of every entry not in ``keep`` (gone from the cache and the trash), so
    that a file made later on a reused inode is never judged by another file's record, and the
    temp files of record writes killed midway (older than an hour); the names dropped. Best
    effort: what cannot be removed stays. ``keep`` None: only the temp files."""
    kept = None if keep is None else set(keep)
    dropped: list[str] = []
    try:
        dir_fd = _open(layout, create=False)
    except OSError:
        return dropped
    try:
        for file in os.listdir(dir_fd):
            name = file.removesuffix(_SUFFIX)
            with contextlib.suppress(OSError):
                if file.endswith(_SUFFIX) and kept is not None and name not in kept:
                    os.unlink(file, dir_fd=dir_fd)
                    dropped.append(name)
                elif naming.classify(file) is Kind.TEMP:  # <entry>.json.<pid>.<token>.part
                    st = os.stat(file, dir_fd=dir_fd, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and now - st.st_mtime > _STALE_TEMP:
                        os.unlink(file, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    return dropped


def read_records(layout: Layout, names: Iterable[str] | None = None) -> dict[str, DigestRecord]:
    """The valid records, by entry name (of ``names`` only, when given); none when the directory
    is missing or not a real one (never read through a symlink). A record that cannot be read or
    is not one is left out (logged at debug level): its entry is then hashed as new."""
    try:
        dir_fd = _open(layout, create=False)
    except OSError:
        return {}
    try:
        if names is None:
            wanted = [f.removesuffix(_SUFFIX) for f in os.listdir(dir_fd) if f.endswith(_SUFFIX)]
        else:
            wanted = list(names)
        out: dict[str, DigestRecord] = {}
        for name in wanted:
            if not naming.valid_entry_name(name):
                continue
            try:
                record = _record(read_json_at(dir_fd, name + _SUFFIX, max_bytes=_MAX_RECORD))
            except (OSError, KeyError, TypeError, ValueError, OverflowError, RecursionError) as exc:
                if not isinstance(exc, FileNotFoundError):
                    LOG.debug("digest record of %r ignored: %s", name, exc)
                continue
            if record.name == name:
                out[name] = record
        return out
    finally:
        os.close(dir_fd)


def legacy_digest(layout: Layout, name: str) -> Digest | None:
    """Nova's own digest of entry ``name``: ``<name>.info`` ``{"sha1": hex}``, else Essex's
    ``<name>.sha1``; None when neither is there or readable as one."""
    base = layout.entry_path(name)
    with contextlib.suppress(JsonFileError):
        doc = read_json(base + ".info", max_bytes=_MAX_RECORD)
        value = doc.get("sha1") if isinstance(doc, dict) else None
        if isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{40}", value.strip()):
            return Digest("sha1", value.strip().lower())
    try:
        if not stat.S_ISREG(os.lstat(base + ".sha1").st_mode):  # a FIFO is never opened
            return None
        fd = os.open(base + ".sha1", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device behind the name
            return None
        text = os.read(fd, 256).decode("ascii", "replace").split()
    finally:
        os.close(fd)
    if text and re.fullmatch(r"[0-9a-fA-F]{40}", text[0]):
        return Digest("sha1", text[0].lower())
    return None


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX:
        raise ValueError("expected a count")
    return value


def _hex(value: Any, *, empty: bool = False) -> str:
    if empty and value == "":
        return ""
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise ValueError("expected hex digits")
    return value


def _digest_from(doc: Any) -> Digest | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("algorithm"), str):
        raise ValueError("expected {algorithm, value}")
    if not _ALGORITHM.fullmatch(doc["algorithm"]):
        raise ValueError("unknown digest algorithm")
    return Digest(doc["algorithm"], _hex(doc.get("value")))


def _record(doc: Any) -> DigestRecord:
    if not isinstance(doc, dict) or type(doc.get("schema")) is not int or doc["schema"] != SCHEMA:
        raise ValueError(f"not a digest record of schema {SCHEMA}")
    verified = doc["verified_epoch"]
    if isinstance(verified, bool) or not isinstance(verified, int | float):
        raise ValueError("verified_epoch: expected a number")
    if not -_MAX < verified < _MAX or not math.isfinite(verified):
        raise ValueError("verified_epoch: out of range")
    image = doc.get("image")
    if image is not None and (not isinstance(image, str) or len(image) > 4096):
        raise ValueError("image: expected a reference")
    observed = doc.get("observed_xxh3_128")
    return DigestRecord(
        name=str(doc["entry"]),
        xxh3=_hex(doc["xxh3_128"], empty=True),
        device=_int(doc["device"]),
        inode=_int(doc["inode"]),
        size=_int(doc["size"]),
        verified_at=float(verified),
        verdict=Verdict(doc["verdict"]),
        source=DigestSource(doc["source"]),
        expected=_digest_from(doc.get("expected")),
        image=image,
        image_digest=_digest_from(doc.get("image_digest")),
        observed=None if observed is None else _hex(observed),
        ctime_ns=_int(doc.get("ctime_ns", 0)),
        birth_ns=_int(doc.get("birth_ns", 0)),
    )

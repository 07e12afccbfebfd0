"""``imagecache verify --repair NAME``: good bytes back into a corrupt base, in place.

The image is fetched again as it was cached (the Glance id or URL its digest record names),
checked against the image service's digest as every fetch is, converted as the fetch converted
it, and its result checked against the record's reference digest: only bytes the record vouches
for are written. Then, under the entry lock, the file is compared block by block with the good
copy and only the blocks that differ are written **into the existing file** (the same inode:
every qemu holding the base open reads good data from then on, where a rename would leave them
on the corrupt inode), fsynced, hashed again, and the record set good.

Crash safety: the good copy is a temp file (reaped like any other); the record is replaced
atomically and only after the file hashes to its reference, so a repair killed midway leaves the
record saying ``corrupt`` (with every block either as it was or good), and the next ``verify``
says so or, if all blocks were written, finds it good.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any

from imagecache import locks
from imagecache.clock import Clock
from imagecache.errors import ImageCacheError
from imagecache.images import cache_name, fetch, hashing
from imagecache.integrity import LOCAL, DigestRecord, DigestSource, Verdict
from imagecache.settings import Settings
from imagecache.store import digests

__all__ = ["RepairReport", "repair"]

LOG = logging.getLogger(__name__)

BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class RepairReport:
    name: str
    result: str  # repaired, intact, refused, failed
    message: str
    blocks_written: int = 0
    bytes_written: int = 0

    @property
    def ok(self) -> bool:
        return self.result in ("repaired", "intact")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def render(self) -> str:
        size = f" ({self.blocks_written} blocks, {self.bytes_written} bytes written)"
        return f"{self.result} {self.name}: {self.message}" + (size if self.blocks_written else "")


def repair(settings: Settings, name: str, *, clock: Clock) -> RepairReport:
    """Repair entry ``name`` from its image source; never raises for the entry's own state."""
    layout = settings.layout
    record = digests.read_records(layout, [name]).get(name)
    if record is None:
        return RepairReport(name, "refused", "no digest record: run `imagecache verify` first")
    if not record.xxh3:
        return RepairReport(name, "refused", "no known-good digest to repair to (its bytes "
                            "never matched Nova's recorded sha1)")  # fmt: skip
    if record.image is None:
        return RepairReport(name, "refused", f"a {record.source} record of a file someone "
                            "else downloaded: no image service copy is known, so it cannot be "
                            "repaired; remove it once unused: Nova fetches it again")  # fmt: skip
    if cache_name(record.image) != name:
        # The record sits in a directory others can write: its image ref is fetched only if it
        # is the one this entry's very name was made from (sha1 of the Glance id or URL), so a
        # forged record can never have a host file or another image written into the cache.
        return RepairReport(name, "refused", "its record names an image this entry was not "
                            "made from: not fetched")  # fmt: skip
    sources = fetch.Sources(settings.glance)
    # The record says how the entry was made, whatever force_raw_images says now: a converted
    # base is repaired from a conversion, any other from the bytes as downloaded.
    convert = record.source is DigestSource.CONVERTED
    options = dataclasses.replace(fetch.FetchOptions.of(layout, settings.fetch), force_raw=convert)
    try:
        with fetch.fetched_copy(record.image, source=sources(record.image), options=options,
                                convert=convert, name=name) as path:  # fmt: skip
            # One descriptor from the hash to the last block copied: the bytes written are the
            # bytes hashed, whatever happens to the temp name meanwhile (a reaper, a rename).
            good = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                got = hashing.hash_file(good, (LOCAL,))[LOCAL]
                if got != record.xxh3:
                    return RepairReport(name, "failed", f"the copy fetched again from "
                                        f"{record.image} hashes to {got}, not to the record's "
                                        f"{record.xxh3}: nothing written")  # fmt: skip
                with locks.entry_lock(layout.instances_path, name,
                                      timeout=settings.clean.lock_timeout):  # fmt: skip
                    return _patch(settings, record, good, clock=clock)
            finally:
                os.close(good)
    except (ImageCacheError, OSError) as exc:
        return RepairReport(name, "failed", f"cannot repair: {exc}")
    finally:
        sources.close()


def _patch(settings: Settings, record: DigestRecord, good: int, *, clock: Clock) -> RepairReport:
    """Write the blocks of ``good`` (an open file hashing to the record) that differ into the
    recorded file, in place; the entry lock is held. Raises OSError (a failed read or write)."""
    name = record.name
    path = settings.layout.entry_path(name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP):
            return RepairReport(
                name, "refused", "gone, or replaced by a symlink: nothing to repair"
            )
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino, st.st_size) != (
            record.device,
            record.inode,
            record.size,
        ):
            return RepairReport(name, "refused", "another file than the one recorded is there "
                                "now: verify it first")  # fmt: skip
        if st.st_nlink > 1:  # writing in place would also write every other name of the inode
            return RepairReport(name, "refused", f"it has {st.st_nlink} names (hard links): "
                                "not written in place")  # fmt: skip
        blocks, written, offset = 0, 0, 0
        while want := os.pread(good, BLOCK, offset):
            if os.pread(fd, len(want), offset) != want:
                done = 0
                while done < len(want):  # a short write is legal: the rest of the block too
                    done += os.pwrite(fd, memoryview(want)[done:], offset + done)
                blocks, written = blocks + 1, written + len(want)
            offset += len(want)
        os.fsync(fd)
        after = hashing.hash_file(fd, (LOCAL,))[LOCAL]
    finally:
        os.close(fd)
    if after != record.xxh3:
        return RepairReport(name, "failed", f"still hashes to {after} after writing the good "
                            "blocks: the disk may be failing", blocks, written)  # fmt: skip
    digests.write_record(settings.layout, dataclasses.replace(
        record, verified_at=clock.wall(), verdict=Verdict.GOOD, observed=None))  # fmt: skip
    if not blocks:
        return RepairReport(name, "intact", "already matches its record: nothing written")
    LOG.warning("REPAIRED %s in place: %d blocks (%d bytes) rewritten", name, blocks, written)
    return RepairReport(name, "repaired", "good bytes written in place (same inode) and "
                        "verified", blocks, written)  # fmt: skip

"""Observe what cache entries themselves use: the backing file, data file or extents of an entry.

An entry can be an image that names others (an operator's golden qcow2 on a base, Nova's legacy
copies, anything parked in the cache): while it exists, what it names is in use, or removing the
base breaks the entry. An entry's bytes came from outside (an uploaded image is whatever its
owner wrote), so they are treated as a guest's: only the top header is parsed, the names it
gives are found by ``stat`` and never opened, and a garbage header is only a warning — an upload
must not stop every removal on the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from imagecache.errors import ImageFormatError
from imagecache.formats import read_header_stat, stat_names
from imagecache.formats.chain import HeaderCache
from imagecache.layout import Layout
from imagecache.model import CacheEntry, Disk, FileType, Problem, ProblemCode
from imagecache.sources.disks import disk_of

__all__ = ["scan_entry_users"]


def scan_entry_users(
    layout: Layout, entries: Iterable[CacheEntry]
) -> tuple[tuple[Disk, ...], tuple[Problem, ...]]:
    """A :class:`Disk` for every regular cache entry whose header names other files.

    Each counts like an instance disk (its links protect the entries they name, by name and by
    device and inode). An entry that cannot be read is a blocking problem: what it names is not
    known. Never raises.
    """
    headers = HeaderCache()
    disks: list[Disk] = []
    problems: list[Problem] = []
    for entry in entries:
        if entry.file_type is not FileType.FILE:
            continue
        path = layout.entry_path(entry.name)
        try:
            header, st = read_header_stat(path)
        except FileNotFoundError:
            continue  # removed since the listing: it uses nothing now
        except OSError as exc:
            message = f"cannot read the header of a cache entry: {exc.strerror}"
            problems.append(Problem(ProblemCode.DISK_UNREADABLE, path, message))
            continue
        except ImageFormatError as exc:
            message = f"cache entry (an image's own bytes) with an unparsable header: {exc}"
            problems.append(Problem(ProblemCode.GUEST_WRITTEN_HEADER, path, message))
            continue
        if header.names_files:
            chain = stat_names(path, header, st, headers=headers)
            disks.append(
                _not_itself(disk_of(path, layout.cache_name, chain), (st.st_dev, st.st_ino))
            )
    return tuple(disks), tuple(problems)


def _not_itself(disk: Disk, own: tuple[int, int]) -> Disk:
    """``disk`` as a user of what it names only, never of itself.

    A sparse VMDK's descriptor names the file itself as its extent, and the file is the entry:
    counted, the entry would keep itself forever.
    """
    extents = [(e, i) for e, i in zip(disk.extents, disk.extent_ids, strict=False) if i != own]
    data = [(d, i) for d, i in zip(disk.data_files, disk.data_file_ids, strict=False) if i != own]
    links = [(c, i) for c, i in zip(disk.chain, disk.chain_ids, strict=False) if i != own]
    if len(links) < len(disk.chain_ids):  # its own backing file: it names nothing else
        return replace(disk, file_id=None, chain=(), chain_ids=(), missing=None, extents=(),
                       extent_ids=(), data_files=(), data_file_ids=())  # fmt: skip
    return replace(
        disk,
        file_id=None,
        extents=tuple(e for e, _ in extents),
        extent_ids=tuple(i for _, i in extents),
        data_files=tuple(d for d, _ in data),
        data_file_ids=tuple(i for _, i in data),
    )

"""The parsed view of an image header, and bounded access to the bytes it is parsed from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from imagecache.errors import ImageFormatError

__all__ = [
    "HEAD_BYTES",
    "QCOW2_EXTERNAL_DATA",
    "RAW",
    "ByteSource",
    "Extent",
    "ImageHeader",
    "ReadAt",
    "decode_name",
]

#: How much of a file is read up front. qcow2's default cluster is 64 KiB and everything we parse
#: (fixed header, extensions, backing name, embedded VMDK descriptor) normally lies in it.
HEAD_BYTES = 65536

ReadAt = Callable[[int, int], bytes]


@dataclass(frozen=True, slots=True)
class Extent:
    """One extent line of a VMDK descriptor: a file that holds part of the guest's bytes.

    ``filename`` is the name exactly as written (relative names are relative to the descriptor's
    directory). ``opened``: qemu opens this file (an ``RW`` line of a descriptor file); lines
    qemu skips (``RDONLY``, ``NOACCESS``, any line of a sparse file's embedded descriptor) still
    name a file, which is kept (the safe side) but never opened, only found by ``stat``.
    """

    access: str
    sectors: int
    kind: str  # FLAT, SPARSE, VMFS, VMFSSPARSE, SESPARSE, ...
    filename: str
    opened: bool

    @property
    def parsed(self) -> bool:
        """True when qemu parses the file as a sparse extent (its header), not as raw data."""
        return self.opened and self.kind in SPARSE_EXTENTS


#: qcow2 incompatible feature bit 2: the guest's data lives in an external data file (qemu opens
#: it, by the data-file extension's name or a ``data-file`` option, and never probes its format).
QCOW2_EXTERNAL_DATA = 1 << 2

# Extent kinds whose file qemu parses (it has a header of its own); FLAT and VMFS are raw data.
SPARSE_EXTENTS = frozenset({"SPARSE", "VMFSSPARSE", "SESPARSE"})


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What an image header says about the files the image depends on.

    ``format`` is ``"qcow2"``, ``"vmdk"`` or ``"raw"``; ``"raw"`` stands for anything not
    recognised and never has a backing file. ``backing_file`` is the name exactly as stored.
    ``virtual_size`` is None for raw (the caller has the file size).

    ``data_file`` is a qcow2 external data file's name as stored; ``incompatible_features`` is a
    qcow2 v3 header's field of that name (0 for v2), whose bit 2 (:attr:`external_data`) makes
    qemu open the data file (without the bit qemu ignores the name; with the bit and no name it
    needs a ``data-file`` option). ``extents`` are a VMDK descriptor's extent lines. Equality
    leaves the extents out: they follow from the bytes the other fields were parsed from, and
    headers compared whole predate them.
    """

    format: str
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    virtual_size: int | None = None
    version: int | None = None
    create_type: str | None = None
    incompatible_features: int = 0
    extents: tuple[Extent, ...] = field(default=(), compare=False)

    @property
    def is_disk_image(self) -> bool:
        """True for the formats that can name other files (qcow2, vmdk)."""
        return self.format != "raw"

    @property
    def external_data(self) -> bool:
        """True when the qcow2 incompatible feature bit of an external data file is set."""
        return bool(self.incompatible_features & QCOW2_EXTERNAL_DATA)

    @property
    def names_files(self) -> bool:
        """True when the header names (or needs) a file besides the image itself."""
        return (
            self.backing_file is not None
            or self.data_file is not None
            or self.external_data
            or bool(self.extents)
        )


RAW = ImageHeader("raw")


class ByteSource:
    """The first bytes of a file, plus an optional way to read further, bounds-checked."""

    __slots__ = ("_read_at", "data")

    def __init__(self, data: bytes, read_at: ReadAt | None) -> None:
        self.data = data
        self._read_at = read_at

    def get(self, offset: int, length: int, what: str) -> bytes:
        """Exactly ``length`` bytes at ``offset``.

        Raises ImageFormatError when they lie beyond the buffer and there is no ``read_at``, or
        beyond the end of the file. Callers bound ``offset`` and ``length`` first.
        """
        end = offset + length
        if end <= len(self.data):
            return self.data[offset:end]
        if self._read_at is None:
            raise ImageFormatError(
                f"{what} at offset {offset} (+{length}) lies beyond the {len(self.data)} bytes read"
            )
        got = self._read_at(offset, length)
        if len(got) != length:
            raise ImageFormatError(
                f"{what} at offset {offset} (+{length}) lies beyond the end of the file"
            )
        return got

    def get_upto(self, offset: int, length: int) -> bytes:
        """At most ``length`` bytes at ``offset``: fewer at the end of the file (or of the buffer,
        when there is no ``read_at``). Callers bound ``offset`` and ``length`` first."""
        end = offset + length
        if end <= len(self.data) or self._read_at is None:
            return self.data[offset:end]
        return self._read_at(offset, length)


def decode_name(raw: bytes, what: str) -> str:
    """A format name (or other text) from a header: UTF-8 without NUL.

    Raises ImageFormatError otherwise: qemu would cut the name at the NUL, and text that is not
    UTF-8 names no format qemu knows, so neither is guessed at.
    """
    if b"\0" in raw:
        raise ImageFormatError(f"{what} contains a NUL byte")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ImageFormatError(f"{what} is not valid UTF-8") from exc


def decode_file_name(raw: bytes, what: str) -> str:
    """A file name from a header, without NUL, decoded as the OS decodes file names.

    Linux file names are bytes, and qemu opens the bytes as stored: a name that is not UTF-8
    (an instance directory named in another encoding) is decoded with ``surrogateescape``, as
    ``os.scandir`` decodes the cache's names, so the two compare equal and the link is followed.

    Raises ImageFormatError for a NUL byte: qemu would cut the name there.
    """
    if b"\0" in raw:
        raise ImageFormatError(f"{what} contains a NUL byte")
    return raw.decode("utf-8", "surrogateescape")

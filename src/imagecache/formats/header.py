"""The parsed view of an image header, and bounded access to the bytes it is parsed from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from imagecache.errors import ImageFormatError

__all__ = ["HEAD_BYTES", "RAW", "ByteSource", "ImageHeader", "ReadAt", "decode_name"]

#: How much of a file is read up front. qcow2's default cluster is 64 KiB and everything we parse
#: (fixed header, extensions, backing name, embedded VMDK descriptor) normally lies in it.
HEAD_BYTES = 65536

ReadAt = Callable[[int, int], bytes]


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What an image header says about the files the image depends on.

    ``format`` is ``"qcow2"``, ``"vmdk"`` or ``"raw"``; ``"raw"`` stands for anything not
    recognised and never has a backing file. ``backing_file`` is the name exactly as stored.
    ``virtual_size`` is None for raw (the caller has the file size).
    """

    format: str
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    virtual_size: int | None = None
    version: int | None = None
    create_type: str | None = None

    @property
    def is_disk_image(self) -> bool:
        """True for the formats that can name other files (qcow2, vmdk)."""
        return self.format != "raw"


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


def decode_name(raw: bytes, what: str) -> str:
    """A file or format name from a header: UTF-8 without NUL.

    Raises ImageFormatError otherwise: qemu would cut the name at the NUL, and a name we cannot
    decode is one we cannot compare with the cache's names, so neither is guessed at.
    """
    if b"\0" in raw:
        raise ImageFormatError(f"{what} contains a NUL byte")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ImageFormatError(f"{what} is not valid UTF-8") from exc

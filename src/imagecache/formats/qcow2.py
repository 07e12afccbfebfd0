"""qcow2 v2/v3 headers: the backing file name, and the external data file (extension and bit).

Layout and limits follow qemu 7.2's ``qcow2_do_open`` and ``qcow2_read_extensions``; every offset
and length read from the file is checked before it is used.
"""

from __future__ import annotations

import struct

from imagecache.errors import ImageFormatError
from imagecache.formats.header import ByteSource, ImageHeader, decode_file_name, decode_name

__all__ = ["EXT_BACKING_FORMAT", "EXT_DATA_FILE", "MAGIC", "parse_qcow2"]

MAGIC = b"QFI\xfb"
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
_EXT_END = 0

# magic, version, backing_file_offset, backing_file_size, cluster_bits, size
_FIXED = struct.Struct(">4sIQIIQ")
_HEADER_LENGTH = struct.Struct(">I")  # v3 only, at offset 100
_HEADER_LENGTH_OFFSET = 100
_INCOMPATIBLE = struct.Struct(">Q")  # v3 only, at offset 72: incompatible_features
_INCOMPATIBLE_OFFSET = 72
_V2_HEADER_LENGTH = 72
_V3_MIN_HEADER_LENGTH = 104
_EXT = struct.Struct(">II")  # type, length; data follows, padded to 8 bytes
# qemu's limits: cluster_bits in [9, 21]; names up to 1023 bytes; the backing format is read into
# a 16-byte buffer including its terminator.
_MIN_CLUSTER_BITS = 9
_MAX_CLUSTER_BITS = 21
_MAX_BACKING_NAME = 1023
_MAX_BACKING_FORMAT = 15


def parse_qcow2(src: ByteSource) -> ImageHeader:
    """Parse a qcow2 header whose magic has been checked.

    Raises ImageFormatError for an unsupported version or cluster size, a header length or offset
    out of bounds, an oversized name or extension, an undecodable name, or bytes beyond the file.
    """
    _, version, backing_offset, backing_size, cluster_bits, size = _FIXED.unpack(
        src.get(0, _FIXED.size, "qcow2 header")
    )
    if version not in (2, 3):
        raise ImageFormatError(f"unsupported qcow2 version {version}")
    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise ImageFormatError(f"unsupported qcow2 cluster_bits {cluster_bits}")
    cluster_size = 1 << cluster_bits
    incompatible = 0
    if version == 2:
        header_length = _V2_HEADER_LENGTH
    else:
        (header_length,) = _HEADER_LENGTH.unpack(
            src.get(_HEADER_LENGTH_OFFSET, _HEADER_LENGTH.size, "qcow2 header_length")
        )
        if header_length < _V3_MIN_HEADER_LENGTH:
            raise ImageFormatError(f"qcow2 header_length {header_length} is too small")
        (incompatible,) = _INCOMPATIBLE.unpack(
            src.get(_INCOMPATIBLE_OFFSET, _INCOMPATIBLE.size, "qcow2 incompatible_features")
        )
    if header_length > cluster_size:
        raise ImageFormatError(f"qcow2 header_length {header_length} exceeds the cluster size")
    # The whole fixed header must be present, not just the fields we use.
    src.get(0, header_length, "qcow2 header")

    if backing_offset:
        # qemu only bounds the offset by the cluster size; a name inside the fixed header is
        # garbage that qemu never writes, so it is refused too.
        if not header_length <= backing_offset <= cluster_size:
            raise ImageFormatError(f"qcow2 backing file offset {backing_offset} is out of bounds")
        if backing_size > min(_MAX_BACKING_NAME, cluster_size - backing_offset):
            raise ImageFormatError(f"qcow2 backing file name length {backing_size} is too large")

    # Extensions lie between the header and the backing name (or the end of the first cluster);
    # they are read before the name, as qemu does, so damage is reported on the same field.
    backing_format, data_file = _read_extensions(src, header_length, backing_offset or cluster_size)
    backing_file = None
    if backing_offset:
        raw = src.get(backing_offset, backing_size, "qcow2 backing file name")
        # qemu treats an empty name as "no backing file".
        backing_file = decode_file_name(raw, "qcow2 backing file name") or None
    return ImageHeader(
        format="qcow2",
        backing_file=backing_file,
        backing_format=backing_format,
        data_file=data_file,
        virtual_size=size,
        version=version,
        incompatible_features=incompatible,
    )


def _read_extensions(src: ByteSource, offset: int, end: int) -> tuple[str | None, str | None]:
    backing_format = data_file = None
    while offset < end:
        if end - offset < _EXT.size:
            raise ImageFormatError(f"qcow2 header extension at {offset} is too large")
        ext_type, length = _EXT.unpack(src.get(offset, _EXT.size, "qcow2 header extension"))
        offset += _EXT.size
        if ext_type == _EXT_END:
            break
        if length > end - offset:
            raise ImageFormatError(f"qcow2 header extension {ext_type:#x} is too large")
        if ext_type == EXT_BACKING_FORMAT:
            if length > _MAX_BACKING_FORMAT:
                raise ImageFormatError(f"qcow2 backing format name length {length} is too large")
            raw = src.get(offset, length, "qcow2 backing format")
            backing_format = decode_name(raw, "qcow2 backing format") or None
        elif ext_type == EXT_DATA_FILE:
            raw = src.get(offset, length, "qcow2 data file name")
            data_file = decode_file_name(raw, "qcow2 data file name") or None
        offset += (length + 7) & ~7
    return backing_format, data_file

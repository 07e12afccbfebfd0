"""qcow2 v2/v3 headers: the backing file name, and the external data file (extension and bit).

Layout and limits follow qemu 7.2's ``qcow2_do_open`` and ``qcow2_read_extensions``; every offset
and length read from the file is checked before it is used.
"""

from __future__ import annotations

import functools
import struct

from imagecache.errors import ImageFormatError
from imagecache.formats.header import ByteSource, ImageHeader, decode_file_name, decode_name

__all__ = ["EXT_BACKING_FORMAT", "EXT_DATA_FILE", "MAGIC", "parse_common", "parse_qcow2"]

MAGIC = b"QFI\xfb"
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
EXT_FEATURE_TABLE = 0x6803F857  # names of feature bits, for messages: nothing to follow
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


# The common header, as qemu-img writes it for every overlay Nova makes: the fixed v2/v3 fields
# (not encrypted; v3 with no incompatible or autoclear feature set and the usual 104 or 112-byte
# length), then only a backing format and a feature name table, then the backing name, all in
# the first bytes read. The fields of _FIXED, then crypt_method (32), incompatible_features (72),
# autoclear_features (88) and header_length (100).
_COMMON_FIXED = struct.Struct(">4sIQIIQI36xQ8xQ4xI")
_COMMON_V3_LENGTHS = (104, 112)


_BACKING_NAME = struct.Struct(">QI")  # backing_file_offset, backing_file_size, at 8


def parse_common(data: bytes) -> ImageHeader | None:
    """:func:`parse_qcow2` of the common header in ``data`` (magic checked), or None.

    A shortcut for the tens of thousands of overlays of a scan: it gives exactly what the full
    parser gives, or None for anything else (another version, a feature bit, any other header
    extension, a name or extension beyond ``data``, anything the full parser would refuse), which
    the full parser then reads. It never decides what the full parser would not.
    """
    if len(data) < _COMMON_FIXED.size:
        return None
    # With a backing name, nothing past its end is looked at (extensions lie before it), so the
    # answer depends on those first bytes alone: the overlays of one base share them, and the
    # header is parsed once for all of them. (Without a name the extensions may run to the end
    # of the cluster: those are parsed each time, and are rare among instance disks.)
    backing_offset, backing_size = _BACKING_NAME.unpack_from(data, 8)
    used = max(_COMMON_FIXED.size, backing_offset + backing_size)
    if backing_offset and used <= len(data):
        return _parse_common_cached(data[:used])
    return _parse_common(data)


@functools.lru_cache(maxsize=4096)
def _parse_common_cached(data: bytes) -> ImageHeader | None:
    return _parse_common(data)


def _parse_common(data: bytes) -> ImageHeader | None:
    (_, version, backing_offset, backing_size, cluster_bits, size, crypt, incompatible, autoclear,
     header_length) = _COMMON_FIXED.unpack_from(data)  # fmt: skip
    if crypt:
        return None
    if version == 2:
        header_length = _V2_HEADER_LENGTH
        incompatible = 0  # v2 has no such field: those bytes are the L1 table or anything
    elif version != 3 or incompatible or autoclear or header_length not in _COMMON_V3_LENGTHS:
        return None
    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        return None
    cluster_size = 1 << cluster_bits  # at least 512: more than any common header_length
    end = backing_offset or cluster_size
    if backing_offset and not (
        header_length <= backing_offset <= cluster_size
        and backing_size <= min(_MAX_BACKING_NAME, cluster_size - backing_offset)
        and backing_offset + backing_size <= len(data)
    ):
        return None
    backing_format = None
    offset = header_length
    while offset < end:
        if end - offset < _EXT.size or offset + _EXT.size > len(data):
            return None
        ext_type, length = _EXT.unpack_from(data, offset)
        offset += _EXT.size
        if ext_type == _EXT_END:
            break
        if length > end - offset or offset + length > len(data):
            return None
        if ext_type == EXT_BACKING_FORMAT:
            raw = data[offset : offset + length]
            if length > _MAX_BACKING_FORMAT or b"\0" in raw or not raw.isascii():
                return None
            backing_format = raw.decode("ascii") or None
        elif ext_type != EXT_FEATURE_TABLE:
            return None
        offset += (length + 7) & ~7
    backing_file = None
    if backing_offset:
        raw = data[backing_offset : backing_offset + backing_size]
        if b"\0" in raw:
            return None
        backing_file = raw.decode("utf-8", "surrogateescape") or None
    return ImageHeader(
        "qcow2", backing_file, backing_format, None, size, version, None, incompatible
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

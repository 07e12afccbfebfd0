"""VMDK: sparse extents (``KDMV``, ``COWD``) with an embedded descriptor, and text descriptors.

Only the descriptor matters here: its ``createType``, its ``parentFileNameHint`` (the name of the
parent, or backing, image of a VMDK snapshot) and its extent lines (the files that hold the
guest's bytes).

qemu finds each of those keys with ``strstr``: the FIRST occurrence anywhere in the descriptor,
even inside a comment or another line, then skips two bytes (``="``) and reads up to the next
quote. Reading them any other way lets a descriptor say one thing to us and another to qemu
(``createType="monolithicFlat"`` first, ``createType="monolithicSparse"`` second: CVE-2024-32498
style). So a key that occurs more than once, or whose one occurrence is not a ``key="value"``
line, is refused rather than interpreted.

Extent lines are read exactly as qemu 7.2's ``vmdk_parse_extents`` reads them: from the start of
every line, ``sscanf(p, "%10s %" SCNd64 " %10s \"%511[^\n\r\"]\" %" SCNd64, ...)``, whose
spaces match any white space, newlines included (so one extent may span lines), whose names
stop at 511 bytes or a quote or line end, and whose refusals (a FLAT extent without an offset, a
SPARSE one with one) make qemu refuse the whole descriptor, and so us.
"""

from __future__ import annotations

import re
import struct

from imagecache.errors import ImageFormatError
from imagecache.formats.header import (
    ByteSource,
    Extent,
    ImageHeader,
    decode_file_name,
    decode_name,
)

__all__ = [
    "COWD_MAGIC",
    "SPARSE_MAGIC",
    "is_text_descriptor",
    "parse_cowd",
    "parse_descriptor",
    "parse_sparse",
]

SPARSE_MAGIC = b"KDMV"
# ESX's older sparse format (VMDK3); qemu probes it as vmdk too.
COWD_MAGIC = b"COWD"
_COWD = struct.Struct("<4sIII")  # magic, version, flags, disk_sectors
# magic, version, flags, capacity, granularity, descriptorOffset, descriptorSize (little-endian;
# capacity, offsets and sizes in 512-byte sectors)
_SPARSE = struct.Struct("<4sIIQQQQ")
_SECTOR = 512
_MAX_SPARSE_VERSION = 3
# Real embedded descriptors are 20 sectors; a larger one is refused rather than read in full.
_MAX_DESCRIPTOR = 1 << 20
_MAX_OFFSET = 1 << 62
# qemu reads a descriptor file up to 1 MiB - 1 (vmdk_read_desc), and the parent hint of a sparse
# file from DESC_SIZE bytes at 0x200, wherever its header says its descriptor is.
_DESCRIPTOR_FILE_MAX = (1 << 20) - 1
_HINT_AT = 0x200
_HINT_BYTES = 20 * _SECTOR

# A text descriptor opens with comment or blank lines and then ``version=N`` (qemu's probe, but
# also allowing empty lines); "# Disk DescriptorFile" is accepted on its own.
_TEXT_PROBE = re.compile(
    rb"\A(?:[ \t]*(?:#[^\n]*)?\r?\n)*[ \t]*version[ \t]*=[ \t]*\"?[123]\"?\r?$", re.M
)
_TEXT_MARK = b"# Disk DescriptorFile"
_CREATE_TYPE = b"createType"
_PARENT_HINT = b"parentFileNameHint"


def is_text_descriptor(data: bytes) -> bool:
    """True when ``data`` starts like a VMDK text descriptor."""
    return data.startswith(_TEXT_MARK) or _TEXT_PROBE.match(data) is not None


def parse_sparse(src: ByteSource) -> ImageHeader:
    """Parse a hosted sparse extent (``KDMV``) and its embedded descriptor, if it has one.

    The parent hint is read where qemu reads it (see :func:`_sparse_parent`); the embedded
    descriptor's extent lines, which qemu never opens, are reported as named only (kept, never
    opened). Raises ImageFormatError for an unsupported version, a descriptor out of bounds or
    too large, or a descriptor (or parent hint) that :func:`parse_descriptor` would refuse.
    """
    _, version, _, capacity, _, desc_offset, desc_size = _SPARSE.unpack(
        src.get(0, _SPARSE.size, "vmdk sparse header")
    )
    if version > _MAX_SPARSE_VERSION:
        raise ImageFormatError(f"unsupported vmdk version {version}")
    if capacity == 0 and desc_offset:
        # qemu then opens the embedded descriptor as a descriptor FILE, extents and all: a
        # "sparse" file that makes qemu read other files.
        raise ImageFormatError("vmdk sparse header of capacity 0 with a descriptor")
    create_type = None
    extents: tuple[Extent, ...] = ()
    if desc_offset and desc_size:
        if desc_size * _SECTOR > _MAX_DESCRIPTOR:
            raise ImageFormatError(f"vmdk descriptor of {desc_size} sectors is too large")
        if desc_offset * _SECTOR >= _MAX_OFFSET:
            raise ImageFormatError(f"vmdk descriptor offset {desc_offset} is out of bounds")
        text = src.get(desc_offset * _SECTOR, desc_size * _SECTOR, "vmdk embedded descriptor")
        create_type, _ = _descriptor_fields(text)  # its parent hint is not where qemu reads one
        extents = _extents(_c_string(text), opened=False)
    return ImageHeader(
        format="vmdk",
        backing_file=_sparse_parent(src),
        virtual_size=capacity * _SECTOR,
        create_type=create_type,
        extents=extents,
    )


def parse_cowd(src: ByteSource) -> ImageHeader:
    """Parse an ESX sparse extent (``COWD``, VMDK3): qemu reads a parent hint for it at 0x200.

    Raises ImageFormatError for a truncated header or an ambiguous parent hint.
    """
    _, _, _, sectors = _COWD.unpack(src.get(0, _COWD.size, "vmdk COWD header"))
    return ImageHeader(
        format="vmdk", backing_file=_sparse_parent(src), virtual_size=sectors * _SECTOR
    )


def _sparse_parent(src: ByteSource) -> str | None:
    """The parent hint of a sparse file where qemu reads it: the 20 sectors from 0x200.

    qemu looks there whatever the header says of its descriptor (``vmdk_parent_open``), so that
    is what counts, not the descriptor at the header's offset (the same place in every file
    qemu-img writes). Read like any descriptor key: refused unless unambiguous.
    """
    return _field(_c_string(src.get_upto(_HINT_AT, _HINT_BYTES)), _PARENT_HINT) or None


def parse_descriptor(src: ByteSource) -> ImageHeader:
    """Parse a text descriptor file (monolithicFlat, twoGbMaxExtent*, vmfs*, split snapshots).

    Read as qemu reads it: its first 1 MiB - 1 bytes, up to a NUL. Raises ImageFormatError when
    ``createType`` is missing (qemu refuses such a descriptor), a field we use is unquoted or not
    UTF-8, or an extent line is one qemu refuses or names a file we cannot decode.
    """
    text = _c_string(src.get_upto(0, _DESCRIPTOR_FILE_MAX))
    create_type, parent = _descriptor_fields(text)
    if create_type is None:
        raise ImageFormatError("vmdk descriptor has no createType")
    return ImageHeader(
        format="vmdk",
        backing_file=parent,
        create_type=create_type,
        extents=_extents(text, opened=True),
    )


def _c_string(data: bytes) -> bytes:
    # qemu handles descriptors as C strings: nothing after a NUL exists for it.
    return data.split(b"\0", 1)[0]


def _descriptor_fields(text: bytes) -> tuple[str | None, str | None]:
    # The descriptor is NUL-terminated inside its sectors (qemu stops there too).
    text = text.split(b"\0", 1)[0]
    create_type = _field(text, _CREATE_TYPE)
    parent = _field(text, _PARENT_HINT)
    # An empty hint means no parent, as in qemu.
    return create_type, parent or None


def _field(text: bytes, key: bytes) -> str | None:
    """The value of ``key``, where qemu reads it: refused unless that is unambiguous."""
    name = key.decode()
    count = text.count(key)
    if count == 0:
        return None
    if count > 1:
        raise ImageFormatError(f"vmdk descriptor mentions {name} {count} times")
    at = text.index(key)
    start = text.rfind(b"\n", 0, at) + 1
    end = text.find(b"\n", at)
    line = text[start : len(text) if end < 0 else end]
    before, _, rest = line.partition(key)
    # qemu skips exactly the two bytes after the key: anything but ``key="`` on a line of its
    # own (a comment, spaces around ``=``) is read differently by qemu than it looks.
    if before.strip() or not rest.startswith(b'="'):
        raise ImageFormatError(f'vmdk descriptor field {name} is not a {name}="..." line')
    return _quoted(rest[1:].strip(), key)


def _quoted(value: bytes, key: bytes) -> str:
    # qemu requires the double quotes; without them we would not know where the name ends.
    name = key.decode()
    if len(value) < 2 or not value.startswith(b'"') or not value.endswith(b'"'):
        raise ImageFormatError(f"vmdk descriptor field {name} is not quoted")
    if b'"' in value[1:-1]:
        # qemu stops at the first quote: the rest would be ours alone.
        raise ImageFormatError(f"vmdk descriptor field {name} holds a quote")
    # A parent's name is a file name (any bytes); createType is text.
    decode = decode_file_name if key == b"parentFileNameHint" else decode_name
    return decode(value[1:-1], f"vmdk {name}")


# --- extent lines, read with qemu's sscanf -------------------------------------------------------

_SPACE = frozenset(b" \t\n\v\f\r")  # C isspace()
_NAME_STOP = frozenset(b'\n\r"')
_NAME_MAX = 511
_WORD_MAX = 10
_QUOTE = ord('"')
_INT64 = (-(1 << 63), (1 << 63) - 1)
# Every kind qemu opens; a line of another kind (ZERO, say) is skipped, like a comment.
_KINDS = frozenset({b"FLAT", b"SPARSE", b"VMFS", b"VMFSSPARSE", b"SESPARSE"})
# Access modes qemu skips (it opens RW lines only): what they name is kept, never opened.
_SKIPPED_ACCESS = frozenset({b"RDONLY", b"NOACCESS"})


def _extents(text: bytes, *, opened: bool) -> tuple[Extent, ...]:
    """The extent lines of a descriptor; ``opened``: it is a descriptor file, which qemu reads.

    Lines of an embedded descriptor (qemu never reads them) and lines qemu skips are reported as
    named only, and a line that qemu would refuse in a descriptor file refuses the descriptor.
    """
    found: list[Extent] = []
    start = 0
    while start < len(text):
        matches, access, sectors, kind, raw_name, offset = _scan_extent(text, start)
        line_end = text.find(b"\n", start)
        line = text[start : len(text) if line_end < 0 else line_end]
        start = len(text) if line_end < 0 else line_end + 1
        if matches < 4:
            continue
        if not opened or access != b"RW":
            # qemu opens nothing for this line; what a plausible one names is still kept.
            name = _name_or_none(raw_name)
            if name is not None and (not opened or access in _SKIPPED_ACCESS):
                found.append(_named_only(access, sectors, kind, name))
            continue
        # FLAT needs an offset (>= 0); VMFS, SPARSE, ... must not have one.
        valid = (matches == 5 and offset >= 0) if kind == b"FLAT" else matches == 4
        if not valid:
            shown = line.decode("utf-8", "backslashreplace")
            raise ImageFormatError(f"vmdk extent line qemu refuses: {shown!r}")
        if sectors <= 0 or kind not in _KINDS:
            continue
        name = decode_file_name(raw_name, "vmdk extent file name")
        found.append(Extent("RW", sectors, kind.decode(), name, opened=True))
    return tuple(found)


def _named_only(access: bytes, sectors: int, kind: bytes, name: str) -> Extent:
    return Extent(access.decode("latin-1"), sectors, kind.decode("latin-1"), name, opened=False)


def _name_or_none(raw: bytes) -> str | None:
    try:
        return decode_file_name(raw, "vmdk extent file name")
    except ImageFormatError:
        return None  # named only: nothing qemu opens, and no name we could compare


def _scan_extent(text: bytes, at: int) -> tuple[int, bytes, int, bytes, bytes, int]:
    """glibc's ``sscanf`` of qemu's extent format from ``at``: fields assigned, then the fields.

    ``%10s`` skips white space and takes at most 10 other bytes; ``%ld`` skips white space, takes
    a sign and digits, and saturates; the literal quotes must match; the name is 1 to 511 bytes
    up to a quote or line end. A short count means the scan stopped there (as sscanf's does).
    """
    access, i = _word(text, at)
    if not access:
        return 0, b"", 0, b"", b"", 0
    sectors, i = _integer(text, i)
    if sectors is None:
        return 1, access, 0, b"", b"", 0
    kind, i = _word(text, i)
    if not kind:
        return 2, access, sectors, b"", b"", 0
    i = _skip(text, i)
    if i >= len(text) or text[i] != _QUOTE:
        return 3, access, sectors, kind, b"", 0
    i += 1
    end = i
    while end < len(text) and end - i < _NAME_MAX and text[end] not in _NAME_STOP:
        end += 1
    if end == i:
        return 3, access, sectors, kind, b"", 0
    name, i = text[i:end], end
    if i >= len(text) or text[i] != _QUOTE:
        return 4, access, sectors, kind, name, 0
    offset, _ = _integer(text, i + 1)
    if offset is None:
        return 4, access, sectors, kind, name, 0
    return 5, access, sectors, kind, name, offset


def _skip(text: bytes, i: int) -> int:
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


def _word(text: bytes, i: int) -> tuple[bytes, int]:
    i = end = _skip(text, i)
    while end < len(text) and end - i < _WORD_MAX and text[end] not in _SPACE:
        end += 1
    return text[i:end], end


def _integer(text: bytes, i: int) -> tuple[int | None, int]:
    i = _skip(text, i)
    digits = i + 1 if i < len(text) and text[i] in b"+-" else i
    end = digits
    while end < len(text) and 0x30 <= text[end] <= 0x39:
        end += 1
    if end == digits:
        return None, i
    low, high = _INT64
    return max(low, min(high, int(text[i:end]))), end

"""VMDK: sparse extents (``KDMV``) with an embedded descriptor, and text descriptor files.

Only the descriptor matters here: its ``createType`` and its ``parentFileNameHint``, the name of
the parent (backing) image of a VMDK snapshot.

qemu finds each of those keys with ``strstr``: the FIRST occurrence anywhere in the descriptor,
even inside a comment or another line, then skips two bytes (``="``) and reads up to the next
quote. Reading them any other way lets a descriptor say one thing to us and another to qemu
(``createType="monolithicFlat"`` first, ``createType="monolithicSparse"`` second: CVE-2024-32498
style). So a key that occurs more than once, or whose one occurrence is not a ``key="value"``
line, is refused rather than interpreted.
"""

from __future__ import annotations

import re
import struct

from imagecache.errors import ImageFormatError
from imagecache.formats.header import ByteSource, ImageHeader, decode_name

__all__ = ["SPARSE_MAGIC", "is_text_descriptor", "parse_descriptor", "parse_sparse"]

SPARSE_MAGIC = b"KDMV"
# magic, version, flags, capacity, granularity, descriptorOffset, descriptorSize (little-endian;
# capacity, offsets and sizes in 512-byte sectors)
_SPARSE = struct.Struct("<4sIIQQQQ")
_SECTOR = 512
_MAX_SPARSE_VERSION = 3
# Real embedded descriptors are 20 sectors; a larger one is refused rather than read in full.
_MAX_DESCRIPTOR = 1 << 20
_MAX_OFFSET = 1 << 62

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

    Raises ImageFormatError for an unsupported version, a descriptor out of bounds or too large,
    or a descriptor that :func:`parse_descriptor` refuses.
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
    create_type = parent = None
    if desc_offset and desc_size:
        if desc_size * _SECTOR > _MAX_DESCRIPTOR:
            raise ImageFormatError(f"vmdk descriptor of {desc_size} sectors is too large")
        if desc_offset * _SECTOR >= _MAX_OFFSET:
            raise ImageFormatError(f"vmdk descriptor offset {desc_offset} is out of bounds")
        text = src.get(desc_offset * _SECTOR, desc_size * _SECTOR, "vmdk embedded descriptor")
        create_type, parent = _descriptor_fields(text)
    return ImageHeader(
        format="vmdk",
        backing_file=parent,
        virtual_size=capacity * _SECTOR,
        create_type=create_type,
    )


def parse_descriptor(data: bytes) -> ImageHeader:
    """Parse a text descriptor file (monolithicFlat, twoGbMaxExtent*, vmfs*, split snapshots).

    Raises ImageFormatError when ``createType`` is missing (qemu refuses such a descriptor), or a
    field we use is unquoted or not UTF-8.
    """
    create_type, parent = _descriptor_fields(data)
    if create_type is None:
        raise ImageFormatError("vmdk descriptor has no createType")
    return ImageHeader(format="vmdk", backing_file=parent, create_type=create_type)


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
    return decode_name(value[1:-1], f"vmdk {name}")

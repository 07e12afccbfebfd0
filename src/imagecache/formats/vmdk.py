"""VMDK: sparse extents (``KDMV``) with an embedded descriptor, and text descriptor files.

Only the descriptor matters here: its ``createType`` and its ``parentFileNameHint``, the name of
the parent (backing) image of a VMDK snapshot.
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
    # The descriptor is NUL-terminated inside its sectors.
    text = text.split(b"\0", 1)[0]
    create_type = parent = None
    for line in text.splitlines():
        key, sep, value = line.partition(b"=")
        key = key.strip()
        if not sep or key not in (_CREATE_TYPE, _PARENT_HINT):
            continue
        field = _quoted(value.strip(), key)
        if key == _CREATE_TYPE:
            create_type = field
        else:
            # An empty hint means no parent, as in qemu.
            parent = field or None
    return create_type, parent


def _quoted(value: bytes, key: bytes) -> str:
    # qemu requires the double quotes; without them we would not know where the name ends.
    name = key.decode()
    if len(value) < 2 or not value.startswith(b'"') or not value.endswith(b'"'):
        raise ImageFormatError(f"vmdk descriptor field {name} is not quoted")
    return decode_name(value[1:-1], f"vmdk {name}")

"""What may enter the cache: a downloaded file must be the format it claims, and safe.

Nova's rules (nova-imagecache.md §4.4), checked on the temp file before it is published:

- our own header parser (:func:`imagecache.formats.read_header`) runs first, on bytes only: a
  qcow2 with a backing file or an external data file (named in an extension, or only flagged by
  its incompatible feature bit), a qcow2 v3 with any incompatible feature bit but compression
  type and extended L2 (:data:`QCOW2_ADMITTED_FEATURES`: a dirty or corrupt image, and every bit
  this version does not know, are refused), a VMDK whose ``createType`` is not in
  ``vmdk_allowed_types``, or one with a parent, is refused before any other program opens it
  (``qemu-img info`` would open a data file, or a VMDK's extent files). A VMDK text descriptor is
  refused whatever it says: a downloaded image is one file, and a descriptor only names others;
- then ``qemu-img info`` probes it once; the two must agree (qemu also knows vdi, vhd, vhdx, ...,
  which our parser reads as raw) and qemu must report no backing file or data file either, and
  for a VMDK a create type in ``vmdk_allowed_types`` and no extent but the file itself (the
  parser and qemu must not be able to disagree about which files a VMDK reads);
- the detected format must equal the claimed ``disk_format``; ``iso``, ``aki``, ``ari`` and
  ``ami`` are expected to be raw. No claim (a URL) accepts whatever was detected, if allowed;
- only the formats Nova has inspectors for are allowed, claimed or detected: raw, qcow2, vmdk,
  vhd (qemu's vpc), vhdx and vdi. qemu opens many more (qed, dmg, cloop, bochs, parallels,
  luks, ...), each a parser of untrusted bytes that no cached image needs.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from imagecache.errors import ImageFormatError, UnsafeImageError
from imagecache.formats import read_header, vmdk
from imagecache.images import process

__all__ = ["QCOW2_ADMITTED_FEATURES", "Admitted", "check_format", "check_raw"]

# Glance disk_format -> the format the bytes must have (qemu's names differ for two of them).
_EXPECTED: Mapping[str, str] = MappingProxyType(
    {"iso": "raw", "aki": "raw", "ari": "raw", "ami": "raw", "vhd": "vpc"}
)
_OURS = frozenset({"raw", "qcow2", "vmdk"})  # what formats.read_header recognises
# qemu's names of the formats an image may have; Glance's are these (vpc as vhd) and _EXPECTED.
_ALLOWED = frozenset({"raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi"})

# qcow2 v3 incompatible_features (docs/interop/qcow2.txt): a 64-bit big-endian field at offset 72
# that qemu refuses to open with a bit it does not know. Read here, bounds-checked, because the
# header parser does not expose it.
_QCOW2_FEATURES = struct.Struct(">Q")
_QCOW2_FEATURES_OFFSET = 72
_QCOW2_FEATURE_NAMES: Mapping[int, str] = MappingProxyType(
    {
        0: "dirty (refcounts need repair)",
        1: "corrupt",
        2: "external data file",
        3: "compression type",
        4: "extended L2 entries",
    }
)
#: The incompatible feature bits an admitted qcow2 may have: a compression type (zstd) and
#: extended L2 entries (subclusters) change only how the image's own clusters are stored. Dirty
#: and corrupt images need a repair that writes to them; an external data file makes qemu open
#: another file; an unknown bit is a format this version cannot reason about.
QCOW2_ADMITTED_FEATURES = frozenset({3, 4})


@dataclass(frozen=True, slots=True)
class Admitted:
    """A file that passed: its format (Glance's name) and qemu's name for ``-f``."""

    format: str
    qemu_format: str
    virtual_size: int | None


def check_format(
    path: str | os.PathLike[str],
    *,
    claimed: str | None,
    vmdk_allowed_types: Collection[str],
) -> Admitted:
    """Check the downloaded file at ``path`` against its ``claimed`` Glance disk format.

    Raises:
        UnsafeImageError: a backing file, a data file, a qcow2 incompatible feature not in
            :data:`QCOW2_ADMITTED_FEATURES`, a VMDK text descriptor, a VMDK type not allowed or
            extents other than the file itself, a format (claimed or found) not allowed, or a
            format other than the claimed one.
        ImageFormatError: a header that cannot be parsed, or our parser and qemu disagree.
        ProcessError: qemu-img cannot read the file.
        OSError: the file cannot be read.
    """
    expected = _EXPECTED.get(claimed, claimed) if claimed else None
    if expected is not None and expected not in _ALLOWED:
        raise UnsafeImageError(f"disk_format {claimed!r} is not an allowed disk format")
    header = read_header(path)
    if header.backing_file is not None:
        raise UnsafeImageError(f"{header.format} image has a backing file {header.backing_file!r}")
    if header.data_file is not None:
        raise UnsafeImageError(f"qcow2 image has an external data file {header.data_file!r}")
    if header.format == "qcow2" and header.version == 3:
        _check_qcow2_features(path)
    if header.format == "vmdk":
        if not _is_sparse_vmdk(path):
            raise UnsafeImageError("a vmdk text descriptor names other files: not one image")
        _check_vmdk_type(header.create_type, vmdk_allowed_types)
    info = process.qemu_img_info(path)
    qemu_format = str(info.get("format", ""))
    _check_qemu_agrees(header.format, qemu_format, info)
    if qemu_format == "vmdk":
        _check_qemu_vmdk(path, info, vmdk_allowed_types)
    if qemu_format not in _ALLOWED:
        raise UnsafeImageError(f"{qemu_format!r} is not an allowed disk format")
    if expected is not None and qemu_format != expected:
        raise UnsafeImageError(
            f"the image claims disk_format {claimed!r}, its bytes are {_glance_name(qemu_format)}"
        )
    size = info.get("virtual-size")
    return Admitted(
        format=_glance_name(qemu_format),
        qemu_format=qemu_format,
        virtual_size=size if isinstance(size, int) else None,
    )


def check_raw(path: str | os.PathLike[str]) -> None:
    """Check that ``path``, the output of a conversion to raw, reads as raw to us and to qemu.

    Nova's "Converted to raw, but format is now ...": a clean image whose guest data starts like
    another format (a VMDK descriptor naming a host file, a qcow2 with a backing file) would be
    probed as that format by anything that opens the base without ``-f raw``.

    Raises UnsafeImageError when either reads another format, ImageFormatError when our parser
    cannot parse the header it sees, ProcessError or OSError as :func:`check_format`.
    """
    ours = read_header(path).format
    if ours != "raw":
        raise UnsafeImageError(f"converted to raw, but its bytes now read as {ours}")
    qemu_format = process.qemu_img_info(path).get("format")
    if qemu_format != "raw":
        raise UnsafeImageError(f"converted to raw, but qemu-img now reads {qemu_format!r}")


def _check_qcow2_features(path: str | os.PathLike[str]) -> None:
    with open(path, "rb") as f:
        f.seek(_QCOW2_FEATURES_OFFSET)
        raw = f.read(_QCOW2_FEATURES.size)
    if len(raw) != _QCOW2_FEATURES.size:
        raise ImageFormatError("qcow2 v3 header ends before its incompatible features")
    (bits,) = _QCOW2_FEATURES.unpack(raw)
    refused = [bit for bit in range(64) if bits >> bit & 1 and bit not in QCOW2_ADMITTED_FEATURES]
    if refused:
        names = ", ".join(f"bit {b} ({_QCOW2_FEATURE_NAMES.get(b, 'unknown')})" for b in refused)
        raise UnsafeImageError(f"qcow2 image has incompatible features imagecache refuses: {names}")


def _check_qemu_agrees(ours: str, qemu_format: str, info: Mapping[str, Any]) -> None:
    # Formats only qemu knows (vdi, vhd, ...) read as raw to us; anything else must agree.
    if (qemu_format in _OURS or ours != "raw") and qemu_format != ours:
        raise ImageFormatError(f"our parser reads {ours}, qemu-img reads {qemu_format!r}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise UnsafeImageError(f"qemu-img reports a backing file {info.get('backing-filename')!r}")
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict) and data.get("data-file"):
        raise UnsafeImageError(f"qemu-img reports an external data file {data['data-file']!r}")


def _is_sparse_vmdk(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as f:
        return f.read(len(vmdk.SPARSE_MAGIC)) == vmdk.SPARSE_MAGIC


def _check_vmdk_type(create_type: object, allowed: Collection[str]) -> None:
    if create_type not in allowed:
        raise UnsafeImageError(
            f"vmdk create type {create_type!r} is not in [imagecache] vmdk_allowed_types "
            f"({', '.join(sorted(allowed)) or 'empty'})"
        )


def _check_qemu_vmdk(
    path: str | os.PathLike[str], info: Mapping[str, Any], allowed: Collection[str]
) -> None:
    # What qemu will do with the file, checked again from qemu's own view (Nova checks
    # create-type there only; the extents close the gap if our parser ever misreads one).
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if not isinstance(data, dict):
        raise UnsafeImageError("qemu-img reports no vmdk details: create type unknown")
    _check_vmdk_type(data.get("create-type"), allowed)
    extents = data.get("extents")
    if not isinstance(extents, list) or not extents:
        raise UnsafeImageError("qemu-img reports no vmdk extents")
    itself = os.fspath(path)
    for extent in extents:
        name = extent.get("filename") if isinstance(extent, dict) else None
        if not isinstance(name, str) or (
            name != itself and os.path.realpath(name) != os.path.realpath(itself)
        ):
            raise UnsafeImageError(f"vmdk extent {name!r} is not the image file itself")


def _glance_name(qemu_format: str) -> str:
    return "vhd" if qemu_format == "vpc" else qemu_format

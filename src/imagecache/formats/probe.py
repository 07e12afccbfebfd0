"""Recognise an image by its first bytes and parse its header: from bytes, or from a file."""

from __future__ import annotations

import os
import stat

from imagecache.errors import UnsafeImageError
from imagecache.formats import qcow2, vmdk
from imagecache.formats.header import HEAD_BYTES, RAW, ByteSource, ImageHeader, ReadAt

__all__ = ["parse_header", "read_header", "read_header_data", "read_header_stat"]

# O_NONBLOCK: opening a FIFO must not wait for a writer. O_NOCTTY: opening a tty must not make it
# our controlling terminal. Neither changes how regular files or block devices are read.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
# What is read first. A qcow2 or VMDK sparse header, its extensions and the backing name lie in
# the first few hundred bytes, and whatever lies further is read on demand (``read_at``); a
# scan reads tens of thousands of disks, and copying 64 KiB instead of 4 KiB from the page cache
# triples the cost of each. Anything else gets the rest of :data:`HEAD_BYTES` before it is probed.
_FIRST_READ = 4096
# QED images can have a backing file, and qemu opens them; we do not parse them, so a QED disk is
# an image we cannot follow: refused as unparsable (blocking, unless a guest wrote the bytes).
QED_MAGIC = b"QED\0"
_BINARY_MAGICS = (qcow2.MAGIC, vmdk.SPARSE_MAGIC, vmdk.COWD_MAGIC, QED_MAGIC)


def parse_header(data: bytes, *, read_at: ReadAt | None = None) -> ImageHeader:
    """Parse the header in ``data``, the first :data:`HEAD_BYTES` (or all) of a file.

    ``read_at(offset, length)`` is called for anything a qcow2 or VMDK header points at beyond
    ``data``; it returns fewer bytes at the end of the file. Anything not recognised is raw.

    Raises ImageFormatError when a recognised magic is followed by a truncated, inconsistent or
    out-of-bounds header, or by names that cannot be decoded.
    """
    src = ByteSource(data, read_at)
    magic = data[:4]
    if magic == qcow2.MAGIC:
        return qcow2.parse_qcow2(src)
    if magic == vmdk.SPARSE_MAGIC:
        return vmdk.parse_sparse(src)
    if magic == vmdk.COWD_MAGIC:
        return vmdk.parse_cowd(src)
    if magic == QED_MAGIC:
        raise UnsafeImageError(
            "'qed' is not an allowed disk format: its backing file cannot be followed"
        )
    if vmdk.is_text_descriptor(data):
        return vmdk.parse_descriptor(src)
    return RAW


def read_header(path: str | os.PathLike[str]) -> ImageHeader:
    """Read and parse the header of the file at ``path``.

    Anything but a regular file or a block device (a FIFO, a directory, a socket) is raw and is
    not read. Raises OSError (unchanged) when the file cannot be opened or read, ImageFormatError
    as :func:`parse_header`.
    """
    return read_header_stat(path)[0]


def read_header_stat(path: str | os.PathLike[str]) -> tuple[ImageHeader, os.stat_result]:
    """:func:`read_header`, with the ``fstat`` of the file that was read (for loop detection).

    The type is checked only after opening, which has effects on some devices: for a name taken
    from a header, ``stat`` first (as :class:`~imagecache.formats.chain.HeaderCache` does).
    Raises as :func:`read_header`.
    """
    header, st, _ = read_header_data(path)
    return header, st


def read_header_data(
    path: str | os.PathLike[str],
) -> tuple[ImageHeader, os.stat_result, bytes]:
    """:func:`read_header_stat`, with the first bytes that were read (b"" for what is not read).

    The whole file when it is short (a ``disk.info``): the scan reads every file of an instance
    directory anyway, and this saves opening the small ones a second time.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            return RAW, st, b""
        data = os.read(fd, _FIRST_READ)
        if data[:4] == qcow2.MAGIC and (header := qcow2.parse_common(data)) is not None:
            return header, st, data  # nearly every instance disk (see tests/test_fastpath.py)
        if len(data) == _FIRST_READ and data[:4] not in _BINARY_MAGICS:
            data += os.read(fd, HEAD_BYTES - _FIRST_READ)
        header = parse_header(data, read_at=lambda offset, length: os.pread(fd, length, offset))
        return header, st, data
    finally:
        os.close(fd)

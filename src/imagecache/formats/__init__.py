"""Image headers (qcow2, VMDK, raw) parsed from bytes, and backing chains followed through them.

No process per disk: headers are read from the files themselves (one open, one read).
"""

from __future__ import annotations

from imagecache.formats.attached import DATA_FILE, EXTENT, AttachedFile
from imagecache.formats.chain import (
    MAX_CHAIN_DEPTH,
    BackingChain,
    follow_chain,
    resolve_chain,
    stat_names,
)
from imagecache.formats.header import HEAD_BYTES, Extent, ImageHeader
from imagecache.formats.probe import parse_header, read_header, read_header_data, read_header_stat

__all__ = [
    "DATA_FILE",
    "EXTENT",
    "HEAD_BYTES",
    "MAX_CHAIN_DEPTH",
    "AttachedFile",
    "BackingChain",
    "Extent",
    "ImageHeader",
    "follow_chain",
    "parse_header",
    "read_header",
    "read_header_data",
    "read_header_stat",
    "resolve_chain",
    "stat_names",
]

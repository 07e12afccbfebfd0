"""Image headers (qcow2, VMDK, raw) parsed from bytes, and backing chains followed through them.

No process per disk: headers are read from the files themselves (one open, one read).
"""

from __future__ import annotations

from imagecache.formats.chain import MAX_CHAIN_DEPTH, BackingChain, resolve_chain
from imagecache.formats.header import HEAD_BYTES, ImageHeader
from imagecache.formats.probe import parse_header, read_header

__all__ = [
    "HEAD_BYTES",
    "MAX_CHAIN_DEPTH",
    "BackingChain",
    "ImageHeader",
    "parse_header",
    "read_header",
    "resolve_chain",
]

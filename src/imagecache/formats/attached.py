"""Files an image keeps guest bytes in besides itself: qcow2 data files, VMDK extents.

They are found by ``stat`` (opened only when qemu parses them, as it does a sparse extent's
header), through the scan's :class:`~imagecache.formats.chain.HeaderCache`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imagecache.formats.header import ImageHeader
from imagecache.formats.paths import backing_path, pathlib_form

if TYPE_CHECKING:
    from imagecache.formats.chain import HeaderCache

__all__ = ["DATA_FILE", "EXTENT", "AttachedFile", "attached_files"]

DATA_FILE = "data file"
EXTENT = "vmdk extent"


@dataclass(frozen=True, slots=True)
class AttachedFile:
    """A file an image of the chain keeps guest bytes in: a qcow2 data file or a VMDK extent.

    ``role`` is :data:`DATA_FILE` or :data:`EXTENT`; ``depth`` is 0 for the top image and n for
    its n-th backing file; ``path`` is absolute and normalised. ``file_id`` is its
    ``(st_dev, st_ino)`` by ``stat`` (symlinks followed), None when it is ``missing`` or cannot be
    stat()ed. ``opened``: qemu opens it; otherwise the header only names it (a data file without
    the feature bit, an extent line qemu skips, any name in bytes a guest wrote), which is kept
    (the safe side) but can be no gap in the view.
    """

    role: str
    depth: int
    path: str
    file_id: tuple[int, int] | None
    opened: bool
    missing: bool = False


def attached_files(
    image: str, header: ImageHeader, depth: int, reads: HeaderCache, *, follow: bool
) -> tuple[tuple[AttachedFile, ...], str | None]:
    """The data file and extents ``header`` (of the image opened as ``image``) names, and the
    first reason one qemu would open cannot be resolved or read (None if none)."""
    if header.data_file is None and not header.external_data and not header.extents:
        return (), None  # nearly every image: nothing to do
    found: list[AttachedFile] = []
    errors: list[str] = []
    if header.data_file is not None:
        # qemu opens the name only with the incompatible bit set, as a protocol name (json:,
        # nbd:, ... included), and never probes its format: stat, never open. A relative name is
        # taken against the image's directory, as libvirt does (qemu alone would take its own
        # working directory, which means nothing here).
        opens = follow and header.external_data
        target, why = backing_path(image, header.data_file, DATA_FILE)
        if target is not None:
            found.append(
                _attach(DATA_FILE, depth, target, reads, opens=opens, parse=False, errors=errors)
            )
        elif opens and why is not None:
            errors.append(why)
    elif header.external_data and follow:
        errors.append("external data file bit set without a name: qemu needs a data-file option")
    for extent in header.extents:
        # qemu joins a relative name to the descriptor's directory, with no protocol parsing.
        name = extent.filename
        joined = name if name.startswith("/") else os.path.join(os.path.dirname(image), name)
        path = pathlib_form(joined)
        if path == image:
            continue  # a sparse file's own descriptor names the file itself
        opens = follow and extent.opened
        parse = opens and extent.parsed
        found.append(_attach(EXTENT, depth, path, reads, opens=opens, parse=parse, errors=errors))
    return tuple(found), (errors[0] if errors else None)


def _attach(
    role: str,
    depth: int,
    target: str,
    reads: HeaderCache,
    *,
    opens: bool,
    parse: bool,
    errors: list[str],
) -> AttachedFile:
    """``target`` found through ``reads`` (its header read only if ``parse``); a problem with a
    file qemu ``opens`` goes to ``errors``."""
    path, outcome = reads.read(target, parse=parse)
    if isinstance(outcome, tuple):
        st = outcome[1]
        if opens and not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            errors.append(f"{role} {path} is not a regular file or block device")
        return AttachedFile(role, depth, path, (st.st_dev, st.st_ino), opened=opens)
    missing = isinstance(outcome, FileNotFoundError)
    if opens and not missing:
        errors.append(f"cannot read {role} {path}: {outcome}")
    return AttachedFile(role, depth, path, None, opened=opens, missing=missing)

"""Follow an image's backing chain through the headers themselves, without running qemu-img.

Besides its backing files, an image of the chain may keep the guest's bytes in other files: a
qcow2 external data file, a VMDK descriptor's extents. Those are found too (by ``stat``; opened
only when qemu parses them, as it does a sparse extent's header) at the depth of their image.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from imagecache.errors import ImageFormatError
from imagecache.formats.attached import AttachedFile, attached_files
from imagecache.formats.header import RAW, ImageHeader
from imagecache.formats.paths import backing_path, lexically_normal, pathlib_form, report_path
from imagecache.formats.probe import read_header_stat

__all__ = [
    "MAX_CHAIN_DEPTH",
    "BackingChain",
    "HeaderCache",
    "follow_chain",
    "resolve_chain",
    "stat_names",
]

MAX_CHAIN_DEPTH = 16

# Backing formats qemu opens without looking at the bytes (``raw``, and the protocol drivers that
# pass them through, which ``qemu-img create -F file`` records as well): nothing in such a file
# is a header, whatever its first bytes say.
_UNINTERPRETED_FORMATS = frozenset({"raw", "file", "host_device", "host_cdrom"})

# What reading one file gave: its header and fstat, or why it could not be read.
_Outcome = tuple[ImageHeader, os.stat_result] | OSError | ImageFormatError


@dataclass(frozen=True, slots=True)
class _Walk:
    """What following a chain found below its top image: the fields of :class:`BackingChain`."""

    links: tuple[str, ...]
    link_ids: tuple[tuple[int, int], ...]
    attached: tuple[AttachedFile, ...]
    missing: str | None
    error: str | None
    too_deep: bool


@dataclass(frozen=True, slots=True)
class BackingChain:
    """An image and the backing files it depends on, nearest first.

    ``links`` holds absolute, normalised paths; a backing file that does not exist is the last
    link and is also ``missing`` (that is not an error). ``error`` says why the chain could not be
    followed to its end; the links found before that are still there. ``link_ids`` holds the
    ``(st_dev, st_ino)`` of each link, in the same order, as the file was found through its name
    (symlinks followed); a last link that is missing or could not be read has none.
    """

    path: str
    header: ImageHeader
    links: tuple[str, ...]
    missing: str | None = None
    error: str | None = None
    link_ids: tuple[tuple[int, int], ...] = ()
    too_deep: bool = False  # the error is the depth limit (a legitimate run of snapshots)
    file_id: tuple[int, int] | None = None  # the top image's own, by fstat of the file read
    nlink: int = 1  # the top image's link count (another name may be a cache entry)
    attached: tuple[AttachedFile, ...] = ()
    followed: bool = True  # False: names were only stat()ed (bytes no one parses: a guest's)

    @property
    def complete(self) -> bool:
        """True when every backing file was found and read (a missing one included)."""
        return self.error is None

    @property
    def missing_attached(self) -> tuple[str, ...]:
        """Paths of the data files and extents qemu opens that do not exist."""
        return tuple(a.path for a in self.attached if a.opened and a.missing)


class HeaderCache:
    """Backing files already read, by the path opened, for the chains of one scan.

    Thousands of disks share a few hundred base images; with one cache passed to every
    :func:`resolve_chain` of a scan, each base is opened once and every chain sees what it said
    then (a snapshot, which is all one scan is anyway). Not for keeping across scans.
    """

    __slots__ = ("_reads", "_unparsed", "tails")

    def __init__(self) -> None:
        self._reads: dict[str, tuple[str, _Outcome]] = {}
        self._unparsed: set[str] = set()  # found by stat alone so far, header not read
        # What follows a top image's header, by what that depends on (see follow_chain): the
        # overlays of one base all walk the same backing files. Only what was read through this
        # cache is replayed, and a header read again (see read) empties it.
        self.tails: dict[tuple[str, str, str | None, int], _Walk] = {}

    def __len__(self) -> int:
        return len(self._reads)

    def read(self, opened: str, *, parse: bool = True) -> tuple[str, _Outcome]:
        """The reported path of ``opened`` and what reading it gave; read on first use only.

        With ``parse`` false the file is found by ``stat`` alone, never opened, and its header is
        reported as RAW: for a backing file declared raw, whose bytes mean nothing.
        """
        found = self._reads.get(opened)
        if found is None or (parse and opened in self._unparsed):
            outcome = _read_backing(opened, parse=parse)
            if parse and opened in self._unparsed:
                self._unparsed.discard(opened)
                self.tails.clear()  # some may have seen the file found by stat alone
            elif isinstance(outcome, tuple):
                self._unparsed.add(opened)
            found = self._reads[opened] = (report_path(opened), outcome)
        return found


def _read_backing(path: str, *, parse: bool) -> _Outcome:
    """Header and stat of a backing file, which is opened only if it is a file or block device.

    Backing names come from headers, which a tenant can influence: merely opening a device has
    effects (a watchdog arms, a tape rewinds), so anything else is refused on ``stat`` alone and
    gets the RAW header, which the chain then reports as not a file. ``read_header_stat`` checks
    again after opening, should the name change in between.
    """
    try:
        st = os.stat(path)
        if not parse or not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            return RAW, st
        return read_header_stat(path)
    except (OSError, ImageFormatError) as exc:
        return exc


def resolve_chain(
    path: str | os.PathLike[str],
    *,
    max_depth: int = MAX_CHAIN_DEPTH,
    headers: HeaderCache | None = None,
) -> BackingChain:
    """Read ``path`` and follow its backing files, at most ``max_depth`` of them.

    :func:`follow_chain` of the header read. Raises OSError or ImageFormatError when the top
    image itself cannot be read or parsed.
    """
    top = _absolute(path)
    header, st = read_header_stat(top)
    return follow_chain(top, header, st, max_depth=max_depth, headers=headers)


def follow_chain(
    path: str | os.PathLike[str],
    header: ImageHeader,
    st: os.stat_result,
    *,
    max_depth: int = MAX_CHAIN_DEPTH,
    headers: HeaderCache | None = None,
) -> BackingChain:
    """The chain of the image at ``path``, whose ``header`` and ``fstat`` were just read.

    Relative backing names are resolved against the directory of the image that names them, as
    qemu does. A backing file its image declares raw is recorded (found by ``stat``) but never
    opened or parsed, as qemu never parses it: its bytes are a guest's, and a header forged there
    could name any host path or, garbled, make the view incomplete. ``json:`` and other protocol
    names, loops, more than ``max_depth`` backing files, and backing files that cannot be read or
    parsed end the chain with an ``error``. Backing files are read through ``headers`` when given
    (see :class:`HeaderCache`).

    Every image's data file and extents are an :class:`AttachedFile` at its depth, found by
    ``stat`` (a sparse extent's header is read too, as qemu parses it). One qemu opens that is
    missing is listed in ``missing_attached``; one it would open that cannot be resolved or read
    (a ``json:`` data file, a data-file bit without a name) is an ``error``, and the chain is
    followed on. Never raises.
    """
    # Opened (and relative names resolved) as given, like qemu; only the reported path is normal.
    # (pathlib's form, which keeps ``..`` components, which is what qemu does too.)
    top_path = _absolute(path)
    top_id = (st.st_dev, st.st_ino)
    name = header.backing_file
    walk = None
    if headers is not None and name is not None and not _attaches(header):
        # Nearly every disk of a scan: its walk depends only on the name (and, for a relative
        # one, the directory it is resolved in) and the format declared, and on what the
        # backing files say, read through the scan's cache anyway. Not if it leads back to
        # this very disk (a loop): that one is walked afresh.
        where = "" if name.startswith("/") else os.path.dirname(top_path)
        key = (name, where, header.backing_format, max_depth)
        walk = headers.tails.get(key)
        if walk is None:
            walk = headers.tails[key] = _walk(top_path, header, headers, max_depth, set())
        if top_id in walk.link_ids:
            walk = None
    if walk is None:
        reads = HeaderCache() if headers is None else headers
        walk = _walk(top_path, header, reads, max_depth, {top_id})
    return BackingChain(
        lexically_normal(top_path),
        header,
        walk.links,
        walk.missing,
        walk.error,
        walk.link_ids,
        walk.too_deep,
        top_id,
        st.st_nlink,
        walk.attached,
    )


def _attaches(header: ImageHeader) -> bool:
    return header.data_file is not None or header.external_data or bool(header.extents)


def _walk(
    opened: str,
    header: ImageHeader,
    reads: HeaderCache,
    max_depth: int,
    seen: set[tuple[int, int]],
) -> _Walk:
    """Follow the chain below the image opened as ``opened`` (see :func:`follow_chain`);
    ``seen``: the files met so far (a loop ends at one of them)."""
    links: list[str] = []
    ids: list[tuple[int, int]] = []
    attached: list[AttachedFile] = []
    missing = error = None
    too_deep = False
    while True:
        if _attaches(header):
            found, why = attached_files(opened, header, len(links), reads, follow=True)
            attached += found
            error = error or why
        if header.backing_file is None:
            break
        target, why = backing_path(opened, header.backing_file)
        if target is None:
            error = error or why
            break
        if len(links) >= max_depth:
            error = f"backing chain is deeper than {max_depth} files"
            too_deep = True
            break
        declared_raw = header.backing_format in _UNINTERPRETED_FORMATS
        link, outcome = reads.read(target, parse=not declared_raw)
        if not isinstance(outcome, tuple):
            links.append(link)
            if isinstance(outcome, FileNotFoundError):
                missing = link
            else:
                error = error or f"cannot read backing file {link}: {outcome}"
            break
        header, st = outcome
        file_id = (st.st_dev, st.st_ino)
        if file_id in seen:
            error = error or f"backing chain loops back to {link}"
            break
        seen.add(file_id)
        links.append(link)
        ids.append(file_id)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            error = error or f"backing file {link} is not a regular file or block device"
            break
        if declared_raw:
            break
        opened = target
    return _Walk(tuple(links), tuple(ids), tuple(attached), missing, error, too_deep)


def stat_names(
    path: str | os.PathLike[str],
    header: ImageHeader,
    st: os.stat_result,
    *,
    headers: HeaderCache | None = None,
) -> BackingChain:
    """What the header of ``path`` names, found by ``stat`` alone: for bytes no one parses.

    A guest writes its raw disks and its console log; a header forged there names files that
    still count as users (keeping too much is safe), but none of them is opened and no chain is
    followed through them. The one backing file named is the only link; nothing is ``opened``,
    so nothing missing is a gap. ``error`` says why a name could not be resolved. Never raises.
    """
    opened = _absolute(path)
    reads = HeaderCache() if headers is None else headers
    attached, _ = attached_files(opened, header, 0, reads, follow=False)
    links: list[str] = []
    ids: list[tuple[int, int]] = []
    missing = error = None
    if header.backing_file is not None:
        target, error = backing_path(opened, header.backing_file)
        if target is not None:
            link, outcome = reads.read(target, parse=False)
            links.append(link)
            if isinstance(outcome, tuple):
                ids.append((outcome[1].st_dev, outcome[1].st_ino))
            elif isinstance(outcome, FileNotFoundError):
                missing = link
            else:
                error = f"cannot stat backing file {link}: {outcome}"
    return BackingChain(
        path=lexically_normal(opened),
        header=header,
        links=tuple(links),
        missing=missing,
        error=error,
        link_ids=tuple(ids),
        file_id=(st.st_dev, st.st_ino),
        nlink=st.st_nlink,
        attached=attached,
        followed=False,
    )


def _absolute(path: str | os.PathLike[str]) -> str:
    given = os.fspath(path)
    return pathlib_form(given if given.startswith("/") else os.path.join(os.getcwd(), given))

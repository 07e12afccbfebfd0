"""Follow an image's backing chain through the headers themselves, without running qemu-img."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath

from imagecache.errors import ImageFormatError
from imagecache.formats.header import RAW, ImageHeader
from imagecache.formats.probe import read_header_stat

__all__ = ["MAX_CHAIN_DEPTH", "BackingChain", "HeaderCache", "resolve_chain"]

MAX_CHAIN_DEPTH = 16

# Backing formats qemu opens without looking at the bytes (``raw``, and the protocol drivers that
# pass them through, which ``qemu-img create -F file`` records as well): nothing in such a file
# is a header, whatever its first bytes say.
_UNINTERPRETED_FORMATS = frozenset({"raw", "file", "host_device", "host_cdrom"})

# What reading one file gave: its header and fstat, or why it could not be read.
_Outcome = tuple[ImageHeader, os.stat_result] | OSError | ImageFormatError


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

    @property
    def complete(self) -> bool:
        """True when every backing file was found and read (a missing one included)."""
        return self.error is None


class HeaderCache:
    """Backing files already read, by the path opened, for the chains of one scan.

    Thousands of disks share a few hundred base images; with one cache passed to every
    :func:`resolve_chain` of a scan, each base is opened once and every chain sees what it said
    then (a snapshot, which is all one scan is anyway). Not for keeping across scans.
    """

    __slots__ = ("_reads", "_unparsed")

    def __init__(self) -> None:
        self._reads: dict[str, tuple[str, _Outcome]] = {}
        self._unparsed: set[str] = set()  # found by stat alone so far, header not read

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
            if parse:
                self._unparsed.discard(opened)
            elif isinstance(outcome, tuple):
                self._unparsed.add(opened)
            found = self._reads[opened] = (_report_path(opened), outcome)
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

    Relative backing names are resolved against the directory of the image that names them, as
    qemu does. A backing file its image declares raw is recorded (found by ``stat``) but never
    opened or parsed, as qemu never parses it: its bytes are a guest's, and a header forged there
    could name any host path or, garbled, make the view incomplete. ``json:`` and other protocol
    names, loops, more than ``max_depth`` backing files, and backing files that cannot be read or
    parsed end the chain with an ``error``. Backing
    files are read through ``headers`` when given (see :class:`HeaderCache`); the top image is
    always read afresh.

    Raises OSError or ImageFormatError when the top image itself cannot be read or parsed.
    """
    # Opened (and relative names resolved) as given, like qemu; only the reported path is normal.
    # (pathlib's form, which keeps ``..`` components, which is what qemu does too.)
    given = os.fspath(path)
    opened = top_path = _pathlib_form(
        given if given.startswith("/") else os.path.join(os.getcwd(), given)
    )
    top, st = read_header_stat(opened)
    seen = {(st.st_dev, st.st_ino)}
    reads = HeaderCache() if headers is None else headers
    links: list[str] = []
    ids: list[tuple[int, int]] = []
    missing = error = None
    too_deep = False
    header = top
    while header.backing_file is not None:
        target, error = _backing_path(opened, header.backing_file)
        if target is None:
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
                error = f"cannot read backing file {link}: {outcome}"
            break
        header, st = outcome
        file_id = (st.st_dev, st.st_ino)
        if file_id in seen:
            error = f"backing chain loops back to {link}"
            break
        seen.add(file_id)
        links.append(link)
        ids.append(file_id)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            error = f"backing file {link} is not a regular file or block device"
            break
        if declared_raw:
            break
        opened = target
    return BackingChain(
        path=_lexically_normal(top_path),
        header=top,
        links=tuple(links),
        missing=missing,
        error=error,
        link_ids=tuple(ids),
        too_deep=too_deep,
    )


def _pathlib_form(path: str) -> str:
    """``str(PurePosixPath(path))`` (no ``//``, ``.`` or trailing ``/``; ``..`` kept), cheaply.

    Paths are handled as strings because a scan resolves tens of thousands of them; this keeps
    exactly the form pathlib gave before (a trailing slash dropped, say), and takes the shortcut
    only for paths that are already in it, which is nearly all of them.
    """
    if (
        path.startswith("/")
        and not path.endswith(("/", "/."))
        and "//" not in path
        and "/./" not in path
    ):
        return path
    return str(PurePosixPath(path))


def _backing_path(overlay: str, name: str) -> tuple[str | None, str | None]:
    """The path qemu would open for backing ``name`` of ``overlay``, or None and why not."""
    if name.startswith("json:"):
        return None, f"backing file is a json: pseudo-filename: {name}"
    # qemu's path_has_protocol: a colon before any slash makes a protocol name (nbd:, rbd:, ...).
    colon, slash = name.find(":"), name.find("/")
    if colon >= 0 and (slash < 0 or colon < slash):
        protocol, rest = name[:colon], name[colon + 1 :]
        # file: is the local file protocol; a relative name after it would depend on the working
        # directory of whichever qemu opens it, so only an absolute one can be followed.
        if protocol == "file" and rest.startswith("/"):
            return _pathlib_form(rest), None
        return None, f"backing file is not a local path: {name}"
    # An absolute name stays as is: joining an absolute path replaces the directory.
    if name.startswith("/"):
        return _pathlib_form(name), None
    return _pathlib_form(os.path.join(os.path.dirname(overlay), name)), None


def _lexically_normal(path: str) -> str:
    """``os.path.normpath`` of a path in pathlib's form, which only ``..`` can change."""
    return os.path.normpath(path) if "/.." in path else path


def _report_path(opened: str) -> str:
    """``opened`` (absolute), normalised without changing which file it names.

    normpath collapses ``dir/..`` lexically, which is wrong when ``dir`` is a symlink; the kernel
    (and qemu) follow the link first. So a path with ``..`` gets its directory resolved.
    """
    if ".." not in opened.split("/"):
        return _lexically_normal(opened)
    parent, name = os.path.split(opened)
    return os.path.normpath(os.path.join(os.path.realpath(parent), name))

"""Follow an image's backing chain through the headers themselves, without running qemu-img."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from imagecache.errors import ImageFormatError
from imagecache.formats.header import ImageHeader
from imagecache.formats.probe import read_header_stat

__all__ = ["MAX_CHAIN_DEPTH", "BackingChain", "resolve_chain"]

MAX_CHAIN_DEPTH = 16


@dataclass(frozen=True, slots=True)
class BackingChain:
    """An image and the backing files it depends on, nearest first.

    ``links`` holds absolute, normalised paths; a backing file that does not exist is the last
    link and is also ``missing`` (that is not an error). ``error`` says why the chain could not be
    followed to its end; the links found before that are still there.
    """

    path: str
    header: ImageHeader
    links: tuple[str, ...]
    missing: str | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        """True when every backing file was found and read (a missing one included)."""
        return self.error is None


def resolve_chain(
    path: str | os.PathLike[str], *, max_depth: int = MAX_CHAIN_DEPTH
) -> BackingChain:
    """Read ``path`` and follow its backing files, at most ``max_depth`` of them.

    Relative backing names are resolved against the directory of the image that names them, as
    qemu does; ``json:`` and other protocol names, loops, more than ``max_depth`` backing files,
    and backing files that cannot be read or parsed end the chain with an ``error``.

    Raises OSError or ImageFormatError when the top image itself cannot be read or parsed.
    """
    # Opened (and relative names resolved) as given, like qemu; only the reported path is normal.
    # (pathlib keeps ``..`` components, which is what qemu does too.)
    opened = top_path = Path.cwd() / path
    top, st = read_header_stat(opened)
    seen = {(st.st_dev, st.st_ino)}
    links: list[str] = []
    missing = error = None
    header = top
    while header.backing_file is not None:
        target, error = _backing_path(opened, header.backing_file)
        if target is None:
            break
        if len(links) >= max_depth:
            error = f"backing chain is deeper than {max_depth} files"
            break
        link = _report_path(target)
        try:
            header, st = read_header_stat(target)
        except FileNotFoundError:
            links.append(link)
            missing = link
            break
        except (OSError, ImageFormatError) as exc:
            links.append(link)
            error = f"cannot read backing file {link}: {exc}"
            break
        if (st.st_dev, st.st_ino) in seen:
            error = f"backing chain loops back to {link}"
            break
        seen.add((st.st_dev, st.st_ino))
        links.append(link)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            error = f"backing file {link} is not a regular file or block device"
            break
        opened = target
    return BackingChain(
        path=os.path.normpath(top_path),
        header=top,
        links=tuple(links),
        missing=missing,
        error=error,
    )


def _backing_path(overlay: Path, name: str) -> tuple[Path | None, str | None]:
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
            return Path(rest), None
        return None, f"backing file is not a local path: {name}"
    # An absolute name stays as is: joining an absolute path replaces the directory.
    return overlay.parent / name, None


def _report_path(opened: Path) -> str:
    """``opened`` (absolute), normalised without changing which file it names.

    normpath collapses ``dir/..`` lexically, which is wrong when ``dir`` is a symlink; the kernel
    (and qemu) follow the link first. So a path with ``..`` gets its directory resolved.
    """
    if ".." not in opened.parts:
        return os.path.normpath(opened)
    return os.path.normpath(Path(os.path.realpath(opened.parent)) / opened.name)

"""Paths as qemu forms them from the names in headers: joined, normalised, protocols refused."""

from __future__ import annotations

import os
from pathlib import PurePosixPath

__all__ = ["backing_path", "lexically_normal", "pathlib_form", "report_path"]


def pathlib_form(path: str) -> str:
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


def backing_path(
    overlay: str, name: str, what: str = "backing file"
) -> tuple[str | None, str | None]:
    """The path qemu would open for backing ``name`` of ``overlay``, or None and why not."""
    if name.startswith("json:"):
        return None, f"{what} is a json: pseudo-filename: {name}"
    # qemu's path_has_protocol: a colon before any slash makes a protocol name (nbd:, rbd:, ...).
    colon, slash = name.find(":"), name.find("/")
    if colon >= 0 and (slash < 0 or colon < slash):
        protocol, rest = name[:colon], name[colon + 1 :]
        # file: is the local file protocol; a relative name after it would depend on the working
        # directory of whichever qemu opens it, so only an absolute one can be followed.
        if protocol == "file" and rest.startswith("/"):
            return pathlib_form(rest), None
        return None, f"{what} is not a local path: {name}"
    # An absolute name stays as is: joining an absolute path replaces the directory.
    if name.startswith("/"):
        return pathlib_form(name), None
    return pathlib_form(os.path.join(os.path.dirname(overlay), name)), None


def lexically_normal(path: str) -> str:
    """``os.path.normpath`` of a path in pathlib's form, which only ``..`` can change."""
    return os.path.normpath(path) if "/.." in path else path


def report_path(opened: str) -> str:
    """``opened`` (absolute), normalised without changing which file it names.

    normpath collapses ``dir/..`` lexically, which is wrong when ``dir`` is a symlink; the kernel
    (and qemu) follow the link first. So a path with ``..`` gets its directory resolved.
    """
    if ".." not in opened.split("/"):
        return lexically_normal(opened)
    parent, name = os.path.split(opened)
    return os.path.normpath(os.path.join(os.path.realpath(parent), name))

"""The few helper processes imagecache runs: qemu-img, mkswap, mkfs.

Each runs with ``LC_ALL=C`` (stable messages), without a shell, with its stderr captured; a
failure to start it (``OSError``) or a non-zero exit (``CalledProcessError``) becomes a
:class:`~imagecache.errors.ProcessError` whose message carries the command and its stderr.
``qemu-img info`` on an image from the network runs under address-space and CPU limits, as Nova
does (a crafted image must not make it eat the host).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from typing import Any

from imagecache.errors import ProcessError

__all__ = ["convert_to_raw", "create_overlay", "mkfs", "mkswap", "qemu_img_info"]

StrPath = str | os.PathLike[str]

_ENV = {**os.environ, "LC_ALL": "C", "LANG": "C"}
# Nova's limits for qemu-img info on untrusted images (nova/virt/images.py QEMU_IMG_LIMITS).
_INFO_LIMITS = ("prlimit", "--as=1073741824", "--cpu=30", "--")


def _run(args: Sequence[str | os.PathLike[str]]) -> str:
    argv = [os.fspath(a) for a in args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=_ENV, check=True)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip() or f"exit status {exc.returncode}"
        raise ProcessError(f"{' '.join(argv)}: {detail}") from exc
    except OSError as exc:
        raise ProcessError(f"cannot run {argv[0]}: {exc}") from exc
    return done.stdout


def qemu_img_info(path: StrPath) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``path`` as qemu probes it (no ``-f``), limited.

    Raises ProcessError when qemu-img fails (an image it cannot parse, a limit hit) or prints
    something that is not a JSON object.
    """
    out = _run([*_INFO_LIMITS, "qemu-img", "info", "--force-share", "--output=json", path])
    try:
        doc = json.loads(out)
    except ValueError as exc:
        raise ProcessError(f"qemu-img info {path}: not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ProcessError(f"qemu-img info {path}: not a JSON object")
    return doc


def convert_to_raw(source: StrPath, target: StrPath, *, source_format: str) -> None:
    """``qemu-img convert -f <fmt> -O raw source target``: a sparse raw copy.

    The input format is given, never probed (a probed format is how a raw image that looks like
    qcow2 would be misread). Raises ProcessError.
    """
    _run(["qemu-img", "convert", "-q", "-f", source_format, "-O", "raw", source, target])


def create_overlay(
    disk: StrPath, *, backing: StrPath, backing_format: str, size: int | None = None
) -> None:
    """``qemu-img create -f qcow2 -F <fmt> -b <abs backing> disk [size]``: a thin overlay.

    ``backing`` is made absolute, as Nova records it. Without ``size`` the overlay has the
    backing image's virtual size. Raises ProcessError.
    """
    args: list[str | os.PathLike[str]] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    args += ["-F", backing_format, "-b", os.path.abspath(backing), disk]
    if size is not None:
        args.append(str(size))
    _run(args)


def mkswap(path: StrPath) -> None:
    """Write a swap signature on the file ``path`` (its size is the swap size). Raises
    ProcessError."""
    _run(["mkswap", "-f", path])


def mkfs(path: StrPath, *, fs_type: str, label: str | None = None) -> None:
    """``mkfs -t <fs_type> [label option] path`` on a file; ``-F`` for ext* (a file is no
    device). Raises ProcessError."""
    args: list[str | os.PathLike[str]] = ["mkfs", "-t", fs_type]
    if fs_type.startswith("ext"):
        args += ["-F", "-q"]
    if label:
        # Nova's labels: ext* and xfs take -L, vfat -n; the label is the disk's name.
        args += ["-n" if fs_type in ("vfat", "msdos") else "-L", label]
    _run([*args, path])

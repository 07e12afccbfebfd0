"""Real disk images for tests, made by the real ``qemu-img`` (no fixtures checked in)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def qemu_img(*args: str | Path) -> str:
    """Run ``qemu-img`` and return its stdout; raise CalledProcessError with stderr on failure."""
    done = subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, text=True)
    return done.stdout


def make_raw(path: Path, size: str = "1M") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", "raw", path, size)
    return path


def make_qcow2(path: Path, size: str = "1M", *, compat: str = "1.1") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", path, size)
    return path


def make_overlay(
    path: Path,
    backing: str | Path,
    *,
    backing_fmt: str = "raw",
    compat: str = "1.1",
    unsafe_size: str | None = None,
) -> Path:
    """An overlay whose header names ``backing`` exactly as given (relative names stay relative).

    With ``unsafe_size`` the backing file need not exist (``-u``), for dangling-backing fixtures.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    args: list[str | Path] = ["create", "-q", "-f", "qcow2", "-o", f"compat={compat}"]
    args += ["-F", backing_fmt, "-b", str(backing)]
    if unsafe_size:
        args += ["-u", path, unsafe_size]
    else:
        args += [path]
    # qemu-img resolves a relative backing name against the overlay's directory, as we do.
    qemu_img(*args)
    return path


def info_chain(path: Path) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain --output=json``: the reference our parser is checked against."""
    out = qemu_img("info", "-U", "--backing-chain", "--output=json", path)
    chain: list[dict[str, Any]] = json.loads(out)
    return chain

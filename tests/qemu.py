"""Real disk images for tests, made by the real ``qemu-img`` (no fixtures checked in)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def qemu_img(*args: str | Path, cwd: Path | None = None) -> str:
    """Run ``qemu-img`` and return its stdout; raise CalledProcessError with stderr on failure.

    ``cwd`` matters for options qemu-img resolves against the working directory (``data_file``).
    """
    done = subprocess.run(
        ["qemu-img", *map(str, args)], check=True, capture_output=True, text=True, cwd=cwd
    )
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
    """``qemu-img info --backing-chain --output=json``: the reference for our parser."""
    out = qemu_img("info", "-U", "--backing-chain", "--output=json", path)
    chain: list[dict[str, Any]] = json.loads(out)
    return chain


def info(path: Path) -> dict[str, Any]:
    """``qemu-img info --output=json`` of one image, without opening its backing file."""
    out: dict[str, Any] = json.loads(qemu_img("info", "-U", "--output=json", path))
    return out


def rebase_unsafe(path: Path, backing: str, *, backing_fmt: str = "qcow2") -> Path:
    """Rewrite the backing name of ``path`` without looking at it (``rebase -u``): loops, json:."""
    qemu_img("rebase", "-u", "-F", backing_fmt, "-b", backing, path)
    return path


def drop_backing_format(path: Path) -> Path:
    """Turn the qcow2 backing-format extension into an unknown one, as old qemu wrote no format.

    qemu 7.2 refuses ``-b`` without ``-F``, so a legacy overlay is made by patching: the extension
    type 0xE2792ACA becomes 0x12345678, which qemu skips (``qemu-img check`` stays clean).
    """
    data = bytearray(path.read_bytes()[:65536])
    # Extensions start after the fixed header (72 bytes for v2, header_length for v3).
    at = data.find(b"\xe2\x79\x2a\xca", 72)
    if at < 0:
        raise ValueError(f"{path} has no backing-format extension")
    data[at : at + 4] = b"\x12\x34\x56\x78"
    with path.open("r+b") as f:
        f.write(data[: at + 4])
    return path


def make_vmdk(
    path: Path, size: str = "1M", *, backing: str | Path | None = None, subformat: str | None = None
) -> Path:
    """A VMDK made by qemu-img (monolithicSparse unless ``subformat``), optionally a child of
    ``backing`` (a VMDK), which qemu records as ``parentFileNameHint``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    args: list[str | Path] = ["create", "-q", "-f", "vmdk"]
    if subformat:
        args += ["-o", f"subformat={subformat}"]
    if backing is not None:
        args += ["-F", "vmdk", "-b", str(backing)]
    qemu_img(*args, path, size)
    return path


def make_data_file_image(
    path: Path,
    data_file: str | Path,
    size: str = "1M",
    *,
    raw: bool = True,
    backing: str | Path | None = None,
    backing_fmt: str = "raw",
) -> Path:
    """A qcow2 whose guest data lives in the external ``data_file`` (created, or emptied, here).

    The name is stored as given; qemu-img resolves a relative one against the working directory,
    so it runs in the image's directory, where libvirt resolves it too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    options = f"data_file={data_file}" + (",data_file_raw=on" if raw else "")
    args: list[str | Path] = ["create", "-q", "-f", "qcow2", "-o", options]
    if backing is not None:
        args += ["-F", backing_fmt, "-b", str(backing)]
    qemu_img(*args, path, size, cwd=path.parent)
    return path


def qemu_io(
    image: str | Path, command: str, *, fmt: str = "qcow2", read_only: bool = True
) -> subprocess.CompletedProcess[str]:
    """One ``qemu-io`` command on ``image``, run in its directory (relative names resolve there).

    ``fmt`` None passes ``image`` as ``--image-opts`` (a ``driver=...,file.filename=...`` string).
    """
    args = ["qemu-io", *(["-r"] if read_only else []), "-c", command]
    if fmt == "image-opts":
        args += ["--image-opts", str(image)]
        cwd = None
    else:
        args += ["-f", fmt, str(image)]
        cwd = Path(image).parent
    return subprocess.run(args, capture_output=True, text=True, check=False, cwd=cwd)


def write_pattern(
    image: str | Path, pattern: int, *, fmt: str = "qcow2", length: str = "64k"
) -> None:
    """The guest writes ``pattern`` over the first ``length`` bytes of its disk."""
    done = qemu_io(image, f"write -P {pattern:#x} 0 {length}", fmt=fmt, read_only=False)
    if done.returncode != 0:
        raise AssertionError(f"qemu-io write failed: {done.stdout}{done.stderr}")


def reads_pattern(
    image: str | Path, pattern: int, *, fmt: str = "qcow2", length: str = "64k"
) -> bool:
    """Whether the guest still reads ``pattern`` there: the image opens and the bytes verify."""
    done = qemu_io(image, f"read -P {pattern:#x} 0 {length}", fmt=fmt)
    return done.returncode == 0 and "verification failed" not in done.stdout

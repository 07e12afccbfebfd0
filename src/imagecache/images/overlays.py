"""Instance disks on cached bases: the root overlay, swap and ephemeral disks, and ``disk.info``.

What Nova's Qcow2 backend does at spawn (nova-imagecache.md §4.3), with its races closed:

- the root disk ``<instances_path>/<uuid>/disk`` is a qcow2 overlay on the cached image. The base
  is fetched if missing, touched, and the overlay created all under the base's entry lock, which
  the cleaner takes too: it cannot remove the base between our look and the overlay's creation;
- the base's format is never guessed from its first bytes (a raw image's guest data may start
  like a VMDK descriptor naming a host file). Before every overlay the base passes admission
  again (``qemu-img info`` under limits, as Nova's backend checks on every use); with
  ``force_raw_images`` it must be raw and the overlay says ``-F raw``, otherwise the overlay
  uses the format qemu-img reports. Swap and ephemeral bases are raw files we made: ``-F raw``;
- ``disk.swap`` overlays ``_base/swap_<MB>`` (a sparse file with a swap signature) and
  ``disk.local`` overlays ``_base/ephemeral_<GB>_<tag>`` (a sparse file with a filesystem, the
  tag naming it as Nova does). Those backing files are built under a temp name, fsynced and
  renamed under their own entry locks (Nova writes them in place: §9.1 item 8);
- every overlay is created under a temp name in the instance directory and renamed without
  replacing; an existing disk is left alone (``existing``);
- ``disk.info`` records ``{disk path: "qcow2"}`` as Nova does, rewritten atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imagecache import locks, naming
from imagecache.errors import UnsafeImageError, UsageError
from imagecache.images import admission, cache_name, fetch, process
from imagecache.images.base import ImageSource
from imagecache.images.fetch import FetchOptions
from imagecache.layout import DISK_INFO
from imagecache.results import Result
from imagecache.store import fsops
from imagecache.store.jsonfile import JsonFileError, read_json

__all__ = ["DISK_INFO", "CreatedDisk", "DiskRequest", "create_disks"]

_MIB = 1 << 20
_GIB = 1 << 30
_EPHEMERAL_LABEL = "ephemeral0"  # Nova's label for the first ephemeral disk


@dataclass(frozen=True, slots=True)
class _Base:
    """A base ready to be overlaid: its path, qemu's name of its format, its virtual size."""

    path: Path
    format: str
    virtual_size: int


@dataclass(frozen=True, slots=True)
class DiskRequest:
    """The disks of one instance: a root disk on an image, optional swap and ephemeral disks."""

    instance: str  # the instance directory name (its uuid)
    image: str  # Glance id or URL of the root disk's image
    size: int | None = None  # root disk bytes; None: the image's virtual size
    swap_mb: int | None = None
    ephemeral_gb: int | None = None
    ephemeral_format: str | None = None  # None: Nova's default, vfat


@dataclass(frozen=True, slots=True)
class CreatedDisk:
    """One instance disk and the cache entry it is an overlay on."""

    path: Path
    backing: str  # cache entry name
    result: Result  # cached: created now; existing: was there already

    @property
    def label(self) -> str:
        """``created`` or ``existing``: for a disk, "cached" would read as if it were downloaded."""
        return "created" if self.result is Result.CACHED else str(self.result)

    def to_dict(self) -> dict[str, str]:
        return {"disk": str(self.path), "backing": self.backing, "result": self.label}


def create_disks(
    request: DiskRequest, *, source: ImageSource, options: FetchOptions
) -> tuple[CreatedDisk, ...]:
    """Create the instance directory, its disks and ``disk.info`` (see the module docstring).

    Raises:
        UsageError: the instance name is not a plain directory name, a size is not positive, or
            ``size`` is smaller than the image.
        LockTimeout, ImageServiceError, ImageFormatError, ProcessError: as
            :func:`imagecache.images.fetch.ensure_cached`, or mkswap / mkfs / qemu-img create
            failed.
        UnsafeImageError: the root base fails admission, or is not raw under force_raw.
        OSError: a directory or file cannot be created.
    """
    _check_request(request, options)
    instance_dir = Path(options.instances_path, request.instance)
    fsops.ensure_dir(options.cache_dir)
    fsops.ensure_dir(instance_dir)
    base = cache_name(request.image)

    def root_base() -> _Base:
        path = fetch.fetch_locked(request.image, source=source, options=options).path
        return _admitted_base(path, options)

    made = [_overlay(instance_dir / "disk", base, root_base, options, size=request.size)]
    if request.swap_mb:
        name = naming.swap_name(request.swap_mb)
        build = _generated(name, request.swap_mb * _MIB, process.mkswap, options)
        made.append(_overlay(instance_dir / "disk.swap", name, build, options))
    if request.ephemeral_gb:
        fs_type = request.ephemeral_format or "vfat"
        name = naming.ephemeral_name(request.ephemeral_gb, request.ephemeral_format)

        def make_fs(path: str | os.PathLike[str]) -> None:
            process.mkfs(path, fs_type=fs_type, label=_EPHEMERAL_LABEL)

        build = _generated(name, request.ephemeral_gb * _GIB, make_fs, options)
        made.append(_overlay(instance_dir / "disk.local", name, build, options))
    _record_disk_info(instance_dir, [d.path for d in made])
    return tuple(made)


def _check_request(request: DiskRequest, options: FetchOptions) -> None:
    name = request.instance
    if not naming.valid_entry_name(name):
        raise UsageError(f"not an instance directory name: {name!r}")
    # The scanner skips these directories (the one test both use): a disk there would be
    # invisible to the cleaner, which would then remove its base.
    if not options.layout.is_instance_name(name):
        raise UsageError(f"{name!r} is not an instance directory: the cleaner never looks there")
    for label, value in (
        ("--size", request.size),
        ("--swap", request.swap_mb),
        ("--ephemeral", request.ephemeral_gb),
    ):
        if value is not None and value <= 0:
            raise UsageError(f"{label} must be positive, got {value}")


def _admitted_base(path: Path, options: FetchOptions) -> _Base:
    """The root base at ``path`` checked as a download is, and the format to overlay it with.

    Raises UnsafeImageError (a backing or data file, a VMDK not allowed, a format not allowed,
    or not raw while ``force_raw``), ImageFormatError or ProcessError, as admission does.
    """
    found = admission.check_format(
        path, claimed=None, vmdk_allowed_types=options.vmdk_allowed_types
    )
    if options.force_raw and found.qemu_format != "raw":
        raise UnsafeImageError(
            f"{path} is {found.format}, but force_raw_images caches raw images only"
        )
    return _Base(path, found.qemu_format, found.virtual_size or path.stat().st_size)


def _overlay(
    disk: Path,
    entry: str,
    ensure_base: Callable[[], _Base],
    options: FetchOptions,
    *,
    size: int | None = None,
) -> CreatedDisk:
    """Under ``entry``'s lock: make sure the base is there (touched), then overlay it."""
    with locks.entry_lock(options.instances_path, entry, timeout=options.lock_timeout):
        base = ensure_base()
        if disk.exists():
            return CreatedDisk(disk, entry, Result.EXISTING)
        virtual = base.virtual_size
        if size is not None and size < virtual:
            raise UsageError(f"--size {size} is smaller than the image ({virtual} bytes)")
        grow = size if size is not None and size > virtual else None
        with fsops.temp_path(disk.parent, disk.name) as temp:
            process.create_overlay(temp, backing=base.path, backing_format=base.format, size=grow)
            fsops.atomic_publish(temp, disk)
    return CreatedDisk(disk, entry, Result.CACHED)


def _generated(
    name: str,
    size: int,
    make: Callable[[str | os.PathLike[str]], None],
    options: FetchOptions,
) -> Callable[[], _Base]:
    """A base builder for ``_overlay``: the sparse file ``name`` of ``size`` bytes, formatted by
    ``make``, published atomically unless present (then touched). Runs under the entry lock."""

    def build() -> _Base:
        path = Path(options.cache_dir, name)
        if path.exists():
            fetch.touch_in_use(path)
        else:
            with fsops.temp_file(options.cache_dir, name) as (temp, stream):
                stream.truncate(size)
                make(temp)
                fsops.atomic_publish(temp, path)
        # Raw by construction (ours or Nova's): never what its first bytes look like.
        return _Base(path, "raw", path.stat().st_size)

    return build


def _record_disk_info(instance_dir: Path, disks: list[Path]) -> None:
    """Add ``{path: "qcow2"}`` for each disk to ``disk.info``, keeping what it already says."""
    info_path = instance_dir / DISK_INFO
    try:
        current = read_json(str(info_path))
    except JsonFileError:
        # Missing, undecodable, a symlink or a FIFO: Nova also rewrites an unreadable disk.info
        # from what it knows. The rename below replaces the name; it never writes through it.
        current = {}
    if not isinstance(current, dict):
        current = {}
    current.update({str(d): "qcow2" for d in disks})
    fsops.atomic_write(info_path, json.dumps(current).encode("utf-8"))

"""Observe a host, read-only: the cache directory, every instance disk, instance records, registry.

Each function owns one outside resource and turns everything that goes wrong with it into a
:class:`Problem` in the observation, never an exception: a disk that cannot be read or parsed makes
the view incomplete (so nothing is removed) and the pass goes on. Headers are read from the files
themselves (``imagecache.formats``); no process is spawned per disk.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from typing import Any

from imagecache import naming
from imagecache.errors import ImageFormatError
from imagecache.formats.chain import HeaderCache, resolve_chain
from imagecache.model import (
    CacheEntry,
    Disk,
    FileType,
    InstanceRecord,
    Inventory,
    Kind,
    Problem,
    TrashEntry,
)
from imagecache.store import fsops

__all__ = [
    "LOCKS_DIR",
    "OWN_STATE_DIR",
    "load_instance_records",
    "observe",
    "read_registry",
    "scan_cache",
    "scan_instances",
    "scan_trash",
]

OWN_STATE_DIR = ".imagecache"
REGISTRY_FILE = "compute_nodes"
LOCKS_DIR = "locks"

_FILE_TYPES = (
    (stat.S_ISREG, FileType.FILE),
    (stat.S_ISLNK, FileType.SYMLINK),
    (stat.S_ISDIR, FileType.DIRECTORY),
)


def _file_type(mode: int) -> FileType:
    return next((ft for test, ft in _FILE_TYPES if test(mode)), FileType.OTHER)


def scan_cache(cache_dir: str) -> tuple[tuple[CacheEntry, ...], tuple[Problem, ...]]:
    """Every name directly in the cache directory, classified, from ``lstat`` only.

    A name that vanishes between listing and ``lstat`` is simply gone. A missing cache directory is
    an empty cache (Nova creates it on first download), reported as a non-blocking problem.
    """
    entries: list[CacheEntry] = []
    try:
        with os.scandir(cache_dir) as it:
            listing = [e for e in it if e.name != OWN_STATE_DIR]
    except FileNotFoundError:
        return (), (Problem("cache", cache_dir, "cache directory does not exist", blocking=False),)
    except OSError as exc:
        return (), (Problem("cache", cache_dir, f"cannot list cache directory: {exc.strerror}"),)
    problems: list[Problem] = []
    for item in listing:
        try:
            st = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(Problem("cache", item.path, f"cannot stat: {exc.strerror}"))
            continue
        ftype = _file_type(st.st_mode)
        entries.append(
            CacheEntry(
                name=item.name,
                kind=naming.classify(item.name, ftype),
                file_type=ftype,
                bytes_allocated=st.st_blocks * 512,
                bytes_apparent=st.st_size,
                mtime=st.st_mtime,
                inode=st.st_ino,
                device=st.st_dev,
            )
        )
    entries.sort(key=lambda e: e.name)
    return tuple(entries), tuple(problems)


def scan_trash(cache_dir: str) -> tuple[tuple[TrashEntry, ...], tuple[Problem, ...]]:
    """The quarantined entries under ``<cache>/.imagecache/trash``; unreadable is blocking.

    A trash that cannot be listed hides entries that may have to be restored or purged, so the
    view is incomplete, as with any other source.
    """
    try:
        return fsops.list_trash(cache_dir), ()
    except OSError as exc:
        path = str(fsops.trash_dir(cache_dir))
        return (), (Problem("trash", path, f"cannot list trash: {exc.strerror}"),)


def _instance_dirs(
    instances_path: str, skip: frozenset[str]
) -> tuple[list[os.DirEntry[str]], list[Problem]]:
    """The instance directories under ``instances_path``, by name: directories and links to them.

    Not one: ``instances_path`` itself, the names in ``skip`` (the cache, ``locks``), and every
    name starting with ``_base`` (Nova's cache naming: on shared storage each host may have its
    own ``_base_<ip>``, whose ``.part`` downloads are no instance's disks), nor any directory,
    real or linked, that is one of those under another name (``_base`` a link to ``realbase``).

    Operators symlink instance directories onto other volumes, so links are followed, and the
    instance keeps the link's name. Each directory is scanned once, under its real name if it has
    one (else the first link's): nothing is scanned twice and no link makes a loop. A link that
    cannot be resolved (dangling, unreadable, looping) hides an instance's disks: a blocking
    problem.

    Raises OSError when ``instances_path`` cannot be listed.
    """
    with os.scandir(instances_path) as it:
        listing = sorted(it, key=lambda e: e.name)
    others = [e for e in listing if _is_instance_name(e.name, skip)]
    # Compared by (st_dev, st_ino) from stat(), not d_ino: a mount point's d_ino is the covered
    # directory's, so a cache mounted at ``realbase`` and linked as ``_base`` would not match.
    excluded = {_dir_id(instances_path)}
    excluded.update(_dir_id(e.path) for e in listing if not _is_instance_name(e.name, skip))
    excluded.discard(None)
    seen = set(excluded)
    dirs: list[os.DirEntry[str]] = []
    for d in (e for e in others if e.is_dir(follow_symlinks=False)):
        found = _dir_id(d.path)  # None (cannot stat): kept, and listing it reports why
        if found is None or found not in excluded:
            seen.add(found)
            dirs.append(d)
    problems: list[Problem] = []
    for link in (e for e in others if e.is_symlink()):
        try:
            st = os.stat(link.path)
        except OSError as exc:
            message = f"cannot resolve symlinked instance directory: {exc.strerror}"
            problems.append(Problem("instance", link.path, message))
            continue
        # A link to a file is no instance directory, any more than a file is.
        if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            dirs.append(link)
    dirs.sort(key=lambda d: d.name)
    return dirs, problems


_CACHE_PREFIX = "_base"  # Nova's cache directory naming; shared storage has one per host


def _is_instance_name(name: str, skip: frozenset[str]) -> bool:
    return name not in skip and not name.startswith(_CACHE_PREFIX)


def _dir_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a directory, or None when it cannot be stat()ed (then: not seen)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def scan_instances(
    instances_path: str, *, cache_dir_name: str
) -> tuple[tuple[Disk, ...], tuple[Problem, ...]]:
    """Every disk image in every instance directory, with its whole backing chain.

    Every directory under ``instances_path`` (or symlink to one) except caches (``_base*``, and
    the cache under any name) and ``locks`` is an instance directory, listed by an inventory or
    not, and every regular file in it is inspected whatever its name (``disk``, ``disk.local``,
    ``disk.swap``, ``disk.rescue``, ...). Files whose header is not a disk image (raw disks,
    ``console.log``, ``disk.info``) have no backing file: left out.

    Some files hold bytes the guest wrote: its serial console log, and disks Nova recorded as raw
    in ``disk.info`` (QEMU opens those as raw, whatever their first bytes say). A qcow2 header
    forged there still counts as a user (keeping too much is safe), but a garbage one is only a
    warning: otherwise any guest could stop every removal on its host.

    Files with a temporary name (``*.part``, ``*.converted``) are writes in progress or left
    behind, which no VM has attached: likewise, a valid header counts as a user, but a truncated
    or unresolvable one is only a warning, or one interrupted copy would stop every removal.
    """
    disks: list[Disk] = []
    problems: list[Problem] = []
    skip = frozenset({cache_dir_name, LOCKS_DIR})
    # Thousands of disks share a few hundred bases: each base header is read once per scan.
    headers = HeaderCache()
    try:
        dirs, dir_problems = _instance_dirs(instances_path, skip)
    except FileNotFoundError:
        return (), (Problem("instances", instances_path, "instances path does not exist"),)
    except OSError as exc:
        return (), (Problem("instances", instances_path, f"cannot list: {exc.strerror}"),)
    problems.extend(dir_problems)
    for directory in dirs:
        try:
            with os.scandir(directory.path) as it:
                files = sorted((f for f in it if f.is_file()), key=lambda f: f.name)
        except OSError as exc:
            problems.append(Problem("instance", directory.path, f"cannot list: {exc.strerror}"))
            continue
        guest_written: frozenset[str] | None = None  # read only when a header is bad
        for item in files:
            disk, problem = _inspect_disk(item.path, directory.name, headers)
            if problem is not None and problem.blocking and problem.message.startswith(_BAD):
                if guest_written is None:
                    guest_written = _guest_written(directory.path, [f.name for f in files])
                why = _unattached(item.name, guest_written)
                if why is not None:
                    detail = problem.message.removeprefix(_BAD)
                    problem = Problem("disk", item.path, why + detail, blocking=False)
            if disk is not None:
                disks.append(disk)
            if problem is not None:
                problems.append(problem)
    return tuple(disks), tuple(problems)


_CONSOLE_LOG = "console.log"
# The start of every problem a guest could cause with forged bytes: a header that cannot be
# parsed, or a chain that cannot be followed (a json: name, a loop, or deeper than the limit,
# which a long run of external snapshots reaches legitimately: still blocking, being unresolved).
_BAD = "unusable image header or backing chain"
_GUEST_BYTES = f"guest-written file (console log, or raw per disk.info) with an {_BAD}"
_PARTIAL = f"temporary file (partial write, attached to no VM) with an {_BAD}"
_DISK_INFO = "disk.info"
_DISK_INFO_MAX = 1 << 20


def _unattached(name: str, guest_written: frozenset[str]) -> str | None:
    """Why an unusable header in file ``name`` is only a warning (no VM parses it), or None."""
    if name in guest_written:
        return _GUEST_BYTES
    if naming.classify(name) is Kind.TEMP:
        return _PARTIAL
    return None


def _guest_written(directory: str, names: list[str]) -> frozenset[str]:
    """Names in an instance directory whose content the guest controls and QEMU never parses.

    The console log, and every disk ``disk.info`` records as raw (Nova writes it when it creates
    the disk and drives libvirt's format from it, so a guest cannot change it; bug 1221190). An
    unreadable or malformed ``disk.info`` protects nothing: the headers are then believed.
    """
    found = {n for n in names if n == _CONSOLE_LOG or n.startswith(_CONSOLE_LOG + ".")}
    if _DISK_INFO in names:
        try:
            with open(os.path.join(directory, _DISK_INFO), "rb") as fh:
                info = json.loads(fh.read(_DISK_INFO_MAX))
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            found |= {os.path.basename(str(k)) for k, v in info.items() if v == "raw"}
    return frozenset(found)


def _inspect_disk(
    path: str, instance: str, headers: HeaderCache | None = None
) -> tuple[Disk | None, Problem | None]:
    try:
        chain = resolve_chain(path, headers=headers)
    except FileNotFoundError:
        return None, Problem("disk", path, "vanished while the instance was scanned")
    except OSError as exc:
        return None, Problem("disk", path, f"cannot read header: {exc.strerror}")
    except ImageFormatError as exc:
        return None, Problem("disk", path, f"{_BAD}: unparsable: {exc}")
    if not chain.header.is_disk_image:
        return None, None
    disk = Disk(
        path=path,
        instance=instance,
        format=chain.header.format,
        chain=chain.links,
        missing=chain.missing,
        chain_ids=chain.link_ids,
    )
    if chain.error is not None:
        return disk, Problem("disk", path, f"{_BAD}: backing chain not resolved: {chain.error}")
    if chain.missing is not None:
        # A broken instance, not a gap in the view: its missing base is reported, nothing else.
        return disk, Problem("disk", path, f"backing file missing: {chain.missing}", blocking=False)
    return disk, None


def load_instance_records(path: str) -> tuple[tuple[InstanceRecord, ...], tuple[Problem, ...]]:
    """Instance records from an inventory file (DESIGN.md §7); unknown fields are ignored.

    An unreadable or malformed file is one blocking problem: without it the view is incomplete.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as exc:
        return (), (Problem("inventory", path, f"cannot read: {exc.strerror}"),)
    except ValueError as exc:
        return (), (Problem("inventory", path, f"not valid JSON: {exc}"),)
    items = doc.get("instances") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return (), (Problem("inventory", path, 'expected {"instances": [...]}'),)
    records: list[InstanceRecord] = []
    problems: list[Problem] = []
    for index, item in enumerate(items):
        try:
            records.append(_record(item))
        except (TypeError, ValueError) as exc:
            problems.append(Problem("inventory", f"{path}#instances[{index}]", str(exc)))
    return tuple(records), tuple(problems)


_STR_FIELDS = ("name", "host", "image_ref", "kernel_id", "ramdisk_id", "ephemeral_format")
_STATE_FIELDS = ("vm_state", "task_state")
_INT_FIELDS = ("swap_mb", "ephemeral_gb")


def _record(item: Any) -> InstanceRecord:
    if not isinstance(item, dict) or not isinstance(item.get("uuid"), str) or not item["uuid"]:
        raise ValueError("every instance needs a non-empty string 'uuid'")
    values: dict[str, Any] = {"uuid": item["uuid"]}
    for key in (*_STR_FIELDS, *_STATE_FIELDS):
        value = item.get(key)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"instance {item['uuid']}: {key} must be a string or null")
        values[key] = value
    for key in _INT_FIELDS:
        value = item.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"instance {item['uuid']}: {key} must be an integer or null")
        values[key] = value
    return InstanceRecord(**values)


def read_registry(instances_path: str) -> tuple[tuple[tuple[str, float], ...], tuple[Problem, ...]]:
    """Nova's ``compute_nodes`` registry: the hosts that share ``instances_path``.

    Missing means only this host. Undecodable is a blocking problem, not an empty registry: Nova
    treating it as empty (LP 1252659) let hosts delete what other hosts' instances use.
    """
    path = os.path.join(instances_path, REGISTRY_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        return (), ()
    except OSError as exc:
        return (), (Problem("registry", path, f"cannot read: {exc.strerror}"),)
    except ValueError as exc:
        return (), (Problem("registry", path, f"not valid JSON: {exc}"),)
    if not isinstance(doc, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in doc.values()
    ):
        return (), (Problem("registry", path, "expected {host: epoch seconds}"),)
    return tuple(sorted((str(k), float(v)) for k, v in doc.items())), ()


def observe(
    *,
    host: str,
    instances_path: str,
    cache_dir: str,
    inventory_files: Iterable[str] = (),
    extra_problems: Iterable[Problem] = (),
) -> Inventory:
    """One read-only observation of a host: everything :func:`imagecache.policy.decide` needs."""
    entries, cache_problems = scan_cache(cache_dir)
    disks, disk_problems = scan_instances(
        instances_path, cache_dir_name=os.path.basename(cache_dir)
    )
    records: list[InstanceRecord] = []
    record_problems: list[Problem] = []
    for path in inventory_files:
        found, problems = load_instance_records(path)
        records.extend(found)
        record_problems.extend(problems)
    registry, registry_problems = read_registry(instances_path)
    trash, trash_problems = scan_trash(cache_dir)
    return Inventory(
        host=host,
        instances_path=instances_path,
        cache_dir=cache_dir,
        entries=entries,
        disks=disks,
        instances=tuple(records),
        registry=registry,
        trash=trash,
        problems=(
            *cache_problems,
            *trash_problems,
            *disk_problems,
            *record_problems,
            *registry_problems,
            *extra_problems,
        ),
    )

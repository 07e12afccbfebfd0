"""Observe every instance disk and its whole backing chain, read from the headers themselves.

Headers are read from the files (``imagecache.formats``); no process is spawned per disk. Every
failure is a :class:`Problem` with a code, never an exception: a disk that cannot be read or
parsed makes the view incomplete (so nothing is removed) and the scan goes on.
"""

from __future__ import annotations

import os
import stat

from imagecache import naming
from imagecache.errors import ImageFormatError
from imagecache.formats.chain import HeaderCache, resolve_chain
from imagecache.layout import DISK_INFO, Layout
from imagecache.model import Disk, Kind, Problem, ProblemCode
from imagecache.store.jsonfile import JsonFileError, read_json

__all__ = ["scan_instances"]


def _instance_dirs(layout: Layout) -> tuple[list[os.DirEntry[str]], list[Problem]]:
    """The instance directories under ``instances_path``, by name: directories and links to them.

    Not one: ``instances_path`` itself, no name :meth:`Layout.is_instance_name` refuses (the
    cache, ``locks``, every name starting with ``_base``: on shared storage each host may have
    its own ``_base_<ip>``, whose ``.part`` downloads are no instance's disks), nor any directory,
    real or linked, that is one of those under another name (``_base`` a link to ``realbase``).

    Operators symlink instance directories onto other volumes, so links are followed, and the
    instance keeps the link's name. Each directory is scanned once, under its real name if it has
    one (else the first link's): nothing is scanned twice and no link makes a loop. A link that
    cannot be resolved (dangling, unreadable, looping) hides an instance's disks: a blocking
    problem.

    Raises OSError when ``instances_path`` cannot be listed.
    """
    instances_path = layout.instances_path
    with os.scandir(instances_path) as it:
        listing = sorted(it, key=lambda e: e.name)
    others = [e for e in listing if layout.is_instance_name(e.name)]
    # Compared by (st_dev, st_ino) from stat(), not d_ino: a mount point's d_ino is the covered
    # directory's, so a cache mounted at ``realbase`` and linked as ``_base`` would not match.
    excluded = {_dir_id(instances_path)}
    excluded.update(_dir_id(e.path) for e in listing if not layout.is_instance_name(e.name))
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
            problems.append(Problem(ProblemCode.INSTANCE_LINK_UNRESOLVABLE, link.path, message))
            continue
        # A link to a file is no instance directory, any more than a file is.
        if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            dirs.append(link)
    dirs.sort(key=lambda d: d.name)
    return dirs, problems


def _dir_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a directory, or None when it cannot be stat()ed (then: not seen)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def scan_instances(layout: Layout) -> tuple[tuple[Disk, ...], tuple[Problem, ...]]:
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
    instances_path = layout.instances_path
    # Thousands of disks share a few hundred bases: each base header is read once per scan.
    headers = HeaderCache()
    try:
        dirs, dir_problems = _instance_dirs(layout)
    except FileNotFoundError:
        message = "instances path does not exist"
        return (), (Problem(ProblemCode.INSTANCES_MISSING, instances_path, message),)
    except OSError as exc:
        message = f"cannot list: {exc.strerror}"
        return (), (Problem(ProblemCode.INSTANCES_UNLISTED, instances_path, message),)
    problems.extend(dir_problems)
    for directory in dirs:
        try:
            with os.scandir(directory.path) as it:
                files = sorted((f for f in it if f.is_file()), key=lambda f: f.name)
        except OSError as exc:
            message = f"cannot list: {exc.strerror}"
            problems.append(Problem(ProblemCode.INSTANCE_UNLISTED, directory.path, message))
            continue
        guest_written: frozenset[str] | None = None  # read only when a header is bad
        for item in files:
            disk, problem = _inspect_disk(item.path, directory.name, headers)
            if problem is not None and problem.code in _FORGEABLE:
                if guest_written is None:
                    guest_written = _guest_written(directory.path, [f.name for f in files])
                code = _unattached(item.name, guest_written)
                if code is not None:
                    problem = Problem(code, item.path, f"{_WHY[code]}: {problem.message}")
            if disk is not None:
                disks.append(disk)
            if problem is not None:
                problems.append(problem)
    return tuple(disks), tuple(problems)


_CONSOLE_LOG = "console.log"
# The start of every problem a guest could cause with forged bytes: a header that cannot be
# parsed, or a chain that cannot be followed (a json: name, a loop, or deeper than the limit,
# which a long run of external snapshots reaches legitimately: still blocking, being unresolved).
# What a guest (or an interrupted copy) can cause with forged bytes: a header that cannot be
# parsed, or a chain that cannot be followed (a json: name, a loop, or deeper than the limit).
_FORGEABLE = frozenset(
    {ProblemCode.HEADER_GARBAGE, ProblemCode.CHAIN_UNRESOLVABLE, ProblemCode.CHAIN_TOO_DEEP}
)
_WHY = {
    ProblemCode.GUEST_WRITTEN_HEADER: "guest-written file (console log, or raw per disk.info)",
    ProblemCode.PARTIAL_WRITE_HEADER: "temporary file (partial write, attached to no VM)",
}
_DISK_INFO_MAX = 1 << 20  # Nova writes a line per disk


def _unattached(name: str, guest_written: frozenset[str]) -> ProblemCode | None:
    """Why an unusable header in file ``name`` is only a warning (no VM parses it), or None."""
    if name in guest_written:
        return ProblemCode.GUEST_WRITTEN_HEADER
    if naming.classify(name) is Kind.TEMP:
        return ProblemCode.PARTIAL_WRITE_HEADER
    return None


def _guest_written(directory: str, names: list[str]) -> frozenset[str]:
    """Names in an instance directory whose content the guest controls and QEMU never parses.

    The console log, and every disk ``disk.info`` records as raw (Nova writes it when it creates
    the disk and drives libvirt's format from it, so a guest cannot change it; bug 1221190). An
    unreadable or malformed ``disk.info`` protects nothing: the headers are then believed.
    """
    found = {n for n in names if n == _CONSOLE_LOG or n.startswith(_CONSOLE_LOG + ".")}
    if DISK_INFO in names:
        try:
            info = read_json(os.path.join(directory, DISK_INFO), max_bytes=_DISK_INFO_MAX)
        except JsonFileError:
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
        message = "vanished while the instance was scanned"
        return None, Problem(ProblemCode.DISK_VANISHED, path, message)
    except OSError as exc:
        message = f"cannot read header: {exc.strerror}"
        return None, Problem(ProblemCode.DISK_UNREADABLE, path, message)
    except ImageFormatError as exc:
        return None, Problem(ProblemCode.HEADER_GARBAGE, path, f"unparsable image header: {exc}")
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
        code = ProblemCode.CHAIN_TOO_DEEP if chain.too_deep else ProblemCode.CHAIN_UNRESOLVABLE
        return disk, Problem(code, path, f"backing chain not resolved: {chain.error}")
    if chain.missing is not None:
        # A broken instance, not a gap in the view: its missing base is reported, nothing else.
        message = f"backing file missing: {chain.missing}"
        return disk, Problem(ProblemCode.BACKING_MISSING, path, message)
    return disk, None

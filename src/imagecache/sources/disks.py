"""Observe every instance disk and everything it uses, read from the headers themselves.

Headers are read from the files (``imagecache.formats``); no process is spawned per disk. Every
failure is a :class:`Problem` with a code, never an exception: a disk that cannot be read or
parsed makes the view incomplete (so nothing is removed) and the scan goes on.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Container, Iterator

from imagecache import naming
from imagecache.errors import ImageFormatError
from imagecache.formats import DATA_FILE, BackingChain, follow_chain, read_header_data, stat_names
from imagecache.formats.chain import HeaderCache
from imagecache.layout import CACHE_PREFIX, DISK_INFO, Layout
from imagecache.model import Disk, Kind, Problem, ProblemCode
from imagecache.sources import split
from imagecache.store.jsonfile import JsonFileError, read_json

__all__ = ["MAX_TREE_DEPTH", "disk_of", "inspect_file", "scan_instances"]

#: How many levels of subdirectories below an instance directory are scanned (``a/b/c``). A
#: directory deeper down is reported (``tree-too-deep``, blocking), never skipped in silence.
MAX_TREE_DEPTH = 3


def _instance_dirs(
    layout: Layout, skip: Container[str] = frozenset()
) -> tuple[list[os.DirEntry[str]], set[tuple[int, int] | None], list[Problem]]:
    """The instance directories under ``instances_path``, by name: directories and links to them.

    Not one: ``instances_path`` itself, no name :meth:`Layout.is_instance_name` refuses (the
    cache, ``locks``, every name starting with ``_base``: on shared storage each host may have
    its own ``_base_<ip>``, whose ``.part`` downloads are no instance's disks), nor any directory,
    real or linked, that is one of those under another name (``_base`` a link to ``realbase``).

    Operators symlink instance directories onto other volumes, so links are followed, and the
    instance keeps the link's name. Each directory is scanned once, under its real name if it has
    one (else the first link's): nothing is scanned twice and no link makes a loop. A link that
    cannot be resolved (dangling, unreadable, looping) hides an instance's disks: a blocking
    problem. Also returned: the ``(st_dev, st_ino)`` of every directory found or excluded, which
    no subdirectory of an instance is scanned as again.

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
        if d.name in skip:
            continue  # a live peer's, unchanged since it scanned it: not even stat()ed
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
    return dirs, seen, problems


def _dir_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a directory, or None when it cannot be stat()ed (then: not seen)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def scan_instances(
    layout: Layout,
    *,
    skip: Container[str] = frozenset(),
    split_at: int | None = split.MIN_DIRECTORIES,
) -> tuple[tuple[Disk, ...], tuple[Problem, ...]]:
    """Every disk image under every instance directory, with everything it uses.

    Every directory under ``instances_path`` (or symlink to one) except caches (``_base*``, and
    the cache under any name) and ``locks`` is an instance directory, listed by an inventory or
    not (``snapshots``, where Nova writes live-snapshot deltas, is one too), and every regular
    file in it is inspected whatever its name (``disk``, ``disk.local``, ``disk.swap``,
    ``disk.rescue``, ...), and so is every file in its subdirectories down to
    :data:`MAX_TREE_DEPTH` levels. A deeper directory makes the view incomplete. Below the
    instance directory itself no directory symlink is followed: one that leads into the
    instances tree hides nothing (its target is scanned under its own name, or is a cache), one
    that leads out of it makes the view incomplete.

    What a disk uses: its backing chain, and the qcow2 data files and VMDK extents of every image
    of it. A file with no disk header (a raw disk, ``console.log``, ``disk.info``) uses nothing;
    it is reported only when it may be another name of a cache entry (reached through a symlink,
    hard-linked, or a mount point), so that the entry it is counts as used. A symlink to nothing
    is a disk whose file is missing.

    Some files hold bytes the guest wrote: its serial console log, and disks Nova recorded as raw
    in ``disk.info`` (QEMU opens those as raw, whatever their first bytes say). That is decided
    before any chain is followed: what a header forged there names still counts as a user
    (keeping too much is safe), but is only found by ``stat``, never opened, and a garbage header is
    only a warning: otherwise any guest could stop every removal on its host, or make us open
    any host file.

    Files with a temporary name (``*.part``, ``*.converted``) are writes in progress or left
    behind, which no VM has attached: likewise, a valid header counts as a user, but a truncated
    or unresolvable one is only a warning, or one interrupted copy would stop every removal.

    A missing file of a chain (a backing file, a data file or extent qemu opens) that is named
    like a cache entry, or lies in a ``_base*`` directory, is a broken instance, a warning; any
    other (an external snapshot on a volume not mounted now) hides what lies behind it: blocking.

    ``skip``: names of instance directories not scanned (on shared storage, those a live peer
    owns: its manifest says what their disks use). ``split_at``: from how many directories on
    the second half is scanned by a second process (:mod:`imagecache.sources.split`; None:
    never); the result is the same either way.
    """
    instances_path = layout.instances_path
    try:
        dirs, known, dir_problems = _instance_dirs(layout, skip)
    except FileNotFoundError:
        message = "instances path does not exist"
        return (), (Problem(ProblemCode.INSTANCES_MISSING, instances_path, message),)
    except OSError as exc:
        message = f"cannot list: {exc.strerror}"
        return (), (Problem(ProblemCode.INSTANCES_UNLISTED, instances_path, message),)
    scan = _Scan(layout, dirs, known)
    scan.problems.extend(dir_problems)
    # A disk parked directly in instances_path (not in an instance directory) is a disk too.
    scan.files_of(instances_path, "-")
    # Shared storage: a live peer's directories are owned and scanned by it.
    todo = [d for d in dirs if d.name not in skip]
    half = len(todo) // 2 if split.worth_splitting(len(todo), at=split_at) else len(todo)
    first, second = todo[:half], todo[half:]
    child = split.start(lambda: scan.trees(second)) if second else None
    try:
        mine = scan.trees(first)
    except BaseException:
        if child is not None:  # an interrupt in the parent's half: no child left behind
            split.abandon(child)
        raise
    found = split.collect(child) if child is not None else None
    # The child scanned the second half from the state the parent had before the first: what
    # it found is what the parent would find next, unless the two halves met one directory (a
    # bind mount in both), which the sequential scan scans once, for the first half. ``known``
    # is the only state that decides what a directory yields (the header cache only saves
    # reads), and each half adds to it every directory it enters that was not in it: a
    # directory the parent's half added that the sequential scan would skip in the second half
    # is one the child entered and added too. No common addition: the same answers throughout.
    if found is not None and not (found.known & mine.known):
        scan.disks += found.disks
        scan.problems += found.problems
        scan.known |= found.known
    elif second:
        scan.trees(second)
    return tuple(scan.disks), tuple(scan.problems)


class _Scan:
    """One scan's state: what was found, and what every directory and disk shares."""

    __slots__ = ("_dirs", "_roots", "disks", "headers", "known", "layout", "problems")

    def __init__(
        self, layout: Layout, dirs: list[os.DirEntry[str]], known: set[tuple[int, int] | None]
    ) -> None:
        self.layout = layout
        self._dirs = (layout.instances_path, [d.path for d in dirs if d.is_symlink()])
        self._roots: tuple[str, ...] | None = None
        self.known = known
        # Thousands of disks share a few hundred bases: each base header is read once per scan.
        self.headers = HeaderCache()
        self.disks: list[Disk] = []
        self.problems: list[Problem] = []

    def files_of(self, path: str, instance: str) -> None:
        """Inspect the disk images of one directory, not its subdirectories nor raw files."""
        before = len(self.disks)
        self._directory(path, instance, 0, descend=False)
        self.disks[before:] = [d for d in self.disks[before:] if d.format not in ("raw", "unknown")]

    def trees(self, directories: list[os.DirEntry[str]]) -> split.Found:
        """:meth:`tree` of each instance directory, in order: what it added (a :class:`Found`)."""
        disks, problems, entered = len(self.disks), len(self.problems), set(self.known)
        for directory in directories:
            self.tree(directory.path, directory.name)
        added = self.known - entered
        return split.Found(self.disks[disks:], self.problems[problems:], added)

    def tree(self, root: str, instance: str) -> None:
        """Every directory of one instance, depth first in name order, down to the bound."""
        pending = [(root, 0)]
        while pending:
            path, level = pending.pop()
            pending.extend(
                reversed([(d, level + 1) for d in self._directory(path, instance, level)])
            )

    def _directory(
        self, path: str, instance: str, level: int, *, descend: bool = True
    ) -> list[str]:
        """Inspect the files of one directory; return its subdirectories to scan.

        ``descend`` False: the files only (``instances_path`` itself, whose directories are the
        instance directories, scanned each as its own tree).
        """
        try:
            with os.scandir(path) as it:
                listing = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            message = f"cannot list: {exc.strerror}"
            self.problems.append(Problem(ProblemCode.INSTANCE_UNLISTED, path, message))
            return []
        files: list[os.DirEntry[str]] = []
        subdirs: list[str] = []
        for entry in listing:
            if entry.is_file(follow_symlinks=False):
                files.append(entry)
            elif entry.is_dir(follow_symlinks=False):
                if descend:
                    subdirs.extend(self._subdir(entry, level))
            elif entry.is_symlink() and self._link(entry, instance, descend=descend):
                files.append(entry)
            elif _is_block_device(entry):
                files.append(entry)  # an LVM or loop device as a disk: read as qemu reads it
            # Anything else (a FIFO, a character device, a socket) is never opened.
        guest = _GuestWritten(path, {f.name for f in files})
        # disk.info first, whose bytes (read as any file's header) say which disks are raw; the
        # results are kept in name order all the same.
        found: list[tuple[Disk | None, Problem | None]] = [(None, None)] * len(files)
        for i in sorted(range(len(files)), key=lambda i: files[i].name != DISK_INFO):
            entry = files[i]
            found[i] = _inspect_disk(
                entry.path, instance, self.headers, guest=guest, layout=self.layout, entry=entry,
            )  # fmt: skip
        for disk, problem in found:
            if disk is not None:
                self.disks.append(disk)
            if problem is not None:
                self.problems.append(problem)
        return subdirs

    def _subdir(self, entry: os.DirEntry[str], level: int) -> Iterator[str]:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            message = f"cannot stat: {exc.strerror}"
            self.problems.append(Problem(ProblemCode.INSTANCE_UNLISTED, entry.path, message))
            return
        # An instance directory (scanned under its own name), a cache, or seen already (a bind
        # mount of one): not again. Compared by stat(), as a mount point's d_ino is the covered one.
        found = (st.st_dev, st.st_ino)
        if found in self.known:
            return
        self.known.add(found)
        if level + 1 > MAX_TREE_DEPTH:
            message = (
                f"directory more than {MAX_TREE_DEPTH} levels below its instance directory: "
                "not scanned, the disks in it are not seen"
            )
            self.problems.append(Problem(ProblemCode.TREE_TOO_DEEP, entry.path, message))
            return
        yield entry.path

    def _link(self, entry: os.DirEntry[str], instance: str, *, descend: bool = True) -> bool:
        """Whether a symlink in an instance tree names a regular file, to inspect as one.

        Its target is found by ``stat`` first, never opened here. A regular file is then read
        like any disk, wherever it lies: libvirt and qemu open it as the disk, and a backing file
        is opened under the same rule. A directory is no subdirectory to scan (see
        :meth:`_dir_link`); nothing at all is a disk whose file is missing; a device or FIFO is
        no disk and no entry, and is never opened.
        """
        try:
            st = os.stat(entry.path)
        except FileNotFoundError:
            if descend:
                self._dangling(entry, instance)
            return False
        except OSError as exc:
            if descend:  # in instances_path itself, the instance-directory listing reports it
                message = f"cannot resolve symlink: {exc.strerror}"
                self.problems.append(Problem(ProblemCode.DISK_UNREADABLE, entry.path, message))
            return False
        if stat.S_ISDIR(st.st_mode):
            if descend:
                self._dir_link(entry.path)
            return False
        return stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)

    def _dangling(self, entry: os.DirEntry[str], instance: str) -> None:
        # realpath resolves as far as it can with lstat and readlink: the name of what is missing.
        target = os.path.realpath(entry.path)
        disk = Disk(entry.path, instance, "unknown", chain=(target,), missing=target)
        self.disks.append(disk)
        cache_like = _cache_like(target, self.layout)
        code = ProblemCode.BACKING_MISSING if cache_like else ProblemCode.CHAIN_LINK_MISSING
        problem = Problem(code, entry.path, f"symlink to a file that does not exist: {target}")
        self.problems.append(_excused(problem, entry.name, frozenset()))

    def _dir_link(self, path: str) -> None:
        """A directory symlink below an instance directory: never followed, maybe reported."""
        target = os.path.realpath(path)
        if any(
            target == root or target.startswith(root.rstrip("/") + "/") for root in self._tree()
        ):
            return  # scanned under its own name, or deliberately not (a cache, the locks)
        message = (
            f"symlinked directory leads out of the instances tree, to {target}: not followed, "
            "the disks there are not seen (link the instance directory itself instead)"
        )
        self.problems.append(Problem(ProblemCode.TREE_LINK_UNFOLLOWED, path, message))

    def _tree(self) -> tuple[str, ...]:
        """The real paths the scanned tree lies in: the instances path, linked instance dirs."""
        if self._roots is None:
            instances_path, linked = self._dirs
            self._roots = tuple(os.path.realpath(p) for p in (instances_path, *linked))
        return self._roots


class _GuestWritten(Container[str]):
    """Names in one directory whose content the guest controls and QEMU never parses.

    The console log, and every disk ``disk.info`` records as raw (Nova writes it when it creates
    the disk and drives libvirt's format from it, so a guest cannot change it; bug 1221190). An
    unreadable or malformed ``disk.info`` protects nothing: the headers are then believed. It is
    parsed only when a question needs it, once per directory (most directories have one), from
    the bytes its header read gave (:meth:`offer`) when those are the whole of the file listed,
    else read again as JSON.
    """

    __slots__ = ("_directory", "_has_info", "_info", "_raw")

    def __init__(self, directory: str, names: Container[str]) -> None:
        self._directory = directory
        self._has_info = DISK_INFO in names
        self._info: bytes | None = None
        self._raw: frozenset[str] | None = None

    def offer(self, entry: os.DirEntry[str], st: os.stat_result, data: bytes) -> None:
        """What reading ``entry``'s header gave: the whole ``disk.info``, maybe.

        Taken only from the regular file listed under that name (not a symlink: the JSON reader
        never follows one; the inode opened is the one listed, so nothing was swapped in) when
        the read got all of it; anything else is read again as JSON, as before.
        """
        if (
            entry.name == DISK_INFO
            and entry.is_file(follow_symlinks=False)
            and stat.S_ISREG(st.st_mode)
            and st.st_ino == entry.inode()
            and len(data) == st.st_size
        ):
            self._info = data

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name.startswith(_CONSOLE_LOG) and (name == _CONSOLE_LOG or name[11] == "."):
            return True
        if self._raw is None:
            if not self._has_info:
                self._raw = frozenset()
            elif self._info is not None:
                self._raw = _raw_per_info(_parse_info(self._info))
            else:
                self._raw = _raw_per_disk_info(self._directory)
        return name in self._raw


def _raw_per_disk_info(directory: str) -> frozenset[str]:
    try:
        info = read_json(os.path.join(directory, DISK_INFO), max_bytes=_DISK_INFO_MAX)
    except JsonFileError:
        return frozenset()
    return _raw_per_info(info)


def _parse_info(data: bytes) -> object:
    """``disk.info``'s bytes as :func:`read_json` takes them: UTF-8 JSON, else nothing."""
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def _raw_per_info(info: object) -> frozenset[str]:
    if not isinstance(info, dict):
        return frozenset()
    return frozenset(os.path.basename(str(k)) for k, v in info.items() if v == "raw")


_CONSOLE_LOG = "console.log"
# What a guest (or an interrupted copy) can cause with forged bytes: a header that cannot be
# parsed, or a chain that cannot be followed (a json: name, a loop, deeper than the limit, which
# a long run of external snapshots reaches legitimately: still blocking, being unresolved, or a
# link that is missing). A guest-written file's names are only stat()ed, so its only causes are
# the first two; a temporary file's chain is followed.
_FORGEABLE = frozenset(
    {
        ProblemCode.HEADER_GARBAGE,
        ProblemCode.CHAIN_UNRESOLVABLE,
        ProblemCode.CHAIN_TOO_DEEP,
        ProblemCode.CHAIN_LINK_MISSING,
    }
)
_WHY = {
    ProblemCode.GUEST_WRITTEN_HEADER: "guest-written file (console log, or raw per disk.info)",
    ProblemCode.PARTIAL_WRITE_HEADER: "temporary file (partial write, attached to no VM)",
}
_DISK_INFO_MAX = 1 << 20  # Nova writes a line per disk


def _is_block_device(entry: os.DirEntry[str]) -> bool:
    try:
        return stat.S_ISBLK(entry.stat(follow_symlinks=False).st_mode)
    except OSError:
        return False


def _excused(problem: Problem, name: str, guest: Container[str]) -> Problem:
    """``problem``, or only a warning when no VM parses file ``name`` (a guest's, a temp)."""
    if problem.code not in _FORGEABLE:
        return problem
    if name in guest:
        code = ProblemCode.GUEST_WRITTEN_HEADER
    elif naming.classify(name) is Kind.TEMP:
        code = ProblemCode.PARTIAL_WRITE_HEADER
    else:
        return problem
    return Problem(code, problem.ref, f"{_WHY[code]}: {problem.message}")


def _cache_like(path: str, layout: Layout) -> bool:
    """Whether a missing file lies in a cache of this storage: a broken instance, no gap.

    Only a file directly in a cache directory under ``instances_path`` (the cache, or a peer's
    ``_base*``) qualifies: its name protects the entry of that name, and nothing can lie behind
    it unseen. Any other missing file, however it is named (a content-addressed snapshot store
    names its files like entries), may hide a chain back into the cache.
    """
    parent = os.path.dirname(path)
    folder = os.path.basename(parent)
    in_cache = folder == layout.cache_name or folder.startswith(CACHE_PREFIX)
    # Names may be resolved (a dangling link's realpath) while instances_path or the cache is
    # a symlink to another volume: compare with the resolved forms too. Rare: missing files only.
    tops = (layout.instances_path, os.path.realpath(layout.instances_path))
    return (in_cache and os.path.dirname(parent) in tops) or parent == os.path.realpath(
        layout.cache_dir
    )


_UNDECLARED = "\0undeclared"  # no format declared: the header says (an instance directory's disk)


def _inspect_disk(
    path: str,
    instance: str,
    headers: HeaderCache | None = None,
    *,
    layout: Layout,
    guest: Container[str] = frozenset(),
    entry: os.DirEntry[str] | None = None,
    declared: str | None = _UNDECLARED,
) -> tuple[Disk | None, Problem | None]:
    """The disk at ``path`` (listed as ``entry``) and what it uses, or why that is not known.

    ``guest``: names in its directory whose bytes are a guest's (asked only when the header names
    other files, or is garbage). ``declared``: the format qemu opens it as, when something says
    (libvirt's ``<driver type>``; None is raw): a header of another format is a guest's bytes.
    """
    name = entry.name if entry is not None else os.path.basename(path)
    if declared is not _UNDECLARED and declared in (None, "raw"):
        guest = frozenset({name})
    try:
        header, st, data = read_header_data(path)
    except FileNotFoundError:
        message = "vanished while the instance was scanned"
        return None, Problem(ProblemCode.DISK_VANISHED, path, message)
    except OSError as exc:
        message = f"cannot read header: {exc.strerror}"
        return None, Problem(ProblemCode.DISK_UNREADABLE, path, message)
    except ImageFormatError as exc:
        problem = Problem(ProblemCode.HEADER_GARBAGE, path, f"unparsable image header: {exc}")
        return None, _excused(problem, name, guest)
    if not header.is_disk_image:
        if isinstance(guest, _GuestWritten) and entry is not None:
            guest.offer(entry, st, data)
        return _raw_disk(path, instance, st, entry), None
    if declared is not _UNDECLARED and header.format != declared:
        guest = frozenset({name})
    if header.names_files and name in guest:
        chain = stat_names(path, header, st, headers=headers)
    else:
        chain = follow_chain(path, header, st, headers=headers)
    disk = disk_of(path, instance, chain)
    if chain.error is None and chain.missing is None and not chain.attached:
        return disk, None  # nearly every disk
    unseen = _chain_problem(chain, layout)
    return disk, unseen and _excused(unseen, name, guest)


def inspect_file(
    path: str, owner: str, headers: HeaderCache, *, layout: Layout, declared: str | None
) -> tuple[Disk | None, Problem | None]:
    """One disk file named from outside an instance directory (a libvirt domain's), read as an
    instance disk is, as the format it is ``declared`` to be (None: raw, as libvirt does not
    probe). A header of any other format is bytes qemu never parses there (a guest's, in a raw or
    fixed-VHD disk): what it names is only ``stat``-ed (see :func:`scan_instances`)."""
    return _inspect_disk(path, owner, headers, layout=layout, declared=declared)


def _raw_disk(
    path: str, instance: str, st: os.stat_result, entry: os.DirEntry[str] | None
) -> Disk | None:
    """A file with no disk header, if it may be another name of a cache entry.

    A file with one name (``st_nlink``), not reached through a symlink nor mounted on its name
    (the directory's ``d_ino`` is then the covered inode's), can only be itself: no entry is it.
    """
    if not stat.S_ISREG(st.st_mode):
        return None
    if entry is not None and not (
        entry.is_symlink() or st.st_nlink > 1 or entry.inode() != st.st_ino
    ):
        return None
    return Disk(path, instance, "raw", file_id=(st.st_dev, st.st_ino))


def disk_of(path: str, instance: str, chain: BackingChain) -> Disk:
    """The :class:`Disk` value of what ``chain`` found for the file at ``path``."""
    if not chain.attached:  # nearly every disk: no data file, no extent
        fmt, links, ids = chain.header.format, chain.links, chain.link_ids
        return Disk(path, instance, fmt, links, chain.missing, ids, chain.file_id)
    data = [a for a in chain.attached if a.role == DATA_FILE]
    extents = [a for a in chain.attached if a.role != DATA_FILE]
    return Disk(
        path=path,
        instance=instance,
        format=chain.header.format,
        chain=chain.links,
        missing=chain.missing,
        chain_ids=chain.link_ids,
        file_id=chain.file_id,
        data_files=tuple((a.depth, a.path) for a in data),
        data_file_ids=tuple(a.file_id for a in data),
        extents=tuple((a.depth, a.path) for a in extents),
        extent_ids=tuple(a.file_id for a in extents),
    )


def _chain_problem(chain: BackingChain, layout: Layout) -> Problem | None:
    if chain.error is not None:
        code = ProblemCode.CHAIN_TOO_DEEP if chain.too_deep else ProblemCode.CHAIN_UNRESOLVABLE
        return Problem(code, chain.path, f"backing chain not resolved: {chain.error}")
    if not chain.followed:
        return None  # names a guest wrote were only stat()ed: a missing one is no gap
    missing = [("backing file", chain.missing)] if chain.missing is not None else []
    missing += [(a.role, a.path) for a in chain.attached if a.opened and a.missing]
    if not missing:
        return None
    message = "; ".join(f"{what} missing: {path}" for what, path in missing)
    if all(_cache_like(path, layout) for _, path in missing):
        # A broken instance, not a gap in the view: its missing base is reported, nothing else.
        return Problem(ProblemCode.BACKING_MISSING, chain.path, message)
    message += " (not a cache entry: what lies behind it is not seen, a volume not mounted?)"
    return Problem(ProblemCode.CHAIN_LINK_MISSING, chain.path, message)

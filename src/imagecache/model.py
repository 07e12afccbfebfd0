"""Observations: what one look at a host saw, as immutable values.

Everything here is a frozen dataclass or a StrEnum, so an observation cannot change after it was
made and ``decide()`` (:mod:`imagecache.policy`) can be a pure function of its inputs. Problem
codes, like reason codes, are part of the JSON contract (DESIGN.md §6): add new ones, never
rename them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "PROBLEMS",
    "CacheEntry",
    "Disk",
    "Domain",
    "DomainFile",
    "FileType",
    "FsUsage",
    "InstanceRecord",
    "Integrity",
    "Inventory",
    "Kind",
    "Manifest",
    "Pin",
    "Problem",
    "ProblemCode",
    "ProblemSource",
    "ProblemTraits",
    "Source",
    "TrashEntry",
    "Upstream",
    "User",
]


class Kind(StrEnum):
    """What a name in the cache directory is (DESIGN.md §2)."""

    ORIGINAL = "original"
    SMALL = "small"
    RESIZED = "resized"
    SWAP = "swap"
    EPHEMERAL = "ephemeral"
    LEGACY_ID = "legacy-id"
    TEMP = "temp"
    UNKNOWN = "unknown"


class Integrity(StrEnum):
    """What verification knows of an entry's bytes (``imagecache.integrity``)."""

    UNVERIFIED = "unverified"  # no record, or the file changed since it was hashed
    GOOD = "good"
    CORRUPT = "corrupt"


class FileType(StrEnum):
    FILE = "file"
    SYMLINK = "symlink"
    DIRECTORY = "directory"
    OTHER = "other"


class Source(StrEnum):
    """Where knowledge that an entry is used comes from."""

    BACKING = "backing"
    INSTANCE = "instance"
    LIBVIRT = "libvirt"
    PEER = "peer"
    OPEN_FILE = "open-file"
    PIN = "pin"


class ProblemSource(StrEnum):
    """Which part of the host a problem is about."""

    CACHE = "cache"
    TRASH = "trash"
    INSTANCES = "instances"
    INSTANCE = "instance"
    DISK = "disk"
    INVENTORY = "inventory"
    REGISTRY = "registry"
    LIBVIRT = "libvirt"
    PEER = "peer"
    AUDIT = "audit"
    LOCKS = "locks"
    CONFIG = "config"


class ProblemCode(StrEnum):
    """What went wrong, as a stable kebab-case code; :data:`PROBLEMS` says what it implies."""

    CACHE_MISSING = "cache-missing"
    CACHE_UNLISTED = "cache-unlisted"
    ENTRY_UNSTATABLE = "entry-unstatable"
    TRASH_UNLISTED = "trash-unlisted"
    INSTANCES_MISSING = "instances-missing"
    INSTANCES_UNLISTED = "instances-unlisted"
    INSTANCE_UNLISTED = "instance-unlisted"
    INSTANCE_LINK_UNRESOLVABLE = "instance-link-unresolvable"
    DISK_VANISHED = "disk-vanished"
    DISK_UNREADABLE = "disk-unreadable"
    HEADER_GARBAGE = "header-garbage"
    CHAIN_UNRESOLVABLE = "chain-unresolvable"
    CHAIN_TOO_DEEP = "chain-too-deep"
    GUEST_WRITTEN_HEADER = "guest-written-header"
    PARTIAL_WRITE_HEADER = "partial-write-header"
    BACKING_MISSING = "backing-missing"
    CHAIN_LINK_MISSING = "chain-link-missing"
    TREE_TOO_DEEP = "tree-too-deep"
    TREE_LINK_UNFOLLOWED = "tree-link-unfollowed"
    RECORDS_UNREADABLE = "records-unreadable"
    RECORDS_CORRUPT = "records-corrupt"
    RECORDS_ABSENT = "records-absent"
    RECORDS_UNREGISTERED_HOST = "records-unregistered-host"
    REGISTRY_UNREADABLE = "registry-unreadable"
    REGISTRY_CORRUPT = "registry-corrupt"
    HOST_UNREGISTERED = "host-unregistered"
    AUDIT_UNWRITABLE = "audit-unwritable"
    LOCKS_UNCOLLECTED = "locks-uncollected"
    NOVA_MANAGER_ENABLED = "nova-manager-enabled"
    ENTRY_CORRUPT = "entry-corrupt"
    DIGESTS_UNWRITABLE = "digests-unwritable"
    LIBVIRT_OFF = "libvirt-off"
    LIBVIRT_UNAVAILABLE = "libvirt-unavailable"
    DOMAIN_UNREADABLE = "domain-unreadable"
    DOMAIN_DISK_MISSING = "domain-disk-missing"
    DOMAIN_DISK_DELETED = "domain-disk-deleted"
    DOMAIN_DISK_UNRESOLVED = "domain-disk-unresolved"
    DOMAIN_NETWORK_DISK = "domain-network-disk"
    PEER_MANIFEST_MISSING = "peer-manifest-missing"
    PEER_MANIFEST_UNREADABLE = "peer-manifest-unreadable"
    PEER_STALE = "peer-stale"
    PEER_INCOMPLETE = "peer-incomplete"
    MANIFEST_UNWRITABLE = "manifest-unwritable"
    MANIFESTS_UNLISTED = "manifests-unlisted"
    HOST_NAME_SHARED = "host-name-shared"
    COORDINATION_UNAVAILABLE = "coordination-unavailable"
    COORDINATION_OFF = "coordination-off"
    # Capacity (issue 13).
    PINS_UNREADABLE = "pins-unreadable"
    FILESYSTEM_UNSTATABLE = "filesystem-unstatable"
    CAPACITY_SHORTFALL = "capacity-shortfall"
    UPSTREAM_UNAVAILABLE = "upstream-unavailable"


@dataclass(frozen=True, slots=True)
class ProblemTraits:
    """What a problem code implies.

    ``blocking``: the view is incomplete, so nothing is removed. ``hides_entries``: the cache
    directory itself was not fully listed, so the names of the plan are not every entry's (no
    lock file may be judged dead by them). ``fails``: it does not block anything, but the
    command reporting it exits 1 (a finding the operator must act on).
    """

    source: ProblemSource
    blocking: bool
    hides_entries: bool = False
    fails: bool = False


_S = ProblemSource
_C = ProblemCode
# The one table: whether a problem blocks removal depends on its code, never on its wording.
PROBLEMS: dict[ProblemCode, ProblemTraits] = {
    _C.CACHE_MISSING: ProblemTraits(_S.CACHE, blocking=False, hides_entries=True),
    _C.CACHE_UNLISTED: ProblemTraits(_S.CACHE, blocking=True, hides_entries=True),
    _C.ENTRY_UNSTATABLE: ProblemTraits(_S.CACHE, blocking=True, hides_entries=True),
    _C.TRASH_UNLISTED: ProblemTraits(_S.TRASH, blocking=True),
    _C.INSTANCES_MISSING: ProblemTraits(_S.INSTANCES, blocking=True),
    _C.INSTANCES_UNLISTED: ProblemTraits(_S.INSTANCES, blocking=True),
    _C.INSTANCE_UNLISTED: ProblemTraits(_S.INSTANCE, blocking=True),
    _C.INSTANCE_LINK_UNRESOLVABLE: ProblemTraits(_S.INSTANCE, blocking=True),
    _C.DISK_VANISHED: ProblemTraits(_S.DISK, blocking=True),
    _C.DISK_UNREADABLE: ProblemTraits(_S.DISK, blocking=True),
    _C.HEADER_GARBAGE: ProblemTraits(_S.DISK, blocking=True),
    _C.CHAIN_UNRESOLVABLE: ProblemTraits(_S.DISK, blocking=True),
    # A long run of external snapshots reaches the limit legitimately: unresolved, so blocking.
    _C.CHAIN_TOO_DEEP: ProblemTraits(_S.DISK, blocking=True),
    # Bytes a guest wrote (console log, disks raw per disk.info) or a partial write no VM has
    # attached: a bad header there must not let any guest stop every removal on its host.
    _C.GUEST_WRITTEN_HEADER: ProblemTraits(_S.DISK, blocking=False),
    _C.PARTIAL_WRITE_HEADER: ProblemTraits(_S.DISK, blocking=False),
    # A broken instance, not a gap in the view: what is missing is (named like) a cache entry,
    # and counts by its name.
    _C.BACKING_MISSING: ProblemTraits(_S.DISK, blocking=False),
    # Missing, and no cache entry: an external snapshot (data file, extent) on a volume that is
    # unmounted, say. What lies behind it is unknown, so the view is incomplete.
    _C.CHAIN_LINK_MISSING: ProblemTraits(_S.DISK, blocking=True),
    # A directory deeper below an instance directory than is scanned, or a symlinked one leading
    # out of the tree (never followed): disks there are not seen.
    _C.TREE_TOO_DEEP: ProblemTraits(_S.INSTANCE, blocking=True),
    _C.TREE_LINK_UNFOLLOWED: ProblemTraits(_S.INSTANCE, blocking=True),
    _C.RECORDS_UNREADABLE: ProblemTraits(_S.INVENTORY, blocking=True),
    _C.RECORDS_CORRUPT: ProblemTraits(_S.INVENTORY, blocking=True),
    _C.RECORDS_ABSENT: ProblemTraits(_S.INVENTORY, blocking=False),
    _C.RECORDS_UNREGISTERED_HOST: ProblemTraits(_S.INVENTORY, blocking=False),
    _C.REGISTRY_UNREADABLE: ProblemTraits(_S.REGISTRY, blocking=True),
    _C.REGISTRY_CORRUPT: ProblemTraits(_S.REGISTRY, blocking=True),
    # Problems of acting, not of observing (a Report's, never an Inventory's): each makes the
    # pass exit 1; "blocking" has no meaning there and is False.
    _C.HOST_UNREGISTERED: ProblemTraits(_S.REGISTRY, blocking=False),
    _C.AUDIT_UNWRITABLE: ProblemTraits(_S.AUDIT, blocking=False),
    _C.LOCKS_UNCOLLECTED: ProblemTraits(_S.LOCKS, blocking=False),
    # A warning about the configuration, reported by every pass: it changes no exit code.
    _C.NOVA_MANAGER_ENABLED: ProblemTraits(_S.CONFIG, blocking=False),
    # A corrupt entry still in use: kept (removing it would destroy its users) and reported with
    # every user; the pass exits 1 until it is repaired.
    _C.ENTRY_CORRUPT: ProblemTraits(_S.CACHE, blocking=False, fails=True),
    # Verification on, but no digest record can be kept: nothing is verified (rather than every
    # entry read whole on every pass), and the pass says so (exit 1).
    _C.DIGESTS_UNWRITABLE: ProblemTraits(_S.CACHE, blocking=False, fails=True),
    # libvirt neither configured nor running here: a note, said once per pass.
    _C.LIBVIRT_OFF: ProblemTraits(_S.LIBVIRT, blocking=False),
    # Configured but not answering (or libvirt-python missing): what its domains use is unknown.
    _C.LIBVIRT_UNAVAILABLE: ProblemTraits(_S.LIBVIRT, blocking=True),
    _C.DOMAIN_UNREADABLE: ProblemTraits(_S.LIBVIRT, blocking=True),
    # A domain's disk that does not exist (a volume not mounted?) or a storage volume that cannot
    # be resolved to a path: what lies behind it is unknown.
    _C.DOMAIN_DISK_MISSING: ProblemTraits(_S.LIBVIRT, blocking=True),
    _C.DOMAIN_DISK_UNRESOLVED: ProblemTraits(_S.LIBVIRT, blocking=True),
    # A running domain's disk deleted under it: libvirt's resolved chain says what it uses.
    _C.DOMAIN_DISK_DELETED: ProblemTraits(_S.LIBVIRT, blocking=False),
    # rbd, iscsi, nbd...: no file here, nothing in this cache; noted.
    _C.DOMAIN_NETWORK_DISK: ProblemTraits(_S.LIBVIRT, blocking=False),
    # Shared storage: a peer (in compute_nodes, in the coordination group, or with a manifest)
    # whose manifest is missing, unreadable, older than peer_stale_seconds, or written from an
    # incomplete view: what its instances use is unknown, nothing on the storage is removed.
    _C.PEER_MANIFEST_MISSING: ProblemTraits(_S.PEER, blocking=True),
    _C.PEER_MANIFEST_UNREADABLE: ProblemTraits(_S.PEER, blocking=True),
    _C.PEER_STALE: ProblemTraits(_S.PEER, blocking=True),
    _C.PEER_INCOMPLETE: ProblemTraits(_S.PEER, blocking=True),
    _C.MANIFESTS_UNLISTED: ProblemTraits(_S.PEER, blocking=True),  # no host is known at all
    # Another machine writes this host's manifest: two hosts share one name, and each would
    # take the other's manifest for its own (and the other's users for nobody's).
    _C.HOST_NAME_SHARED: ProblemTraits(_S.PEER, blocking=True),
    # The coordination backend configured is down (or tooz missing): no host may know it is the
    # one cleaner, so nothing is removed; touching and manifests go on.
    _C.COORDINATION_UNAVAILABLE: ProblemTraits(_S.PEER, blocking=True),
    # Other hosts share the storage and no coordination is possible (tooz not installed, or
    # turned off): Nova's entry locks still serialise each removal; said once per pass.
    _C.COORDINATION_OFF: ProblemTraits(_S.PEER, blocking=False),
    # This host's own manifest could not be written: its peers will stop removing (stale), and
    # the pass says so (exit 1).
    _C.MANIFEST_UNWRITABLE: ProblemTraits(_S.PEER, blocking=False, fails=True),
    # The pins file (``imagecache pin``) exists and cannot be read: which entries are pinned is
    # unknown, so nothing is removed.
    _C.PINS_UNREADABLE: ProblemTraits(_S.CACHE, blocking=True),
    # Watermarks configured and the cache's filesystem cannot be measured (statvfs failed): the
    # watermark rule cannot run; age removals go on, and the pass says so (exit 1).
    _C.FILESYSTEM_UNSTATABLE: ProblemTraits(_S.CACHE, blocking=False, fails=True),
    # Over a capacity limit and everything left is protected (in use, pinned, too young, unknown,
    # or the view incomplete): what was freed, what was needed, why the rest stays (exit 1).
    _C.CAPACITY_SHORTFALL: ProblemTraits(_S.CACHE, blocking=False, fails=True),
    # evict_deleted_images_first and the image service cannot be listed (whole): the preference
    # is off for this pass, nothing else changes; a note.
    _C.UPSTREAM_UNAVAILABLE: ProblemTraits(_S.CACHE, blocking=False),
}
del _S, _C


@dataclass(frozen=True, slots=True)
class Problem:
    """Something that could not be observed (or done): a code, what it is about, and why.

    ``ref`` names the thing (a path, a host); ``message`` is for people. What the problem implies
    (its source, whether it blocks removal) comes from :data:`PROBLEMS` by its code.
    """

    code: ProblemCode
    ref: str
    message: str

    @property
    def source(self) -> ProblemSource:
        return PROBLEMS[self.code].source

    @property
    def blocking(self) -> bool:
        return PROBLEMS[self.code].blocking

    @property
    def hides_entries(self) -> bool:
        return PROBLEMS[self.code].hides_entries

    @property
    def fails(self) -> bool:
        return PROBLEMS[self.code].fails


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One name directly in the cache directory, as ``lstat`` saw it."""

    name: str
    kind: Kind
    file_type: FileType
    bytes_allocated: int
    bytes_apparent: int
    mtime: float
    inode: int
    device: int
    integrity: Integrity = Integrity.UNVERIFIED
    ctime_ns: int = 0  # the inode's last change (content or metadata), by lstat
    birth_ns: int = 0  # when the file was made (statx); 0: the filesystem does not say


@dataclass(frozen=True, slots=True)
class TrashEntry:
    """A quarantined entry under ``<cache>/.imagecache/trash/``."""

    name: str
    trash_name: str
    bytes_allocated: int
    quarantined_at: float
    inode: int


@dataclass(frozen=True, slots=True)
class User:
    """Something that uses an entry: ``ref`` names it (a disk path, an instance uuid, a host)."""

    source: Source
    ref: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Disk:
    """One instance file that uses other files, or may be a cache entry itself.

    A disk image and its resolved backing chain (nearest backing file first), or a raw file that
    may be another name of a cache entry (a symlink, a hard link, a mount point): ``format`` is
    ``qcow2``, ``vmdk`` or ``raw``, ``unknown`` for a symlink to nothing.

    ``chain`` holds absolute, normalised paths; a missing backing file is the last element and is
    also named in ``missing``. ``chain_ids`` holds the ``(st_dev, st_ino)`` of each file of
    ``chain`` as found through its name (symlinks followed), in the same order; a missing or
    unreadable last one has none. ``file_id`` is the disk file's own.

    ``data_files`` (qcow2 external data files) and ``extents`` (VMDK extent files) are
    ``(depth, path)`` pairs, depth 0 for the disk itself and n for ``chain[n - 1]``; their
    ``*_ids`` hold each one's ``(st_dev, st_ino)``, in the same order, None for one not found.
    """

    path: str
    instance: str
    format: str
    chain: tuple[str, ...] = ()
    missing: str | None = None
    chain_ids: tuple[tuple[int, int], ...] = ()
    file_id: tuple[int, int] | None = None
    data_files: tuple[tuple[int, str], ...] = ()
    data_file_ids: tuple[tuple[int, int] | None, ...] = ()
    extents: tuple[tuple[int, str], ...] = ()
    extent_ids: tuple[tuple[int, int] | None, ...] = ()


@dataclass(frozen=True, slots=True)
class DomainFile:
    """One file a libvirt domain names: ``role`` says where (``disk vda``, ``kernel``, ...).

    ``file_id`` is its ``(st_dev, st_ino)`` found by ``stat`` (never opened for this), None when
    it does not exist or the path is not absolute.
    """

    role: str
    path: str
    file_id: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Domain:
    """One libvirt domain, running or only defined, and every file it uses.

    ``files``: each file its XML names (disk sources, the backing chain libvirt reports for a
    running domain, mirrors, ``<os>`` kernel, initrd, loader, nvram, dtb). ``disks``: the chains
    read from its disk sources' own headers, as instance disks are read.
    """

    name: str
    uuid: str
    active: bool
    files: tuple[DomainFile, ...] = ()
    disks: tuple[Disk, ...] = ()


@dataclass(frozen=True, slots=True)
class Manifest:
    """What one host sharing the storage last said it uses (``.imagecache/hosts/<host>.json``).

    ``entries``: (name, st_dev, st_ino) of every entry its own sources use (never what it learnt
    from other manifests); ``instance_dirs``: the instance directories it owns and scans, which
    its peers may then skip; ``complete``: whether its own view was. A retired host's manifest
    says ``retired`` (by whom, when) and claims nothing. ``machine``: the machine id of the host
    that wrote it ("" unknown), so that two machines given one host name are told apart.
    """

    host: str
    written: float
    complete: bool
    entries: tuple[tuple[str, int, int], ...] = ()
    instance_dirs: tuple[str, ...] = ()
    retired: bool = False
    retired_by: str | None = None
    machine: str = ""


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One instance from an inventory source (DESIGN.md §7); only ``uuid`` is required."""

    uuid: str
    name: str | None = None
    host: str | None = None
    image_ref: str | None = None
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    swap_mb: int | None = None
    ephemeral_gb: int | None = None
    ephemeral_format: str | None = None
    vm_state: str | None = None
    task_state: str | None = None


@dataclass(frozen=True, slots=True)
class FsUsage:
    """The space of the cache's filesystem, by ``statvfs``, counted as ``df`` does.

    ``used_bytes`` is ``(f_blocks - f_bfree) * f_frsize``; ``available_bytes`` is ``f_bavail *
    f_frsize`` (what an unprivileged writer may still use: root's reserve is neither).
    """

    used_bytes: int
    available_bytes: int

    @property
    def used_percent(self) -> float:
        """``df``'s Use%: used / (used + available), in percent (0 on an empty filesystem)."""
        total = self.used_bytes + self.available_bytes
        return 100.0 * self.used_bytes / total if total > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Pin:
    """An image pinned by an operator (``imagecache pin``): its entries are never removed.

    ``image`` is a Glance image id or a URL, as given; it protects the entry named by its
    fingerprint and that entry's ``_sm`` and resized copies, and a legacy entry of its raw id.
    """

    image: str
    pinned_at: float  # epoch seconds
    by: str  # the host whose ``imagecache pin`` wrote it
    comment: str = ""


@dataclass(frozen=True, slots=True)
class Upstream:
    """What the image service says of its images: a listing's (image id, status) pairs.

    ``complete``: every page was read, so an entry whose fingerprint matches no listed id names
    an image that was deleted. Only ``evict_deleted_images_first`` reads it, for an order.
    """

    statuses: tuple[tuple[str, str], ...]
    complete: bool


@dataclass(frozen=True, slots=True)
class Inventory:
    """Everything one observation saw; the only input of ``decide()`` besides policy and now.

    ``registry`` is Nova's ``compute_nodes`` file as read: (host, last registration epoch) pairs of
    the hosts that share ``instances_path``.
    """

    host: str
    instances_path: str
    cache_dir: str
    entries: tuple[CacheEntry, ...] = ()
    disks: tuple[Disk, ...] = ()
    instances: tuple[InstanceRecord, ...] = ()
    trash: tuple[TrashEntry, ...] = ()
    registry: tuple[tuple[str, float], ...] = ()
    problems: tuple[Problem, ...] = ()
    # Cache entries some process holds open right now: (entry name, "pid N (comm)").
    open_files: tuple[tuple[str, str], ...] = ()
    domains: tuple[Domain, ...] = ()
    # Shared storage: every host's manifest read (this host's own included), and the members of
    # the coordination group (None: no group was consulted).
    manifests: tuple[Manifest, ...] = ()
    members: tuple[str, ...] | None = None
    owned_dirs: tuple[str, ...] = ()  # the instance directories this host owns (its manifest's)
    cache_per_host: bool = False  # ``_base_$my_ip``: compute_nodes' hosts are no cache peers
    # Capacity: the cache filesystem's space (None: not measured, or no watermark configured),
    # the operator's pins (``imagecache pin``), and the image service's listing (None: not asked
    # or not answering).
    filesystem: FsUsage | None = None
    pins: tuple[Pin, ...] = ()
    upstream: Upstream | None = None
    machine: str = ""  # this machine's id (/etc/machine-id); "" unknown

    @property
    def complete(self) -> bool:
        return not any(p.blocking for p in self.problems)

"""Observe a host, read-only: each source returns values plus typed problems, never raises.

:func:`observe` composes the view from every source: the cache directory and its trash
(``cache``), every instance disk's backing chain (``disks``), instance records (``records``),
libvirt's domains (``libvirt``), the processes holding entries open (``openfiles``) and Nova's
shared-storage registry (``registry``). A source that fails makes the view incomplete through
its problems' codes (:data:`imagecache.model.PROBLEMS`); nothing here decides anything.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from imagecache.integrity import DigestRecord, integrity_of
from imagecache.layout import Layout
from imagecache.model import (
    CacheEntry,
    Domain,
    FileType,
    FsUsage,
    InstanceRecord,
    Integrity,
    Inventory,
    Problem,
)
from imagecache.plan import Policy
from imagecache.settings import LibvirtSettings
from imagecache.sources import openfiles
from imagecache.sources.cache import scan_cache, scan_trash
from imagecache.sources.disks import scan_instances
from imagecache.sources.entries import scan_entry_users
from imagecache.sources.libvirt import Domains, observe_domains
from imagecache.sources.records import load_instance_records
from imagecache.sources.registry import observe_registry
from imagecache.store.digests import read_records
from imagecache.store.manifests import read_manifests
from imagecache.store.pins import read_pins
from imagecache.usage import claimed_by_live_peers

__all__ = [
    "SharedView",
    "load_instance_records",
    "observe",
    "observe_domains",
    "observe_registry",
    "scan_cache",
    "scan_entry_users",
    "scan_instances",
    "scan_trash",
    "with_integrity",
]


def with_integrity(
    entries: tuple[CacheEntry, ...], records: Mapping[str, DigestRecord]
) -> tuple[CacheEntry, ...]:
    """The entries, each with what its digest record says of its bytes (still the same file)."""
    if not records:
        return entries
    out = []
    for e in entries:
        integrity = integrity_of(e, records.get(e.name))
        out.append(
            e if integrity is Integrity.UNVERIFIED else dataclasses.replace(e, integrity=integrity)
        )
    return tuple(out)


def observe(
    layout: Layout,
    *,
    host: str,
    inventory_files: Iterable[str] = (),
    libvirt: LibvirtSettings | None = None,
    shared: SharedView | None = None,
    extra_problems: Iterable[Problem] = (),
) -> Inventory:
    """One read-only observation of a host: everything :func:`imagecache.policy.decide` needs.

    ``libvirt`` None: domains are not consulted at all (a library caller's choice; the
    configuration always says, see :class:`~imagecache.settings.LibvirtSettings`). ``shared``:
    how to read the other hosts of a shared storage (the instance directories live peers own are
    then not scanned: their manifests say what those use); None: every directory is scanned.
    """
    entries, cache_problems = scan_cache(layout.cache_dir)
    entries = with_integrity(entries, read_records(layout))
    manifests, manifest_problems = read_manifests(layout)
    registry, registry_problems = observe_registry(layout)
    records: list[InstanceRecord] = []
    record_problems: list[Problem] = []
    for path in inventory_files:
        found, problems = load_instance_records(path)
        records.extend(found)
        record_problems.extend(problems)
    members = None if shared is None else shared.members
    peers_view = Inventory(
        host, layout.instances_path, layout.cache_dir, registry=registry,
        problems=manifest_problems, manifests=manifests, members=members,
        cache_per_host=layout.cache_per_host,
    )  # fmt: skip
    claims = {} if shared is None else claimed_by_live_peers(peers_view, shared.policy, shared.now)
    claimed = frozenset(claims)
    own = {n for r in records if r.host == host for n in (r.uuid, r.name) if n}
    skip = _unchanged_since(layout, {d: t for d, t in claims.items() if d not in own})
    disks, disk_problems = scan_instances(layout, skip=skip)
    # An entry that names another (a golden qcow2 on a base) uses it while it exists.
    entry_users, entry_problems = scan_entry_users(layout, entries)
    domains = (
        observe_domains(libvirt, layout, host=host, disks={d.path: d for d in disks})
        if libvirt is not None
        else Domains()
    )
    records.extend(domains.records)
    by_file = {(e.device, e.inode): e.name for e in entries if e.file_type is FileType.FILE}
    held = openfiles.holders(by_file)  # one walk of /proc for the whole cache
    open_files = tuple(sorted((by_file[k], h) for k, hs in held.items() for h in hs))
    trash, trash_problems = scan_trash(layout.cache_dir)
    pins, pin_problems = read_pins(layout)
    previous = next((m.instance_dirs for m in manifests if m.host == host), ())
    return Inventory(
        host=host,
        instances_path=layout.instances_path,
        cache_dir=layout.cache_dir,
        entries=entries,
        disks=disks + entry_users,
        instances=tuple(records),
        registry=registry,
        trash=trash,
        open_files=open_files,
        domains=domains.domains,
        manifests=manifests,
        members=members,
        cache_per_host=layout.cache_per_host,
        owned_dirs=_owned_dirs(layout, own, domains.domains, previous=previous, claimed=claimed),
        filesystem=filesystem_usage(layout.cache_dir),
        pins=pins,
        problems=(
            *cache_problems,
            *pin_problems,
            *trash_problems,
            *disk_problems,
            *entry_problems,
            *record_problems,
            *domains.problems,
            *registry_problems,
            *manifest_problems,
            *extra_problems,
        ),
    )


def filesystem_usage(path: str) -> FsUsage | None:
    """The space of the filesystem ``path`` is on, as ``df`` counts it; None if statvfs fails."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return FsUsage(
        used_bytes=max(0, st.f_blocks - st.f_bfree) * st.f_frsize,
        available_bytes=st.f_bavail * st.f_frsize,
    )


#: A peer's clock and the file server's may differ: a directory changed less than this before
#: its claimer's manifest was written is scanned anyway.
CLOCK_MARGIN = 60.0


def _unchanged_since(layout: Layout, claims: dict[str, float]) -> frozenset[str]:
    """The claimed directories not changed since their claimer scanned them (their mtime, which
    a new or replaced disk moves, is older than its manifest): only those are skipped. A disk
    a peer made since its last manifest (a rebuild on another base) is then seen here too."""
    skip = []
    for name, written in claims.items():
        try:
            st = os.stat(os.path.join(layout.instances_path, name), follow_symlinks=False)
        except OSError:
            continue  # gone, or cannot be stat()ed: the scan says what it is
        if st.st_mtime < written - CLOCK_MARGIN:
            skip.append(name)
    return frozenset(skip)


@dataclass(frozen=True, slots=True)
class SharedView:
    """How a pass reads its peers: ``policy`` (``peer_stale_seconds``) and ``now`` to tell live
    manifests from stale ones, and the coordination group's ``members`` (None: no group)."""

    policy: Policy
    now: float
    members: tuple[str, ...] | None = None


def _owned_dirs(
    layout: Layout,
    own: set[str],
    domains: Iterable[Domain],
    *,
    previous: Iterable[str],
    claimed: frozenset[str],
) -> tuple[str, ...]:
    """The instance directories this host owns: its instance records' (``own``: uuids, names)
    and domains' (by uuid and name, and any that holds a file a domain names), and those its last
    manifest claimed that no live peer claims now (an instance migrated away is another host's)."""
    try:
        present = set(os.listdir(layout.instances_path))
    except OSError:
        return ()
    names = set(own)
    top = layout.instances_path.rstrip("/") + "/"
    for d in domains:
        names |= {d.uuid, d.name}
        names |= {f.path[len(top) :].split("/", 1)[0] for f in d.files if f.path.startswith(top)}
    names |= set(previous) - claimed
    return tuple(sorted(n for n in names & present if layout.is_instance_name(n)))

"""Observe a host, read-only: each source returns values plus typed problems, never raises.

:func:`observe` composes the view from every source: the cache directory and its trash
(``cache``), every instance disk's backing chain (``disks``), instance records (``records``),
libvirt's domains (``libvirt``), the processes holding entries open (``openfiles``) and Nova's
shared-storage registry (``registry``). A source that fails makes the view incomplete through
its problems' codes (:data:`imagecache.model.PROBLEMS`); nothing here decides anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from imagecache.integrity import DigestRecord, integrity_of
from imagecache.layout import Layout
from imagecache.model import CacheEntry, FileType, InstanceRecord, Integrity, Inventory, Problem
from imagecache.settings import LibvirtSettings
from imagecache.sources import openfiles
from imagecache.sources.cache import scan_cache, scan_trash
from imagecache.sources.disks import scan_instances
from imagecache.sources.entries import scan_entry_users
from imagecache.sources.libvirt import Domains, observe_domains
from imagecache.sources.records import load_instance_records
from imagecache.sources.registry import observe_registry
from imagecache.store.digests import read_records

__all__ = [
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
    extra_problems: Iterable[Problem] = (),
) -> Inventory:
    """One read-only observation of a host: everything :func:`imagecache.policy.decide` needs.

    ``libvirt`` None: domains are not consulted at all (a library caller's choice; the
    configuration always says, see :class:`~imagecache.settings.LibvirtSettings`).
    """
    entries, cache_problems = scan_cache(layout.cache_dir)
    entries = with_integrity(entries, read_records(layout))
    disks, disk_problems = scan_instances(layout)
    # An entry that names another (a golden qcow2 on a base) uses it while it exists.
    entry_users, entry_problems = scan_entry_users(layout, entries)
    records: list[InstanceRecord] = []
    record_problems: list[Problem] = []
    for path in inventory_files:
        found, problems = load_instance_records(path)
        records.extend(found)
        record_problems.extend(problems)
    domains = (
        observe_domains(libvirt, layout, host=host, disks={d.path: d for d in disks})
        if libvirt is not None
        else Domains()
    )
    records.extend(domains.records)
    registry, registry_problems = observe_registry(layout)
    by_file = {(e.device, e.inode): e.name for e in entries if e.file_type is FileType.FILE}
    held = openfiles.holders(by_file)  # one walk of /proc for the whole cache
    open_files = tuple(sorted((by_file[k], h) for k, hs in held.items() for h in hs))
    trash, trash_problems = scan_trash(layout.cache_dir)
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
        problems=(
            *cache_problems,
            *trash_problems,
            *disk_problems,
            *entry_problems,
            *record_problems,
            *domains.problems,
            *registry_problems,
            *extra_problems,
        ),
    )

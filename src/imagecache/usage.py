"""Who uses which cache entry: a pure index from entry name to users (DESIGN.md §2, §7).

Two kinds of evidence, both kept: the backing chains of instance disks (what QEMU will actually
open) and instance records (what Nova will ask for next boot: image, kernel, ramdisk, swap and
ephemeral names). A chain counts by *basename*, whatever directory it names, as Nova does, so a
disk that points at another host's ``_base_<ip>`` still protects our entry of the same name. It
also counts by *identity*: a link that is the same file as an entry (``st_dev``, ``st_ino``)
protects it whatever its name, so a backing file named through a symlink, or a hard link to an
entry, protects the entry. Quarantined entries (whose device is not recorded) count by name only.

The files a disk keeps guest bytes in besides its chain count the same way, by name and by
identity, at the depth of the image that names them: qcow2 external data files and VMDK
extents. And an instance file that *is* an entry (a raw disk or ISO symlinked or hard-linked to
``_base/<sha1>``) protects it by identity alone: its own name is no claim on any entry's.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from imagecache import naming
from imagecache.model import (
    Disk,
    FileType,
    InstanceRecord,
    Inventory,
    Kind,
    Manifest,
    Problem,
    ProblemCode,
    Source,
    User,
)
from imagecache.plan import Policy, iso

__all__ = [
    "Peer",
    "claimed_by_live_peers",
    "counted_records",
    "name_shared",
    "peer_problems",
    "peers",
    "pin_claims",
    "record_claims",
    "record_notes",
    "users_by_entry",
]

_ID_FIELDS = ("image_ref", "kernel_id", "ramdisk_id")


def counted_records(inventory: Inventory) -> tuple[InstanceRecord, ...]:
    """Records that protect entries here: this host's, unassigned ones, and registered peers'.

    A peer counts as long as it is in the registry at all, however old its heartbeat: Nova's 24 h
    window is how a host that was down lost its base images (LP 1078594 class).
    """
    sharing = sharing_hosts(inventory)
    return tuple(r for r in inventory.instances if r.host is None or r.host in sharing)


def sharing_hosts(inventory: Inventory) -> set[str]:
    """This host and every one that shares the storage: registered, a group member, with a
    manifest (not retired) or an unreadable one (a host only gone from compute_nodes counts)."""
    hosts = {inventory.host} | {host for host, _ in inventory.registry}
    hosts |= set(inventory.members or ())
    hosts |= {m.host for m in inventory.manifests if not m.retired}
    hosts |= {p.ref for p in inventory.problems if p.code is ProblemCode.PEER_MANIFEST_UNREADABLE}
    return hosts


def record_notes(inventory: Inventory) -> tuple[Problem, ...]:
    """Warnings about instance records that protect less than an operator may think.

    Not blocking: they change nothing a pass does, but a plan that quarantines a kernel should
    say that no record was there to protect it.
    """
    if not inventory.instances:
        return (
            Problem(
                ProblemCode.RECORDS_ABSENT,
                "-",
                "no instance records (--inventory, [imagecache] inventory_files): only disk "
                "backing chains protect entries, not kernels, ramdisks, shelved instances' images "
                "or swap/ephemeral files named by records alone",
            ),
        )
    counted = {id(r) for r in counted_records(inventory)}
    ignored = Counter(r.host for r in inventory.instances if id(r) not in counted)
    return tuple(
        Problem(
            ProblemCode.RECORDS_UNREGISTERED_HOST,
            str(host),
            f"{n} record(s) of host {host} protect nothing here: it is not in compute_nodes, "
            "so it does not share this storage",
        )
        for host, n in sorted(ignored.items(), key=lambda kv: str(kv[0]))
    )


def record_claims(record: InstanceRecord, policy: Policy) -> Iterator[tuple[str, str]]:
    """(entry name, detail) pairs an instance record protects."""
    for field in _ID_FIELDS:
        image_id = getattr(record, field)
        if not image_id:  # volume-booted instances have image_ref "" (nova-imagecache.md §9.19)
            continue
        detail = f"{field}={image_id}"
        fp = naming.fingerprint(image_id)
        yield fp, detail
        yield fp + "_sm", detail
        yield image_id, detail  # a legacy kernel/ramdisk cached under its raw id
    if record.swap_mb:
        yield naming.swap_name(record.swap_mb), f"swap_mb={record.swap_mb}"
    if record.ephemeral_gb:
        fs_format = record.ephemeral_format or policy.default_ephemeral_format
        name = naming.ephemeral_name(record.ephemeral_gb, fs_format)
        yield name, f"ephemeral_gb={record.ephemeral_gb} format={fs_format or 'vfat'}"


def users_by_entry(inventory: Inventory, policy: Policy) -> Mapping[str, tuple[User, ...]]:
    """Every user of every cache or trash entry, keyed by entry name.

    Only names present in the cache or the trash are indexed: a large host has tens of thousands
    of claims on names that do not exist (``_sm`` copies, raw ids), and nobody asks about them.
    """
    wanted = {e.name for e in inventory.entries} | {t.name for t in inventory.trash}
    same_file: defaultdict[tuple[int, int], list[str]] = defaultdict(list)
    for e in inventory.entries:
        if e.file_type is FileType.FILE:
            same_file[(e.device, e.inode)].append(e.name)
    found = _Users(wanted, same_file)
    users = found.by_name  # (source, ref, detail) of each user: deduplicated before it is built
    for disk in inventory.disks:
        found.disk(disk, Source.BACKING, disk.path)
    for domain in inventory.domains:  # what the hypervisor says each domain uses
        ref = domain.name
        for f in domain.files:
            found.claim(ref, f.path, f.file_id, f"{f.role}: {f.path}", Source.LIBVIRT)
        for disk in domain.disks:
            found.disk(disk, Source.LIBVIRT, ref, of=f" of {disk.path}")
    for record in counted_records(inventory):
        for name, detail in record_claims(record, policy):
            if name in wanted:
                users[name][Source.INSTANCE, record.uuid, detail] = None
    for m in inventory.manifests:  # what every other host says it uses, fresh or not
        if m.host == inventory.host or m.retired:
            continue
        detail = f"in use on host {m.host} (its manifest)"
        for name, device, inode in m.entries:
            found.claim(m.host, name, (device, inode) if device or inode else None, detail,
                        Source.PEER)  # fmt: skip
    for name, holder in inventory.open_files:  # a running qemu, qemu-nbd, anything
        if name in wanted:
            users[name][Source.OPEN_FILE, holder, "holds it open"] = None
    for image, detail, names in pin_claims(inventory, policy, wanted):
        for name in names:
            users[name][Source.PIN, image, detail] = None
    return {name: tuple([User(*c) for c in claims]) for name, claims in users.items()}


_FAMILY = frozenset({Kind.ORIGINAL, Kind.SMALL, Kind.RESIZED})


def pin_claims(
    inventory: Inventory, policy: Policy, wanted: set[str]
) -> Iterator[tuple[str, str, list[str]]]:
    """(image, detail, entry names) of every pin: the configuration's (``pinned_images``) and
    the operator's (``imagecache pin``). A pin protects the entry of the image's fingerprint,
    its ``_sm`` and resized copies, and a legacy entry of its raw id."""
    family: defaultdict[str, list[str]] = defaultdict(list)
    for name in wanted:
        prefix = naming.image_prefix(name)
        if prefix is not None and naming.classify(name) in _FAMILY:
            family[prefix].append(name)
    pins = [(image, "pinned ([imagecache] pinned_images)") for image in policy.pinned_images]
    for p in inventory.pins:
        note = f": {p.comment}" if p.comment else ""
        pins.append((p.image, f"pinned by `imagecache pin` on {p.by} at {iso(p.pinned_at)}{note}"))
    for image, detail in pins:
        names = sorted(family.get(naming.fingerprint(image), ()))
        if image in wanted and naming.classify(image) is Kind.LEGACY_ID:
            names.append(image)
        if names:
            yield image, detail, names


class _Users:
    """Users found so far, by entry name: of the names present, and of the files entries are."""

    __slots__ = ("by_name", "same_file", "wanted")

    def __init__(self, wanted: set[str], same_file: Mapping[tuple[int, int], list[str]]) -> None:
        self.wanted = wanted
        self.same_file = same_file
        # Users as plain tuples, in the order found, each once: a large host has tens of
        # thousands, and hashing a tuple is cheaper than hashing the User made of it.
        self.by_name: defaultdict[str, dict[tuple[Source, str, str], None]] = defaultdict(dict)

    def disk(self, disk: Disk, source: Source, ref: str, *, of: str = "") -> None:
        """Everything one disk uses: the entry it is, its chain, its data files and extents."""
        if disk.file_id is not None:
            for name in self.same_file.get(disk.file_id, ()):
                self.by_name[name][source, ref, f"the disk file itself{of}"] = None
        ids = disk.chain_ids
        for depth, link in enumerate(disk.chain, start=1):
            detail = "direct backing file" if depth == 1 else f"backing chain depth {depth}"
            # A missing or unreadable last link has no id: there is no file to compare.
            file_id = ids[depth - 1] if depth <= len(ids) else None
            self.claim(ref, link, file_id, detail + of, source)
        if not (disk.data_files or disk.extents):
            return  # nearly every disk
        for role, files, file_ids in (
            ("data file", disk.data_files, disk.data_file_ids),
            ("vmdk extent", disk.extents, disk.extent_ids),
        ):
            for (depth, path), file_id in zip(files, file_ids, strict=True):
                self.claim(ref, path, file_id, f"{role} at depth {depth}{of}", source)

    def claim(
        self,
        ref: str,
        path: str,
        file_id: tuple[int, int] | None,
        detail: str,
        source: Source = Source.BACKING,
    ) -> None:
        """``ref`` uses the file at ``path``: the entry of its basename, and the entry it is."""
        name = path[path.rfind("/") + 1 :]  # posixpath.basename, without the call
        if name in self.wanted:
            self.by_name[name][source, ref, detail] = None
        if file_id is None:
            return
        for other in self.same_file.get(file_id, ()):
            if other != name:
                self.by_name[other][source, ref, f"{detail} via {path}"] = None


# --- shared storage: peers and their manifests ---------------------------------------------------

LIVE, STALE, MISSING, INCOMPLETE, UNREADABLE, RETIRED, SKEWED = (
    "live", "stale", "missing", "incomplete", "unreadable", "retired", "skewed",
)  # fmt: skip
#: How far in the future a manifest may say it was written (clocks differ a little) before its
#: host's clock is judged wrong: such a manifest would otherwise never grow stale.
CLOCK_ALLOWANCE = 300.0


@dataclass(frozen=True, slots=True)
class Peer:
    """Another host sharing the storage, and what its manifest says of it now.

    ``state``: ``live`` (a fresh manifest from a complete view), ``stale`` (older than
    ``peer_stale_seconds``), ``missing`` (none: registered in ``compute_nodes`` or a member of the
    coordination group, never ran imagecache), ``incomplete`` (written from an incomplete view),
    ``unreadable``, or ``retired`` (an operator retired it, and it has not come back since).
    """

    host: str
    state: str
    registered: float | None = None
    member: bool = False
    manifest: Manifest | None = None


def peers(inventory: Inventory, policy: Policy, now: float) -> tuple[Peer, ...]:
    """Every host that shares this storage but this one: registered, a group member, or with a
    manifest (a host that only left ``compute_nodes`` is never forgotten while it has one)."""
    registered = dict(inventory.registry)
    members = set(inventory.members or ())
    manifests = {m.host: m for m in inventory.manifests}
    unreadable = {
        p.ref for p in inventory.problems if p.code is ProblemCode.PEER_MANIFEST_UNREADABLE
    }
    if inventory.cache_per_host:  # they share the instances path, not this cache
        registered = {}
    hosts = (set(registered) | members | set(manifests) | unreadable) - {inventory.host}
    found = []
    for host in sorted(hosts):
        m = manifests.get(host)
        at = registered.get(host)
        if host in unreadable:
            state = UNREADABLE
        elif m is not None and m.retired and host not in members and at is None:
            # Retiring drops it from compute_nodes under Nova's lock: registered again (whatever
            # its clock says), or a member, it came back.
            state = RETIRED
        elif m is None or m.retired:
            state = MISSING
        elif m.written > now + CLOCK_ALLOWANCE:
            state = SKEWED
        elif now - m.written > policy.peer_stale_seconds:
            state = STALE
        elif not m.complete:
            state = INCOMPLETE
        else:
            state = LIVE
        found.append(Peer(host, state, at, host in members, m))
    return tuple(found)


def name_shared(inventory: Inventory, policy: Policy, now: float) -> tuple[Problem, ...]:
    """A blocking problem if another machine wrote this host's manifest lately: two hosts share
    one name (``[DEFAULT] host``), and each takes the other's manifest for its own, so that
    neither counts what the other uses."""
    if not inventory.machine:
        return ()
    for m in inventory.manifests:
        if m.host != inventory.host or not m.machine or m.machine == inventory.machine:
            continue
        if now - m.written > policy.peer_stale_seconds:
            continue  # an old one (this host reinstalled, say): overwritten by this pass
        message = (
            f"the manifest of host {m.host} was written {max(0.0, now - m.written):.0f} s ago by "
            f"another machine (machine id {m.machine}, this one is {inventory.machine}): two "
            "hosts share one name, and neither would count what the other uses; nothing is "
            "removed until each has its own [DEFAULT] host"
        )
        return (Problem(ProblemCode.HOST_NAME_SHARED, m.host, message),)
    return ()


def peer_problems(found: Iterable[Peer], policy: Policy, now: float) -> tuple[Problem, ...]:
    """One blocking problem per peer that is neither live nor retired (an unreadable manifest is
    reported where it was read)."""
    retire = "or retire it if it is gone for good (imagecache peers retire {host})"
    problems = []
    for p in found:
        if p.state in (LIVE, RETIRED, UNREADABLE):
            continue
        where = " and ".join(
            w
            for w, yes in (
                ("in compute_nodes", p.registered is not None),
                ("in the coordination group", p.member),
            )
            if yes
        )
        if p.state == MISSING:
            code = ProblemCode.PEER_MANIFEST_MISSING
            why = (
                f"host {p.host} shares this storage ({where}) but has written no manifest: what "
                "its instances use is unknown, nothing on this storage is removed; run "
                f"imagecache there (a host upgraded from Nova's manager), {retire}"
            )
        elif p.state == SKEWED:
            assert p.manifest is not None
            code = ProblemCode.PEER_STALE
            why = (
                f"host {p.host}'s manifest says it was written {p.manifest.written - now:.0f} s "
                "from now: its clock is wrong, and its manifest would never grow stale. Nothing "
                f"on this storage is removed until its clock is fixed, {retire}"
            )
        elif p.state == STALE:
            assert p.manifest is not None
            code = ProblemCode.PEER_STALE
            why = (
                f"host {p.host}'s manifest is {now - p.manifest.written:.0f} s old (more than "
                f"peer_stale_seconds, {policy.peer_stale_seconds}): is it down? Nothing on this "
                f"storage is removed until it writes one again, {retire}"
            )
        else:
            code = ProblemCode.PEER_INCOMPLETE
            why = (
                f"host {p.host} wrote its manifest from an incomplete view: what its instances "
                "use may be more than it says, nothing on this storage is removed until its "
                "view is complete again"
            )
        problems.append(Problem(code, p.host, why.format(host=p.host)))
    return tuple(problems)


def claimed_by_live_peers(inventory: Inventory, policy: Policy, now: float) -> dict[str, float]:
    """The instance directories live peers own (and scan), each with when its claimer last
    looked at it (the oldest claim's manifest time): this host may skip those unchanged since."""
    live = {p.host for p in peers(inventory, policy, now) if p.state == LIVE}
    claimed: dict[str, float] = {}
    for m in inventory.manifests:
        if m.host in live:
            for d in m.instance_dirs:
                claimed[d] = min(claimed.get(d, m.written), m.written)
    return claimed

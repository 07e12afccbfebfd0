"""Observe libvirt's domains: every file each one uses, and the Nova records in their metadata.

The hypervisor knows what no directory listing shows: the disks of domains defined but shut off,
disks outside ``instances_path``, the backing chain it resolved for a running domain, the
``<os>`` kernel and initrd, and, for Nova's domains, the image id in ``<nova:instance>``. Every
domain is listed, running or not, read-only (``openReadOnly``); nothing here changes libvirt.

What is and is not a problem:

- libvirt *configured* (``[imagecache] libvirt_uri``, Nova's ``[libvirt] connection_uri`` or
  ``virt_type``) or a daemon socket present, but no answer (libvirt-python missing, the daemon
  down or hung past the timeout), or a domain whose XML cannot be read: blocking, since what
  those domains use is unknown.
- Neither configured nor running: off, said once as a note (``libvirt_uri = none``: off,
  silently, as the operator asked).
- A network disk (rbd, iscsi, nbd, ...): noted; it is no file here.

libvirt's XML is the hypervisor's, but its ``<metadata>`` is whatever a client wrote: it is
parsed as hostile text (no DTD, bounded, values checked like an inventory's). The files it names
are found by ``stat`` and read with the same header reader as instance disks, never opened
otherwise; a disk qemu opens raw (``<driver type='raw'>``, or no type: libvirt does not probe)
holds a guest's bytes, whose header names are only ``stat``-ed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import stat
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imagecache import naming
from imagecache.formats.chain import HeaderCache
from imagecache.layout import Layout
from imagecache.model import Disk, Domain, DomainFile, InstanceRecord, Problem, ProblemCode
from imagecache.settings import LibvirtSettings
from imagecache.sources.disks import inspect_file

__all__ = ["DAEMON_SOCKETS", "NOVA_NAMESPACES", "Domains", "observe_domains", "parse_domain"]

#: Sockets of a libvirt daemon on this host (monolithic libvirtd, modular virtqemud): one that
#: exists means libvirt runs here, configured or not.
DAEMON_SOCKETS = (
    "/run/libvirt/libvirt-sock",
    "/run/libvirt/libvirt-sock-ro",
    "/run/libvirt/virtqemud-sock",
    "/run/libvirt/virtqemud-sock-ro",
)
#: Nova's domain metadata (``nova/virt/libvirt/config.py``), newest first.
NOVA_NAMESPACES = (
    "http://openstack.org/xmlns/libvirt/nova/1.1",
    "http://openstack.org/xmlns/libvirt/nova/1.0",
)
_MAX_XML = 16 << 20  # a domain's XML is a few KiB; a 16 MiB one is refused, not parsed
_MAX_SIZE = 1 << 40  # MiB of swap, GiB of ephemeral disk, as for inventory records
_VIR_ERR_NO_DOMAIN = 42  # undefined between listing and reading: gone, nothing to protect
_VIR_DOMAIN_XML_INACTIVE = 2
# Disk types that name no file here.
_NOT_FILES = frozenset({"network", "nvme", "vhostuser", "vhostvdpa"})


@dataclass(frozen=True, slots=True)
class Domains:
    """What the libvirt source found: domains, the Nova records of their metadata, problems."""

    domains: tuple[Domain, ...] = ()
    records: tuple[InstanceRecord, ...] = ()
    problems: tuple[Problem, ...] = ()


@dataclass(slots=True)
class _Parsed:
    """What one domain's XML says, before any file is looked at."""

    files: list[tuple[str, str]] = field(default_factory=list)  # (role, path)
    # (role, path, declared format or None): disks, and file-backed filesystems
    sources: list[tuple[str, str, str | None]] = field(default_factory=list)
    volumes: list[tuple[str, str, str, str | None]] = field(default_factory=list)  # role, pool, vol
    network: list[str] = field(default_factory=list)
    resolved: set[str] = field(default_factory=set)  # disk sources libvirt reported a chain of
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Listed:
    """One domain as listed, in plain values (all libvirt calls happen in the worker thread)."""

    name: str
    uuid: str
    active: bool
    parsed: _Parsed | None
    error: str | None = None
    volumes: Mapping[tuple[str, str], str | Exception] = field(default_factory=dict)


def observe_domains(
    settings: LibvirtSettings,
    layout: Layout,
    *,
    host: str,
    disks: Mapping[str, Disk] = {},
    sockets: Sequence[str] = DAEMON_SOCKETS,
) -> Domains:
    """Every domain of the configured connection and what it uses; never raises.

    ``disks``: chains already read by the instance scan, by path, reused for a domain disk of the
    same path. ``sockets``: where a running daemon would be found (the test suite's edge).
    """
    uri = settings.uri
    if uri is None:
        return Domains()  # the operator said so: no note every pass
    if not settings.configured and not any(os.path.exists(s) for s in sockets):
        why = "not configured and no libvirt daemon socket on this host"
        return Domains(problems=(_off(why),))
    listed = _list(uri, settings.timeout)
    if isinstance(listed, Problem):
        return Domains(problems=(listed,))
    reader = _Reader(layout, host, disks)
    for item in listed:
        reader.add(uri, item)
    return Domains(tuple(reader.domains), tuple(reader.records), tuple(reader.problems))


def _off(why: str) -> Problem:
    message = f"libvirt {why}: domains are not consulted"
    return Problem(ProblemCode.LIBVIRT_OFF, "-", message)


def _list(uri: str, timeout: float) -> list[_Listed] | Problem:
    """Every domain of ``uri``, listed in a worker thread that may take ``timeout`` seconds.

    A daemon that hangs must not hang the pass: past the timeout the thread is left behind (a
    daemon thread, blocked in libvirt) and the view is incomplete. While one is still blocked,
    no other is started (a hung libvirtd must not cost the daemon a thread per pass).
    """
    global _stuck  # noqa: PLW0603 - one per process, like the libvirt connection it waits on
    with _stuck_lock:
        if _stuck is not None and _stuck.is_alive():
            return _unavailable(uri, "the previous listing has still not returned")
    answer: queue.Queue[list[_Listed] | Problem] = queue.Queue(1)

    def work() -> None:
        try:
            answer.put(_connect_and_list(uri))
        except Exception as exc:
            answer.put(_unavailable(uri, f"listing domains failed: {exc}"))

    worker = threading.Thread(target=work, name="imagecache-libvirt", daemon=True)
    worker.start()
    try:
        return answer.get(timeout=timeout)
    except queue.Empty:
        with _stuck_lock:
            _stuck = worker
        return _unavailable(uri, f"no answer within {timeout:g} s")


_stuck_lock = threading.Lock()
_stuck: threading.Thread | None = None  # a listing that timed out and may still be blocked


def _unavailable(uri: str, why: str) -> Problem:
    return Problem(
        ProblemCode.LIBVIRT_UNAVAILABLE,
        uri,
        f"{why}: what its domains use is unknown, nothing is removed "
        "(start libvirt, or set [imagecache] libvirt_uri = none on a host without it)",
    )


_event_loop = threading.Lock()
_event_loop_registered = False


def _connect_and_list(uri: str) -> list[_Listed] | Problem:
    """In the worker thread: connect read-only, list every domain, read and parse its XML."""
    try:
        import libvirt
    except ImportError:
        return _unavailable(
            uri, "libvirt-python is not installed (pip install 'imagecache[libvirt]')"
        )
    libvirt.registerErrorHandler(_quiet, None)  # errors are raised; do not print them too
    if uri.startswith("qemu:///embed"):
        _register_event_loop(libvirt)  # the embedded driver insists on one
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as exc:
        return _unavailable(uri, f"cannot connect: {exc}")
    try:
        try:
            found = conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            return _unavailable(uri, f"cannot list domains: {exc}")
        return [d for d in (_read_domain(libvirt, conn, dom) for dom in found) if d is not None]
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def _quiet(_ctx: object, _err: object) -> None:
    return None


def _register_event_loop(libvirt: Any) -> None:
    global _event_loop_registered  # noqa: PLW0603 - libvirt's event loop is process-wide
    with _event_loop:
        if not _event_loop_registered:
            libvirt.virEventRegisterDefaultImpl()
            _event_loop_registered = True


def _read_domain(libvirt: Any, conn: Any, dom: Any) -> _Listed | None:
    """One domain's name, state and files; None when it was undefined meanwhile."""
    try:
        name = str(dom.name())
        uuid = str(dom.UUIDString())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == _VIR_ERR_NO_DOMAIN:
            return None
        return _Listed("?", "?", active=True, parsed=None, error=f"cannot name it: {exc}")
    try:
        active = bool(dom.isActive())
        # A running domain's live XML has the chain libvirt resolved; its persistent config is
        # what the next boot opens. Both count.
        xmls = [dom.XMLDesc(0)]
        if active and dom.isPersistent():
            xmls.append(dom.XMLDesc(_VIR_DOMAIN_XML_INACTIVE))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == _VIR_ERR_NO_DOMAIN:
            return None
        return _Listed(name, uuid, active=True, parsed=None, error=f"cannot read its XML: {exc}")
    try:
        parsed = _Parsed()
        for text in xmls:
            parse_domain(text, into=parsed)
    except ValueError as exc:
        return _Listed(name, uuid, active, parsed=None, error=str(exc))
    volumes: dict[tuple[str, str], str | Exception] = {}
    for _, pool, volume, _ in parsed.volumes:
        try:
            path = conn.storagePoolLookupByName(pool).storageVolLookupByName(volume).path()
            volumes[(pool, volume)] = str(path)
        except libvirt.libvirtError as exc:
            volumes[(pool, volume)] = exc
    return _Listed(name, uuid, active, parsed, volumes=volumes)


def parse_domain(text: str, *, into: _Parsed | None = None) -> _Parsed:
    """The files, disks and Nova record one domain XML names.

    Raises:
        ValueError: not a domain XML this can trust itself to read (too large, a DTD, malformed,
            or Nova metadata with values that are no sizes or no text).
    """
    parsed = _Parsed() if into is None else into
    if len(text) > _MAX_XML:
        raise ValueError(f"domain XML larger than {_MAX_XML} bytes")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise ValueError("domain XML with a document type declaration")  # no entity expansion
    try:
        root = ET.fromstring(_keep_attribute_whitespace(text))
    except ET.ParseError as exc:
        raise ValueError(f"domain XML does not parse: {exc}") from exc
    for disk in root.iterfind("devices/disk"):
        _disk(disk, parsed)
    for device in root.iterfind("devices/*"):
        if device.tag != "disk":
            _other_device(device, parsed)
    os_element = root.find("os")
    if os_element is not None:
        for tag in ("kernel", "initrd", "dtb", "loader"):
            _add_text(parsed, tag, os_element.findtext(tag))
        for nvram in os_element.iterfind("nvram"):
            _add_text(parsed, "nvram", nvram.text)
            for path in (nvram.get("template"), *_paths(nvram.find("source"))):
                _add_text(parsed, "nvram", path)
    parsed.records.extend(r for r in _nova_records(root) if r not in parsed.records)
    return parsed


# libvirt writes a tab, newline or carriage return in a path attribute as the character itself,
# and XML normalises those to spaces in attribute values: written as character references, the
# path is read as libvirt meant it (anywhere else, a reference is the same character).
_ATTRIBUTE = re.compile(r"""=(\s*)(["'])(.*?)\2""", re.DOTALL)


def _keep_attribute_whitespace(text: str) -> str:
    if "\t" not in text and "\n" not in text and "\r" not in text:
        return text
    return _ATTRIBUTE.sub(
        lambda m: (
            f"={m[1]}{m[2]}"
            + m[3].replace("\t", "&#9;").replace("\n", "&#10;").replace("\r", "&#13;")
            + m[2]
        ),
        text,
    )


def _add_text(parsed: _Parsed, role: str, path: str | None) -> None:
    """A path from an element's text or an attribute, exactly as written (no stripping: a
    trailing space is part of a file name)."""
    if path and path.strip():
        parsed.files.append((role, path))


def _paths(source: ET.Element | None) -> Iterator[str]:
    """The file names a ``<source>`` element gives."""
    if source is None:
        return
    for attribute in ("file", "dev", "path", "dir"):
        value = source.get(attribute)
        if value:
            yield value
    path = source.findtext("path")  # nvdimm, virtio-pmem: <source><path>
    if path:
        yield path


def _other_device(device: ET.Element, parsed: _Parsed) -> None:
    """Any other device that names files: every one counts (``<filesystem type='file'>`` is an
    image qemu or the loop driver opens, and is read like a disk)."""
    role = device.tag
    driver = device.find("driver")
    if role == "filesystem" and device.get("type") in ("file", "block"):
        fmt = driver.get("format") if driver is not None else None
        for path in _paths(device.find("source")):
            parsed.sources.append((f"filesystem {_target(device)}", path, fmt))
        return
    for source in device.iter("source"):
        for path in _paths(source):
            _add_text(parsed, role, path)


def _target(device: ET.Element) -> str:
    target = device.find("target")
    if target is None:
        return "?"
    return target.get("dev") or target.get("dir") or "?"


def _disk(disk: ET.Element, parsed: _Parsed) -> None:
    role = f"disk {_target(disk)}"
    driver = disk.find("driver")
    fmt = driver.get("type") if driver is not None else None  # None: raw, libvirt does not probe
    kind = disk.get("type", "file")
    source = disk.find("source")
    if kind in _NOT_FILES:
        parsed.network.append(f"{role}: {kind} {_network_name(source)}")
    elif source is not None and kind == "volume":
        pool, volume = source.get("pool"), source.get("volume")
        if pool and volume:
            parsed.volumes.append((role, pool, volume, fmt))
    elif source is not None:
        path = source.get("file") or source.get("dev") or source.get("dir")
        if path:
            parsed.sources.append((role, path, fmt))
            if disk.find("backingStore") is not None:
                parsed.resolved.add(path)
        store = source.find("dataStore/source")  # a qcow2 external data file
        if store is not None and store.get("file"):
            parsed.files.append((f"{role} data file", store.get("file", "")))
    for depth, path in _backing_store(disk):
        parsed.files.append((f"{role} backing chain depth {depth} (libvirt)", path))
    mirror = disk.find("mirror")  # a block copy in progress: its destination
    if mirror is not None:
        mirror_source = mirror.find("source")
        path = mirror.get("file") or (
            mirror_source.get("file") if mirror_source is not None else ""
        )
        if path:
            parsed.files.append((f"{role} mirror", path))


def _network_name(source: ET.Element | None) -> str:
    if source is None:
        return ""
    return f"{source.get('protocol', '')}:{source.get('name', '')}".strip(":")


def _backing_store(disk: ET.Element) -> Iterator[tuple[int, str]]:
    """The chain libvirt reports under a disk, nearest first; network links skipped."""
    node = disk.find("backingStore")
    depth = 1
    while node is not None:  # as deep as libvirt says: the XML's own size bounds it
        source = node.find("source")
        if source is not None and node.get("type", "file") not in _NOT_FILES:
            path = source.get("file") or source.get("dev")
            if path:
                yield depth, path
        node = node.find("backingStore")
        depth += 1


def _nova_records(root: ET.Element) -> Iterator[dict[str, Any]]:
    """The fields of an instance record for each ``<nova:instance>`` of every namespace, and
    each image root and flavor in it: a claim more only keeps more."""
    for ns in NOVA_NAMESPACES:
        for instance in root.iterfind(f"metadata/{{{ns}}}instance"):
            common: dict[str, Any] = {}
            name = instance.findtext(f"{{{ns}}}name")
            if name:
                common["name"] = _text(name, "nova:name")
            images = [
                {"image_ref": _text(r.get("uuid", ""), "nova:root uuid")}
                for r in instance.iterfind(f"{{{ns}}}root")
                if r.get("type") == "image" and r.get("uuid")
            ]
            flavors = [_flavor(f, ns) for f in instance.iterfind(f"{{{ns}}}flavor")]
            for image in images or [{}]:
                for flavor in flavors or [{}]:
                    yield {**common, **image, **flavor}


def _flavor(flavor: ET.Element, ns: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for tag, key in (("swap", "swap_mb"), ("ephemeral", "ephemeral_gb")):
        value = flavor.findtext(f"{{{ns}}}{tag}")
        if value is not None and value.strip():
            sizes[key] = _size(value, f"nova:flavor {tag}")
    return sizes


def _text(value: str, what: str) -> str:
    if not naming.encodable(value):
        raise ValueError(f"Nova metadata: {what} is not valid text: {value!r}")
    return value


def _size(value: str, what: str) -> int:
    text = value.strip()
    if not text.isdecimal() or not text.isascii() or not 0 <= int(text) <= _MAX_SIZE:
        raise ValueError(f"Nova metadata: {what} is not a size from 0 to 2**40: {value!r}")
    return int(text)


class _Reader:
    """Turn listed domains into values: files found by ``stat``, disk chains by their headers."""

    __slots__ = ("disks", "domains", "headers", "host", "layout", "problems", "records")

    def __init__(self, layout: Layout, host: str, disks: Mapping[str, Disk]) -> None:
        self.layout = layout
        self.host = host
        self.disks = disks
        self.headers = HeaderCache()
        self.domains: list[Domain] = []
        self.records: list[InstanceRecord] = []
        self.problems: list[Problem] = []

    def add(self, uri: str, item: _Listed) -> None:
        ref = f"{uri} domain {item.name}"
        if item.parsed is None:
            message = f"{item.error}: what it uses is unknown, nothing is removed"
            self.problems.append(Problem(ProblemCode.DOMAIN_UNREADABLE, ref, message))
            return
        parsed = item.parsed
        for note in dict.fromkeys(parsed.network):  # live and persistent XML name it alike
            message = f"{note}: no file on this host, nothing in this cache"
            self.problems.append(Problem(ProblemCode.DOMAIN_NETWORK_DISK, ref, message))
        sources = list(parsed.sources)
        for role, pool, volume, fmt in dict.fromkeys(parsed.volumes):
            path = item.volumes.get((pool, volume))
            if isinstance(path, str) and path:
                sources.append((role, path, fmt))
            else:
                message = f"{role}: storage volume {pool}/{volume} not resolved: {path}"
                self.problems.append(Problem(ProblemCode.DOMAIN_DISK_UNRESOLVED, ref, message))
        files = [self._file(role, path) for role, path in parsed.files]
        disks: list[Disk] = []
        for role, path, fmt in dict.fromkeys(sources):
            found = self._file(role, path)
            files.append(found)
            resolved = item.active and path in parsed.resolved
            disk = self._disk(ref, found, declared=fmt, resolved=resolved)
            if disk is not None:
                disks.append(disk)
        unique = tuple(dict.fromkeys(files))
        self.domains.append(Domain(item.name, item.uuid, item.active, unique, tuple(disks)))
        for record in parsed.records:
            self.records.append(InstanceRecord(uuid=item.uuid, host=self.host, **record))

    def _file(self, role: str, path: str) -> DomainFile:
        """The file as libvirt names it: not normalised (``lnk/..`` is where the kernel goes)."""
        if not os.path.isabs(path):
            return DomainFile(role, path)  # counts by its name alone
        try:
            st = os.stat(path)  # found, never opened; a link is the file it names
        except (OSError, ValueError):  # ValueError: a NUL in the name
            return DomainFile(role, path)
        return DomainFile(role, path, (st.st_dev, st.st_ino))

    def _disk(
        self, ref: str, found: DomainFile, *, declared: str | None, resolved: bool
    ) -> Disk | None:
        """The chain of one disk source: read by the instance scan already, or read now.

        ``resolved``: a running domain's, whose chain libvirt reported (in ``files``): a disk
        deleted while it runs hides nothing, qemu has it and libvirt says what lies behind it.
        Any other disk that cannot be found hides what it uses: blocking.
        """
        known = self.disks.get(found.path)
        if known is not None and known.file_id == found.file_id is not None:
            return known
        if not os.path.isabs(found.path):
            message = (
                f"{found.role}: relative path {found.path!r}: where qemu opens it is not known, "
                "nor what it uses"
            )
            self.problems.append(Problem(ProblemCode.DOMAIN_DISK_UNRESOLVED, ref, message))
            return None
        if found.file_id is None:
            if resolved:
                message = (
                    f"{found.role}: {found.path} was deleted while the running domain uses it: "
                    "the chain libvirt reports for it counts"
                )
                self.problems.append(Problem(ProblemCode.DOMAIN_DISK_DELETED, ref, message))
            else:
                message = (
                    f"{found.role}: {found.path}: {_why_missing(found.path)}: what it would use is "
                    "unknown; undefine the domain (or drop the disk) if it is gone for good"
                )
                self.problems.append(Problem(ProblemCode.DOMAIN_DISK_MISSING, ref, message))
            return None
        try:
            mode = os.stat(found.path).st_mode
        except OSError:
            mode = 0
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            return None  # a directory disk, a FIFO: nothing with a header, never opened
        disk, problem = inspect_file(
            found.path, ref, self.headers, layout=self.layout, declared=declared
        )
        if problem is not None:
            self.problems.append(problem)
        return disk


def _why_missing(path: str) -> str:
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return "a symlink to nothing (a volume not mounted?)"
        return "does not exist (a volume not mounted?)"
    except (OSError, ValueError) as exc:
        return f"cannot be found: {getattr(exc, 'strerror', None) or exc}"
    return "vanished while it was looked at"

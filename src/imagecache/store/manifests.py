"""Per-host manifests of a shared cache: ``<cache>/.imagecache/hosts/<host>.json``.

Every ``clean`` and daemon pass writes its host's manifest (also a pass that is blocked from
removing): the entries its own sources use, the instance directories it owns, whether its own
view was complete, and when. Its peers count those entries as used, may skip scanning those
directories, and stop removing when a manifest is missing, unreadable or stale. A retired host's
manifest is replaced by a tombstone that claims nothing (``imagecache peers retire``).

Written like every file this project publishes: temp name, fsync, rename, all through the
directory's descriptor (a symlink swapped in for ``.imagecache`` or ``hosts`` is refused, never
followed). Read as hostile input: every manifest of the directory is read, and one that is not a
manifest of this schema for the host its file is named after is a problem naming that host —
never a host forgotten, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import stat
from typing import Any
from urllib.parse import quote, unquote

from imagecache import naming
from imagecache._version import __version__
from imagecache.layout import Layout
from imagecache.model import Kind, Manifest, Problem, ProblemCode
from imagecache.plan import iso
from imagecache.store import fsops
from imagecache.store.jsonfile import read_json_at

__all__ = ["HOSTS_DIR", "SCHEMA", "manifest_to_dict", "read_manifests", "write_manifest"]

SCHEMA = 1
HOSTS_DIR = "hosts"
_SUFFIX = ".json"
_MAX_MANIFEST = 64 << 20  # ~100 bytes per entry and directory: far beyond any host
_MAX_INT = 1 << 63
_STALE_TEMP = 3600.0


_PREFIX = "host-"


def _file_name(host: str) -> str:
    """The file of ``host``'s manifest: ``host-<name quoted>.json``, so that no host name (empty,
    ``.hidden``, ``a/b``, undecodable bytes) is a path or a hidden file."""
    return _PREFIX + quote(host, safe="", errors="surrogateescape") + _SUFFIX


def _host_of(file: str) -> str | None:
    """The host a manifest file is named after (its name need not be canonical: ``host-a%2fb``
    names ``a/b`` too, and is then unreadable, never a host forgotten)."""
    if not file.startswith(_PREFIX) or not file.endswith(_SUFFIX):
        return None
    return unquote(file[len(_PREFIX) : -len(_SUFFIX)], errors="surrogateescape")


def _open(layout: Layout, *, create: bool) -> int:
    state_fd = fsops.open_dir(layout.state_dir, create=create)
    try:
        return fsops.open_dir(HOSTS_DIR, dir_fd=state_fd, create=create)
    finally:
        os.close(state_fd)


def manifest_to_dict(m: Manifest) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "version": __version__,
        # For people; the host is known by the file's (quoted) name, whatever its bytes.
        "host": m.host.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
        "written": iso(m.written),
        "written_epoch": m.written,
        "complete": m.complete,
        "entries": [{"name": n, "device": d, "inode": i} for n, d, i in m.entries],
        "instance_dirs": list(m.instance_dirs),
    }
    if m.retired:
        doc["retired"] = True
        doc["retired_by"] = m.retired_by
    if m.machine:
        doc["machine"] = m.machine
    return doc


def write_manifest(layout: Layout, manifest: Manifest) -> None:
    """Replace ``manifest.host``'s manifest, atomically.

    Raises:
        OSError: the directory cannot be made or written (a symlink there: ``ELOOP``).
    """
    doc = manifest_to_dict(manifest)
    doc["host_file"] = _file_name(manifest.host)  # how the host is known, whatever its bytes
    data = (json.dumps(doc, ensure_ascii=True) + "\n").encode("ascii")
    dir_fd = _open(layout, create=True)
    try:
        name = _file_name(manifest.host)
        temp = naming.temp_name(name, os.getpid(), secrets.token_hex(4))
        fsops.replace_at(dir_fd, name, data, temp=temp)
        _drop_stale_temps(dir_fd, manifest.written)
    finally:
        os.close(dir_fd)


def _drop_stale_temps(dir_fd: int, now: float) -> None:
    """Temp files of writers killed midway (older than an hour); best effort."""
    for file in os.listdir(dir_fd):
        if naming.classify(file) is not Kind.TEMP:
            continue
        with contextlib.suppress(OSError):
            st = os.stat(file, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > _STALE_TEMP:
                os.unlink(file, dir_fd=dir_fd)


def read_manifests(layout: Layout) -> tuple[tuple[Manifest, ...], tuple[Problem, ...]]:
    """Every host's manifest; no directory means none. A manifest that cannot be read or is not
    one is a blocking problem whose ``ref`` is the host its file is named after."""
    try:
        dir_fd = _open(layout, create=False)
    except FileNotFoundError:
        return (), ()
    except OSError as exc:
        path = os.path.join(layout.state_dir, HOSTS_DIR)
        message = f"cannot read the hosts' manifests: {exc.strerror or exc}"
        return (), (Problem(ProblemCode.MANIFESTS_UNLISTED, path, message),)
    manifests: list[Manifest] = []
    problems: list[Problem] = []
    try:
        files = sorted(os.listdir(dir_fd))
        for file in files:
            host = _host_of(file)
            if host is None or naming.classify(file) is Kind.TEMP:
                continue
            try:
                if file != _file_name(host):
                    raise ValueError("its file name is not the host's canonical one")
                manifests.append(
                    _manifest(read_json_at(dir_fd, file, max_bytes=_MAX_MANIFEST), host)
                )
            except (OSError, KeyError, TypeError, ValueError, OverflowError, RecursionError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                message = (
                    f"manifest {file} cannot be read ({why}): what host {host} "
                    "uses is unknown, nothing on this storage is removed until it writes one "
                    "again or is retired (imagecache peers retire)"
                )
                problems.append(Problem(ProblemCode.PEER_MANIFEST_UNREADABLE, host, message))
    finally:
        os.close(dir_fd)
    return tuple(manifests), tuple(problems)


def _manifest(doc: Any, host: str) -> Manifest:
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"not a manifest of schema {SCHEMA}")
    if doc.get("host_file") != _file_name(host):
        raise ValueError("names another host than its file")
    written = doc["written_epoch"]
    if isinstance(written, bool) or not isinstance(written, int | float):
        raise TypeError("written_epoch is not a number")
    if not math.isfinite(written) or not 0 <= written < _MAX_INT:
        raise ValueError("written_epoch is not a time")
    complete, retired = doc["complete"], doc.get("retired", False)
    if not isinstance(complete, bool) or not isinstance(retired, bool):
        raise TypeError("complete and retired are true or false")
    entries = tuple(_entry(e) for e in _list(doc["entries"]))
    dirs = tuple(_dir_name(d) for d in _list(doc["instance_dirs"]))
    by = doc.get("retired_by")
    if by is not None and not isinstance(by, str):
        raise TypeError("retired_by is not text")
    if retired and (entries or dirs):
        raise ValueError("a retired host's manifest claims nothing")
    machine = doc.get("machine", "")
    if not isinstance(machine, str) or not re.fullmatch(r"[0-9a-f]{0,64}", machine):
        raise ValueError("machine is not a machine id")
    return Manifest(host, float(written), complete, entries, dirs, retired, by, machine)


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError("expected a list")
    return value


def _entry(item: Any) -> tuple[str, int, int]:
    if not isinstance(item, dict):
        raise TypeError("an entry is {name, device, inode}")
    name, device, inode = item["name"], item["device"], item["inode"]
    if not isinstance(name, str) or not naming.valid_entry_name(name):
        raise ValueError(f"not an entry name: {name!r}")
    for n in (device, inode):
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < _MAX_INT:
            raise ValueError("device and inode are integers")
    return name, device, inode


def _dir_name(item: Any) -> str:
    if not isinstance(item, str) or not naming.valid_entry_name(item):
        raise ValueError(f"not an instance directory name: {item!r}")
    return item

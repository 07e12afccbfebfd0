"""Nova's ``compute_nodes`` registry, read and written: the hosts that share ``instances_path``.

Nova lists the hosts sharing ``instances_path`` in ``$instances_path/compute_nodes``, a JSON object
``{host: epoch seconds}``, and registers a host only from its image-cache periodic task
(nova-imagecache.md §5). Operators turn that task off (``manager_interval = -1``) when imagecache
runs instead, so on shared storage a newly added host would never appear, and the instance
records of hosts missing from the registry protect nothing
(:func:`imagecache.usage.counted_records`).

So every ``clean`` pass registers its host, the way Nova does but safely: under Nova's own lock
``$instances_path/locks/nova-storage-registry-lock`` (the lock path Nova fixed in LP 1194696), the
whole file is read, only this host's entry is set, and the file is replaced atomically with its
owner and mode kept. An undecodable file is left exactly as it is: Nova reset it to its own single
entry (LP 1252659), which removed every other host's instances from protection.
"""

from __future__ import annotations

import json
import math
import os
import stat

from imagecache import locks
from imagecache.errors import LockTimeout, ObservationError
from imagecache.layout import REGISTRY_LOCK, Layout
from imagecache.model import Problem, ProblemCode
from imagecache.store import fsops
from imagecache.store.jsonfile import JsonFileError, read_json

__all__ = ["RegistryError", "drop_host", "read_registry", "register_host"]

Hosts = tuple[tuple[str, float], ...]


class RegistryError(ObservationError):
    """``compute_nodes`` cannot be read (``code`` says how); it must then be left as it is."""

    def __init__(self, code: ProblemCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_registry(layout: Layout) -> Hosts:
    """The (host, last registration epoch) pairs of ``compute_nodes``, by host; missing is empty.

    Raises:
        RegistryError: it cannot be read (a FIFO, a symlink, permissions: ``registry-unreadable``)
            or is not ``{host: finite epoch seconds}`` (``registry-corrupt``).
    """
    try:
        doc = read_json(layout.registry_file)
    except JsonFileError as exc:
        if exc.missing:
            return ()
        code = ProblemCode.REGISTRY_CORRUPT if exc.corrupt else ProblemCode.REGISTRY_UNREADABLE
        raise RegistryError(code, str(exc)) from exc
    if not isinstance(doc, dict):
        raise RegistryError(ProblemCode.REGISTRY_CORRUPT, "expected {host: epoch seconds}")
    hosts: list[tuple[str, float]] = []
    for host, value in doc.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RegistryError(ProblemCode.REGISTRY_CORRUPT, "expected {host: epoch seconds}")
        try:
            epoch = float(value)
        except OverflowError:
            epoch = math.inf
        if not math.isfinite(epoch):
            message = f"host {host!r}: {str(value)[:40]} is not a finite epoch"
            raise RegistryError(ProblemCode.REGISTRY_CORRUPT, message)
        hosts.append((host, epoch))
    return tuple(sorted(hosts))


def register_host(layout: Layout, host: str, *, now: float, lock_timeout: float) -> Problem | None:
    """Set ``host``'s entry in ``compute_nodes`` to ``now``; other hosts' entries stay.

    Waits at most ``lock_timeout`` seconds for Nova's registry lock. A missing file is created
    (owned like ``instances_path``, mode 0644); an existing one keeps its owner and mode.

    Returns:
        None when registered, else the problem (``host-unregistered``) that prevented it (the lock
        stayed busy, the file is unreadable or not ``{host: epoch}``, it cannot be written); the
        file is then unchanged.
    """
    path = layout.registry_file
    code = ProblemCode.HOST_UNREGISTERED
    try:
        with locks.entry_lock(layout.instances_path, REGISTRY_LOCK, timeout=lock_timeout):
            try:
                hosts = read_registry(layout)
            except RegistryError as exc:
                return Problem(code, path, f"{exc}: left as it is, {host} not registered")
            _replace(layout, {**dict(hosts), host: now})
    except LockTimeout as exc:
        return Problem(code, path, f"{host} not registered this pass: {exc}")
    except OSError as exc:
        return Problem(code, path, f"cannot register {host}: {exc}")
    return None


def drop_host(
    layout: Layout, host: str, *, lock_timeout: float = 0.0, locked: bool = False
) -> bool:
    """Remove ``host``'s entry from ``compute_nodes`` under Nova's lock (``locked``: the caller
    holds it); whether it was there.

    Raises:
        RegistryError: the file cannot be read or is not ``{host: epoch}`` (it is left as is).
        LockTimeout: Nova's registry lock stayed busy.
        OSError: it cannot be written.
    """
    if not locked:
        with locks.entry_lock(layout.instances_path, REGISTRY_LOCK, timeout=lock_timeout):
            return drop_host(layout, host, locked=True)
    hosts = dict(read_registry(layout))
    if host not in hosts:
        return False
    del hosts[host]
    _replace(layout, hosts)
    return True


def _replace(layout: Layout, hosts: dict[str, float]) -> None:
    """Write ``compute_nodes`` atomically; the lock is held. A missing file is created owned
    like ``instances_path``, mode 0644; an existing one keeps its owner and mode."""
    path = layout.registry_file
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = os.stat(layout.instances_path)
        mode = 0o644
    else:
        mode = stat.S_IMODE(st.st_mode)
    data = (json.dumps(hosts, sort_keys=True) + "\n").encode("utf-8")
    owner = (st.st_uid, st.st_gid)
    ours = owner == (os.geteuid(), os.getegid())
    fsops.atomic_write(path, data, mode=mode, owner=None if ours else owner)

"""Nova's ``compute_nodes`` registry: this host registers itself, as Nova's own pass would.

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
import os
import stat

from imagecache import locks
from imagecache import sources as scan
from imagecache.errors import LockTimeout
from imagecache.model import Problem
from imagecache.store import fsops

__all__ = ["REGISTRY_LOCK", "register_host"]

# Nova: utils.synchronized("storage-registry-lock", external=True, lock_path=instances_path/locks).
REGISTRY_LOCK = "storage-registry-lock"


def register_host(
    instances_path: str, host: str, *, now: float, lock_timeout: float
) -> Problem | None:
    """Set ``host``'s entry in ``$instances_path/compute_nodes`` to ``now``; other hosts' stay.

    Waits at most ``lock_timeout`` seconds for Nova's registry lock. A missing file is created
    (owned like ``instances_path``, mode 0644); an existing one keeps its owner and mode.

    Returns:
        None when registered, else the problem that prevented it (the lock stayed busy, the file
        is unreadable or not ``{host: epoch}``, it cannot be written); the file is then unchanged.
    """
    path = os.path.join(instances_path, scan.REGISTRY_FILE)
    try:
        with locks.entry_lock(instances_path, REGISTRY_LOCK, timeout=lock_timeout):
            hosts, problems = scan.read_registry(instances_path)
            if problems:
                why = "; ".join(p.message for p in problems)
                return Problem("registry", path, f"{why}: left as it is, {host} not registered")
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = os.stat(instances_path)
                mode = 0o644
            else:
                mode = stat.S_IMODE(st.st_mode)
            doc = {**dict(hosts), host: now}
            data = (json.dumps(doc, sort_keys=True) + "\n").encode("utf-8")
            owner = (st.st_uid, st.st_gid)
            ours = owner == (os.geteuid(), os.getegid())
            fsops.atomic_write(path, data, mode=mode, owner=None if ours else owner)
    except LockTimeout as exc:
        return Problem("registry", path, f"{host} not registered this pass: {exc}")
    except OSError as exc:
        return Problem("registry", path, f"cannot register {host}: {exc}")
    return None

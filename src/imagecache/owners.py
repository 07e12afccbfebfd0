"""Files this process creates in the shared tree belong to whoever owns the tree.

An operator tries ``imagecache clean`` once as root before installing the unit, and everything it
created (``locks/nova-<entry>``, ``_base/.imagecache/``, the state file and its lock, the run lock)
would be root's, mode 0644/0755: nova-compute, and the daemon running as ``nova``, then cannot
open those lock files for writing, and fail. So when running as root, each file or directory
made in a directory owned by someone else is handed to that directory's owner (uid and gid),
as a setgid directory does for groups. A process that is not root changes nothing: what it
creates is already its own. ``compute_nodes`` keeps its own owner by the same rule
(:mod:`imagecache.store.registry`).
"""

from __future__ import annotations

import logging
import os

__all__ = ["adopt"]

LOG = logging.getLogger(__name__)


def adopt(fd: int, dir_fd: int) -> None:
    """Give the file or directory open as ``fd`` the owner of the directory open as ``dir_fd``,
    if this process is root and the owners differ. Best effort: a refusal (NFS root squash) is
    logged at debug level and changes nothing else."""
    if os.geteuid() != 0:
        return
    try:
        parent, own = os.fstat(dir_fd), os.fstat(fd)
        if (own.st_uid, own.st_gid) != (parent.st_uid, parent.st_gid):
            os.fchown(fd, parent.st_uid, parent.st_gid)
    except OSError as exc:
        LOG.debug("could not hand a new file to its directory's owner: %s", exc)

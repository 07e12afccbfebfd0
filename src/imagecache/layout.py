"""Where everything lives on disk (DESIGN.md §2), as one value built from the settings.

Every path imagecache reads or writes is a property or method of :class:`Layout`; no other module
joins a directory name it knows by heart. Pure: strings in, strings out, nothing is touched::

    $instances_path/
    ├── compute_nodes                 registry_file (Nova's shared-storage registry)
    ├── locks/nova-<name>             locks_dir (imagecache.locks.lock_path)
    ├── <instance>/disk.info          DISK_INFO
    └── <cache_name>/                 cache_dir ([image_cache] subdirectory_name)
        ├── <entry>                   entry_path(name)
        └── .imagecache/trash/<t>     trash_dir_of(cache_dir)
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from imagecache import naming

__all__ = [
    "CACHE_PREFIX",
    "DISK_INFO",
    "LOCKS_DIR",
    "REGISTRY_FILE",
    "REGISTRY_LOCK",
    "STATE_DIR",
    "Layout",
    "trash_dir_of",
]

LOCKS_DIR = "locks"
REGISTRY_FILE = "compute_nodes"
# Nova: utils.synchronized("storage-registry-lock", external=True, lock_path=instances_path/locks).
REGISTRY_LOCK = "storage-registry-lock"
STATE_DIR = ".imagecache"  # this project's own state in the cache (Nova ignores directories)
TRASH_DIR = "trash"
DISK_INFO = "disk.info"
# Nova's cache directory naming: on shared storage each host may have its own ``_base_<ip>``.
CACHE_PREFIX = "_base"


@dataclass(frozen=True, slots=True)
class Layout:
    """The on-disk layout of one host: ``instances_path`` and the cache directory's name in it.

    ``instances_path`` is absolute and normalised by whoever builds the value (the configuration).
    """

    instances_path: str
    cache_name: str = "_base"
    # The name is made per host (``_base_$my_ip``): compute_nodes' hosts do not share this cache.
    cache_per_host: bool = False

    @property
    def cache_dir(self) -> str:
        return posixpath.join(self.instances_path, self.cache_name)

    @property
    def locks_dir(self) -> str:
        return posixpath.join(self.instances_path, LOCKS_DIR)

    @property
    def registry_file(self) -> str:
        return posixpath.join(self.instances_path, REGISTRY_FILE)

    @property
    def state_dir(self) -> str:
        """``<cache_dir>/.imagecache``: this project's own files (trash, pass state, run lock)."""
        return posixpath.join(self.cache_dir, STATE_DIR)

    def entry_path(self, name: str) -> str:
        """``<cache_dir>/<name>``; raises ValueError for a name that is not a plain entry name."""
        return posixpath.join(self.cache_dir, _plain(name))

    def is_instance_name(self, name: str) -> bool:
        """Whether a name directly under ``instances_path`` may be an instance directory.

        Not the cache (under its configured name), not ``locks``, and no name starting with
        ``_base``: on shared storage every host may have its own ``_base_<ip>``, whose files are
        no instance's disks. The scanner and ``create-disk`` both ask this one question, so an
        instance created under a name the scanner skips (whose base the next pass would then
        remove) is refused.
        """
        return (
            naming.valid_entry_name(name)
            and name not in {self.cache_name, LOCKS_DIR}
            and not name.startswith(CACHE_PREFIX)
        )


def trash_dir_of(cache_dir: str) -> str:
    """``<cache_dir>/.imagecache/trash``, where quarantined entries wait for their purge."""
    return posixpath.join(cache_dir, STATE_DIR, TRASH_DIR)


def _plain(name: str) -> str:
    if not naming.valid_entry_name(name):
        raise ValueError(f"not a plain name: {name!r}")
    return name

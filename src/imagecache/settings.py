"""The validated configuration, as frozen sections: built once by :mod:`imagecache.config`.

Pure values, no oslo.config: every other module receives the one section it needs (the fetcher
its :class:`FetchSettings`, the Glance client its :class:`GlanceSettings`), never ``CONF`` or the
whole :class:`Settings`. No defaults are written here: each option's default lives once, in the
options table of :mod:`imagecache.config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from imagecache.layout import Layout
from imagecache.plan import Policy

__all__ = [
    "CleanSettings",
    "DaemonSettings",
    "FetchSettings",
    "GlanceSettings",
    "Settings",
    "VerifySettings",
]


@dataclass(frozen=True, slots=True)
class CleanSettings:
    """How a pass acts beside nova-compute (``[imagecache]``)."""

    lock_timeout: float  # one wait for every busy entry lock of a pass, in seconds
    touch_in_use: bool
    audit_log: str
    inventory_files: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FetchSettings:
    """How images enter the cache."""

    lock_timeout: float
    force_raw: bool
    vmdk_allowed_types: frozenset[str]
    precache_concurrency: int


@dataclass(frozen=True, slots=True)
class VerifySettings:
    """Checksum verification of cached images (``[libvirt]``, Nova's names)."""

    checksum_base_images: bool
    checksum_interval: int


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """The periodic pass (``[image_cache] manager_interval``)."""

    manager_interval: int

    @property
    def pass_interval(self) -> int | None:
        """Seconds between passes: Nova's 0 means every 60 s, negative means disabled."""
        if self.manager_interval < 0:
            return None
        return self.manager_interval or 60


@dataclass(frozen=True, slots=True)
class GlanceSettings:
    """How to reach Glance: nova.conf ``[glance]`` or a clouds.yaml cloud (``--os-cloud``).

    Here, not in ``images/glance.py``, so that reading the configuration does not import
    keystoneauth and requests (``plan`` and ``status`` start without them).
    """

    api_servers: tuple[str, ...]  # empty: find the endpoint in the catalog via auth
    os_cloud: str | None  # a clouds.yaml cloud; its settings replace auth_* below
    auth_type: str | None  # keystoneauth plugin ("password", ...); "none"/"noauth"
    auth_options: Mapping[str, str]
    insecure: bool
    cafile: str | None
    timeout: float | None
    region_name: str | None
    valid_interfaces: tuple[str, ...]
    clouds_yaml: str | None = None  # that file; None: openstacksdk's usual search path


@dataclass(frozen=True, slots=True)
class Settings:
    """Every option imagecache reads, already validated, by section."""

    host: str
    layout: Layout
    policy: Policy
    clean: CleanSettings
    fetch: FetchSettings
    verify: VerifySettings
    daemon: DaemonSettings
    glance: GlanceSettings
    config_files: tuple[str, ...] = ()

    @property
    def instances_path(self) -> str:
        return self.layout.instances_path

    @property
    def cache_dir(self) -> str:
        return self.layout.cache_dir

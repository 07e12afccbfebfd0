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
    "COORDINATION_UNSET",
    "LIBVIRT_OFF",
    "CleanSettings",
    "CoordinationSettings",
    "DaemonSettings",
    "FetchSettings",
    "GlanceSettings",
    "LibvirtSettings",
    "MetricsSettings",
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
    remove_max_bytes_per_second: float  # 0: no limit


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
    max_bytes_per_pass: int  # 0: no budget
    max_bytes_per_second: float  # 0: no limit


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """The periodic pass of ``imagecache run``, and what Nova's own manager is set to do.

    ``manager_interval`` is ``[imagecache] manager_interval``: by default Nova's ``[image_cache]
    manager_interval`` when that is >= 0 (an operator's tuned value carries over), else 2400.
    ``nova_manager_interval`` is Nova's as read: >= 0 means nova-compute runs its own manager.
    """

    manager_interval: int
    first_pass_delay: float
    nova_manager_interval: int

    @property
    def pass_interval(self) -> int | None:
        """Seconds between passes: 0 means every 60 s (as Nova), negative means disabled."""
        if self.manager_interval < 0:
            return None
        return self.manager_interval or 60

    @property
    def max_jitter(self) -> float:
        """The most seconds ``run`` adds to an interval (5 % of it, at most a minute), so that
        hosts started together do not pass together."""
        interval = self.pass_interval
        return 0.0 if interval is None else min(interval * 0.05, 60.0)


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Where the metrics go: an HTTP endpoint (``run`` only) and a node_exporter textfile."""

    listen: tuple[str, int] | None  # (address, port)
    textfile: str | None


@dataclass(frozen=True, slots=True)
class LibvirtSettings:
    """Which libvirt connection tells what every domain uses (``[imagecache] libvirt_uri``).

    ``uri`` None: turned off (``libvirt_uri = none``). ``configured``: the configuration says
    this host runs libvirt (``libvirt_uri``, or Nova's ``[libvirt] connection_uri`` or
    ``virt_type``), so a connection that fails makes the view incomplete; otherwise it is
    consulted only when a libvirt daemon's socket exists.
    """

    uri: str | None
    configured: bool
    timeout: float  # seconds the whole listing may take before the view is incomplete


LIBVIRT_OFF = LibvirtSettings(uri=None, configured=False, timeout=30.0)


@dataclass(frozen=True, slots=True)
class CoordinationSettings:
    """How hosts sharing the storage agree on one cleaner (``[imagecache] coordination_url``).

    ``url`` None: off (``none``); ``""``: unset, the ``file://`` default on the shared storage
    when other hosts share it and tooz is installed; else that URL.
    """

    url: str | None


COORDINATION_UNSET = CoordinationSettings(url="")


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
    metrics: MetricsSettings
    glance: GlanceSettings
    config_files: tuple[str, ...] = ()
    libvirt: LibvirtSettings = LIBVIRT_OFF
    coordination: CoordinationSettings = COORDINATION_UNSET
    machine_id_file: str = ""  # where this machine's id is read; "": none

    @property
    def nova_manager_enabled(self) -> bool:
        """Nova's own manager would remove from this cache too (its interval >= 0, removal on)."""
        return self.daemon.nova_manager_interval >= 0 and self.policy.remove_unused

    @property
    def instances_path(self) -> str:
        return self.layout.instances_path

    @property
    def cache_dir(self) -> str:
        return self.layout.cache_dir

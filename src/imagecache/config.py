"""nova.conf and imagecache.conf, read once with oslo.config into frozen :class:`Settings`.

This is the only module that imports oslo.config. Every option is declared once, in
:data:`_OPTIONS`: its group, name, deprecated names, type and bounds, default and help text (all
in the oslo ``Opt``), and the settings field it fills. Nova's options keep their names, groups
and deprecated aliases (DESIGN.md §5), so an existing ``nova.conf`` of any release since Icehouse
works unchanged; this project's own options live in ``[imagecache]``. oslo.config validates
lazily (a bad integer raises only when read), so :func:`load_settings` reads every option once
and turns the first bad one into a :class:`ConfigError` naming it.

:func:`list_opts` is the ``oslo.config.opts`` entry point: ``oslo-config-generator --namespace
imagecache`` writes ``etc/imagecache.conf.sample`` from the same table.
"""

from __future__ import annotations

import difflib
import glob
import logging
import math
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from oslo_config import cfg

from imagecache import naming
from imagecache.errors import ConfigError
from imagecache.layout import Layout
from imagecache.plan import Policy
from imagecache.settings import (
    CleanSettings,
    CoordinationSettings,
    DaemonSettings,
    FetchSettings,
    GlanceSettings,
    LibvirtSettings,
    MetricsSettings,
    Settings,
    VerifySettings,
)

__all__ = [
    "DEFAULT_CONFIG_FILES",
    "LOGGING_OPTIONS",
    "list_opts",
    "load_settings",
    "logging_configured",
    "setup_logging",
]

LOG = logging.getLogger(__name__)

DEFAULT_CONFIG_FILES = ("/etc/nova/nova.conf", "/etc/imagecache/imagecache.conf")
_MAX_CONFIG_BYTES = 16 << 20
# What a plan document holds (an off_t, an ino_t): a policy value past it could not be saved.
_MAX_COUNT = (1 << 63) - 1
DEFAULT_MANAGER_INTERVAL = 2400  # Nova's default, when Nova's own manager is turned off


def _old(name: str, group: str) -> list[cfg.DeprecatedOpt]:
    return [cfg.DeprecatedOpt(name, group=group)]


@dataclass(frozen=True, slots=True)
class _Option:
    """One option: where it is read (``group``, ``opt``) and which settings fields it fills."""

    group: str
    opt: cfg.Opt
    targets: tuple[str, ...]  # "section.field"; "" section = a top-level field of Settings
    convert: Callable[[Any], Any] = lambda v: v


def _tuple(value: Any) -> tuple[str, ...]:
    return tuple(value or ())


def _finite(value: float, what: str) -> float:
    """``value``, unless it is NaN (which every min/max bound lets through)."""
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not a number of {what}")
    return value


def _listen(value: str | None) -> tuple[str, int] | None:
    """``ADDRESS:PORT`` (``[v6]:PORT``) as (address, port); empty is None.

    Raises:
        ValueError: not ADDRESS:PORT with a port in 0..65535 (the caller names the option).
    """
    if not value:
        return None
    address, sep, port = value.rpartition(":")
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    elif ":" in address:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, [::1]:9477")
    if not sep or not address or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not ADDRESS:PORT (e.g. 127.0.0.1:9477)")
    return address, int(port)


_OPTIONS: tuple[_Option, ...] = (
    _Option(
        "DEFAULT",
        cfg.StrOpt(
            "state_path",
            default="/var/lib/nova",
            help="Top-level directory of Nova's state; instances_path defaults below it.",
        ),
        (),
    ),
    _Option(
        "DEFAULT",
        cfg.StrOpt(
            "instances_path",
            default="$state_path/instances",
            help="Where instance directories, the image cache, locks/ and compute_nodes live.",
        ),
        ("layout.instances_path",),
        os.path.abspath,
    ),
    _Option(
        "DEFAULT",
        cfg.StrOpt(
            "host",
            sample_default="<hostname>",
            help="This host's name, as nova-compute registers it in compute_nodes and in instance "
            "records.",
        ),
        (".host",),
    ),
    _Option(
        "DEFAULT",
        cfg.StrOpt(
            "my_ip",
            sample_default="<primary IP>",
            help="This host's IP address; subdirectory_name may use it as $my_ip.",
        ),
        (),
    ),
    _Option(
        "DEFAULT",
        cfg.BoolOpt(
            "force_raw_images",
            default=True,
            help="Convert downloaded non-raw images to raw before publishing them in the cache.",
        ),
        ("fetch.force_raw",),
    ),
    _Option(
        "DEFAULT",
        cfg.StrOpt(
            "default_ephemeral_format",
            help="Filesystem of ephemeral disks when an instance record names none (Nova: vfat).",
        ),
        ("policy.default_ephemeral_format",),
    ),
    _Option(
        "image_cache",
        cfg.IntOpt(
            "manager_interval",
            default=2400,
            deprecated_opts=_old("image_cache_manager_interval", "DEFAULT"),
            help="Nova's own image cache manager: seconds between its passes in nova-compute; "
            "0 means every 60 s, negative disables it. Set it to -1 where imagecache runs: "
            "while it is >= 0 and remove_unused_base_images is true, Nova removes from the "
            "cache too, and every imagecache pass warns (nova-manager-enabled).",
        ),
        ("daemon.nova_manager_interval",),
    ),
    _Option(
        "image_cache",
        cfg.StrOpt(
            "subdirectory_name",
            default="_base",
            deprecated_opts=_old("image_cache_subdirectory_name", "DEFAULT"),
            help="Name of the image cache directory under instances_path ($my_ip allowed, e.g. "
            "_base_$my_ip for one cache per host on shared storage).",
        ),
        ("layout.cache_name",),
    ),
    _Option(
        "image_cache",
        cfg.BoolOpt(
            "remove_unused_base_images",
            default=True,
            deprecated_opts=_old("remove_unused_base_images", "DEFAULT"),
            help="Remove unused cache entries; false only reports what would be removed.",
        ),
        ("policy.remove_unused",),
    ),
    _Option(
        "image_cache",
        cfg.IntOpt(
            "remove_unused_original_minimum_age_seconds",
            default=86400,
            min=0,
            max=_MAX_COUNT,
            deprecated_opts=_old("remove_unused_original_minimum_age_seconds", "DEFAULT"),
            help="Seconds an original image (and swap, ephemeral and legacy-id entries) must be "
            "unused before it is removed.",
        ),
        ("policy.original_age",),
    ),
    _Option(
        "image_cache",
        cfg.IntOpt(
            "remove_unused_resized_minimum_age_seconds",
            default=3600,
            min=0,
            max=_MAX_COUNT,
            deprecated_opts=_old("remove_unused_resized_minimum_age_seconds", "libvirt"),
            help="Seconds a resized (<sha1>_<size>) or small (_sm) copy must be unused before it "
            "is removed.",
        ),
        ("policy.resized_age",),
    ),
    _Option(
        "image_cache",
        cfg.IntOpt(
            "precache_concurrency",
            default=1,
            min=1,
            help="Images `imagecache precache` downloads at the same time.",
        ),
        ("fetch.precache_concurrency",),
    ),
    _Option(
        "libvirt",
        cfg.BoolOpt(
            "checksum_base_images",
            default=False,
            deprecated_opts=_old("checksum_base_images", "DEFAULT"),
            help="Verify cached images on each pass: entries new or rewritten since their digest "
            "record, and those verified longer than checksum_interval_seconds ago, are hashed "
            "(xxh3-128) and compared with their records; an unused corrupt entry is "
            "quarantined, an in-use one reported with its users.",
        ),
        ("verify.checksum_base_images",),
    ),
    _Option(
        "libvirt",
        cfg.IntOpt(
            "checksum_interval_seconds",
            default=3600,
            min=0,
            help="Seconds after which a verified entry is due to be hashed again (bit rot keeps "
            "size and mtime: only re-reading finds it).",
        ),
        ("verify.checksum_interval",),
    ),
    _Option(
        "libvirt",
        cfg.BoolOpt(
            "remove_unused_kernels",
            default=False,
            deprecated_opts=_old("remove_unused_kernels", "DEFAULT"),
            help="Also remove kernels and ramdisks cached under their raw image id (pre-2013 "
            "Nova).",
        ),
        ("policy.remove_unused_kernels",),
    ),
    _Option(
        "imagecache",
        cfg.IntOpt(
            "verify_max_bytes_per_pass",
            default=0,
            min=0,
            help="Bytes a pass re-hashes at most when checksum_base_images is on (rewritten and "
            "new entries first, then the longest unverified); the rest waits for later passes, "
            "so a large cache is scrubbed over time. 0: no limit. `imagecache verify` ignores it.",
        ),
        ("verify.max_bytes_per_pass",),
    ),
    _Option(
        "imagecache",
        cfg.FloatOpt(
            "verify_max_bytes_per_second",
            default=0.0,
            min=0,
            help="Read rate verification keeps under, in bytes per second, so that scrubbing "
            "never starves the guests reading their bases; 0: as fast as the disk reads.",
        ),
        ("verify.max_bytes_per_second",),
    ),
    _Option(
        "imagecache",
        cfg.IntOpt(
            "manager_interval",
            sample_default="[image_cache] manager_interval if >= 0, else 2400",
            help="Seconds between passes of `imagecache run`; 0 means every 60 s, negative "
            "disables the periodic pass (`run` then exits at once). Default: Nova's "
            "[image_cache] manager_interval when that is >= 0 (a tuned value carries over), "
            "2400 when Nova's manager is turned off (negative).",
        ),
        ("daemon.manager_interval",),
    ),
    _Option(
        "imagecache",
        cfg.FloatOpt(
            "first_pass_delay_seconds",
            default=0.0,
            min=0,
            help="Seconds `imagecache run` waits before its first pass (say, to let "
            "nova-compute start its instances after a reboot).",
        ),
        ("daemon.first_pass_delay",),
    ),
    _Option(
        "imagecache",
        cfg.StrOpt(
            "metrics_listen",
            help="ADDRESS:PORT where `imagecache run` serves Prometheus metrics over HTTP at "
            "/metrics, e.g. 127.0.0.1:9477 ([::1]:9477 for IPv6); empty: no endpoint.",
        ),
        ("metrics.listen",),
        _listen,
    ),
    _Option(
        "imagecache",
        cfg.StrOpt(
            "metrics_textfile",
            help="File the metrics are written to after each pass of `run` and `clean`, "
            "atomically, for node_exporter's textfile collector (a *.prom file in its "
            "--collector.textfile.directory); empty: none.",
        ),
        ("metrics.textfile",),
        lambda v: v or None,
    ),
    _Option(
        "imagecache",
        cfg.FloatOpt(
            "lock_timeout_seconds",
            default=60.0,
            min=0,
            help="Seconds a pass waits in all for busy entry locks (one deadline per pass, not per "
            "lock), and a fetch for its entry lock.",
        ),
        ("clean.lock_timeout", "fetch.lock_timeout"),
    ),
    _Option(
        "imagecache",
        cfg.IntOpt(
            "quarantine_seconds",
            default=86400,
            min=0,
            max=_MAX_COUNT,
            help="Seconds an expired entry waits in _base/.imagecache/trash before it is purged; "
            "0 removes at once, as Nova does.",
        ),
        ("policy.quarantine_seconds",),
    ),
    _Option(
        "imagecache",
        cfg.IntOpt(
            "peer_stale_seconds",
            min=1,
            max=_MAX_COUNT,
            sample_default="<3 x manager_interval>",
            help="Shared storage: a host sharing the cache (in compute_nodes, in the "
            "coordination group, or with a manifest) whose manifest is older than this stops "
            "every removal on the storage until it writes one again or is retired.",
        ),
        ("policy.peer_stale_seconds",),
    ),
    _Option(
        "imagecache",
        cfg.IntOpt(
            "max_cache_bytes",
            default=0,
            min=0,
            max=_MAX_COUNT,
            help="Capacity: the most the cache may hold, in allocated bytes (entries and "
            "quarantined entries); over it, a pass removes unused entries, least recently used "
            "first, until it is under. 0: no limit.",
        ),
        ("policy.max_cache_bytes",),
    ),
    _Option(
        "imagecache",
        cfg.FloatOpt(
            "high_watermark_percent",
            default=0.0,
            min=0,
            max=100,
            help="Capacity: when the cache's filesystem is this full or fuller (Use% as df "
            "shows it: used / (used + available)), a pass removes unused entries, least "
            "recently used first, until it is at or under low_watermark_percent. 0: off.",
        ),
        ("policy.high_watermark_percent",),
        lambda v: _finite(v, "percent"),
    ),
    _Option(
        "imagecache",
        cfg.FloatOpt(
            "low_watermark_percent",
            default=0.0,
            min=0,
            max=100,
            help="Capacity: the Use% a pass over high_watermark_percent frees down to; must be "
            "below it.",
        ),
        ("policy.low_watermark_percent",),
        lambda v: _finite(v, "percent"),
    ),
    _Option(
        "imagecache",
        cfg.IntOpt(
            "min_unused_seconds",
            default=600,
            min=0,
            max=_MAX_COUNT,
            help="Capacity: an entry unused for less than this is never removed to get under a "
            "limit (it may be about to be used: a spawn between its download and its disk).",
        ),
        ("policy.min_unused_seconds",),
    ),
    _Option(
        "imagecache",
        cfg.ListOpt(
            "pinned_images",
            default=[],
            help="Image ids or URLs whose cache entries (and their _sm and resized copies) are "
            "never removed, by age or capacity; `imagecache pin IMAGE` adds more at run time.",
        ),
        ("policy.pinned_images",),
        _tuple,
    ),
    _Option(
        "imagecache",
        cfg.BoolOpt(
            "evict_deleted_images_first",
            default=False,
            help="Capacity: among the entries that may go, those whose image the image service "
            "reports deactivated, or no longer lists, go first (needs [glance] or --os-cloud). "
            "An image service that does not answer only turns the preference off.",
        ),
        ("policy.evict_deleted_first",),
    ),
    _Option(
        "imagecache",
        cfg.FloatOpt(
            "remove_max_bytes_per_second",
            default=0.0,
            min=0,
            help="Bytes per second a pass frees at most (removals and purges), pausing between "
            "them with no lock held, so that large unlinks on XFS, ext4 or NFS do not stall "
            "the guests' I/O. 0: no limit.",
        ),
        ("clean.remove_max_bytes_per_second",),
        lambda v: _finite(v, "bytes per second"),
    ),
    _Option(
        "imagecache",
        cfg.StrOpt(
            "machine_id_file",
            default="/etc/machine-id",
            help="Shared storage: the file holding this machine's id (32 hex digits), written "
            "into its manifest, so that two machines given one [DEFAULT] host are told apart "
            "(nothing is then removed until they are renamed). Empty: no check.",
        ),
        (".machine_id_file",),
        lambda v: v or "",
    ),
    _Option(
        "imagecache",
        cfg.IntOpt(
            "stale_temp_seconds",
            default=86400,
            min=0,
            max=_MAX_COUNT,
            help="Seconds after which a partial download or conversion (*.part, *.converted) "
            "whose entry lock is free is reaped.",
        ),
        ("policy.stale_temp_age",),
    ),
    _Option(
        "imagecache",
        cfg.StrOpt(
            "audit_log",
            default="/var/log/imagecache/audit.jsonl",
            help="JSON-lines file every action is appended to; a pass that cannot open it removes "
            "nothing.",
        ),
        ("clean.audit_log",),
    ),
    _Option(
        "imagecache",
        cfg.ListOpt(
            "inventory_files",
            default=[],
            help="Instance-record files (DESIGN.md §7) read every pass, as if given with "
            "--inventory.",
        ),
        ("clean.inventory_files",),
        _tuple,
    ),
    _Option(
        "imagecache",
        cfg.BoolOpt(
            "touch_in_use",
            default=True,
            help="Refresh the mtime of in-use entries each pass, as Nova does, so that a peer's "
            "manager never sees them as old.",
        ),
        ("clean.touch_in_use",),
    ),
    _Option(
        "imagecache",
        cfg.ListOpt(
            "vmdk_allowed_types",
            default=["streamOptimized", "monolithicSparse"],
            deprecated_opts=_old("vmdk_allowed_types", "compute"),
            help="VMDK create types admitted into the cache (Nova's [compute] option).",
        ),
        ("fetch.vmdk_allowed_types",),
        lambda v: frozenset(v or ()),
    ),
)

_LIBVIRT_OPTIONS: tuple[_Option, ...] = (
    _Option(
        "imagecache",
        cfg.StrOpt(
            "libvirt_uri",
            sample_default="<[libvirt] connection_uri, else qemu:///system>",
            help="The libvirt connection whose domains (running and defined) are users of the "
            "files they name, and whose Nova metadata are instance records; 'none' turns it off. "
            "Unset: Nova's [libvirt] connection_uri, else the URI of its virt_type, else "
            "qemu:///system, consulted when one of those options is set or a libvirt daemon's "
            "socket exists. Configured but not answering: nothing is removed.",
        ),
        ("libvirt.option",),
    ),
    _Option(
        "imagecache",
        cfg.FloatOpt(
            "libvirt_timeout_seconds",
            default=30.0,
            min=0.1,
            max=86400.0,
            help="Seconds listing libvirt's domains may take; past it the view is incomplete "
            "(nothing removed) and the pass goes on.",
        ),
        ("libvirt.timeout",),
        lambda v: _finite(v, "seconds"),
    ),
    _Option(
        "libvirt",
        cfg.StrOpt("connection_uri", default="", help="Nova's libvirt URI override."),
        ("libvirt.connection_uri",),
    ),
    _Option(
        "libvirt",
        cfg.StrOpt(
            "virt_type",
            sample_default="kvm",
            help="Nova's hypervisor type (kvm, qemu, lxc, parallels); set, it says libvirt runs "
            "here, and picks the default URI.",
        ),
        ("libvirt.virt_type",),
    ),
)
_COORDINATION_OPTION = _Option(
    "imagecache",
    cfg.StrOpt(
        "coordination_url",
        sample_default="<file:// in _base/.imagecache/coordination>",
        help="Shared storage: the tooz backend through which the hosts sharing the cache agree "
        "on one cleaner at a time (file://DIR, redis://HOST:PORT, etcd3+http://HOST:PORT, "
        "zookeeper://HOST:PORT; needs pip install 'imagecache[coordination]'); 'none' turns it "
        "off. Unset: file:// on the shared storage, when other hosts share it and tooz is "
        "installed. A backend that is down, or a lost lock, stops removals.",
    ),
    ("coordination.url",),
)
# Nova's default connection URI by virt_type (nova/virt/libvirt/driver.py, _uri()).
_VIRT_TYPE_URIS = {"parallels": "parallels:///system", "lxc": "lxc:///"}


def _coordination(url: str | None) -> CoordinationSettings:
    if url is None or not url.strip():
        return CoordinationSettings(url="")
    if url.strip().lower() == "none":
        return CoordinationSettings(url=None)
    if not url.isprintable() or any(c.isspace() for c in url) or "://" not in url:
        raise ConfigError(
            f"[imagecache] coordination_url: invalid value: {url!r} is not a URL (scheme://...)"
        )
    return CoordinationSettings(url=url)


def _libvirt(
    option: str | None, connection_uri: str, virt_type: str | None, timeout: float
) -> LibvirtSettings:
    """Which connection to consult, and whether the configuration says libvirt runs here."""
    if option is not None and option.strip().lower() == "none":
        return LibvirtSettings(uri=None, configured=False, timeout=timeout)
    uri = option or connection_uri or _VIRT_TYPE_URIS.get(virt_type or "", "qemu:///system")
    if not uri.isprintable() or any(c.isspace() for c in uri):
        label = "[imagecache] libvirt_uri" if option else "[libvirt] connection_uri"
        raise ConfigError(f"{label}: invalid value: {uri!r} is not a libvirt URI")
    configured = bool(option or connection_uri or virt_type)
    return LibvirtSettings(uri=uri, configured=configured, timeout=timeout)


# nova.conf [glance]: where Glance is and how to authenticate (keystoneauth's session and adapter
# options that matter here; the auth plugin's own options are registered once auth_type is known,
# from keystoneauth1.loading, so any plugin works).
_GLANCE_OPTIONS: tuple[_Option, ...] = (
    _Option(
        "glance",
        cfg.ListOpt(
            "api_servers",
            help="Glance endpoints; empty: found in the service catalog.",
        ),
        ("glance.api_servers",),
        _tuple,
    ),
    _Option(
        "glance",
        cfg.StrOpt(
            "endpoint_override",
            help="Glance endpoint, used when api_servers is empty.",
        ),
        (),
    ),
    _Option(
        "glance",
        cfg.StrOpt(
            "auth_type",
            help="keystoneauth plugin (password, v3password, none, ...).",
        ),
        ("glance.auth_type",),
    ),
    _Option(
        "glance",
        cfg.StrOpt(
            "region_name",
            help="Region of the Glance endpoint in the catalog.",
        ),
        ("glance.region_name",),
    ),
    _Option(
        "glance",
        cfg.ListOpt(
            "valid_interfaces",
            default=["internal", "public"],
            help="Catalog interfaces to try, in order.",
        ),
        ("glance.valid_interfaces",),
        _tuple,
    ),
    _Option(
        "glance",
        cfg.BoolOpt(
            "insecure",
            default=False,
            help="Do not verify Glance's TLS certificate.",
        ),
        ("glance.insecure",),
    ),
    _Option(
        "glance",
        cfg.StrOpt(
            "cafile",
            help="CA bundle to verify Glance's TLS certificate with.",
        ),
        ("glance.cafile",),
    ),
    _Option(
        "glance",
        cfg.FloatOpt(
            "timeout",
            min=0,
            help="Seconds to wait for Glance to answer.",
        ),
        ("glance.timeout",),
    ),
)
_NO_AUTH = ("none", "noauth")

_SECTIONS: dict[str, type[Any]] = {
    "metrics": MetricsSettings,
    "policy": Policy,
    "clean": CleanSettings,
    "fetch": FetchSettings,
    "verify": VerifySettings,
    "daemon": DaemonSettings,
}


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """Every option by group, for ``oslo-config-generator`` (entry point ``oslo.config.opts``)."""
    groups: dict[str, list[cfg.Opt]] = {}
    for option in (*_OPTIONS, *_LIBVIRT_OPTIONS, _COORDINATION_OPTION, *_GLANCE_OPTIONS):
        groups.setdefault(option.group, []).append(option.opt)
    return list(groups.items())


def _default_ip() -> str:
    from oslo_utils import netutils

    return str(netutils.get_my_ipv4())


def _register(conf: cfg.ConfigOpts) -> None:
    for option in (*_OPTIONS, *_LIBVIRT_OPTIONS, _COORDINATION_OPTION, *_GLANCE_OPTIONS):
        conf.register_opt(option.opt, group=None if option.group == "DEFAULT" else option.group)


def load_settings(
    config_files: Sequence[str] | None = None,
    config_dirs: Sequence[str] = (),
    *,
    instances_path: str | None = None,
    host: str | None = None,
    os_cloud: str | None = None,
) -> Settings:
    """Read the configuration files and return validated settings.

    ``config_files`` None means the defaults of DESIGN.md §5 that exist; ``[]`` means none (every
    option at its default). Command-line overrides (``instances_path``, ``host``) win over the
    files and take part in ``$name`` interpolation. ``os_cloud`` names a clouds.yaml cloud to
    reach Glance through, instead of ``[glance]``. An unknown option in ``[imagecache]`` (a typo)
    is logged as a warning naming the closest known option.

    Raises:
        ConfigError: a file is missing or unparsable, or an option has a bad value (the message
            names the option and its group).
    """
    if config_files is None:
        config_files = [f for f in DEFAULT_CONFIG_FILES if os.path.exists(f)]
    conf = cfg.ConfigOpts()
    _register(conf)
    try:
        _parse(conf, config_files, config_dirs)
    except (cfg.ConfigFilesNotFoundError, cfg.ConfigDirNotFoundError) as exc:
        raise ConfigError(f"cannot read configuration: {exc}") from exc
    except cfg.ConfigFileParseError as exc:
        raise ConfigError(f"cannot parse configuration: {exc}") from exc
    except cfg.Error as exc:
        raise ConfigError(f"configuration error: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:  # a directory, EACCES, a file not in UTF-8
        raise ConfigError(f"cannot read configuration: {_unreadable(exc)}") from exc
    raw = _raw_files(_files_read(config_files, config_dirs))
    _warn_unknown(raw)
    if instances_path is not None:
        conf.set_override("instances_path", instances_path)
    if host is not None:
        conf.set_override("host", host)
    # Defaults that need the machine, set before any option is read: `_base_$my_ip` must
    # interpolate the real address, not an empty string. Finding the address costs more than
    # the rest of reading the configuration (oslo_utils.netutils imports psutil): it is looked up
    # only when some value may name it.
    if conf.host is None:
        conf.set_default("host", socket.gethostname())
    if conf.my_ip is None and _may_name_my_ip(raw, (instances_path, host)):
        conf.set_default("my_ip", _default_ip())

    sections = (*_SECTIONS, "layout", "libvirt", "coordination", "")
    fields: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for option in (*_OPTIONS, *_LIBVIRT_OPTIONS, _COORDINATION_OPTION):
        section = conf if option.group == "DEFAULT" else conf[option.group]
        label = _label(option.group, option.opt)
        try:
            value = option.convert(_read(section, label, option.opt.dest))
        except ValueError as exc:  # a value oslo.config accepts but the option does not
            raise ConfigError(f"{label}: invalid value: {exc}") from exc
        for target in option.targets:
            name, _, field_name = target.partition(".")
            fields[name][field_name] = value
    daemon = fields["daemon"]
    if daemon["manager_interval"] is None:
        nova = daemon["nova_manager_interval"]
        daemon["manager_interval"] = nova if nova >= 0 else DEFAULT_MANAGER_INTERVAL
    _check_watermarks(fields["policy"])
    if fields["policy"]["peer_stale_seconds"] is None:
        # Three passes missed (an interval of 0 means a pass a minute).
        fields["policy"]["peer_stale_seconds"] = 3 * (daemon["manager_interval"] or 60)
    cache_name = fields["layout"]["cache_name"]
    fields["layout"]["cache_per_host"] = _cache_per_host(raw)
    if not naming.valid_entry_name(cache_name):
        raise ConfigError(
            "[image_cache] subdirectory_name: must be a directory name under instances_path, "
            f"got {cache_name!r}"
        )
    return Settings(
        host=fields[""]["host"],
        machine_id_file=fields[""]["machine_id_file"],
        layout=Layout(**fields["layout"]),
        glance=_glance(conf, os_cloud),
        libvirt=_libvirt(**fields["libvirt"]),
        coordination=_coordination(fields["coordination"]["url"]),
        config_files=tuple(config_files),
        **{name: cls(**fields[name]) for name, cls in _SECTIONS.items()},
    )


def _check_watermarks(policy: Mapping[str, Any]) -> None:
    """Raises ConfigError unless the watermarks are off, or 0 < low < high."""
    high, low = policy["high_watermark_percent"], policy["low_watermark_percent"]
    if high == 0 and low == 0:
        return
    if high == 0:
        raise ConfigError(
            "[imagecache] low_watermark_percent: set without high_watermark_percent "
            "(the mark a pass frees down to once the filesystem is that full)"
        )
    if not 0 < low < high:
        raise ConfigError(
            f"[imagecache] low_watermark_percent: must be above 0 and below "
            f"high_watermark_percent ({high:g}), got {low:g}"
        )


def _parse(conf: cfg.ConfigOpts, config_files: Sequence[str], config_dirs: Sequence[str]) -> None:
    """Parse exactly these files and directories: no argv, no search of /etc/<project>/.

    Each file is first read whole as UTF-8 (they are small), so that one oslo.config cannot read
    (a directory, EACCES, Latin-1 in a comment) is a :class:`ConfigError` naming it.
    """
    for path in _files_read(config_files, config_dirs):
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read
                raise ConfigError(f"cannot read configuration {path}: not a regular file")
            with open(path, "rb") as f:
                f.read(_MAX_CONFIG_BYTES).decode("utf-8")
        except FileNotFoundError:
            continue  # oslo.config says so, in its words
        except UnicodeDecodeError as exc:
            raise ConfigError(f"cannot read configuration {path}: not UTF-8 text "
                              f"(byte {exc.start}: {exc.reason})") from exc  # fmt: skip
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    args: list[str] = []
    for path in config_files:
        args += ["--config-file", path]
    for path in config_dirs:
        args += ["--config-dir", path]
    conf(args=args, project="imagecache", default_config_files=[], default_config_dirs=[])


def _unreadable(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.start}: {exc.reason})"
    return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)


def _files_read(config_files: Sequence[str], config_dirs: Sequence[str]) -> list[str]:
    """The files oslo.config read, in its order: the files, then each directory's ``*.conf``."""
    found = list(config_files)
    for directory in config_dirs:
        found += sorted(glob.glob(os.path.join(glob.escape(directory), "*.conf")))
    return found


_RawFile = dict[str, dict[str, list[str]]]  # section -> option -> its values, in file order


def _raw_files(paths: Sequence[str]) -> list[tuple[str, _RawFile]]:
    """Each file oslo.config read, parsed once more as text, before interpolation: what the
    checks below ask of the option text itself. A file it cannot parse is left out (oslo.config
    already read or refused it)."""
    found = []
    for path in paths:
        sections: _RawFile = {}
        try:
            cfg.ConfigParser(path, sections).parse()
        except (OSError, UnicodeDecodeError, cfg.ParseError):
            continue
        found.append((path, sections))
    return found


def _warn_unknown(files: Sequence[tuple[str, _RawFile]]) -> None:
    """Warn about options in ``[imagecache]`` that no option declares: typos, most likely.

    Nova's groups are shared with nova-compute, so options imagecache does not read are expected
    there; ``[imagecache]`` is ours alone, and a misspelt ``lock_timeout_secs`` would otherwise be
    silently ignored, its default in force.
    """
    options = (*_OPTIONS, *_LIBVIRT_OPTIONS, _COORDINATION_OPTION)
    known = sorted(o.opt.dest for o in options if o.group == "imagecache")
    for path, sections in files:
        for name in sorted(sections.get("imagecache", {})):
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                LOG.warning("%s: [imagecache] %s is not an imagecache option%s", path, name, hint)


def _may_name_my_ip(files: Sequence[tuple[str, _RawFile]], overrides: Sequence[str | None]) -> bool:
    """Whether any value could interpolate ``$my_ip``: a file's, an override's, or one given
    through the environment (oslo.config reads ``OS_<GROUP>__<OPTION>``). Any mention at all
    counts, however it is spelt; missing one would name a cache ``_base_`` on every host."""
    texts = [v for _, sections in files for opts in sections.values() for vs in opts.values()
             for v in vs]  # fmt: skip
    texts += [v for v in overrides if v is not None]
    texts += [v for k, v in os.environ.items() if k.startswith("OS_")]
    return any("my_ip" in text for text in texts)


_PER_HOST = re.compile(r"\$\{?(my_ip|host)\b")


def _cache_per_host(files: Sequence[tuple[str, _RawFile]]) -> bool:
    """Whether the cache's name is made per host (``_base_$my_ip``): then the hosts of
    ``compute_nodes`` share the instances path but not this cache. Read from the raw option
    text (the last file that sets it wins, as for oslo.config), before interpolation."""
    raw: str | None = None
    for _, sections in files:
        for group, name in (("DEFAULT", "image_cache_subdirectory_name"),
                            ("image_cache", "subdirectory_name")):  # fmt: skip
            values = sections.get(group, {}).get(name)
            if values:
                raw = values[-1]
    # oslo.config reads ``$$`` as a literal ``$``: ``_base_$$my_ip`` is one name on every host.
    return raw is not None and _PER_HOST.search(raw.replace("$$", "")) is not None


def _glance(conf: cfg.ConfigOpts, os_cloud: str | None) -> GlanceSettings:
    """``[glance]`` as :class:`GlanceSettings`; Nova's ``endpoint_override`` is used when
    ``api_servers`` is empty (Nova prefers ``api_servers`` too)."""
    section = conf.glance
    read: dict[str, Any] = {}
    for option in _GLANCE_OPTIONS:
        value = option.convert(_read(section, f"[glance] {option.opt.dest}", option.opt.dest))
        read[option.opt.dest] = value
    auth_type = read["auth_type"]
    auth_options: dict[str, str] = {}
    if auth_type and auth_type not in _NO_AUTH and not os_cloud:
        from keystoneauth1 import exceptions as ks_exc
        from keystoneauth1 import loading

        try:
            plugin_opts = loading.get_auth_plugin_conf_options(auth_type)
        except ks_exc.NoMatchingPlugin as exc:
            raise ConfigError(f"[glance] auth_type: unknown auth plugin {auth_type!r}") from exc
        conf.register_opts(plugin_opts, group="glance")
        for opt in plugin_opts:
            value = _read(section, f"[glance] {opt.dest}", opt.dest)
            if value is not None:
                auth_options[opt.dest] = str(value)
    servers = read["api_servers"] or (
        (read["endpoint_override"],) if read["endpoint_override"] else ()
    )
    return GlanceSettings(
        api_servers=servers,
        os_cloud=os_cloud,
        auth_type=auth_type,
        auth_options=MappingProxyType(auth_options),
        insecure=read["insecure"],
        cafile=read["cafile"],
        timeout=read["timeout"],
        region_name=read["region_name"],
        valid_interfaces=read["valid_interfaces"],
    )


def _label(group: str, opt: Any) -> str:
    """``[group] name``, plus the old names an operator's nova.conf may be using."""
    label = f"[{group}] {opt.dest}"
    old = [f"[{d.group or 'DEFAULT'}] {d.name}" for d in opt.deprecated_opts]
    return f"{label} (or {', '.join(old)})" if old else label


def _read(section: Any, label: str, name: str) -> Any:
    try:
        return getattr(section, name)
    except (cfg.ConfigFileValueError, ValueError) as exc:
        detail = str(exc).rsplit("is not valid: ", 1)[-1]
        raise ConfigError(f"{label}: invalid value: {detail}") from exc
    except cfg.TemplateSubstitutionError as exc:
        raise ConfigError(f"{label}: {exc}") from exc
    except cfg.NoSuchOptError as exc:
        raise ConfigError(f"{label}: refers to an unknown option: {exc}") from exc


# oslo.log's [DEFAULT] options (and their old names) that say where and how logs go; whether
# any is set decides if oslo.log is loaded at all (it adds ~45 ms to every start, more than a
# `plan` of a small host). tests/test_config.py checks this list against oslo.log's own.
LOGGING_OPTIONS = frozenset(
    {"debug", "default_log_levels", "fatal_deprecations", "instance_format"}
    | {"instance_uuid_format", "log-config", "log_color", "log_config", "log_config_append"}
    | {"log_date_format", "log_dir", "log_file", "log_rotate_interval"}
    | {"log_rotate_interval_type", "log_rotation_type", "logdir", "logfile"}
    | {"logging_context_format_string", "logging_debug_format_suffix"}
    | {"logging_default_format_string", "logging_exception_prefix"}
    | {"logging_user_identity_format", "max_logfile_count", "max_logfile_size_mb"}
    | {"publish_errors", "rate_limit_burst", "rate_limit_except_level", "rate_limit_interval"}
    | {"syslog_log_facility", "use_eventlog", "use_journal", "use_json", "use_stderr"}
    | {"use_syslog", "watch_log_file"}
)
# Logged times are UTC, and say so.
_LOG_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"
_LOG_FORMAT = "%(asctime)s.%(msecs)03dZ %(process)d %(levelname)s %(name)s {}%(message)s"
_LOG_DESTINATIONS = ("log_file", "log_dir", "use_journal", "use_syslog", "log_config_append")


def logging_configured(config_files: Sequence[str], config_dirs: Sequence[str] = ()) -> bool:
    """Whether the files set any oslo.log option in ``[DEFAULT]`` (read without oslo.log)."""
    for path in _files_read(config_files, config_dirs):
        sections: dict[str, dict[str, list[str]]] = {}
        try:
            cfg.ConfigParser(path, sections).parse()
        except (OSError, UnicodeDecodeError, cfg.ParseError):
            continue
        if LOGGING_OPTIONS & set(sections.get("DEFAULT", {})):
            return True
    return False


def setup_logging(
    config_files: Sequence[str],
    config_dirs: Sequence[str] = (),
    *,
    debug: bool = False,
    log_file: str | None = None,
    destinations: bool = True,
    stderr: bool = True,
) -> None:
    """Set up logging with oslo.log from the files' ``[DEFAULT]`` options, as every OpenStack
    service does (``debug``, ``log_file``, ``log_dir``, ``use_journal``, ``use_json``,
    ``use_syslog``, ``log_config_append``, ...).

    ``debug`` and ``log_file`` (the command line) win over the files. ``destinations`` False
    ignores the files' log files, journal and syslog (read-only commands change nothing, not
    even a log file). ``stderr`` also logs to stderr; without it, stderr is used only when no
    other destination is set (oslo.log would pick stdout, where ``--json`` documents go).

    Raises:
        ConfigError: a logging option has a bad value, or ``log_config_append`` cannot be used.
        OSError: the log file cannot be opened.
    """
    from oslo_log import _options as oslo_log_options
    from oslo_log import log as oslo_log

    conf = cfg.ConfigOpts()
    # oslo.log's own register_options() makes some of them command-line options, whose bad
    # values in a file end the process from inside argparse; registered as plain options, each
    # is validated when read, below, and named. list_opts is oslo.log's oslo.config.opts entry.
    conf.register_opts(oslo_log_options.list_opts()[0][1])
    conf.set_default("log_date_format", _LOG_DATE_FORMAT)
    conf.set_default("logging_default_format_string", _LOG_FORMAT.format(""))
    conf.set_default("logging_context_format_string",
                     _LOG_FORMAT.format("[%(request_id)s] "))  # fmt: skip
    try:
        _parse(conf, config_files, config_dirs)
        if not destinations:
            for name in _LOG_DESTINATIONS:
                conf.set_override(name, False if name.startswith("use_") else None)
        if debug:
            conf.set_override("debug", True)
        if log_file:
            conf.set_override("log_file", log_file)
        elif _read(conf, "[DEFAULT] log_dir", "log_dir") and not conf.log_file:
            # oslo.log would name the file after argv[0] (`<frozen runpy>` under python -m).
            conf.set_override("log_file", "imagecache.log")
        if stderr or not any(_read(conf, f"[DEFAULT] {n}", n) for n in _LOG_DESTINATIONS[:3]):
            conf.set_override("use_stderr", True)
        for name in sorted(LOGGING_OPTIONS & set(conf)):
            _read(conf, f"[DEFAULT] {name}", name)  # the first bad value, named
        oslo_log.setup(conf, "imagecache")
    except cfg.Error as exc:
        raise ConfigError(f"logging configuration: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration: {_unreadable(exc)}") from exc
    except oslo_log.LogConfigError as exc:
        raise ConfigError(f"[DEFAULT] log_config_append: {exc}") from exc

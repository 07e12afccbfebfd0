"""nova.conf and imagecache.conf, read once with oslo.config into one frozen :class:`Settings`.

This is the only module that knows about oslo.config. Nova's options keep their names, groups and
deprecated aliases (DESIGN.md §5), so an existing ``nova.conf`` of any release since Icehouse works
unchanged; this project's own options live in ``[imagecache]``. oslo.config validates lazily (a
bad integer raises only when read), so :func:`load_settings` reads every option once and turns the
first bad one into a :class:`ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from oslo_config import cfg

from imagecache.errors import ConfigError
from imagecache.model import Policy

__all__ = ["DEFAULT_CONFIG_FILES", "GlanceSettings", "Settings", "load_settings"]

DEFAULT_CONFIG_FILES = ("/etc/nova/nova.conf", "/etc/imagecache/imagecache.conf")


def _old(name: str, group: str) -> list[cfg.DeprecatedOpt]:
    return [cfg.DeprecatedOpt(name, group=group)]


def _default_ip() -> str:
    from oslo_utils import netutils

    return str(netutils.get_my_ipv4())


_DEFAULT_OPTS = [
    cfg.StrOpt("state_path", default="/var/lib/nova"),
    cfg.StrOpt("instances_path", default="$state_path/instances"),
    cfg.StrOpt("host", sample_default="<hostname>"),
    cfg.StrOpt("my_ip", sample_default="<primary IP>"),
    cfg.BoolOpt("force_raw_images", default=True),
    cfg.StrOpt("default_ephemeral_format"),
]

_IMAGE_CACHE_OPTS = [
    cfg.IntOpt(
        "manager_interval",
        default=2400,
        deprecated_opts=_old("image_cache_manager_interval", "DEFAULT"),
    ),
    cfg.StrOpt(
        "subdirectory_name",
        default="_base",
        deprecated_opts=_old("image_cache_subdirectory_name", "DEFAULT"),
    ),
    cfg.BoolOpt(
        "remove_unused_base_images",
        default=True,
        deprecated_opts=_old("remove_unused_base_images", "DEFAULT"),
    ),
    cfg.IntOpt(
        "remove_unused_original_minimum_age_seconds",
        default=86400,
        min=0,
        deprecated_opts=_old("remove_unused_original_minimum_age_seconds", "DEFAULT"),
    ),
    cfg.IntOpt(
        "remove_unused_resized_minimum_age_seconds",
        default=3600,
        min=0,
        deprecated_opts=_old("remove_unused_resized_minimum_age_seconds", "libvirt"),
    ),
    cfg.IntOpt("precache_concurrency", default=1, min=1),
]

_LIBVIRT_OPTS = [
    cfg.BoolOpt(
        "checksum_base_images",
        default=False,
        deprecated_opts=_old("checksum_base_images", "DEFAULT"),
    ),
    cfg.IntOpt("checksum_interval_seconds", default=3600, min=0),
    cfg.BoolOpt(
        "remove_unused_kernels",
        default=False,
        deprecated_opts=_old("remove_unused_kernels", "DEFAULT"),
    ),
]

_IMAGECACHE_OPTS = [
    cfg.FloatOpt("lock_timeout_seconds", default=60.0, min=0),
    cfg.IntOpt("quarantine_seconds", default=86400, min=0),
    cfg.IntOpt("stale_temp_seconds", default=86400, min=0),
    cfg.StrOpt("audit_log", default="/var/log/imagecache/audit.jsonl"),
    # Instance-record files (DESIGN.md §7) read every pass, as if given with --inventory.
    cfg.ListOpt("inventory_files", default=[]),
    cfg.BoolOpt("touch_in_use", default=True),
    cfg.ListOpt(
        "vmdk_allowed_types",
        default=["streamOptimized", "monolithicSparse"],
        deprecated_opts=_old("vmdk_allowed_types", "compute"),
    ),
]

# nova.conf [glance]: where Glance is and how to authenticate (keystoneauth's session and adapter
# options that matter here; the auth plugin's own options are registered once auth_type is known,
# from keystoneauth1.loading, so any plugin works). Not in _GROUPS: they build GlanceSettings.
_GLANCE_OPTS = [
    cfg.ListOpt("api_servers"),
    cfg.StrOpt("endpoint_override"),
    cfg.StrOpt("auth_type"),
    cfg.StrOpt("region_name"),
    cfg.ListOpt("valid_interfaces", default=["internal", "public"]),
    cfg.BoolOpt("insecure", default=False),
    cfg.StrOpt("cafile"),
    cfg.FloatOpt("timeout", min=0),
]
_NO_AUTH = ("none", "noauth")

_GROUPS: tuple[tuple[str, list[Any]], ...] = (
    ("DEFAULT", _DEFAULT_OPTS),
    ("image_cache", _IMAGE_CACHE_OPTS),
    ("libvirt", _LIBVIRT_OPTS),
    ("imagecache", _IMAGECACHE_OPTS),
)


@dataclass(frozen=True, slots=True)
class GlanceSettings:
    """How to reach Glance: nova.conf ``[glance]`` or a clouds.yaml cloud (``--os-cloud``).

    Defined here, not in ``glance.py``, so that reading the configuration does not import
    keystoneauth and requests (``plan`` and ``status`` start without them).
    """

    api_servers: tuple[str, ...] = ()  # empty: find the endpoint in the catalog via auth
    os_cloud: str | None = None  # a clouds.yaml cloud; its settings replace auth_* below
    clouds_yaml: str | None = None  # that file; None: openstacksdk's usual search path
    auth_type: str | None = None  # keystoneauth plugin ("password", ...); "none"/"noauth"
    auth_options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    insecure: bool = False
    cafile: str | None = None
    timeout: float | None = None
    region_name: str | None = None
    valid_interfaces: tuple[str, ...] = ("internal", "public")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every option imagecache reads, already validated. Built once by :func:`load_settings`."""

    state_path: str = "/var/lib/nova"
    instances_path: str = "/var/lib/nova/instances"
    host: str = "localhost"
    my_ip: str = "127.0.0.1"
    subdirectory_name: str = "_base"
    manager_interval: int = 2400
    remove_unused_base_images: bool = True
    remove_unused_original_minimum_age_seconds: int = 86400
    remove_unused_resized_minimum_age_seconds: int = 3600
    precache_concurrency: int = 1
    checksum_base_images: bool = False
    checksum_interval_seconds: int = 3600
    remove_unused_kernels: bool = False
    force_raw_images: bool = True
    default_ephemeral_format: str | None = None
    lock_timeout_seconds: float = 60.0
    quarantine_seconds: int = 86400
    stale_temp_seconds: int = 86400
    audit_log: str = "/var/log/imagecache/audit.jsonl"
    inventory_files: tuple[str, ...] = ()
    touch_in_use: bool = True
    vmdk_allowed_types: tuple[str, ...] = ("streamOptimized", "monolithicSparse")
    config_files: tuple[str, ...] = ()
    glance: GlanceSettings = field(default_factory=GlanceSettings)

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.instances_path, self.subdirectory_name)

    @property
    def pass_interval(self) -> int | None:
        """Seconds between daemon passes: Nova's 0 means every 60 s, negative means disabled."""
        if self.manager_interval < 0:
            return None
        return self.manager_interval or 60

    @property
    def policy(self) -> Policy:
        return Policy(
            remove_unused=self.remove_unused_base_images,
            original_age=self.remove_unused_original_minimum_age_seconds,
            resized_age=self.remove_unused_resized_minimum_age_seconds,
            remove_unused_kernels=self.remove_unused_kernels,
            stale_temp_age=self.stale_temp_seconds,
            quarantine_seconds=self.quarantine_seconds,
            default_ephemeral_format=self.default_ephemeral_format,
        )


def load_settings(
    config_files: Sequence[str] | None = None,
    config_dirs: Sequence[str] = (),
    *,
    instances_path: str | None = None,
    host: str | None = None,
    os_cloud: str | None = None,
) -> Settings:
    """Read the configuration files and return validated settings.

    ``config_files`` None means the defaults of DESIGN.md §5 that exist. Command-line overrides
    (``instances_path``, ``host``) win over the files and take part in ``$name`` interpolation.
    ``os_cloud`` names a clouds.yaml cloud to reach Glance through, instead of ``[glance]``.

    Raises:
        ConfigError: a file is missing or unparsable, or an option has a bad value (the message
            names the option and its group).
    """
    if config_files is None:
        config_files = [f for f in DEFAULT_CONFIG_FILES if os.path.exists(f)]
    conf = cfg.ConfigOpts()
    for group, opts in _GROUPS:
        conf.register_opts(opts, group=None if group == "DEFAULT" else group)
    conf.register_opts(_GLANCE_OPTS, group="glance")
    args: list[str] = []
    for path in config_files:
        args += ["--config-file", path]
    for path in config_dirs:
        args += ["--config-dir", path]
    try:
        conf(args=args, project="imagecache", default_config_files=[], default_config_dirs=[])
    except (cfg.ConfigFilesNotFoundError, cfg.ConfigDirNotFoundError) as exc:
        raise ConfigError(f"cannot read configuration: {exc}") from exc
    except cfg.ConfigFileParseError as exc:
        raise ConfigError(f"cannot parse configuration: {exc}") from exc
    except cfg.Error as exc:
        raise ConfigError(f"configuration error: {exc}") from exc
    if instances_path is not None:
        conf.set_override("instances_path", instances_path)
    if host is not None:
        conf.set_override("host", host)
    # Defaults that need the machine, set before any option is read: `_base_$my_ip` must
    # interpolate the real address, not an empty string.
    if conf.host is None:
        conf.set_default("host", socket.gethostname())
    if conf.my_ip is None:
        conf.set_default("my_ip", _default_ip())

    values: dict[str, Any] = {}
    for group, opts in _GROUPS:
        section = conf if group == "DEFAULT" else conf[group]
        for opt in opts:
            values[opt.dest] = _read(section, _label(group, opt), opt.dest)
    values["vmdk_allowed_types"] = tuple(values["vmdk_allowed_types"])
    values["inventory_files"] = tuple(values["inventory_files"] or ())
    values["instances_path"] = os.path.abspath(values["instances_path"])
    values["config_files"] = tuple(config_files)
    if "/" in values["subdirectory_name"] or values["subdirectory_name"] in ("", ".", ".."):
        raise ConfigError(
            "[image_cache] subdirectory_name: must be a directory name under instances_path, "
            f"got {values['subdirectory_name']!r}"
        )
    values["glance"] = _glance(conf, os_cloud)
    fields = {f.name for f in dataclasses.fields(Settings)}
    return Settings(**{k: v for k, v in values.items() if k in fields})


def _glance(conf: cfg.ConfigOpts, os_cloud: str | None) -> GlanceSettings:
    """``[glance]`` as :class:`GlanceSettings`; Nova's ``endpoint_override`` is used when
    ``api_servers`` is empty (Nova prefers ``api_servers`` too)."""
    section = conf.glance
    read = {o.dest: _read(section, f"[glance] {o.dest}", o.dest) for o in _GLANCE_OPTS}
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
    servers = tuple(read["api_servers"] or ()) or (
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
        valid_interfaces=tuple(read["valid_interfaces"]),
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

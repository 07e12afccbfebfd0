"""imagecache: a safe image cache manager for libvirt/QEMU hosts, compatible with Nova's _base.

The library in one screen::

    settings = load_settings(["/etc/nova/nova.conf"])  # ConfigError on a bad value
    inventory = observe(settings, inventory_files=[...])  # read-only; a bad disk is a Problem
    plan = decide(inventory, settings.policy, now=time.time())  # pure: action + reason per entry
"""

from __future__ import annotations

from imagecache.config import Settings, load_settings
from imagecache.errors import (
    ConfigError,
    ImageCacheError,
    ImageFormatError,
    ImageServiceError,
    LockTimeout,
)
from imagecache.formats import BackingChain, ImageHeader, read_header, resolve_chain
from imagecache.manager import observe, plan_pass
from imagecache.model import (
    Action,
    CacheEntry,
    Decision,
    Disk,
    InstanceRecord,
    Inventory,
    Kind,
    Plan,
    Policy,
    Problem,
    Reason,
    Source,
    User,
)
from imagecache.naming import classify, fingerprint
from imagecache.policy import decide
from imagecache.render.plan import plan_to_dict

__all__ = [
    "Action",
    "BackingChain",
    "CacheEntry",
    "ConfigError",
    "Decision",
    "Disk",
    "ImageCacheError",
    "ImageFormatError",
    "ImageHeader",
    "ImageServiceError",
    "InstanceRecord",
    "Inventory",
    "Kind",
    "LockTimeout",
    "Plan",
    "Policy",
    "Problem",
    "Reason",
    "Settings",
    "Source",
    "User",
    "classify",
    "decide",
    "fingerprint",
    "load_settings",
    "observe",
    "plan_pass",
    "plan_to_dict",
    "read_header",
    "resolve_chain",
]

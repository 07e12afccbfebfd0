"""imagecache: a safe image cache manager for libvirt/QEMU hosts, compatible with Nova's _base.

The library in one screen::

    settings = load_settings(["/etc/nova/nova.conf"])  # ConfigError on a bad value
    inventory = observe(settings, inventory_files=[...])  # read-only; a bad disk is a Problem
    plan = decide(inventory, settings.policy, now=time.time())  # pure: action + reason per entry
"""

from __future__ import annotations

from imagecache._version import __version__ as __version__
from imagecache.config import load_settings
from imagecache.errors import (
    ConfigError,
    ImageCacheError,
    ImageFormatError,
    ImageServiceError,
    LockTimeout,
)
from imagecache.formats import BackingChain, ImageHeader, read_header, resolve_chain
from imagecache.layout import Layout
from imagecache.manager import observe, plan_pass
from imagecache.model import (
    CacheEntry,
    Disk,
    InstanceRecord,
    Inventory,
    Kind,
    Problem,
    ProblemCode,
    Source,
    User,
)
from imagecache.naming import classify, fingerprint
from imagecache.plan import Action, Decision, Plan, Policy, Reason, plan_from_dict, plan_to_dict
from imagecache.policy import decide
from imagecache.settings import Settings

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
    "Layout",
    "LockTimeout",
    "Plan",
    "Policy",
    "Problem",
    "ProblemCode",
    "Reason",
    "Settings",
    "Source",
    "User",
    "classify",
    "decide",
    "fingerprint",
    "load_settings",
    "observe",
    "plan_from_dict",
    "plan_pass",
    "plan_to_dict",
    "read_header",
    "resolve_chain",
]

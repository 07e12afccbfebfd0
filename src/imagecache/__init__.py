"""imagecache: a safe image cache manager for libvirt/QEMU hosts, compatible with Nova's _base."""

from __future__ import annotations

from imagecache.errors import ImageCacheError
from imagecache.model import Action, Kind, Plan, Policy, Reason

__all__ = [
    "Action",
    "ImageCacheError",
    "Kind",
    "Plan",
    "Policy",
    "Reason",
]

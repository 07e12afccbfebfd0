"""One pass on one screen: observe -> decide -> (act). The only module that wires the layers.

Reading order for a newcomer: this file for the flow, ``policy.py`` for every decision.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from imagecache import fsops, policy, scan
from imagecache.config import Settings
from imagecache.model import Inventory, Plan

__all__ = ["observe", "plan_pass", "save_plan"]


def observe(settings: Settings, *, inventory_files: Iterable[str] = ()) -> Inventory:
    """Read-only observation of the host the settings describe."""
    return scan.observe(
        host=settings.host,
        instances_path=settings.instances_path,
        cache_dir=settings.cache_dir,
        inventory_files=inventory_files,
    )


def plan_pass(settings: Settings, *, inventory_files: Iterable[str] = (), now: float) -> Plan:
    """Observe and decide: what one pass would do now. Changes nothing."""
    inventory = observe(settings, inventory_files=inventory_files)
    return policy.decide(inventory, settings.policy, now)


def save_plan(path: str, doc: dict[str, Any]) -> None:
    """Write a plan document atomically, for ``clean --plan FILE`` to apply later."""
    fsops.atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))

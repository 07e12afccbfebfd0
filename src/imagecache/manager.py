"""One pass on one screen: observe -> decide -> act. The only module that wires the layers.

Reading order for a newcomer: this file for the flow, ``policy.py`` for every decision.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from imagecache import executor, fsops, policy, scan
from imagecache.audit import AuditLog
from imagecache.config import Settings
from imagecache.model import Inventory, Plan, Report

__all__ = ["apply_plan", "observe", "plan_pass", "restore", "run_pass", "save_plan"]


def observe(settings: Settings, *, inventory_files: Iterable[str] = ()) -> Inventory:
    """Read-only observation of the host the settings describe."""
    return scan.observe(
        host=settings.host,
        instances_path=settings.instances_path,
        cache_dir=settings.cache_dir,
        inventory_files=inventory_files,
    )


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a pass builds its values.

    A pass on a large host allocates a few hundred thousand small, acyclic, immutable values;
    the collector finds nothing among them yet spends about a fifth of the pass walking them.
    Reference counting still frees everything as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def plan_pass(settings: Settings, *, inventory_files: Iterable[str] = (), now: float) -> Plan:
    """Observe and decide: what one pass would do now. Changes nothing."""
    with _cyclic_gc_paused():
        inventory = observe(settings, inventory_files=inventory_files)
        return policy.decide(inventory, settings.policy, now)


def save_plan(path: str, doc: dict[str, Any]) -> None:
    """Write a plan document atomically, for ``clean --plan FILE`` to apply later."""
    fsops.atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))


def apply_plan(
    settings: Settings,
    plan: Plan,
    *,
    inventory_files: Iterable[str] = (),
    clock: Callable[[], float],
) -> Report:
    """Act on ``plan`` (just made, or saved earlier), re-checking every entry under its lock."""
    files = tuple(inventory_files)
    return executor.apply(
        plan,
        instances_path=settings.instances_path,
        observe=lambda: observe(settings, inventory_files=files),
        policy=settings.policy,
        clock=clock,
        audit=AuditLog(settings.audit_log, host=settings.host),
        lock_timeout=settings.lock_timeout_seconds,
        touch_in_use=settings.touch_in_use,
    )


def run_pass(
    settings: Settings, *, inventory_files: Iterable[str] = (), clock: Callable[[], float]
) -> tuple[Plan, Report]:
    """One whole pass: observe, decide, act."""
    files = tuple(inventory_files)
    plan = plan_pass(settings, inventory_files=files, now=clock())
    return plan, apply_plan(settings, plan, inventory_files=files, clock=clock)


def restore(settings: Settings, name: str, *, clock: Callable[[], float]) -> Report:
    """Bring a quarantined entry back (``imagecache restore NAME``)."""
    return executor.restore_entry(
        name,
        cache_dir=settings.cache_dir,
        instances_path=settings.instances_path,
        lock_timeout=settings.lock_timeout_seconds,
        audit=AuditLog(settings.audit_log, host=settings.host),
        now=clock(),
    )

"""One pass on one screen: observe -> decide -> act. The only module that wires the layers.

Reading order for a newcomer: this file for the flow, ``policy.py`` for every decision.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from imagecache import executor, policy
from imagecache import sources as scan
from imagecache.config import Settings
from imagecache.model import Inventory, Plan, Problem, Report
from imagecache.store import fsops, registry
from imagecache.store.audit import AuditLog

__all__ = ["apply_plan", "observe", "plan_pass", "register", "restore", "run_pass", "save_plan"]

LOG = logging.getLogger(__name__)


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


def register(settings: Settings, *, now: float) -> tuple[Problem, ...]:
    """Register this host in Nova's ``compute_nodes``, as Nova's own pass would; what went wrong.

    Only ``clean`` does this (``plan`` and ``status`` stay read-only), first thing in the pass as
    Nova does, so the observation that follows already counts this host.
    """
    problem = registry.register_host(
        settings.instances_path,
        settings.host,
        now=now,
        lock_timeout=settings.lock_timeout_seconds,
    )
    if problem is None:
        return ()
    LOG.warning("%s: %s", problem.ref, problem.message)
    return (problem,)


def apply_plan(
    settings: Settings,
    plan: Plan,
    *,
    inventory_files: Iterable[str] = (),
    clock: Callable[[], float],
) -> Report:
    """Register the host, then act on a saved ``plan``, re-checking every entry under its lock."""
    registered = register(settings, now=clock())
    return _apply(settings, plan, tuple(inventory_files), clock=clock, problems=registered)


def _apply(
    settings: Settings,
    plan: Plan,
    files: tuple[str, ...],
    *,
    clock: Callable[[], float],
    problems: tuple[Problem, ...],
) -> Report:
    done = executor.apply(
        plan,
        instances_path=settings.instances_path,
        observe=lambda: observe(settings, inventory_files=files),
        policy=settings.policy,
        clock=clock,
        audit=AuditLog(settings.audit_log, host=settings.host),
        lock_timeout=settings.lock_timeout_seconds,
        touch_in_use=settings.touch_in_use,
    )
    return dataclasses.replace(done, problems=(*problems, *done.problems))


def run_pass(
    settings: Settings, *, inventory_files: Iterable[str] = (), clock: Callable[[], float]
) -> tuple[Plan, Report]:
    """One whole pass: register the host, observe, decide, act."""
    files = tuple(inventory_files)
    registered = register(settings, now=clock())
    plan = plan_pass(settings, inventory_files=files, now=clock())
    return plan, _apply(settings, plan, files, clock=clock, problems=registered)


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

"""One pass on one screen: observe -> decide -> act. The only module that wires the layers.

Reading order for a newcomer: this file for the flow, ``policy.py`` for every decision.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from imagecache import executor, policy, sources
from imagecache.clock import Clock
from imagecache.model import Inventory, Problem
from imagecache.plan import Plan
from imagecache.restore import restore_entry
from imagecache.results import Report
from imagecache.settings import Settings
from imagecache.store import registry
from imagecache.store.audit import AuditLog

__all__ = ["apply_plan", "observe", "plan_pass", "register", "restore", "run_pass"]

LOG = logging.getLogger(__name__)


def observe(settings: Settings, *, inventory_files: Iterable[str] = ()) -> Inventory:
    """Read-only observation of the host the settings describe."""
    files = (*settings.clean.inventory_files, *inventory_files)
    return sources.observe(settings.layout, host=settings.host, inventory_files=files)


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


def register(settings: Settings, *, now: float) -> tuple[Problem, ...]:
    """Register this host in Nova's ``compute_nodes``, as Nova's own pass would; what went wrong.

    Only ``clean`` does this (``plan`` and ``status`` stay read-only), first thing in the pass as
    Nova does, so the observation that follows already counts this host.
    """
    problem = registry.register_host(
        settings.layout, settings.host, now=now, lock_timeout=settings.clean.lock_timeout
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
    clock: Clock,
    should_stop: Callable[[], bool] = lambda: False,
) -> Report:
    """Register the host, then act on a saved ``plan``, re-deciding every entry under its lock."""
    registered = register(settings, now=clock.wall())
    return _apply(settings, plan, tuple(inventory_files), clock=clock, problems=registered,
                  should_stop=should_stop)  # fmt: skip


def _apply(
    settings: Settings,
    plan: Plan,
    files: tuple[str, ...],
    *,
    clock: Clock,
    problems: tuple[Problem, ...],
    should_stop: Callable[[], bool],
) -> Report:
    done = executor.apply(
        plan,
        layout=settings.layout,
        observe=lambda: observe(settings, inventory_files=files),
        policy=settings.policy,
        clock=clock,
        audit=AuditLog(settings.clean.audit_log, host=settings.host),
        lock_timeout=settings.clean.lock_timeout,
        touch_in_use=settings.clean.touch_in_use,
        should_stop=should_stop,
    )
    return dataclasses.replace(done, problems=(*problems, *done.problems))


def run_pass(
    settings: Settings,
    *,
    inventory_files: Iterable[str] = (),
    clock: Clock,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[Plan, Report]:
    """One whole pass: register the host, observe, decide, act."""
    files = tuple(inventory_files)
    registered = register(settings, now=clock.wall())
    plan = plan_pass(settings, inventory_files=files, now=clock.wall())
    done = _apply(settings, plan, files, clock=clock, problems=registered, should_stop=should_stop)
    return plan, done


def restore(settings: Settings, name: str, *, clock: Clock) -> Report:
    """Bring a quarantined entry back (``imagecache restore NAME``)."""
    return restore_entry(
        name,
        layout=settings.layout,
        lock_timeout=settings.clean.lock_timeout,
        audit=AuditLog(settings.clean.audit_log, host=settings.host),
        now=clock.wall(),
    )

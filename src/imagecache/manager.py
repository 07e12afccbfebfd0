"""One pass on one screen: observe -> decide -> act. The only module that wires the layers.

Reading order for a newcomer: this file for the flow, ``policy.py`` for every decision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from imagecache import history, locks, policy, sources, usage, verify
from imagecache.clock import Clock
from imagecache.coordination import Coordination, CoordinationError, default_url, redact
from imagecache.errors import LockTimeout
from imagecache.history import History
from imagecache.layout import REGISTRY_LOCK
from imagecache.model import (
    PROBLEMS,
    Inventory,
    Manifest,
    Problem,
    ProblemCode,
    ProblemSource,
    Source,
    Upstream,
)
from imagecache.plan import Action, Plan, Reason
from imagecache.results import Report, Result
from imagecache.settings import Settings
from imagecache.store import digests, manifests, registry, state
from imagecache.store.audit import AuditLog
from imagecache.store.identity import machine_id, storage_id

__all__ = [
    "RetireRefused",
    "apply_plan",
    "config_problems",
    "observe",
    "peers_of",
    "plan_pass",
    "record",
    "record_fetches",
    "record_verifications",
    "register",
    "restore",
    "retire_peer",
    "run_pass",
    "verify_entries",
    "write_manifest",
]

LOG = logging.getLogger(__name__)


def observe(
    settings: Settings,
    *,
    inventory_files: Iterable[str] = (),
    now: float | None = None,
    members: tuple[str, ...] | None = None,
    listed: tuple[Upstream | None] | None = None,
) -> Inventory:
    """Read-only observation of the host the settings describe, with the configuration's own
    warnings (a non-blocking problem: Nova's manager still enabled on this cache).

    ``now``: the time the view is for, to tell its peers' live manifests from stale ones (the
    instance directories live peers own are then not scanned); None: every one is scanned.
    ``members``: the coordination group's, when one was consulted. ``listed``: the image
    service's listing this pass already made, as a 1-tuple (the executor's observations under
    the entry locks reuse it: it only orders evictions, and listing Glance once per batch would
    be a request per entry when throttled); None: list it here, if the policy wants it.
    """
    files = (*settings.clean.inventory_files, *inventory_files)
    shared = None if now is None else sources.SharedView(settings.policy, now, members)
    inventory = sources.observe(
        settings.layout,
        host=settings.host,
        inventory_files=files,
        libvirt=settings.libvirt,
        shared=shared,
    )
    inventory = dataclasses.replace(inventory, machine=machine_id(settings.machine_id_file))
    warnings = config_problems(settings)
    policy = settings.policy
    if policy.high_watermark_percent > 0 and inventory.filesystem is None:
        message = (
            "cannot measure the cache's filesystem (statvfs failed): the watermark rule does "
            "not run this pass"
        )
        warnings += (Problem(ProblemCode.FILESYSTEM_UNSTATABLE, settings.cache_dir, message),)
    if listed is not None:
        inventory = dataclasses.replace(inventory, upstream=listed[0])
    elif policy.evict_deleted_first and policy.capacity_limited:
        from imagecache.images.upstream import observe_upstream  # plan alone needs no client

        upstream, noted = observe_upstream(settings.glance)
        inventory = dataclasses.replace(inventory, upstream=upstream)
        warnings += noted
    if not warnings:
        return inventory
    return dataclasses.replace(inventory, problems=(*inventory.problems, *warnings))


def config_problems(settings: Settings) -> tuple[Problem, ...]:
    """What the configuration itself puts at risk; reported by every pass, blocking nothing."""
    if not settings.nova_manager_enabled:
        return ()
    interval = settings.daemon.nova_manager_interval
    return (
        Problem(
            ProblemCode.NOVA_MANAGER_ENABLED,
            "[image_cache] manager_interval",
            f"Nova's own image cache manager is enabled ([image_cache] manager_interval = "
            f"{interval}, remove_unused_base_images = true): nova-compute will still remove "
            "entries imagecache keeps (in quarantine, pinned, or by its own rules); set "
            "[image_cache] manager_interval = -1 in nova.conf and restart nova-compute",
        ),
    )


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a pass builds its values (and, on the command
    line, for the whole of a read-only command: rendering the plan is the same values).

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
    return _observe_and_decide(settings, tuple(inventory_files), now=now)[1]


def _observe_and_decide(
    settings: Settings,
    files: tuple[str, ...],
    *,
    now: float,
    members: tuple[str, ...] | None = None,
    extra: tuple[Problem, ...] = (),
) -> tuple[Inventory, Plan]:
    with cyclic_gc_paused():
        inventory = observe(settings, inventory_files=files, now=now, members=members)
        if extra:
            inventory = dataclasses.replace(inventory, problems=(*inventory.problems, *extra))
        return inventory, policy.decide(inventory, settings.policy, now)


def write_manifest(
    settings: Settings, inventory: Inventory, plan: Plan, *, now: float
) -> tuple[Problem, ...]:
    """This host's manifest for its peers on a shared storage; what went wrong.

    The entries its own sources use (never what it learnt from other manifests: two hosts must
    not keep each other's claims alive forever), the instance directories it owns, and whether
    its own view was complete (a peer's gap is not its own: else two hosts would block each
    other for good). Written by every pass, also one blocked from removing.
    """
    if not os.path.isdir(settings.layout.cache_dir):
        return ()  # no cache (not mounted, not made yet): nothing to share, nothing made here
    complete = not any(
        p.blocking and PROBLEMS[p.code].source is not ProblemSource.PEER for p in inventory.problems
    )
    used = sorted(
        {
            (d.entry.name, d.entry.device, d.entry.inode)
            for d in plan.decisions
            if any(u.source is not Source.PEER for u in d.users)
        }
        # A quarantined entry this host's disks still use (restored by its next pass): no peer
        # may purge it meanwhile. By name: its device is not recorded.
        | {
            (t.entry.name, 0, 0)
            for t in plan.trash
            if any(u.source is not Source.PEER for u in t.users)
        }
    )
    manifest = Manifest(settings.host, now, complete, tuple(used), inventory.owned_dirs,
                        machine=inventory.machine)  # fmt: skip
    try:
        manifests.write_manifest(settings.layout, manifest)
    except OSError as exc:
        message = (
            f"cannot write this host's manifest: {exc.strerror or exc}; its peers will find it "
            "stale and stop removing"
        )
        LOG.error("%s", message)
        return (Problem(ProblemCode.MANIFEST_UNWRITABLE, settings.layout.state_dir, message),)
    return ()


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
    files = tuple(inventory_files)
    with _Cleaner(settings, now=clock.wall()) as cleaner:
        now = clock.wall()
        # Its peers must hear from this host whatever runs its passes: a fresh view for the
        # manifest; and a saved plan removes only while this host is the storage's cleaner.
        inventory, fresh = _observe_and_decide(
            settings, files, now=now, members=cleaner.members, extra=cleaner.problems
        )
        registered += write_manifest(settings, inventory, fresh, now=now)
        if not cleaner.leading:
            plan = policy.touch_only(plan)
        done = _apply(settings, plan, files, clock=clock,
                      problems=(*registered, *cleaner.problems),
                      should_stop=lambda: should_stop() or cleaner.lost(),
                      collect_lock_files=cleaner.leading,
                      upstream=inventory.upstream)  # fmt: skip
        return _after(settings, done, inventory, fresh, cleaner, now=clock.wall(), since=now)


def _apply(
    settings: Settings,
    plan: Plan,
    files: tuple[str, ...],
    *,
    clock: Clock,
    problems: tuple[Problem, ...],
    should_stop: Callable[[], bool],
    housekeeping: bool = True,
    collect_lock_files: bool = True,
    upstream: Upstream | None = None,
) -> Report:
    from imagecache import executor  # only what acts loads it: plan and status never do

    def again() -> Inventory:
        return observe(settings, inventory_files=files, now=clock.wall(), listed=(upstream,))

    done = executor.apply(
        plan,
        layout=settings.layout,
        observe=again,
        policy=settings.policy,
        clock=clock,
        audit=AuditLog(settings.clean.audit_log, host=settings.host),
        lock_timeout=settings.clean.lock_timeout,
        touch_in_use=settings.clean.touch_in_use,
        should_stop=should_stop,
        housekeeping=housekeeping,
        collect_lock_files=collect_lock_files,
        max_bytes_per_second=settings.clean.remove_max_bytes_per_second,
    )
    return dataclasses.replace(done, problems=(*problems, *done.problems))


def run_pass(
    settings: Settings,
    *,
    inventory_files: Iterable[str] = (),
    clock: Clock,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[Plan, Report]:
    """One whole pass: register the host, verify what is due (``checksum_base_images``),
    observe, decide, act."""
    files = tuple(inventory_files)
    registered = register(settings, now=clock.wall())
    if settings.verify.checksum_base_images:
        checked = verify.verify(settings.layout, settings.verify, clock=clock,
                                should_stop=should_stop)  # fmt: skip
        record_verifications(settings, checked, now=clock.wall())
        registered += _verify_problems(settings, checked)
    with _Cleaner(settings, now=clock.wall()) as cleaner:
        now = clock.wall()
        inventory, plan = _observe_and_decide(
            settings, files, now=now, members=cleaner.members, extra=cleaner.problems
        )
        registered += write_manifest(settings, inventory, plan, now=now)
        if not cleaner.leading:
            plan = policy.touch_only(plan)  # another host cleans the storage now
        done = _apply(settings, plan, files, clock=clock, problems=registered,
                      should_stop=lambda: should_stop() or cleaner.lost(),
                      collect_lock_files=cleaner.leading,
                      upstream=inventory.upstream)  # fmt: skip
        done = _after(settings, done, inventory, plan, cleaner, now=clock.wall(), since=now)
    _forget_removed(settings, done, now=clock.wall())
    return plan, done


def _after(
    settings: Settings,
    done: Report,
    inventory: Inventory,
    plan: Plan,
    cleaner: _Cleaner,
    *,
    now: float,
    since: float,
) -> Report:
    """The report with the lock lost on the way, if it was; and the manifest written again if
    the pass outlived a peer's patience (a pass that waited for locks longer than
    ``peer_stale_seconds`` would look dead, and a tombstone written meanwhile must not stand).
    """
    extra = cleaner.lost_problems
    if now - since >= settings.policy.peer_stale_seconds / 3:
        extra += write_manifest(settings, inventory, plan, now=now)
    if not extra:
        return done
    return dataclasses.replace(done, problems=(*done.problems, *extra))


class _Cleaner:
    """Whether this host is the one that removes on a shared storage, for one pass.

    Through :class:`~imagecache.coordination.Coordination` (``[imagecache] coordination_url``):
    the group's members are peers, and the cleaner lock is taken without waiting; another
    holder makes this pass touch-only. Unset, coordination is used only where other hosts share
    the storage (``file://`` on it, when tooz is installed; without tooz, a note: Nova's entry
    locks still serialise every removal). A backend that cannot be used is a blocking problem:
    nothing removed, touching and the manifest go on. A lock lost during the pass stops it.
    """

    def __init__(self, settings: Settings, *, now: float, lead: bool = True) -> None:
        self.settings = settings
        self.now = now
        self.members: tuple[str, ...] | None = None
        self.problems: tuple[Problem, ...] = ()
        self.leading = True
        self._lead = lead  # False: membership only (``peers retire`` asks who is there)
        self._coord: Coordination | None = None
        self._where = "coordination"
        self._lost: Problem | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Cleaner:
        try:
            url = self._url()
            if url is None:
                return self
            self._where = redact(url)
            # Named after the storage's own id, not this host's path to it: hosts that mount
            # the share at different paths must still join one group and share one lock.
            try:
                storage = storage_id(self.settings.layout)
            except OSError as exc:
                raise CoordinationError(
                    f"cannot read or make the storage id in {self.settings.layout.state_dir}: "
                    f"{exc.strerror or exc}",
                    reason="bad-storage",
                ) from exc
            coord = Coordination(url, member=self.settings.host, storage=storage)
            self._coord = self._stack.enter_context(coord)
            self.members = tuple(sorted(coord.members()))
            self.leading = coord.lead(wait=0.0) if self._lead else False
        except CoordinationError as exc:
            self.leading = False
            message = f"{exc} ({exc.reason}): nothing is removed this pass"
            code = ProblemCode.COORDINATION_UNAVAILABLE
            self.problems = (*self.problems, Problem(code, self._where, message))
            LOG.error("coordination: %s", message)
        if self._lead and not self.leading and not self.problems:
            LOG.info(
                "another host holds the cleaner lock of %s: touching only", self.settings.cache_dir
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _url(self) -> str | None:
        url = self.settings.coordination.url
        if url is None or url:
            return url  # off, or the operator's
        peers, _ = peers_of(self.settings, now=self.now)
        if not peers:
            return None  # nobody else on this storage: nothing to coordinate
        if importlib.util.find_spec("tooz") is None:
            message = (
                "other hosts share this storage and tooz is not installed: more than one may "
                "clean at once (each removal is still under Nova's entry lock); "
                "pip install 'imagecache[coordination]'"
            )
            self.problems = (Problem(ProblemCode.COORDINATION_OFF, "-", message),)
            return None
        return default_url(self.settings.cache_dir)

    def lost(self) -> bool:
        """The cleaner lock was held and is not any more (or the backend is gone): stop, and
        say why in :attr:`lost_problems`."""
        if self._lost is not None:
            return True
        if self._coord is None or not self.leading or self._coord.leading():
            return False
        why = self._coord.problem or "the cleaner lock is no longer held"
        message = f"{why}: removals stopped half-way; the next pass goes on"
        self._lost = Problem(ProblemCode.COORDINATION_UNAVAILABLE, self._where, message)
        LOG.error("coordination: %s", message)
        return True

    @property
    def lost_problems(self) -> tuple[Problem, ...]:
        """The lock lost during the pass, as a problem of its report (exit 1), if it was."""
        return () if self._lost is None else (self._lost,)


_GONE = frozenset({Result.REMOVED, Result.REAPED, Result.PURGED})


def _forget_removed(settings: Settings, done: Report, *, now: float) -> None:
    """Drop the digest records of what the pass removed for good (not quarantined: a restore
    brings the same inode back), so that no later file on a reused inode is judged by them,
    and reap the temp files of record writes killed midway."""
    if not any(o.result in _GONE for o in done.outcomes):
        digests.drop_records(settings.layout, None, now=now)  # the temps of killed writes only
        return
    entries, listing = sources.scan_cache(settings.layout.cache_dir)
    trash, trash_problems = sources.scan_trash(settings.layout.cache_dir)
    if trash_problems or any(p.hides_entries for p in listing):
        return  # an incomplete listing must not drop the records of what is still there
    live = {e.name for e in entries} | {t.name for t in trash}
    digests.drop_records(settings.layout, live, now=now)


def verify_entries(
    settings: Settings,
    *,
    names: Iterable[str] | None = None,
    every: bool = False,
    inventory_files: Iterable[str] = (),
    clock: Clock,
    on_start: Callable[[int, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_result: Callable[[verify.Verified], None] | None = None,
) -> tuple[verify.VerifyReport, Plan | None, Report | None]:
    """``imagecache verify``: hash ``names`` (or every entry, or what is due), then quarantine
    the unused corrupt ones as a pass would (through the executor, each re-decided under its
    lock), and nothing else: no touch, no other removal, no lock-file collection."""
    checked = verify.verify(settings.layout, settings.verify, clock=clock, names=names,
                            every=every, budget=False, on_start=on_start,
                            on_bytes=on_bytes, on_result=on_result)  # fmt: skip
    record_verifications(settings, checked, now=clock.wall())
    files = tuple(inventory_files)
    # Always: the corrupt entries kept in use (found now or before) are part of the answer.
    plan = plan_pass(settings, inventory_files=files, now=clock.wall())
    plan = dataclasses.replace(
        plan, problems=(*plan.problems, *_verify_problems(settings, checked))
    )
    if not any(d.reason is Reason.CORRUPT for d in plan.decisions):
        return checked, plan, None
    only = dataclasses.replace(
        plan,
        decisions=tuple(d if d.reason is Reason.CORRUPT else dataclasses.replace(
            d, action=Action.KEEP) for d in plan.decisions),
        trash=tuple(dataclasses.replace(t, action=Action.KEEP) for t in plan.trash),
    )  # fmt: skip
    with _Cleaner(settings, now=clock.wall()) as cleaner:  # a quarantine is a removal too
        if not cleaner.leading:
            only = policy.touch_only(only)
        done = _apply(settings, only, files, clock=clock, problems=cleaner.problems,
                      should_stop=cleaner.lost, housekeeping=False)  # fmt: skip
        if cleaner.lost_problems:
            done = dataclasses.replace(done, problems=(*done.problems, *cleaner.lost_problems))
    return checked, plan, done


def _verify_problems(settings: Settings, checked: verify.VerifyReport) -> tuple[Problem, ...]:
    if checked.problem is None:
        return ()
    LOG.error("%s", checked.problem)
    code = ProblemCode.DIGESTS_UNWRITABLE
    return (Problem(code, settings.layout.state_dir, checked.problem),)


def record_verifications(
    settings: Settings, checked: verify.VerifyReport, *, now: float
) -> History | None:
    """Add verification results (verdict, bytes read) to the state file's totals."""
    rows = tuple(
        (str(r.verdict or "unreadable"), r.bytes) for r in checked.results if not r.skipped
    )
    if not rows:
        return None
    return _keep(settings, lambda h: history.record_verifications(h, rows), now=now)


def record(
    settings: Settings,
    plan: Plan,
    report: Report,
    *,
    started: float,
    finished: float,
    stopped: bool = False,
) -> History | None:
    """Log what the pass did and keep it in the cache's state file; the history, or None when
    the state could not be written (logged: the state is a report, it never fails a pass)."""
    log_pass(plan, report)
    entry = history.summarize(plan, report, started=started, finished=finished, stopped=stopped)
    return _keep(settings, lambda h: history.record_pass(h, entry), now=finished)


def record_fetches(
    settings: Settings, fetched: Iterable[tuple[Result, int]], *, now: float
) -> History | None:
    """Add fetch results (result, bytes downloaded) to the state file's totals; as
    :func:`record`, None when the state could not be written (logged)."""
    rows = tuple(fetched)
    return _keep(settings, lambda h: history.record_fetches(h, rows), now=now)


def _keep(
    settings: Settings, change: Callable[[History], History], *, now: float
) -> History | None:
    try:
        return state.update_state(
            settings.layout, change, now=now, timeout=settings.clean.lock_timeout
        )
    except (OSError, LockTimeout) as exc:
        LOG.warning("cannot record in %s: %s", settings.layout.state_dir, exc)
        return None


_LOGGED = {
    Result.REMOVED: logging.INFO,
    Result.QUARANTINED: logging.INFO,
    Result.REAPED: logging.INFO,
    Result.PURGED: logging.INFO,
    Result.RESTORED: logging.WARNING,
    Result.FAILED: logging.ERROR,
}


def log_pass(plan: Plan, report: Report) -> None:
    """One line per decision that matters: what was removed, quarantined, purged, restored or
    failed, what a problem kept, and one summary line."""
    for o in report.outcomes:
        level = _LOGGED.get(o.result, logging.WARNING if o.problem else None)
        if level is not None:
            LOG.log(level, "%s %s (%s, %s): %d bytes freed%s", o.result, o.name, o.kind,
                    o.reason, o.bytes_freed, f"; {o.message}" if o.message else "")  # fmt: skip
    held = sum(d.reason is Reason.INCOMPLETE_VIEW for d in plan.decisions)
    if held:
        codes = sorted({str(p.code) for p in plan.problems if p.blocking})
        LOG.warning("view incomplete (%s): %d entries kept that might have been removed",
                    ", ".join(codes), held)  # fmt: skip
    for p in plan.problems:
        LOG.warning("%s: %s: %s", p.code, p.ref, p.message)
    LOG.info("pass %s: %d entries, %d actions, %d bytes freed, view %s", report.plan_id,
             len(plan.decisions), len(report.outcomes), report.bytes_freed,
             "complete" if plan.complete else "incomplete")  # fmt: skip


def restore(settings: Settings, name: str, *, clock: Clock) -> Report:
    """Bring a quarantined entry back (``imagecache restore NAME``)."""
    from imagecache.restore import restore_entry  # acts: not loaded by plan and status

    return restore_entry(
        name,
        layout=settings.layout,
        lock_timeout=settings.clean.lock_timeout,
        audit=AuditLog(settings.clean.audit_log, host=settings.host),
        now=clock.wall(),
    )


def peers_of(
    settings: Settings, *, now: float, members: tuple[str, ...] | None = None
) -> tuple[tuple[usage.Peer, ...], tuple[Problem, ...]]:
    """The other hosts sharing this storage and their state, from ``compute_nodes``, the
    manifests and ``members`` (the coordination group's, when it was asked; no scan); with the
    problems a pass would report about them."""
    found, problems = manifests.read_manifests(settings.layout)
    hosts, registry_problems = sources.observe_registry(settings.layout)
    layout = settings.layout
    view = Inventory(
        settings.host, layout.instances_path, layout.cache_dir, registry=hosts,
        problems=(*problems, *registry_problems), manifests=found, members=members,
        cache_per_host=layout.cache_per_host,
    )  # fmt: skip
    peers = usage.peers(view, settings.policy, now)
    return peers, (*view.problems, *usage.peer_problems(peers, settings.policy, now))


class RetireRefused(Exception):
    """``peers retire`` would lose what a live host uses, or names no peer."""


def retire_peer(settings: Settings, host: str, *, now: float) -> bool:
    """Retire a peer for good: drop it from ``compute_nodes`` and replace its manifest with a
    tombstone that claims nothing (its instance directories are then scanned by the survivors),
    both under Nova's registry lock, judged again under it; audited in this host's audit log.
    Whether it was registered.

    Raises:
        RetireRefused: it is this host, or no peer of this storage, or it shows signs of life (a
            manifest younger than ``peer_stale_seconds``, complete or not, or a group member).
        RegistryError, LockTimeout, OSError: compute_nodes or the manifest cannot be changed.
    """
    if host == settings.host:
        raise RetireRefused(f"{host} is this host")
    audit = AuditLog(settings.clean.audit_log, host=settings.host)
    audit.check_writable()  # nothing done that is not audited
    layout = settings.layout
    with (
        locks.entry_lock(layout.instances_path, REGISTRY_LOCK,
                         timeout=settings.clean.lock_timeout),
        _Cleaner(settings, now=now, lead=False) as group,
    ):  # fmt: skip
        # Judged under the lock, with the group's members: a host that came back while we
        # waited, or whose pass is still running, is not retired.
        if group.problems and any(p.blocking for p in group.problems):
            raise RetireRefused(
                "cannot ask the coordination group who is alive: "
                + "; ".join(p.message for p in group.problems)
            )
        found, _ = peers_of(settings, now=now, members=group.members)
        peer = next((p for p in found if p.host == host), None)
        _refuse_unless_gone(peer, host, settings, now=now)
        assert peer is not None
        was_registered = registry.drop_host(layout, host, locked=True)
        tombstone = Manifest(host, now, complete=True, retired=True, retired_by=settings.host)
        manifests.write_manifest(layout, tombstone)
    audit.record_event("retire-peer", now=now, peer=host, was_registered=was_registered,
                       state=peer.state)  # fmt: skip
    LOG.warning("retired peer %s (was %s)", host, peer.state)
    return was_registered


def _refuse_unless_gone(
    peer: usage.Peer | None, host: str, settings: Settings, *, now: float
) -> None:
    if peer is None:
        raise RetireRefused(
            f"{host} is no host of this storage (not in compute_nodes, no manifest)"
        )
    if peer.state == usage.RETIRED:
        raise RetireRefused(f"{host} is retired already")
    if peer.member:
        raise RetireRefused(f"{host} is a member of the coordination group: it is alive")
    m = peer.manifest
    if m is not None and not m.retired and peer.state != usage.SKEWED:
        age = now - m.written
        if age <= settings.policy.peer_stale_seconds:
            raise RetireRefused(
                f"{host} wrote its manifest {age:.0f} s ago: it is alive (stop imagecache there "
                f"first, and wait peer_stale_seconds, {settings.policy.peer_stale_seconds} s)"
            )

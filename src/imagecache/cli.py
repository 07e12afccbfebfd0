"""The ``imagecache`` command line (DESIGN.md §6): the only place that reads argv and exits.

Exit codes: 0 done; 1 done with problems (errors, refused removals, incomplete view); 2 usage or
configuration error. ``--json`` prints exactly one JSON document on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from imagecache import manager, naming
from imagecache._version import __version__
from imagecache.clock import Clock
from imagecache.config import load_settings, logging_configured, setup_logging
from imagecache.errors import ImageCacheError, UsageError
from imagecache.plan import iso, plan_to_dict, problem_to_dict
from imagecache.render import clean as outcome
from imagecache.render import health, peers
from imagecache.render import plan as report
from imagecache.render import verify as verified
from imagecache.render.text import document, dumps, human_seconds, printable, render_table
from imagecache.results import Result
from imagecache.settings import Settings
from imagecache.store import pins, plans
from imagecache.store.audit import AuditLog

__all__ = ["main"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Context:
    """What every command gets: validated settings, the parsed arguments and the clock."""

    settings: Settings
    args: argparse.Namespace
    inventory_files: tuple[str, ...]
    clock: Clock

    @property
    def json(self) -> bool:
        return bool(self.args.json)


def _emit(ctx: Context, doc: object, text: str | Callable[[], str]) -> None:
    """Print the JSON document or the text; text may be given lazily (only built when printed).

    JSON is indented for a terminal only: the compact form is written by ``json``'s C encoder,
    several times faster on a large host, and whatever reads it does not care.
    """
    if ctx.json:
        _print(dumps(doc, pretty=sys.stdout.isatty()))
    else:
        _print(text() if callable(text) else text)


class OutputClosed(ImageCacheError):
    """Standard output was closed by its reader (``imagecache plan | head``)."""


def _print(text: str) -> None:
    """Write a line to stdout, flushed. When the reader has gone, what is left is not printed
    (stdout then leads to /dev/null, so nothing later fails on it) and the command ends with
    :class:`OutputClosed`: one line on stderr and status 1, never a traceback."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        raise OutputClosed(
            "standard output closed by its reader: the rest is not printed"
        ) from None


def cmd_status(ctx: Context) -> int:
    plan = manager.plan_pass(
        ctx.settings, inventory_files=ctx.inventory_files, now=ctx.clock.wall()
    )
    if ctx.json:
        _emit(ctx, plan_to_dict(plan), "")
    else:
        _emit(ctx, None, report.render_status(plan))
    return 0 if plan.ok else 1


def cmd_plan(ctx: Context) -> int:
    plan = manager.plan_pass(
        ctx.settings, inventory_files=ctx.inventory_files, now=ctx.clock.wall()
    )
    doc = plan_to_dict(plan)
    if getattr(ctx.args, "output", None):  # `clean --dry-run` has no -o
        plans.save_plan(ctx.args.output, plan)
    _emit(ctx, doc, lambda: report.render_plan(plan))
    return 0 if plan.ok else 1


def cmd_explain(ctx: Context) -> int:
    plan = manager.plan_pass(
        ctx.settings, inventory_files=ctx.inventory_files, now=ctx.clock.wall()
    )
    found = report.find_decisions(plan, ctx.args.target)
    trashed = report.find_trash(plan, ctx.args.target)
    doc = {**plan_to_dict(plan), "query": ctx.args.target}
    doc["entries"] = [e for e in doc["entries"] if e["name"] in {d.entry.name for d in found}]
    names = {t.entry.trash_name for t in trashed}
    doc["trash"] = [t for t in doc["trash"] if t["trash_name"] in names]
    _emit(ctx, doc, lambda: report.render_explain(plan, ctx.args.target))
    return 0 if (found or trashed) and plan.ok else 1


def cmd_clean(ctx: Context) -> int:
    if ctx.args.dry_run and ctx.args.plan:
        raise UsageError("clean: --dry-run and --plan exclude each other")
    if ctx.args.dry_run:
        return cmd_plan(ctx)
    s = ctx.settings
    if ctx.args.plan:
        plan = plans.load_plan(ctx.args.plan)
        if (plan.host, plan.cache_dir) != (s.host, s.cache_dir):
            raise UsageError(
                f"{ctx.args.plan} is a plan for {plan.cache_dir} on {plan.host}, "
                f"not {s.cache_dir} on {s.host}"
            )
        started = ctx.clock.wall()
        done = manager.apply_plan(s, plan, inventory_files=ctx.inventory_files, clock=ctx.clock)
    else:
        started = ctx.clock.wall()
        plan, done = manager.run_pass(s, inventory_files=ctx.inventory_files, clock=ctx.clock)
    history = manager.record(s, plan, done, started=started, finished=ctx.clock.wall())
    if history is not None:
        from imagecache import daemon

        daemon.publish_textfile(s, history)
    _emit(ctx, outcome.clean_to_dict(plan, done), outcome.render_clean(plan, done))
    return 0 if plan.ok and done.ok else 1


def cmd_run(ctx: Context) -> int:
    from imagecache import daemon

    a = ctx.args
    return daemon.run(
        ctx.settings,
        reload=lambda: _load(a),
        inventory_files=ctx.inventory_files,
        clock=ctx.clock,
    )


def cmd_health(ctx: Context) -> int:
    doc = health.check(ctx.settings, now=ctx.clock.wall())
    _emit(ctx, doc, lambda: health.render(doc))
    return 0 if doc["healthy"] else 1


def cmd_verify(ctx: Context) -> int:
    a, s = ctx.args, ctx.settings
    if a.repair:
        from imagecache import repair

        fixed = repair.repair(s, a.repair, clock=ctx.clock)
        _emit(ctx, document(fixed.to_dict()), fixed.render())
        return 0 if fixed.ok else 1
    if a.all and a.names:
        raise UsageError("verify: NAME... and --all exclude each other")
    progress = _Progress(0, what="verify", unit="entries") if sys.stderr.isatty() else None
    try:
        checked, plan, done = manager.verify_entries(
            s,
            names=a.names or None,
            every=a.all,
            inventory_files=ctx.inventory_files,
            clock=ctx.clock,
            on_start=progress.start if progress else None,
            on_bytes=progress.add_bytes if progress else None,
            on_result=progress.add_result if progress else None,
        )
    finally:
        if progress:
            progress.finish()
    if checked.unknown:
        LOG.warning("not verifiable entries (no such file, or not an image): %s",
                    ", ".join(printable(n) for n in checked.unknown))  # fmt: skip
    _emit(ctx, verified.verify_to_dict(checked, plan, done),
          lambda: verified.render_verify(checked, plan, done))  # fmt: skip
    failed = checked.corrupt or checked.unknown or any(r.unreadable for r in checked.results)
    failed = failed or checked.problem is not None or (plan is not None and not plan.ok)
    return 1 if failed or (done is not None and not done.ok) else 0


def cmd_peers(ctx: Context) -> int:
    s, now = ctx.settings, ctx.clock.wall()
    if ctx.args.action == "retire":
        if ctx.args.peer is None:
            raise UsageError("peers retire: name the HOST to retire")
        try:
            manager.retire_peer(s, ctx.args.peer, now=now)
        except manager.RetireRefused as exc:
            LOG.error("not retired: %s", exc)
            return 1
        except (OSError, ImageCacheError) as exc:
            LOG.error("cannot retire %s: %s", ctx.args.peer, exc)
            return 1
    found, problems = manager.peers_of(s, now=now)
    doc = peers.peers_to_dict(s.host, found, problems, now=now)
    _emit(ctx, document(doc), lambda: peers.render_peers(found, problems, now=now))
    return 0


def cmd_restore(ctx: Context) -> int:
    done = manager.restore(ctx.settings, ctx.args.name, clock=ctx.clock)
    _emit(ctx, document(outcome.report_to_dict(done)), outcome.render_restore(done))
    return 0 if done.ok else 1


def cmd_pin(ctx: Context) -> int:
    a, s, now = ctx.args, ctx.settings, ctx.clock.wall()
    audit = _pin_audit(ctx, "pin")
    changed = pins.pin(s.layout, a.image, host=s.host, now=now, comment=a.comment,
                       timeout=s.clean.lock_timeout)  # fmt: skip
    entry = naming.fingerprint(a.image)
    if changed:
        _record_pin(audit, "pin", a.image, entry=entry, comment=a.comment, now=now)
    doc = {"action": "pin", "image": a.image, "entry": entry, "changed": changed,
           "configured": a.image in s.policy.pinned_images}  # fmt: skip
    done = "pinned" if changed else "was pinned already:"
    _emit(ctx, document(doc), f"{done} {printable(a.image)} (entry {entry} and its copies)")
    return 0


def cmd_unpin(ctx: Context) -> int:
    a, s, now = ctx.args, ctx.settings, ctx.clock.wall()
    audit = _pin_audit(ctx, "unpin")
    changed = pins.unpin(s.layout, a.image, timeout=s.clean.lock_timeout)
    entry = naming.fingerprint(a.image)
    if changed:
        _record_pin(audit, "unpin", a.image, entry=entry, comment=a.comment, now=now)
    configured = a.image in s.policy.pinned_images
    if configured:  # what the operator asked for is not so: say it, and exit 1
        LOG.error("%s is still pinned by [imagecache] pinned_images: remove it there", a.image)
    doc = {"action": "unpin", "image": a.image, "entry": entry, "changed": changed,
           "configured": configured}  # fmt: skip
    done = "unpinned" if changed else "not pinned by `imagecache pin`:"
    _emit(ctx, document(doc), f"{done} {printable(a.image)} (entry {entry})")
    return 1 if configured else 0


def _pin_audit(ctx: Context, action: str) -> AuditLog:
    """The audit log, checked writable before anything changes; the arguments, checked."""
    a, s = ctx.args, ctx.settings
    try:
        pins.check_image(a.image)
    except ValueError as exc:
        raise UsageError(f"{action}: {exc}") from None
    if len(a.comment) > pins.MAX_COMMENT:
        raise UsageError(f"{action}: --comment has at most {pins.MAX_COMMENT} characters")
    audit = AuditLog(s.clean.audit_log, host=s.host)
    try:
        audit.check_writable()  # nothing changed that is not audited
    except OSError as exc:
        raise pins.PinsError(
            f"not {action}ned: the audit log {s.clean.audit_log} cannot be written: "
            f"{exc.strerror or exc}"
        ) from exc
    return audit


def _record_pin(
    audit: AuditLog, action: str, image: str, *, entry: str, comment: str, now: float
) -> None:
    try:
        audit.record_event(action, now=now, image=image, entry=entry, comment=comment)
    except OSError as exc:
        raise pins.PinsError(
            f"{action}ned {image}, but its audit line could not be written to {audit.path}: "
            f"{exc.strerror or exc}"
        ) from exc


def cmd_pins(ctx: Context) -> int:
    s = ctx.settings
    found, problems = pins.read_pins(s.layout)
    rows: list[dict[str, Any]] = [
        {"image": p.image, "entry": naming.fingerprint(p.image), "source": "pin", "by": p.by,
         "pinned_at": iso(p.pinned_at), "pinned_at_epoch": p.pinned_at, "comment": p.comment}
        for p in found
    ]  # fmt: skip
    rows += [
        {"image": i, "entry": naming.fingerprint(i), "source": "config", "by": None,
         "pinned_at": None, "pinned_at_epoch": None, "comment": "[imagecache] pinned_images"}
        for i in s.policy.pinned_images
    ]  # fmt: skip

    def text() -> str:
        table = [[r["image"], r["entry"], r["source"], r["by"] or "-", r["pinned_at"] or "-",
                  r["comment"]] for r in rows]  # fmt: skip
        out = [render_table(table, ["IMAGE", "ENTRY", "SOURCE", "BY", "PINNED", "COMMENT"])]
        if not rows:
            out = ["no pins"]
        notes = [f"  ! {p.code} {printable(p.ref)}: {printable(p.message)}" for p in problems]
        return "\n".join([*out, *notes])

    doc = {"pins": rows, "problems": [problem_to_dict(p) for p in problems]}
    _emit(ctx, document(doc), text)
    return 1 if problems else 0


def cmd_precache(ctx: Context) -> int:
    # Lazily: keystoneauth and requests only for the commands that fetch.
    from imagecache.images import fetch

    s = ctx.settings
    sources = fetch.Sources(s.glance)
    progress = _Progress(len(set(ctx.args.images))) if sys.stderr.isatty() else None
    try:
        results = fetch.precache(
            ctx.args.images,
            sources=sources,
            options=fetch.FetchOptions.of(s.layout, s.fetch),
            concurrency=s.fetch.precache_concurrency,
            on_bytes=progress.add_bytes if progress else None,
            on_result=progress.add_result if progress else None,
        )
    finally:
        sources.close()
        if progress:
            progress.finish()
    downloaded = [(r.result, r.bytes or 0 if r.result is Result.CACHED else 0) for r in results]
    history = manager.record_fetches(s, downloaded, now=ctx.clock.wall())
    if history is not None:
        from imagecache import daemon

        daemon.publish_textfile(s, history)
    # Image refs and failure reasons come from outside (argv, Glance, an image's header).
    text = "\n".join(
        f"{r.result:<8} {r.role:<7} {printable(r.image)}  {printable(r.name)}"
        + (f"  {r.bytes} bytes" if r.bytes is not None else "")
        + (f"\n         {printable(r.reason)}" if r.reason else "")
        for r in results
    )
    _emit(ctx, document({"results": [r.to_dict() for r in results]}), text)
    return 1 if any(r.failed for r in results) else 0


def cmd_create_disk(ctx: Context) -> int:
    from imagecache.images import fetch
    from imagecache.images import overlays as disks

    a, s = ctx.args, ctx.settings
    request = disks.DiskRequest(
        instance=a.instance,
        image=a.image,
        size=a.size,
        swap_mb=a.swap,
        ephemeral_gb=a.ephemeral,
        ephemeral_format=a.ephemeral_format or s.policy.default_ephemeral_format,
    )
    sources = fetch.Sources(s.glance)
    try:
        made = disks.create_disks(
            request, source=sources(a.image), options=fetch.FetchOptions.of(s.layout, s.fetch)
        )
    finally:
        sources.close()
    text = "\n".join(
        f"{d.label:<8} {printable(str(d.path))}  on _base/{printable(d.backing)}" for d in made
    )
    _emit(ctx, document({"instance": a.instance, "disks": [d.to_dict() for d in made]}), text)
    return 0


class _Progress:
    """One line on a terminal's stderr: items done, bytes, rate and (with a byte total) the time
    left. Threads call it (precache downloads in parallel)."""

    def __init__(self, total: int, *, what: str = "precache", unit: str = "images") -> None:
        import threading

        self._lock = threading.Lock()
        self._what, self._unit = what, unit
        self._total, self._done, self._bytes, self._shown = total, 0, 0, 0
        self._total_bytes: int | None = None
        self._start = time.monotonic()

    def start(self, items: int, nbytes: int) -> None:
        with self._lock:
            self._total, self._total_bytes = items, nbytes
            self._draw()

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes += n
            if self._bytes - self._shown >= 32 << 20:  # redraw every 32 MiB, not every chunk
                self._draw()

    def add_result(self, row: Any) -> None:
        with self._lock:
            self._done += getattr(row, "role", "image") == "image"
            self._draw()

    def _draw(self) -> None:
        self._shown = self._bytes
        mib = self._bytes / (1 << 20)
        rate = self._bytes / max(time.monotonic() - self._start, 1e-3)
        line = f"\r{self._what}: {self._done}/{self._total} {self._unit}, {mib:,.0f} MiB"
        line += f", {rate / (1 << 20):,.0f} MiB/s"
        if self._total_bytes and rate > 0:
            left = max(0, self._total_bytes - self._bytes) / rate
            line += f", {human_seconds(left)} left"
        sys.stderr.write(line + "   ")
        sys.stderr.flush()

    def finish(self) -> None:
        sys.stderr.write("\n")


def _size(text: str) -> int:
    """``20G``, ``512M``, ``1T`` or plain bytes (binary units, as qemu-img)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 20G, 512M)") from None


def _global_options(parser: argparse.ArgumentParser, *, sub: bool) -> None:
    # On subcommands the defaults are suppressed so `imagecache --json plan` and
    # `imagecache plan --json` both work without one overwriting the other.
    d = argparse.SUPPRESS if sub else None
    g = parser.add_argument_group("global options")
    g.add_argument(
        "--config-file",
        action="append",
        default=d,
        metavar="FILE",
        help="nova.conf / imagecache.conf (repeatable; default: /etc/nova/nova.conf "
        "and /etc/imagecache/imagecache.conf where they exist)",
    )
    g.add_argument(
        "--config-dir",
        action="append",
        default=d,
        metavar="DIR",
        help="directory of *.conf files read after --config-file (repeatable)",
    )
    g.add_argument(
        "--instances-path", default=d, metavar="DIR", help="override [DEFAULT] instances_path"
    )
    g.add_argument(
        "--inventory",
        action="append",
        default=d,
        metavar="FILE",
        help='instance records JSON, {"instances": [{"uuid", "host", "image_ref", "kernel_id", '
        '"ramdisk_id", "swap_mb", "ephemeral_gb", "ephemeral_format"}]}; repeatable, added to '
        "[imagecache] inventory_files",
    )
    g.add_argument("--host", default=d, metavar="NAME", help="override [DEFAULT] host")
    g.add_argument(
        "--os-cloud", default=d, metavar="CLOUD", help="reach Glance through this clouds.yaml cloud"
    )
    g.add_argument(
        "--json", action="store_true", default=d or False, help="print one JSON document on stdout"
    )
    g.add_argument("-v", "--verbose", action="count", default=d or 0, help="more logging")
    g.add_argument(
        "--debug", action="store_true", default=d or False, help="debug logging ([DEFAULT] debug)"
    )
    g.add_argument(
        "--log-file", default=d, metavar="FILE", help="also log to FILE ([DEFAULT] log_file)"
    )


Command = Callable[[Context], int]

_EXIT_CODES = """exit codes: 0 done; 1 done with problems (an unreadable disk or another gap in the
view, which removes nothing; a lock timeout; a refused touch; an automatic restore); 2 usage or
configuration error (the message names the option)."""

_CLEAN = """Entries to remove are locked with nova-compute's own entry locks
($instances_path/locks/nova-<name>, waited for at most [imagecache] lock_timeout_seconds in
all), the host is observed again under them, and an entry goes only if it is still unused,
still old enough and still the same file (inode, size, mtime). With [imagecache]
quarantine_seconds > 0 (default 86400) it is moved to _base/.imagecache/trash/ and purged
later; `imagecache restore NAME` brings it back. Every action is a JSON line in
[imagecache] audit_log."""


_RUN = """One pass every interval (plus a small random delay), the first after [imagecache]
first_pass_delay_seconds; one daemon per cache (a second `run` exits 1, naming the first's
pid). SIGTERM stops between two entries and exits 0 (SIGINT: 130); SIGHUP reloads the
configuration between passes. Notifies systemd (Type=notify, WatchdogSec=) when NOTIFY_SOCKET
is set; serves metrics on [imagecache] metrics_listen; writes each pass's state for
`imagecache health`."""

_VERIFY = """Without NAME or --all, what a pass would hash: rewritten and new entries, then those
verified longer than [libvirt] checksum_interval_seconds ago. Each entry is read once (xxh3-128)
and its digest record in _base/.imagecache/digests/ updated. An unused corrupt entry is
quarantined at once (through the executor, under its entry lock, re-checked); an in-use one is
kept and reported with its users. Exit 1 when anything is corrupt or could not be read. --repair
NAME fetches the image again, checks it against its recorded digests and rewrites the differing
blocks in place (same inode: running guests read good data from then on)."""

_PEERS = """On shared storage every pass writes its host's manifest
(_base/.imagecache/hosts/<host>.json): the entries it uses and the instance directories it owns.
A host in compute_nodes, in the coordination group or with a manifest, whose manifest is
missing, unreadable or older than [imagecache] peer_stale_seconds, stops every removal on the
storage. `peers retire HOST` (a host gone for good, not live) drops it from compute_nodes under
Nova's lock, leaves a tombstone manifest, and is audited; its instance directories are then
scanned by the other hosts. A retired host that runs imagecache again is a peer again."""

_PIN = """A pinned image's entry (_base/<sha1 of IMAGE>), its _sm and resized copies and a legacy
entry of its raw id are in use (user source `pin`): never removed by age or capacity, and
touched each pass. Pins are kept in _base/.imagecache/pins.json, on the cache's storage (shared
by every host of a shared cache), changed under _base/.imagecache/pins.lock, and every change is
a line in [imagecache] audit_log. [imagecache] pinned_images pins images by configuration. A
pins file that cannot be read stops every removal (pins-unreadable) and is never overwritten:
`pin` and `unpin` refuse (exit 1). Pinning needs no image service."""

# Commands that change nothing: they log to stderr only, never to the configured log files.
_READ_ONLY = frozenset({"status", "plan", "explain", "health", "pins"})


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(
        prog="imagecache",
        description="Safe image cache manager for libvirt/QEMU hosts (Nova _base compatible).",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, sub=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands: dict[str, Command] = {}

    def add(name: str, func: Command, help_text: str, details: str = "") -> argparse.ArgumentParser:
        p = subs.add_parser(
            name,
            help=help_text,
            description=help_text + (f"\n\n{details}" if details else ""),
            epilog=_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _global_options(p, sub=True)
        commands[name] = func
        return p

    add("status", cmd_status, "every cache entry: kind, size, age, users, planned action")
    p = add("plan", cmd_plan, "what one pass would do, with a reason per entry (changes nothing)")
    p.add_argument("-o", "--output", metavar="FILE", help="also save the plan as JSON to FILE")
    p = add("explain", cmd_explain, "why an entry is kept, or when it becomes removable")
    p.add_argument("target", metavar="NAME|IMAGE_ID", help="cache entry name or image id")
    p = add("clean", cmd_clean, "run one pass and apply its plan, re-checking each entry", _CLEAN)
    p.add_argument("--dry-run", action="store_true", help="only show the plan (same as `plan`)")
    p.add_argument("--plan", metavar="FILE", help="apply exactly the plan saved by `plan -o FILE`")
    add("run", cmd_run, "the daemon: a pass every [imagecache] manager_interval seconds", _RUN)
    add("health", cmd_health, "exit 0 if the last successful pass is younger than two intervals")
    p = add("verify", cmd_verify, "hash cache entries and compare them with their digest records",
            _VERIFY)  # fmt: skip
    p.add_argument("names", nargs="*", metavar="NAME", help="entries to verify (default: due)")
    p.add_argument("--all", action="store_true", help="every verifiable entry, due or not")
    p.add_argument("--repair", metavar="NAME", help="fetch NAME again and repair it in place")
    p = add("peers", cmd_peers, "the hosts sharing this storage; retire one that is gone", _PEERS)
    p.add_argument("action", choices=["list", "retire"], help="list them, or retire PEER")
    p.add_argument("peer", nargs="?", metavar="HOST", help="the host to retire")
    p = add("restore", cmd_restore, "bring a quarantined entry back from the trash")
    p.add_argument("name", metavar="NAME", help="entry name (or its trash name NAME@EPOCH)")
    p = add("pin", cmd_pin, "keep an image's entries in the cache until it is unpinned", _PIN)
    p.add_argument("image", metavar="IMAGE", help="Glance image id or URL (need not be cached)")
    p.add_argument("--comment", default="", metavar="TEXT", help="why, for `pins` and the audit")
    p = add("unpin", cmd_unpin, "undo `imagecache pin IMAGE`", _PIN)
    p.add_argument("image", metavar="IMAGE", help="the image id or URL, as pinned")
    p.add_argument("--comment", default="", metavar="TEXT", help="why, for the audit log")
    add("pins", cmd_pins, "the pinned images: by `imagecache pin` and by the configuration", _PIN)
    p = add("precache", cmd_precache, "fetch images (and their kernels, ramdisks) into the cache")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="Glance image id or http(s)/file URL")
    p = add("create-disk", cmd_create_disk, "create an instance's disks as overlays on the cache")
    p.add_argument("--image", required=True, metavar="IMAGE", help="Glance image id or URL")
    p.add_argument("--instance", required=True, metavar="UUID", help="instance directory name")
    p.add_argument(
        "--size", type=_size, metavar="SIZE", help="root disk size (20G); default: image"
    )
    p.add_argument("--swap", type=int, metavar="MB", help="also a swap disk of MB MiB")
    p.add_argument("--ephemeral", type=int, metavar="GB", help="also an ephemeral disk of GB GiB")
    p.add_argument("--ephemeral-format", metavar="FS", help="its filesystem (default: vfat)")
    return parser, commands


def main(argv: Sequence[str] | None = None, *, clock: Callable[[], float] = time.time) -> int:
    """Run the command line; ``clock`` is the one clock every command reads (tests pass theirs)."""
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    _tolerant(sys.stdout)
    _tolerant(sys.stderr)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT, _LOG_DATE_FORMAT))
    logging.basicConfig(level=_level(args), handlers=[handler])
    _escape_handlers()
    if not args.verbose:
        # oslo.config warns once per deprecated option name on every run: with an older
        # nova.conf that is cron mail from every hypervisor. Shown with -v.
        logging.getLogger("oslo_config.cfg").setLevel(logging.ERROR)
    # A read-only command is short and its values (a plan's) are acyclic: the collector would
    # walk them again and again for nothing (measured: 14 % of a big host's plan). A command
    # that acts may run for hours (a throttled clean, the daemon): it collects as usual.
    paused = manager.cyclic_gc_paused() if args.command in _READ_ONLY else contextlib.nullcontext()
    with paused:
        try:
            settings = _load(args)
            _oslo_logging(args, settings)
            ctx = Context(
                settings=settings,
                args=args,
                inventory_files=tuple(args.inventory or ()),
                clock=Clock(wall=clock, monotonic=time.monotonic, sleep=time.sleep),
            )
            return commands[args.command](ctx)
        except ImageCacheError as exc:
            return _fail(args, str(exc), exc.exit_code)
        except OSError as exc:
            # The library maps what it expects; anything else at the edge is still one clear line
            # (say, `plan -o` into a directory that does not exist), never a traceback.
            where = f": {exc.filename}" if exc.filename else ""
            return _fail(args, f"{exc.strerror or exc}{where}", 1)
        except KeyboardInterrupt:
            # Every mutation is atomic and each lock is released on the way out: what was done is
            # in the audit log, nothing is half done.
            return _fail(args, "interrupted (actions already taken are in the audit log)", 130)


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(
        args.config_file,
        args.config_dir or (),
        instances_path=args.instances_path,
        host=args.host,
        os_cloud=args.os_cloud,
    )


def _level(args: argparse.Namespace) -> int:
    return logging.DEBUG if args.debug else logging.WARNING - 10 * min(args.verbose, 2)


_LOG_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"
_LOG_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"


def _oslo_logging(args: argparse.Namespace, settings: Settings) -> None:
    """Hand logging to oslo.log when the daemon runs, or the command line or the configuration
    asks for any of its options; otherwise stay with the plain stderr handler (oslo.log's
    import alone costs ~45 ms, more than a `plan` of a small host)."""
    files, dirs = settings.config_files, tuple(args.config_dir or ())
    wanted = args.command == "run" or args.debug or args.log_file
    if not (wanted or logging_configured(files, dirs)):
        return
    setup_logging(
        files,
        dirs,
        debug=args.debug,
        log_file=args.log_file,
        destinations=args.command not in _READ_ONLY,
        stderr=args.command != "run",  # the daemon: stderr only when nothing else is set
    )
    if args.verbose or args.debug:
        logging.getLogger().setLevel(_level(args))
    else:
        logging.getLogger("oslo_config.cfg").setLevel(logging.ERROR)
    _escape_handlers()
    LOG.debug("imagecache %s %s; configuration from %s", __version__, args.command,
              ", ".join(files) or "defaults")  # fmt: skip


def _escape_handlers() -> None:
    """Every log record's message escaped as one line, and every handler stamping UTC, whoever
    made the handlers (oslo.log, a ``log_config_append`` file with loggers of its own)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _EscapingRecords):
        logging.setLogRecordFactory(_EscapingRecords(factory))
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for h in getattr(logger, "handlers", ()):
            if h.formatter is not None:
                h.formatter.converter = time.gmtime


class _EscapingRecords:
    """A log record factory: image refs, names and messages come from outside, and none may
    forge a line or send a terminal escape (``\x1b[...``) to an operator's screen. At the
    record, not in a formatter or a handler's filter, so that it holds under any formatter and
    any handler a logging configuration installs (text, JSON, journal, syslog, its own loggers).
    """

    def __init__(self, make: Callable[..., logging.LogRecord]) -> None:
        self._make = make

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self._make(*args, **kwargs)
        record.msg, record.args = printable(record.getMessage()), None
        return record


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """Report an error on stderr and, under --json, as the one JSON document on stdout.

    The message may quote a file or a field from outside: escaped on the terminal, exact in JSON.
    """
    print(f"imagecache: error: {printable(message)}", file=sys.stderr)
    if getattr(args, "json", False):
        with contextlib.suppress(OutputClosed):
            _print(dumps(document({"error": message, "exit_code": code})))
    return code


def _tolerant(stream: object) -> None:
    # A file name that is not UTF-8 arrives surrogate-escaped; printing it must not crash.
    if isinstance(stream, io.TextIOWrapper):
        stream.reconfigure(errors="backslashreplace")

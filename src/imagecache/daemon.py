"""``imagecache run``: a pass every ``[imagecache] manager_interval`` seconds, as a service.

Nova runs its image cache manager as a periodic task inside nova-compute; this is the same pass
as its own process, with what a service needs around it:

- one daemon per host and cache: ``<cache>/.imagecache/run-<host>.lock`` is held for the
  daemon's life and names its pid, so a second ``run`` of that host on the same cache exits 1 at
  once, saying which one runs (on shared storage every host runs its own);
- never two passes at once (one loop), a small random delay added to each interval so a thousand
  hosts started together do not pass together on shared storage, and the first pass after
  ``[imagecache] first_pass_delay_seconds``;
- signals: SIGTERM stops between two entries, never inside one (the executor asks
  ``should_stop`` before each), and exits 0; SIGINT the same with exit 130; SIGHUP reloads the
  configuration between passes (a configuration that does not load is logged, the running one
  kept; a changed instances path or cache directory needs a restart);
- systemd's notification protocol on ``NOTIFY_SOCKET`` (``READY=1``, ``STATUS=`` with the last
  pass's summary, ``WATCHDOG=1`` every half ``WATCHDOG_USEC``, ``STOPPING=1``), written here (a
  datagram of ``KEY=VALUE`` lines; not worth a dependency);
- the pass's history in the state file (``imagecache health`` reads it), the metrics endpoint and
  the node_exporter textfile, all rendered from that history.

An edge module: it reads the environment and installs signal handlers; the pass itself is
:func:`imagecache.manager.run_pass`, the same as ``clean``'s.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import signal
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any
from urllib.parse import quote

from imagecache import locks, manager
from imagecache.clock import Clock
from imagecache.errors import ImageCacheError, LockTimeout
from imagecache.history import History, PassRecord
from imagecache.settings import Settings
from imagecache.store import fsops, state

__all__ = ["DaemonRunning", "Notifier", "publish_textfile", "run"]

LOG = logging.getLogger(__name__)

TICK = 0.5  # seconds between two looks at the signals while waiting


class DaemonRunning(ImageCacheError):
    """Another ``imagecache run`` holds this cache's run lock."""

    exit_code = 1


class Notifier:
    """systemd's ``sd_notify`` protocol: datagrams to ``NOTIFY_SOCKET``; a no-op without it."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + path[1:] if path.startswith("@") else path
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_every = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and ours else None

    def send(self, **fields: str) -> None:
        if not self._address:
            return
        text = "\n".join(f"{k}={v.replace(chr(10), ' ')}" for k, v in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(text.encode("utf-8", "backslashreplace"), self._address)
        except OSError as exc:
            LOG.debug("cannot notify %s: %s", self._address, exc)


@dataclass
class _Signals:
    stop: int | None = None  # the signal that asked to stop
    reload: bool = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload = True
        elif self.stop is None:
            self.stop = signum
            LOG.warning("%s: stopping after the current entry", signal.Signals(signum).name)


@contextlib.contextmanager
def _handled(signals: _Signals) -> Iterator[None]:
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    old = {s: signal.signal(s, signals.handle) for s in watched}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _run_lock(settings: Settings) -> Iterator[None]:
    """Hold ``<cache>/.imagecache/run.lock`` (made with the cache directory when missing), with
    this process's pid in it.

    Raises:
        DaemonRunning: another process holds it (the message names its pid).
        OSError: the instances path does not exist (storage not mounted?) or is not writable.
    """
    layout = settings.layout
    os.close(fsops.open_dir(layout.instances_path))  # never made here: it may be a mount point
    os.close(fsops.open_dir(layout.cache_dir, create=True))
    os.close(fsops.open_dir(layout.state_dir, create=True))
    # One daemon per host and cache: on shared storage every host runs its own (each writes its
    # manifest); one cleaner at a time is the coordination lock's business.
    path = os.path.join(layout.state_dir, run_lock_name(settings.host))
    try:
        with locks.held_lock(path, timeout=0, poll=0.05, what="imagecache run") as fd:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
    except LockTimeout:
        raise DaemonRunning(
            f"another `imagecache run` (pid {_pid_in(path)}) already manages "
            f"{layout.cache_dir} for host {settings.host}; one daemon per host and cache"
        ) from None


def run_lock_name(host: str) -> str:
    """The run lock of ``host``'s daemon: its name quoted, so no host name is a path."""
    return f"run-{quote(host, safe='', errors='surrogateescape')}.lock"


def _pid_in(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def publish_textfile(settings: Settings, history: History) -> None:
    """Write the metrics textfile of ``[imagecache] metrics_textfile``, if set; failures logged."""
    path = settings.metrics.textfile
    if not path:
        return
    from imagecache import metrics

    reg = metrics.registry(history, **_figures(settings))
    try:
        metrics.write_textfile(path, reg)
    except metrics.MetricsError as exc:
        LOG.warning("%s", exc)


def _figures(settings: Settings) -> dict[str, Any]:
    """What the metrics say besides the history: the cache filesystem, the host, the cache."""
    from imagecache import metrics

    cache = settings.layout.cache_dir
    return {"fs": metrics.fs_usage(cache), "host": settings.host, "cache_dir": cache}


def status_line(record: PassRecord | None) -> str:
    """The one line ``STATUS=`` shows in ``systemctl status``."""
    if record is None:
        return "waiting for the first pass"
    done = {result: n for (result, _), (n, _) in record.actions.items()}
    acted = ", ".join(f"{n} {result}" for result, n in sorted(done.items())) or "nothing done"
    view = "view complete" if record.complete else "VIEW INCOMPLETE: nothing removed"
    entries = sum(n for n, _ in record.entries.values())
    return f"last pass: {entries} entries, {acted}, {record.bytes_freed} bytes freed, {view}"


@dataclass
class _Daemon:
    settings: Settings
    reload: Callable[[], Settings]
    inventory_files: Sequence[str]
    clock: Clock
    notifier: Notifier
    rng: random.Random
    signals: _Signals = field(default_factory=_Signals)
    server: Any = None  # metrics.MetricsServer while metrics_listen is set
    _next_ping: float = 0.0

    def ping(self) -> None:
        every = self.notifier.watchdog_every
        if every is not None and self.clock.monotonic() >= self._next_ping:
            self.notifier.send(WATCHDOG="1")
            self._next_ping = self.clock.monotonic() + every

    def should_stop(self) -> bool:
        self.ping()  # between two entries: a long pass still feeds the watchdog
        return self.signals.stop is not None

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` unless asked to stop; a reload asked meanwhile is done at once."""
        deadline = self.clock.monotonic() + seconds
        while self.signals.stop is None:
            if self.signals.reload:
                self.do_reload()
            left = deadline - self.clock.monotonic()
            if left <= 0:
                return
            self.clock.sleep(min(left, TICK))
            self.ping()

    def do_reload(self) -> None:
        self.signals.reload = False
        try:
            new = self.reload()
        except ImageCacheError as exc:
            LOG.error("SIGHUP: configuration not reloaded, the running one kept: %s", exc)
            return
        if new.layout != self.settings.layout:
            LOG.error(
                "SIGHUP: configuration not reloaded: it moves the cache from %s to %s, which "
                "needs a restart; the running one kept",
                self.settings.layout.cache_dir,
                new.layout.cache_dir,
            )
            return
        if new.metrics.listen != self.settings.metrics.listen:
            from imagecache import metrics

            try:
                self.move_server(new)
            except metrics.MetricsError as exc:
                LOG.error("SIGHUP: configuration not reloaded, the running one kept: %s", exc)
                return
        self.settings = new
        LOG.warning("SIGHUP: configuration reloaded from %s", ", ".join(new.config_files))

    def move_server(self, new: Settings) -> None:
        """Serve the metrics where ``new`` says; on failure, still where they were.

        Raises:
            MetricsError: the new address cannot be bound (the old endpoint is serving again).
        """
        from imagecache import metrics

        old, self.server = self.server, None
        if new.metrics.listen is None:
            if old is not None:
                old.close()
            return
        try:
            self.start_server(new)
        except metrics.MetricsError:
            if old is None:
                raise
            old.close()  # the new address may be the old port on another interface
            try:
                self.start_server(new)
            except metrics.MetricsError:
                self.start_server(self.settings)  # the old address is free again
                raise
            return
        if old is not None:
            old.close()

    def start_server(self, settings: Settings) -> None:
        if settings.metrics.listen is None:
            return
        from imagecache import metrics

        self.server = metrics.MetricsServer.start(*settings.metrics.listen)
        LOG.info("metrics on http://%s:%d/metrics", settings.metrics.listen[0], self.server.port)

    def close_server(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def publish(self, history: History) -> None:
        try:
            if self.server is not None:
                self.server.update(history, **_figures(self.settings))
            publish_textfile(self.settings, history)
        except Exception:
            LOG.exception("cannot publish the metrics")  # a report: it never stops the passes
        self.notifier.send(STATUS=status_line(history.last_pass))

    def one_pass(self) -> None:
        started = self.clock.wall()
        try:
            plan, report = manager.run_pass(
                self.settings,
                inventory_files=self.inventory_files,
                clock=self.clock,
                should_stop=self.should_stop,
            )
        except (ImageCacheError, OSError) as exc:
            # Recorded nowhere as a success: `imagecache health` turns 1 if this persists.
            LOG.error("pass failed: %s", exc)
            return
        except Exception:
            # A defect, not the host: logged with its traceback, and the daemon goes on (the
            # next pass observes afresh; nothing is half done, every mutation being atomic).
            LOG.exception("pass failed unexpectedly")
            return
        stopped = self.signals.stop is not None
        done = manager.record(self.settings, plan, report, started=started,
                              finished=self.clock.wall(), stopped=stopped)  # fmt: skip
        if done is not None:
            self.publish(done)

    def loop(self) -> int:
        self.start_server(self.settings)
        try:
            self.publish(_read_history(self.settings))
            self.notifier.send(READY="1", STATUS="waiting for the first pass")
            self.wait(self.settings.daemon.first_pass_delay)
            while self.signals.stop is None:
                if self.signals.reload:
                    self.do_reload()
                interval = self.settings.daemon.pass_interval
                if interval is None:
                    LOG.warning("periodic pass disabled by reload ([imagecache] manager_interval "
                                "< 0): stopping")  # fmt: skip
                    break
                self.one_pass()
                self.wait(interval + self.rng.uniform(0, self.settings.daemon.max_jitter))
        finally:
            self.notifier.send(STOPPING="1")
            self.close_server()
        return 130 if self.signals.stop == signal.SIGINT else 0


def _read_history(settings: Settings) -> History:
    try:
        return state.read_state(settings.layout)
    except state.StateError as exc:
        LOG.warning("%s; the next pass starts it afresh", exc)
        return History()


def run(
    settings: Settings,
    *,
    reload: Callable[[], Settings],
    inventory_files: Sequence[str] = (),
    clock: Clock,
    environ: Mapping[str, str] = os.environ,
    rng: random.Random | None = None,
) -> int:
    """Run passes until a signal stops them; the exit code (0, or 130 after SIGINT).

    ``reload`` loads the configuration again (on SIGHUP). ``environ`` gives ``NOTIFY_SOCKET``,
    ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

    Raises:
        DaemonRunning: another daemon manages this cache.
        OSError: the instances path does not exist, or the run lock cannot be made.
        MetricsError: the metrics address cannot be bound.
    """
    notifier = Notifier(environ)
    interval = settings.daemon.manager_interval
    if settings.daemon.pass_interval is None:
        LOG.warning(
            "periodic pass disabled ([imagecache] manager_interval = %d): exiting", interval
        )
        notifier.send(
            READY="1", STATUS="periodic pass disabled ([imagecache] manager_interval < 0)"
        )
        return 0
    daemon = _Daemon(settings, reload, inventory_files, clock, notifier, rng or random.Random())
    with _handled(daemon.signals):
        try:
            with _run_lock(settings):
                LOG.info("imagecache run: a pass every %d s on %s (pid %d)",
                         settings.daemon.pass_interval, settings.layout.cache_dir,
                         os.getpid())  # fmt: skip
                return daemon.loop()
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise OSError(exc.errno, "does not exist (storage not mounted?)",
                              exc.filename) from exc  # fmt: skip
            raise

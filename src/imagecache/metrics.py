"""Prometheus metrics, derived from the passes' :class:`~imagecache.history.History`.

Nothing deep in the library counts anything: a pass ends, its plan and report become a
:class:`~imagecache.history.PassRecord` and the state file's running totals, and this module
renders that value (plus the cache filesystem's size) as metric families. Counters come from the
totals the state file keeps, so they keep counting across one-shot ``clean`` runs and daemon
restarts; gauges describe the last pass. Two ways out:

- :class:`MetricsServer`, the daemon's ``/metrics`` over HTTP (``[imagecache] metrics_listen``),
  serving the latest snapshot as a whole: :meth:`MetricsServer.update` swaps it in one reference
  assignment, so a scrape never sees half of one pass and half of the next;
- :func:`write_textfile`, a node_exporter textfile (``[imagecache] metrics_textfile``).

Label values are stable codes (kind, state, result, reason, problem code) and never a file
name; only ``imagecache_info``'s ``host`` and ``cache_dir`` come from outside, escaped like every
name this tool prints (:func:`~imagecache.render.text.printable`), so the exposition stays UTF-8.

An edge module: only the commands that publish metrics import it, in the function that does, so
``plan`` and ``status`` never load prometheus_client.
"""

from __future__ import annotations

import os
import secrets
import socket
import socketserver
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imagecache._version import __version__
from imagecache.errors import ImageCacheError
from imagecache.history import ENTRY_STATES, Figures, History, PassRecord, Totals
from imagecache.model import Kind, ProblemCode
from imagecache.render.text import printable
from imagecache.results import Result
from imagecache.store import fsops

__all__ = [
    "FsUsage",
    "MetricsError",
    "MetricsServer",
    "families",
    "fs_usage",
    "registry",
    "write_textfile",
]

# Series present at zero before anything happened, so that an alert on a rate or a threshold
# sees 0 rather than no data (``absent()`` is kept for what really has no value yet).
_FETCH_RESULTS = (str(Result.CACHED), str(Result.EXISTING), str(Result.FAILED))
_OUTCOMES = ("ok", "incomplete", "failed", "stopped")  # history.pass_outcome's
_VERDICTS = ("good", "corrupt", "unreadable")


class MetricsError(ImageCacheError):
    """The metrics endpoint cannot listen, or the textfile cannot be written; names which."""


@dataclass(frozen=True, slots=True)
class FsUsage:
    """The cache filesystem: its size, free bytes, and free bytes an unprivileged user may use."""

    size_bytes: int
    free_bytes: int  # f_bfree: root's reserve included
    avail_bytes: int  # f_bavail: what nova-compute (not root) can still write


def fs_usage(path: str) -> FsUsage | None:
    """The usage of the filesystem holding ``path`` (``statvfs``); None if it cannot be read."""
    try:
        st = os.statvfs(path)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    unit = st.f_frsize or st.f_bsize
    return FsUsage(st.f_blocks * unit, st.f_bfree * unit, st.f_bavail * unit)


# Rendering: one function per group of families, each a plain function of values.


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _by(
    family: GaugeMetricFamily | CounterMetricFamily, rows: Iterable[tuple[tuple[str, ...], float]]
) -> Metric:
    for labels, value in rows:
        family.add_metric(list(labels), value)
    return family


def _pairs(figures: Figures, zeros: Iterable[tuple[str, str]] = ()) -> dict[tuple[str, str], Any]:
    """``figures`` with ``zeros`` added at (0, 0), sorted by labels."""
    out: dict[tuple[str, str], tuple[int, int]] = dict.fromkeys(zeros, (0, 0))
    out.update(figures)
    return dict(sorted(out.items()))


def _counts(counts: Mapping[str, int], zeros: Iterable[str]) -> dict[str, int]:
    out = dict.fromkeys(zeros, 0)
    out.update(counts)
    return dict(sorted(out.items()))


def _info(host: str, cache_dir: str) -> Metric:
    family = GaugeMetricFamily(
        "imagecache_info",
        "Always 1: the imagecache version, the Nova host and the cache directory.",
        labels=("version", "host", "cache_dir"),
    )
    family.add_metric([__version__, printable(host), printable(cache_dir)], 1)
    return family


def _totals(history: History) -> Iterator[Metric]:
    t: Totals = history.totals
    passes = _counts(t.passes, _OUTCOMES)
    yield _by(
        CounterMetricFamily("imagecache_passes", "Passes, by outcome.", labels=("outcome",)),
        (((outcome,), n) for outcome, n in passes.items()),
    )
    actions = _pairs(t.actions)
    yield _by(
        CounterMetricFamily(
            "imagecache_actions",
            "Entries acted on or skipped by the executor, by result and reason.",
            labels=("result", "reason"),
        ),
        ((key, n) for key, (n, _) in actions.items()),
    )
    yield _by(
        CounterMetricFamily(
            "imagecache_freed_bytes",
            "Bytes freed (allocated blocks) by removals, reaps and purges, by result and reason.",
            labels=("result", "reason"),
        ),
        ((key, freed) for key, (_, freed) in actions.items()),
    )
    fetches = _pairs(t.fetches, ((r, "") for r in _FETCH_RESULTS))
    yield _by(
        CounterMetricFamily("imagecache_fetches", "Images fetched, by result.", labels=("result",)),
        (((result,), n) for (result, _), (n, _) in fetches.items()),
    )
    yield _by(
        CounterMetricFamily(
            "imagecache_fetched_bytes", "Bytes of fetched images, by result.", labels=("result",)
        ),
        (((result,), size) for (result, _), (_, size) in fetches.items()),
    )
    checked = _pairs(t.verifications, ((v, "") for v in _VERDICTS))
    yield _by(
        CounterMetricFamily(
            "imagecache_verifications",
            "Entries hashed and compared with their digest records, by verdict (good, corrupt; "
            "unreadable: could not be hashed).",
            labels=("result",),
        ),
        (((verdict,), n) for (verdict, _), (n, _) in checked.items()),
    )
    yield _by(
        CounterMetricFamily(
            "imagecache_verified_bytes",
            "Bytes read to verify entries, by verdict.",
            labels=("result",),
        ),
        (((verdict,), size) for (verdict, _), (_, size) in checked.items()),
    )
    yield _gauge(
        "imagecache_incomplete_passes",
        "Passes in a row whose view was incomplete (0 after a complete one).",
        history.incomplete_streak,
    )
    if history.last_success is not None:
        yield _gauge(
            "imagecache_last_success_timestamp_seconds",
            "When the last successful pass finished (epoch seconds); absent before the first.",
            history.last_success,
        )


def _last_pass(record: PassRecord) -> Iterator[Metric]:
    entries = _pairs(record.entries, ((str(k), s) for k in Kind for s in ENTRY_STATES))
    yield _by(
        GaugeMetricFamily(
            "imagecache_entries",
            "Cache entries seen by the last pass, by kind and state (quarantined: in the trash).",
            labels=("kind", "state"),
        ),
        ((key, n) for key, (n, _) in entries.items()),
    )
    yield _by(
        GaugeMetricFamily(
            "imagecache_entry_bytes",
            "Allocated bytes of the cache entries seen by the last pass, by kind and state.",
            labels=("kind", "state"),
        ),
        ((key, size) for key, (_, size) in entries.items()),
    )
    problems = _counts(record.problems, (str(c) for c in ProblemCode))
    yield _by(
        GaugeMetricFamily(
            "imagecache_problems", "Problems of the last pass, by code.", labels=("code",)
        ),
        (((code,), n) for code, n in problems.items()),
    )
    yield _gauge(
        "imagecache_view_complete",
        "1 if the last pass saw every user of the cache, 0 if its view was incomplete.",
        1 if record.complete else 0,
    )
    yield _gauge(
        "imagecache_last_pass_success",
        "1 if the last pass was successful (complete, not stopped, no action failed), else 0.",
        1 if record.ok else 0,
    )
    yield _gauge(
        "imagecache_last_pass_timestamp_seconds",
        "When the last pass finished (epoch seconds).",
        record.finished,
    )
    yield _gauge(
        "imagecache_last_pass_duration_seconds", "How long the last pass took.", record.duration
    )
    if record.capacity is not None:  # a size limit or a watermark is configured
        cache, need, short = record.capacity
        yield _gauge(
            "imagecache_capacity_cache_bytes",
            "Allocated bytes of the cache (entries and quarantined entries) at the last pass.",
            cache,
        )
        yield _gauge(
            "imagecache_capacity_need_bytes",
            "Bytes the last pass had to free to be under max_cache_bytes and the low watermark.",
            need,
        )
        yield _gauge(
            "imagecache_capacity_shortfall_bytes",
            "Bytes the last pass could not free, everything left being protected (in use, "
            "pinned, too young, unknown); > 0 means the cache stays over its limit.",
            short,
        )


def _filesystem(fs: FsUsage) -> Iterator[Metric]:
    yield _gauge("imagecache_filesystem_size_bytes", "Size of the cache filesystem.", fs.size_bytes)
    yield _gauge(
        "imagecache_filesystem_free_bytes",
        "Free bytes on the cache filesystem, root's reserve included.",
        fs.free_bytes,
    )
    yield _gauge(
        "imagecache_filesystem_avail_bytes",
        "Free bytes on the cache filesystem that an unprivileged user (nova) can write.",
        fs.avail_bytes,
    )


def families(history: History, *, fs: FsUsage | None, host: str, cache_dir: str) -> list[Metric]:
    """Every imagecache metric family for ``history``: counters from its totals, gauges from its
    last pass (absent before the first pass), filesystem gauges from ``fs`` (absent if None)."""
    out = [_info(host, cache_dir), *_totals(history)]
    if history.last_pass is not None:
        out += _last_pass(history.last_pass)
    if fs is not None:
        out += _filesystem(fs)
    return out


class _Snapshot(Collector):
    """A collector serving the families it was last given, all of them at once."""

    def __init__(self, metrics: Iterable[Metric] = ()) -> None:
        self._metrics = tuple(metrics)

    def replace(self, metrics: Iterable[Metric]) -> None:
        self._metrics = tuple(metrics)  # one reference swap: a scrape sees old or new, whole

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def registry(
    history: History, *, fs: FsUsage | None, host: str, cache_dir: str
) -> CollectorRegistry:
    """A registry holding only the imagecache families of ``history`` (for a textfile)."""
    out = CollectorRegistry(auto_describe=True)
    out.register(_Snapshot(families(history, fs=fs, host=host, cache_dir=cache_dir)))
    return out


def write_textfile(path: str, registry: CollectorRegistry) -> None:
    """Write ``registry`` to ``path`` for node_exporter's textfile collector, atomically.

    prometheus_client's ``write_to_textfile`` neither fsyncs nor opens its temp file exclusively
    (``<path>.<pid>.<thread id>``, followed if it is a symlink), so this one is ours: the text is
    rendered first, then written to a unique temp name in the same directory that does not end
    in ``.prom`` (node_exporter never reads it half-written), fsynced, made world-readable
    (node_exporter runs as another user), renamed over ``path`` (a symlink there is replaced,
    not followed), and the directory fsynced.

    Raises:
        MetricsError: the directory is missing or not writable, or the write failed; the file at
            ``path`` is then the previous one, and no temp file is left.
    """
    data = generate_latest(registry)
    directory, name = os.path.split(os.path.abspath(path))
    temp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise MetricsError(f"{path}: cannot write metrics: {exc.strerror}") from exc
    try:
        fsops.replace_at(dir_fd, name, data, temp=temp)
    except OSError as exc:
        raise MetricsError(f"{path}: cannot write metrics: {exc.strerror or exc}") from exc
    finally:
        os.close(dir_fd)


# The HTTP endpoint: our own small server around prometheus_client's WSGI app (in every version
# we support), because start_http_server returns (server, thread) only in recent releases and
# None in older ones, which leaves no way to stop it, free its port or learn the port it bound.


class _Handler(WSGIRequestHandler):
    timeout = 30  # a client that connects and sends nothing holds a thread this long at most

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: one line every 15 s would drown the pass lines."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scrape never keeps the daemon from exiting

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the address's FQDN, which can stall start-up for
        # seconds on a host whose reverse DNS is broken; the WSGI environment only needs a name.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


def _only_metrics(app: Any) -> Any:
    def serve(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") in ("/metrics", "/metrics/"):
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"imagecache serves its metrics on /metrics\n"]

    return serve


class MetricsServer:
    """``/metrics`` over HTTP in a daemon thread, serving the snapshot last given to
    :meth:`update` (and this process's standard ``process_*`` metrics)."""

    def __init__(self, server: _Server, snapshot: _Snapshot) -> None:
        self._server, self._snapshot = server, snapshot
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
            name="imagecache-metrics",
        )  # fmt: skip
        self._thread.start()
        self._closed = False

    @classmethod
    def start(cls, host: str, port: int) -> MetricsServer:
        """Listen on ``host``:``port`` (port 0: any free port, see :attr:`port`) and serve.

        ``host`` is an IPv4 or IPv6 address or a name (``[::1]`` brackets allowed); until the
        first :meth:`update`, only ``process_*`` metrics are served.

        Raises:
            MetricsError: the address cannot be resolved or bound (in use, no permission).
        """
        addr = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            infos = socket.getaddrinfo(
                addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, *_, sockaddr = infos[0]
            snapshot = _Snapshot()
            reg = CollectorRegistry(auto_describe=True)
            reg.register(snapshot)
            ProcessCollector(registry=reg)
            server_class = _Server6 if family == socket.AF_INET6 else _Server
            server = server_class((str(sockaddr[0]), int(sockaddr[1])), _Handler)
        except (OSError, UnicodeError) as exc:
            raise MetricsError(f"metrics_listen {host}:{port}: cannot listen: {exc}") from exc
        server.set_app(_only_metrics(make_wsgi_app(reg)))
        return cls(server, snapshot)

    @property
    def port(self) -> int:
        """The port bound (the chosen one when started with port 0)."""
        return int(self._server.server_address[1])

    def update(self, history: History, *, fs: FsUsage | None, host: str, cache_dir: str) -> None:
        """Serve the families of ``history`` from now on, replacing the previous snapshot."""
        self._snapshot.replace(families(history, fs=fs, host=host, cache_dir=cache_dir))

    def close(self) -> None:
        """Stop serving, close the socket (the port is free on return) and join the thread."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""A REAL, private Redis and etcd for the coordination tests; not a test file.

``running_redis()`` and ``running_etcd()`` start ``redis-server`` (Debian's redis-server, 7.0)
and ``etcd`` (etcd-server, 3.4) in the foreground on free ports of 127.0.0.1 (never 6379 or
2379: a machine may run its own), with their data in a new temporary directory, wait until they
answer (a ``PING`` / ``GET /health``), and yield a :class:`Service` whose ``url`` is the tooz URL
(``redis://127.0.0.1:PORT?timeout=5``, ``etcd3+http://127.0.0.1:PORT?timeout=5``: the
``timeout`` is also tooz's lock TTL and member expiry, default 30 s). Redis keeps nothing on disk
(``--save ''``, no AOF). At the end the server is stopped (SIGTERM, then SIGKILL) and its
directory removed; :meth:`Service.stop` stops it earlier, to test a backend that went away::

    with running_redis(timeout=2) as redis:
        ... Coordination(redis.url, member="host-a", storage="s1") ...
        redis.stop()  # from now on, connections to its port are refused

Both are started through a tiny ``exec`` wrapper that asks the kernel for a SIGKILL when the test
process dies (``PR_SET_PDEATHSIG``), so a killed pytest leaves no server behind, and in a session
of their own, so a ^C in the terminal reaches the test first and the clean-up still runs. Without
the binary (dev/bootstrap.sh installs both) the test is skipped and says what to install. Here
Redis answers ~0.035 s after the start and etcd 0.07-0.16 s (with a 10 ms heartbeat and a 100 ms
election timeout: etcd's defaults, 100 ms and 1 s, made its first answer take 0.25-0.95 s).

Fixtures (a plugin of tests/conftest.py):
``redis_service`` and ``etcd_service`` (one server each per session, started on first use);
``coordination_url``, parametrized over ``file`` (a new directory under ``tmp_path``), ``redis``
and ``etcd``: the URL of a working tooz backend (the servers are shared: use a storage id of the
test's own, such as ``unique_storage``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = [
    "Service",
    "coordination_url",
    "etcd_service",
    "free_port",
    "redis_service",
    "running_etcd",
    "running_redis",
    "unique_storage",
]

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
TIMEOUT = 2  # tooz's ?timeout= for the fixtures: lock TTL, member expiry, socket timeout (s)
_ATTEMPTS = 3  # a free port can be taken by someone else before the server binds it

# exec SERVER ARGS... after asking for SIGKILL when the test process (argv[1]) dies.
_PDEATH = r"""
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the test process is gone already
os.execvp(sys.argv[2], sys.argv[2:])
"""


@dataclass
class Service:
    """A running server: its tooz ``url``, ``host`` and ``port``, its process and directory."""

    name: str
    url: str
    host: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]
    started_in: float  # seconds from the start to the first answer
    _log: Path = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """Stop the server (idempotent); connections to its port are refused from then on."""
        _stop(self.proc)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self._log.read_text(errors="replace")[-4000:]
        return ""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _binary(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin:/sbin")
    if path is None:
        pytest.skip(f"{name} is not installed (dev/bootstrap.sh installs {package})")
    return path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _etcd_answers(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=1.0) as answer:
            return bool(json.loads(answer.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _running(
    name: str,
    argv: Callable[[Path, int], list[str]],
    answers: Callable[[str, int], bool],
    url: Callable[[str, int], str],
) -> Iterator[Service]:
    """Start ``argv(workdir, port)`` until it answers on a free port; stop it and clean up."""
    host = "127.0.0.1"
    workdir = Path(tempfile.mkdtemp(prefix=f"ic-{name}-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(_ATTEMPTS):
            port = free_port(host)
            log = workdir / f"{name}-{attempt}.log"
            started = time.monotonic()
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _PDEATH, str(os.getpid()), *argv(workdir, port)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                    start_new_session=True,  # ^C in the test must not stop it before the clean-up
                )
            deadline = started + START_TIMEOUT
            while proc.poll() is None and not answers(host, port):
                if time.monotonic() > deadline:
                    _stop(proc)
                    raise RuntimeError(f"{name} did not answer in {START_TIMEOUT} s:\n{_tail(log)}")
                time.sleep(0.005)
            if proc.poll() is None:
                service = Service(
                    name, url(host, port), host, port, workdir, proc,
                    time.monotonic() - started, log,
                )  # fmt: skip
                yield service
                return
            # It exited: most likely someone took the port in between; try another one.
        raise RuntimeError(f"{name} did not start in {_ATTEMPTS} attempts:\n{_tail(log)}")
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-4000:]
    return ""


@contextlib.contextmanager
def running_redis(*, timeout: float = TIMEOUT) -> Iterator[Service]:
    """A private redis-server on a free port of 127.0.0.1, nothing kept on disk."""
    server = _binary("redis-server", "redis-server")

    def argv(workdir: Path, port: int) -> list[str]:
        return [
            server, "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "no",
            "--dir", str(workdir), "--save", "", "--appendonly", "no",
            "--protected-mode", "yes", "--loglevel", "warning",
        ]  # fmt: skip

    with _running(
        "redis", argv, _redis_answers, lambda h, p: f"redis://{h}:{p}?timeout={timeout:g}"
    ) as service:
        yield service


@contextlib.contextmanager
def running_etcd(*, timeout: float = TIMEOUT) -> Iterator[Service]:
    """A private single-node etcd on free ports of 127.0.0.1 (client, peer), data in a tmp dir."""
    server = _binary("etcd", "etcd-server")

    def argv(workdir: Path, port: int) -> list[str]:
        client, peer = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{free_port()}"
        return [
            server, "--name", "test", "--data-dir", str(workdir / "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}", "--initial-cluster-state", "new",
            "--heartbeat-interval", "10", "--election-timeout", "100",  # elected at once
            "--log-level", "warn",
        ]  # fmt: skip

    with _running(
        "etcd", argv, _etcd_answers, lambda h, p: f"etcd3+http://{h}:{p}?timeout={timeout:g}"
    ) as service:
        yield service


@pytest.fixture(scope="session")
def redis_service() -> Iterator[Service]:
    """One private Redis for the session (tooz URL with ``?timeout=2``)."""
    with running_redis() as service:
        yield service


@pytest.fixture(scope="session")
def etcd_service() -> Iterator[Service]:
    """One private etcd for the session (tooz URL with ``?timeout=2``)."""
    with running_etcd() as service:
        yield service


@pytest.fixture(params=["file", "redis", "etcd"])
def coordination_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A working tooz URL on each backend: ``file://`` (a new directory), Redis, etcd."""
    backend = request.param
    if backend == "file":
        directory = tmp_path / "coordination"
        directory.mkdir()
        return f"file://{directory}?timeout={TIMEOUT}"
    service: Service = request.getfixturevalue(f"{backend}_service")
    return service.url


@pytest.fixture
def unique_storage() -> str:
    """A storage id no other test uses: the session's servers are shared."""
    return f"test-{uuid.uuid4().hex[:12]}"

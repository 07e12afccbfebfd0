"""``imagecache run`` as a real process: systemd notification, metrics, SIGHUP, SIGTERM, health.

Every test starts the daemon as operators do (``python -m imagecache run``) on a real host tree
with a one-second interval, and watches it from outside: a real datagram socket as
``NOTIFY_SOCKET``, ``/metrics`` over HTTP, the audit log, the state file, the exit code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imagecache import _sample as sample
from imagecache.cli import main
from imagecache.naming import fingerprint as fp
from tests.test_executor import make_host, put

T = TypeVar("T")
WAIT = 60.0  # seconds before a wait gives up: a slow CI machine, never a test's pace


def until(what: str, probe: Callable[[], T | None], timeout: float = WAIT) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Notify:
    """A real ``NOTIFY_SOCKET``: every datagram the daemon sends, as a list of field dicts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.seen: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.seen
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.seen.append(fields)

    def has(self, key: str, value: str | None = None) -> dict[str, str] | None:
        for m in self.drain():
            if key in m and (value is None or m[key] == value):
                return m
        return None

    def close(self) -> None:
        self.sock.close()


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc, self.log = proc, log

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self) -> int:
        return self.proc.wait(timeout=WAIT)


@contextmanager
def daemon(
    tmp_path: Path, config: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[Daemon]:
    log = tmp_path / f"run-{time.monotonic_ns()}.log"
    argv = [sys.executable, "-m", "imagecache", "--config-file", str(config), *args, "run"]
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, **(env or {})})  # fmt: skip
    d = Daemon(proc, log)
    try:
        yield d
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample_value(metrics: Samples, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def passed(metrics: Samples, n: int) -> Samples | None:
    """The metrics, once they count ``n`` successful passes."""
    return metrics if sample_value(metrics, "imagecache_passes_total", outcome="ok") >= n else None


def quarantined(metrics: Samples, n: int) -> Samples | None:
    """The metrics, once they count ``n`` expired entries quarantined."""
    got = sample_value(metrics, "imagecache_actions_total", result="quarantined",
                       reason="unused-expired")  # fmt: skip
    return metrics if got >= n else None


def configure(config: Path, base: str, **imagecache: object) -> None:
    """The sample's nova.conf with ``imagecache`` set in ``[imagecache]`` (base: the original)."""
    lines = "".join(f"{k} = {v}\n" for k, v in imagecache.items())
    config.write_text(base.replace("[imagecache]\n", "[imagecache]\n" + lines))


def test_the_daemon_notifies_serves_metrics_reloads_and_stops(tmp_path: Path) -> None:
    host = sample.build(tmp_path / "sample")
    base = host.config.read_text()
    port = free_port()
    common = {"manager_interval": 1, "metrics_listen": f"127.0.0.1:{port}"}
    # First a threshold no sample entry reaches: every pass keeps everything.
    configure(host.config, base, **common)
    ten_days = "".join(f"remove_unused_{k}_minimum_age_seconds = 864000\n"
                       for k in ("original", "resized"))  # fmt: skip
    old = host.config.read_text().replace("[image_cache]\n", "[image_cache]\n" + ten_days)
    host.config.write_text(old)
    notify = Notify(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    inventory = ("--inventory", str(host.inventory))
    with closing(notify), daemon(tmp_path, host.config, *inventory, env=env) as d:
        until("READY=1", lambda: notify.has("READY", "1"))
        first = until("a first pass in /metrics", lambda: passed(scrape(port), 1))
        assert sample_value(first, "imagecache_actions_total", result="quarantined",
                            reason="unused-expired") == 0  # fmt: skip
        assert sample_value(first, "imagecache_view_complete") == 1
        assert (host.cache_dir / fp(sample.IMG_OLD)).exists()
        until("WATCHDOG=1", lambda: notify.has("WATCHDOG", "1"))
        status = until(
            "STATUS= of a pass",
            lambda: next(
                (m for m in notify.drain() if m.get("STATUS", "").startswith("last pass")), None
            ),
        )
        assert "view complete" in status["STATUS"]

        # A second daemon on the same cache refuses at once, naming the first.
        second = subprocess.run(
            [sys.executable, "-m", "imagecache", "--config-file", str(host.config), "run"],
            check=False, capture_output=True, text=True, timeout=WAIT)  # fmt: skip
        assert second.returncode == 1
        assert f"pid {d.proc.pid}" in second.stderr

        # SIGHUP with the default threshold (one day): the two-day-old entries expire.
        configure(host.config, base, **common)
        d.signal(signal.SIGHUP)
        after = until("the reloaded threshold to act", lambda: quarantined(scrape(port), 6))
        assert "configuration reloaded" in d.stderr()
        assert not (host.cache_dir / fp(sample.IMG_OLD)).exists()
        trash = host.cache_dir / ".imagecache" / "trash"
        assert any(p.name.startswith(fp(sample.IMG_OLD) + "@") for p in trash.iterdir())
        assert sample_value(after, "imagecache_entries", kind="original", state="quarantined") > 0

        # SIGHUP with a broken configuration: logged, the running one kept, passes go on.
        host.config.write_text(host.config.read_text() + "[image_cache]\nmanager_interval = x\n")
        passes = sample_value(scrape(port), "imagecache_passes_total", outcome="ok")
        d.signal(signal.SIGHUP)
        until("the refused reload in the log", lambda: "not reloaded" in d.stderr())
        assert "manager_interval" in d.stderr().split("not reloaded", 1)[1].splitlines()[0]
        until("passes after the refused reload", lambda: sample_value(
            scrape(port), "imagecache_passes_total", outcome="ok") >= passes + 2)  # fmt: skip
        assert d.proc.poll() is None

        cli_args = ["--config-file", str(tmp_path / "good.conf"), "health"]
        configure(tmp_path / "good.conf", base, **common)
        assert main(cli_args) == 0
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        until("STOPPING=1", lambda: notify.has("STOPPING", "1"))
    # Passes have stopped: once two intervals (2 s) went by, health says so.
    until("health to flip to 1", lambda: main(cli_args) == 1, timeout=10)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_during_a_pass_stops_between_two_entries(
    tmp_path: Path, signum: int, code: int
) -> None:
    host = make_host(tmp_path, remove_unused_original_minimum_age_seconds=0,
                     quarantine_seconds=0, manager_interval=3600)  # fmt: skip
    now = time.time()
    names = [fp(f"img-{i}") for i in range(1500)]
    inodes = {n: put(host, n, 3600, size=4096, now=now).stat().st_ino for n in names}
    with daemon(tmp_path, host.config, "--inventory", str(host.inventory)) as d:
        until("the pass to be under way", lambda: host.audit.exists()
              and host.audit.stat().st_size > 0, timeout=WAIT)  # fmt: skip
        d.signal(signum)
        assert d.wait() == code
    lines = host.audit_lines()
    removed = {line["entry"] for line in lines if line["action"] == "removed"}
    assert len(removed) == len(lines)  # one line per entry, nothing else done
    left = {n for n in names if host.path(n).exists()}
    assert left, "the pass finished before the signal: nothing proves it stopped"
    assert removed and removed | left == set(names) and not removed & left
    for n in left:  # untouched: the very same file
        assert host.path(n).stat().st_ino == inodes[n]
    stray = [p.name for p in host.cache.iterdir() if p.name not in left and p.name != ".imagecache"]
    assert stray == []
    state = json.loads((host.cache / ".imagecache" / "state.json").read_text())
    assert state["last_pass"]["stopped"] is True and state["last_success"] is None


def test_nova_manager_enabled_is_reported_by_every_pass(tmp_path: Path) -> None:
    host = make_host(tmp_path, nova_manager_interval=2400, manager_interval=1)
    with daemon(tmp_path, host.config, "--inventory", str(host.inventory)) as d:
        until("two passes", lambda: d.stderr().count("nova-manager-enabled") >= 2)
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    assert "manager_interval = -1" in d.stderr()


def test_a_bad_configuration_at_start_exits_2_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, metrics_listen="everywhere")
    assert main(["--config-file", str(host.config), "run"]) == 2
    assert "[imagecache] metrics_listen" in capsys.readouterr().err


def test_a_disabled_interval_says_so_and_exits_0(tmp_path: Path) -> None:
    host = make_host(tmp_path, manager_interval=-1)
    notify = Notify(tmp_path / "notify")
    with (
        closing(notify),
        daemon(tmp_path, host.config, env={"NOTIFY_SOCKET": str(notify.path)}) as d,
    ):
        assert d.wait() == 0
        # Type=notify: a unit that exits without READY=1 fails as a protocol error.
        assert notify.has("READY", "1")
    assert "disabled" in d.stderr()


def test_the_first_pass_waits_for_its_delay_and_sigterm_ends_the_wait(tmp_path: Path) -> None:
    host = make_host(tmp_path, manager_interval=1, first_pass_delay_seconds=3600)
    notify = Notify(tmp_path / "notify")
    with (
        closing(notify),
        daemon(tmp_path, host.config, env={"NOTIFY_SOCKET": str(notify.path)}) as d,
    ):
        until("READY=1", lambda: notify.has("READY", "1"))
        time.sleep(1.5)  # a second and a half of a one-second interval: no pass yet
        assert not (host.cache / ".imagecache" / "state.json").exists()
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    assert not (host.cache / ".imagecache" / "state.json").exists()


def test_a_daemon_pass_finds_bit_rot_once_its_interval_is_due(tmp_path: Path) -> None:
    from tests.test_verify import rot

    host = make_host(tmp_path, manager_interval=1, checksum_base_images="true",
                     checksum_interval_seconds=1)  # fmt: skip
    name = fp("young-and-unused")
    put(host, name, 60, now=time.time())
    record = host.cache / ".imagecache" / "digests" / f"{name}.json"
    with daemon(tmp_path, host.config, "--inventory", str(host.inventory)) as d:
        until("the first record", lambda: record.exists()
              and json.loads(record.read_text())["verdict"] == "good")  # fmt: skip
        rot(host.path(name))
        until("the rotten entry quarantined", lambda: not host.path(name).exists())
        assert json.loads(record.read_text())["verdict"] == "corrupt"
        assert [line["reason"] for line in host.audit_lines()] == ["corrupt"]
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    assert f"CORRUPT {name}" in d.stderr()

"""Logging the OpenStack way: nova.conf's oslo.log options, one line per decision, UTC, escaped.

Each test runs the command line in a child process (logging is process-wide state) on a real
host tree, and reads what landed in the log file and on stderr.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagecache.config import LOGGING_OPTIONS
from tests.test_executor import Host, make_host, put

A = "a" * 40
B = "b" * 40
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


def run(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "imagecache", "--config-file", str(host.config),
            "--inventory", str(host.inventory), *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)


def with_default(host: Host, text: str) -> None:
    """Add ``text`` to the host's nova.conf ``[DEFAULT]``."""
    host.config.write_text(host.config.read_text().replace("[DEFAULT]\n", "[DEFAULT]\n" + text))


def expired(tmp_path: Path) -> Host:
    """A host whose entry A is unused for two days (removed by a clean), B one hour."""
    host = make_host(tmp_path, quarantine_seconds=0)
    now = time.time()  # the child process reads the real clock
    put(host, A, 2 * 86400, now=now)
    put(host, B, 3600, now=now)
    return host


def test_every_oslo_log_option_is_known() -> None:
    """A logging option the detection missed would leave nova.conf's setting silently unused."""
    from oslo_log import _options

    names = set()
    for opt in _options.list_opts()[0][1]:
        names |= {opt.dest} | {d.name for d in opt.deprecated_opts if d.name}
    assert names <= LOGGING_OPTIONS, sorted(names - LOGGING_OPTIONS)


def test_log_file_and_debug_from_nova_conf(tmp_path: Path) -> None:
    host = expired(tmp_path)
    log = tmp_path / "imagecache.log"
    with_default(host, f"debug = true\nlog_file = {log}\n")
    done = run(host, "clean")
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    assert lines and all(STAMP.match(line) for line in lines), lines[:3]
    removed = [line for line in lines if f"removed {A}" in line]
    assert len(removed) == 1 and "unused-expired" in removed[0] and " INFO " in removed[0]
    assert any(" DEBUG " in line for line in lines)  # debug = true
    assert not any(B in line and "removed" in line for line in lines)
    assert f"removed {A}" in done.stderr  # a one-shot command also tells its operator


def test_use_json_writes_json_lines(tmp_path: Path) -> None:
    host = expired(tmp_path)
    log = tmp_path / "imagecache.json"
    with_default(host, f"use_json = true\nlog_file = {log}\n")
    assert run(host, "clean").returncode == 0
    docs = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(d["message"].startswith(f"removed {A}") for d in docs)


def test_read_only_commands_write_no_log_file(tmp_path: Path) -> None:
    host = expired(tmp_path)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    with_default(host, f"debug = true\nlog_dir = {log_dir}\n")
    for command in ("plan", "status", "health"):
        run(host, command)
    assert list(log_dir.iterdir()) == []
    assert run(host, "clean").returncode == 0
    assert [p.name for p in log_dir.iterdir()] == ["imagecache.log"]  # oslo.log's naming


def test_log_file_on_the_command_line(tmp_path: Path) -> None:
    host = expired(tmp_path)
    log = tmp_path / "cli.log"
    done = run(host, "--log-file", str(log), "--debug", "plan")
    assert done.returncode == 0, done.stderr
    assert " DEBUG " in log.read_text()


def test_a_bad_logging_value_names_the_option(tmp_path: Path) -> None:
    host = expired(tmp_path)
    with_default(host, "use_json = perhaps\n")
    done = run(host, "clean")
    assert done.returncode == 2
    assert "use_json" in done.stderr and "Traceback" not in done.stderr
    assert (host.cache / A).exists()


@pytest.mark.parametrize("oslo", [False, True], ids=["plain", "oslo.log"])
def test_a_hostile_name_cannot_forge_a_log_line(tmp_path: Path, oslo: bool) -> None:
    host = expired(tmp_path)
    log = tmp_path / "imagecache.log"
    if oslo:
        with_default(host, f"log_file = {log}\n")
    forged = str(tmp_path / "inv\n2026-01-01T00:00:00.000Z 1 ERROR forged \x1b[31mred")
    done = run(host, "--inventory", forged, "clean")
    assert done.returncode == 1  # an unreadable inventory: incomplete view, nothing removed
    assert (host.cache / A).exists()
    for text in (done.stderr, *([log.read_text()] if oslo else [])):
        assert "\x1b[31m" not in text  # (oslo.log 5.0 colours its own stderr lines: not ours)
        assert not any(line.startswith("2026-01-01") for line in text.splitlines())
        assert "forged" in text  # shown, escaped on its own line


def test_plain_stderr_lines_are_utc_too(tmp_path: Path) -> None:
    host = expired(tmp_path)
    done = run(host, "-v", "clean")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and all(STAMP.match(line) for line in lines), lines[:3]

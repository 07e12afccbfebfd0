"""What the ``imagecache`` command writes to a pipe: all of a big document, or, when the reader
goes away, one line on stderr and status 1. Real processes, real pipes."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagecache import cli, naming
from tests.test_executor import make_host, put

NOW_AGE = 30 * 86400.0


def _imagecache(
    *argv: str, stdout: int | None = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    argv = (sys.executable, "-m", "imagecache", *argv)
    return subprocess.run(
        argv, stdout=stdout, stderr=subprocess.PIPE, text=True, check=False, timeout=120
    )


def _host_with_entries(tmp_path: Path, n: int) -> Path:
    host = make_host(tmp_path)
    for i in range(n):
        put(host, naming.fingerprint(f"img-{i}"), NOW_AGE, size=4096)
    return host.config


def test_a_big_plan_is_printed_whole(tmp_path: Path) -> None:
    config = _host_with_entries(tmp_path, 400)  # some 200 KiB of JSON: more than a pipe holds
    done = _imagecache("--config-file", str(config), "plan", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert len(doc["entries"]) == 400


def test_a_plan_saved_to_a_file_is_complete(tmp_path: Path) -> None:
    config = _host_with_entries(tmp_path, 50)
    out = tmp_path / "plan.json"
    done = _imagecache("--config-file", str(config), "plan", "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(out.read_text())["entries"]) == 50


def test_the_exit_status_of_a_read_only_command_is_kept(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("[imagecache]\nlock_timeout_seconds = soon\n")
    done = _imagecache("--config-file", str(bad), "status")
    assert done.returncode == 2 and "lock_timeout_seconds" in done.stderr


@pytest.mark.parametrize("command", ["plan", "status"])
def test_a_closed_pipe_still_ends_the_command(tmp_path: Path, command: str) -> None:
    # `imagecache plan --json | head`: one line on stderr and status 1, no traceback.
    config = _host_with_entries(tmp_path, 400)
    r, w = os.pipe()
    os.close(r)
    try:
        done = _imagecache("--config-file", str(config), command, "--json", stdout=w)
    finally:
        os.close(w)
    assert done.returncode == 1
    assert "standard output closed by its reader" in done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr


def _collector_while_running(argv: list[str]) -> set[bool]:
    """Whether the cyclic collector was enabled, each time the command read the clock."""
    seen: set[bool] = set()

    def clock() -> float:
        seen.add(gc.isenabled())
        return time.time()

    with contextlib.redirect_stdout(io.StringIO()):
        cli.main(argv, clock=clock)
    return seen


def test_a_read_only_command_runs_without_the_cyclic_collector(tmp_path: Path) -> None:
    config = str(_host_with_entries(tmp_path, 20))
    assert gc.isenabled()
    assert _collector_while_running(["--config-file", config, "plan", "--json"]) == {False}
    assert gc.isenabled()  # and it is back after
    # A command that acts (it may run for hours) collects as usual, but for its passes.
    assert True in _collector_while_running(["--config-file", config, "clean", "--json"])

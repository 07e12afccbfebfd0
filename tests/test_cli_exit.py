"""How the ``imagecache`` command leaves: at once after a read-only command, output complete;
the usual way (``atexit`` work done) after one that acts. Real processes, real output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagecache import naming
from tests.test_executor import make_host, put

NOW_AGE = 30 * 86400.0

# The console script, with an atexit hook of our own that says whether teardown ran.
_RUN = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('TEARDOWN-RAN\\n'))\n"
    "from imagecache.cli import run\n"
    "sys.argv[0] = 'imagecache'\n"
    "run()\n"
)


def _imagecache(
    *argv: str, stdout: int | None = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _RUN, *argv], stdout=stdout, stderr=subprocess.PIPE, text=True,
        check=False, timeout=120,
    )  # fmt: skip


def _host_with_entries(tmp_path: Path, n: int) -> Path:
    host = make_host(tmp_path)
    for i in range(n):
        put(host, naming.fingerprint(f"img-{i}"), NOW_AGE, size=4096)
    return host.config


def test_a_big_plan_is_printed_whole_and_teardown_is_skipped(tmp_path: Path) -> None:
    config = _host_with_entries(tmp_path, 400)  # some 200 KiB of JSON: more than a pipe holds
    done = _imagecache("--config-file", str(config), "plan", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert len(doc["entries"]) == 400
    assert "TEARDOWN-RAN" not in done.stderr


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
    assert "TEARDOWN-RAN" not in done.stderr


def test_a_command_that_acts_exits_the_usual_way(tmp_path: Path) -> None:
    config = _host_with_entries(tmp_path, 3)
    done = _imagecache("--config-file", str(config), "pin", "img-1")
    assert done.returncode == 0, done.stderr
    assert "TEARDOWN-RAN" in done.stderr


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

"""Log lines on stderr are escaped too: an image ref or a file name cannot forge a line there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.test_executor import make_host


def test_a_failing_precache_logs_its_ref_escaped(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    ref = "file:///nonexistent/\x1b[31mred\nFORGED LINE"
    done = subprocess.run(
        [sys.executable, "-m", "imagecache", "--config-file", str(host.config), "precache", ref],
        capture_output=True,
        check=False,
    )
    assert done.returncode == 1
    err = done.stderr.decode("utf-8")
    assert "\x1b" not in err and "\\x1b[31mred\\nFORGED LINE" in err
    assert not any(line.startswith("FORGED") for line in err.splitlines())

"""A file a process holds open is never removed, whatever the records say (issue 11, part 2):
every observation sees it in use (``open-file`` users, one walk of ``/proc``), and the executor
checks again under the entry lock just before acting (``/proc`` and qemu's image locks).

Real holders: a ``qemu-io`` process with the base open through an overlay (qemu's image locks),
a plain process with a descriptor on it (``/proc``), and a qemu-io in another PID namespace
(``unshare``), whose ``/proc`` entry we may not see but whose lock we do.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.test_executor import cli, make_host, put

A = "a" * 40
DAY = 86400.0


@contextmanager
def holding(argv: list[str], ready: str) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert ready in line, line
            yield proc
        finally:
            proc.kill()


def outcomes(doc: dict[str, object]) -> list[tuple[str, str]]:
    return [(o["result"], o["reason"]) for o in doc["outcomes"]]  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["descriptor", "qemu-io", "qemu-io-other-pid-namespace"])
def test_a_base_held_open_is_kept_and_removable_once_let_go(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    host = make_host(tmp_path, quarantine_seconds=0)
    base = put(host, A, 2 * DAY, now=time.time())
    if how == "descriptor":
        argv = [sys.executable, "-c",
                f"f = open({str(base)!r}, 'rb'); print('open', flush=True); input()"]  # fmt: skip
        ready = "open"
    else:
        qemu_io = shutil.which("qemu-io")
        if qemu_io is None:
            pytest.skip("qemu-io is not installed")
        # Interactive qemu-io keeps the image open (and locked, as qemu does) until stdin ends.
        argv = [qemu_io, "-f", "raw", str(base)]
        if how == "qemu-io-other-pid-namespace":
            if shutil.which("unshare") is None:
                pytest.skip("unshare is not installed")
            argv = ["unshare", "--pid", "--fork", "--mount-proc", *argv]
        ready = ""
    with holding(argv, ready) if ready else _qemu_io(argv) as proc:
        code, plan = cli(host, capsys, "plan", now=time.time())
        (entry,) = plan["entries"]
        assert (entry["action"], entry["reason"]) == ("keep", "in-use")
        assert [u["source"] for u in entry["users"]] == ["open-file"]
        if how != "qemu-io-other-pid-namespace":  # there, the holder is unshare's child
            assert entry["users"][0]["ref"].startswith(f"pid {proc.pid} ")
        code, doc = cli(host, capsys, "clean", now=time.time())
        assert code == 0, doc
        assert [o for o in outcomes(doc) if o[0] != "touched"] == []
        assert base.exists()
    # In use, it was touched as every in-use entry is: it goes once unused for its threshold.
    code, doc = cli(host, capsys, "clean", now=time.time() + 2 * DAY)
    assert outcomes(doc) == [("removed", "unused-expired")]
    assert not base.exists()


@contextmanager
def _qemu_io(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("read 0 512\n")
            proc.stdin.flush()
            deadline = time.monotonic() + 30
            while "read 512/512" not in proc.stdout.readline():
                assert time.monotonic() < deadline and proc.poll() is None, "qemu-io never read"
            yield proc
        finally:
            proc.kill()


def test_qemus_image_lock_is_seen_without_proc(tmp_path: Path) -> None:
    """The lock test alone (what works when qemu runs in a PID namespace whose /proc we cannot
    see): qemu-io's OFD locks on the image, from another PID namespace, and none once it ends."""
    from imagecache.sources import openfiles

    qemu_io, unshare = shutil.which("qemu-io"), shutil.which("unshare")
    if qemu_io is None or unshare is None:
        pytest.skip("qemu-io or unshare is not installed")
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * (1 << 20))
    assert not openfiles.ofd_locked(str(base))
    argv = [unshare, "--pid", "--fork", "--mount-proc", qemu_io, "-f", "raw", str(base)]
    with _qemu_io(argv):
        assert openfiles.ofd_locked(str(base))
    assert not openfiles.ofd_locked(str(base))

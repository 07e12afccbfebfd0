"""A name that looks like a temp file but is some disk's backing file is in use, and stays.

``in-use`` comes before every rule that removes, for every kind: a ``<sha1>.converted`` or
``x.part`` that an instance disk opens as its backing file is kept (and touched) by a pass with
every threshold at zero, and by a saved plan hand-edited to reap it. The guest's data is read
back through the real overlay with ``qemu-io``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.qemu import make_overlay
from tests.test_executor import DAY, NOW, A, Host, cli, make_host, results

PATTERN = 0xA7
MIB = 1 << 20


def zero_thresholds(tmp_path: Path) -> Host:
    return make_host(
        tmp_path,
        quarantine_seconds=0,
        stale_temp_seconds=0,
        remove_unused_original_minimum_age_seconds=0,
        remove_unused_resized_minimum_age_seconds=0,
    )


def base_with_guest_data(host: Host, name: str) -> Path:
    """A raw base whose every byte is PATTERN, 30 days old, and an overlay of an instance on it."""
    base = host.path(name)
    base.write_bytes(bytes([PATTERN]) * MIB)
    make_overlay(host.instances / "inst-1" / "disk", base, backing_fmt="raw")
    os.utime(base, (NOW - 30 * DAY, NOW - 30 * DAY))
    return base


def guest_reads_its_data(host: Host) -> subprocess.CompletedProcess[str]:
    disk = host.instances / "inst-1" / "disk"
    return subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {PATTERN} 0 1M", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )


TEMP_NAMES = [A + ".converted", "x.part", A + ".4242.beef.part"]


@pytest.mark.parametrize("name", TEMP_NAMES)
def test_a_temp_named_backing_file_is_in_use_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    host = zero_thresholds(tmp_path)
    base = base_with_guest_data(host, name)
    inode = base.stat().st_ino

    code, plan = cli(host, capsys, "plan")
    assert code == 0
    [entry] = plan["entries"]
    assert (entry["kind"], entry["action"], entry["reason"]) == ("temp", "keep", "in-use")
    assert [u["ref"] for u in entry["users"]] == [str(host.instances / "inst-1" / "disk")]

    code, doc = cli(host, capsys, "clean")
    assert code == 0
    assert results(doc, touched=True) == {name: ("touched", "in-use")}
    assert base.stat().st_ino == inode and base.stat().st_mtime == NOW
    assert host.audit_lines() == []
    read = guest_reads_its_data(host)
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read


@pytest.mark.parametrize("name", TEMP_NAMES)
def test_a_saved_plan_that_reaps_an_in_use_temp_removes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # The executor's re-check under the lock decides afresh: in use, so not reaped, whatever the
    # plan says.
    host = zero_thresholds(tmp_path)
    base = base_with_guest_data(host, name)
    saved = tmp_path / "plan.json"
    cli(host, capsys, "plan", "-o", str(saved))
    doc = json.loads(saved.read_text())
    [entry] = doc["entries"]
    entry.update(action="reap", reason="stale-temp", users=[], in_use=False)
    saved.write_text(json.dumps(doc))

    code, done = cli(host, capsys, "clean", "--plan", str(saved))
    assert code == 0
    assert results(done) == {name: ("skipped", "now-in-use")}
    assert base.exists() and host.audit_lines() == []
    read = guest_reads_its_data(host)
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read

"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# The real Glance, one per session, for tests marked @pytest.mark.glance; the real Redis and etcd
# (started on first use) and the ``coordination_url`` fixture over file, Redis and etcd.
pytest_plugins = ["tests.glance_server", "tests.services"]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs mounted at a new directory (root only; skipped with the reason where
    mounting is not permitted), unmounted after the test: a filesystem of fixed size."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs",
                           str(mount)], capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)

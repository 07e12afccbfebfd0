"""Whole hostile libvirt hosts, generated: whatever the domains name and however, a pass never
removes an entry a domain uses, never opens what a guest's header or a FIFO names, removes
nothing when a domain's disk is missing, and never crashes.

Each example is a real host (a cache of real files, real qcow2 overlays made by ``qemu-img``)
and real libvirt (the test driver reading a node file of the generated domains).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.opens import OpenWatch
from tests.qemu import make_overlay
from tests.test_executor import cli, make_host, put
from tests.test_libvirt import DAY, domain_xml, node, point

pytest.importorskip("libvirt", reason="libvirt-python is not installed")

ENTRIES = [c * 40 for c in "0123456789"]

# How a domain names an entry (or something else): each a way a real host does it.
HOW = st.sampled_from(
    [
        "entry",  # the entry's own path in _base (a raw image backend, an ISO)
        "symlink",  # a link elsewhere to the entry
        "hardlink",  # another name of the same file
        "overlay",  # a qcow2 overlay outside instances_path, declared qcow2
        "overlay-undeclared",  # the same, but the domain says raw (qemu reads it raw)
        "forged-raw",  # a raw disk whose guest wrote a qcow2 header naming the entry
        "fifo",  # a FIFO named as a disk: never opened
        "missing",  # a disk that is not there (an unmounted volume)
        "dangling",  # a disk that is a symlink to nothing (the volume behind it not mounted)
        "relative",  # a relative path: where qemu opens it only qemu knows
        "kernel",  # <os><kernel> (a second: initrd, dtb, loader) is the entry
        "network",  # an rbd disk
    ]
)


@dataclass
class Use:
    domain: int
    how: str
    entry: int
    active: bool


USES = st.lists(
    st.builds(
        Use,
        domain=st.integers(0, 3),
        how=HOW,
        entry=st.integers(0, len(ENTRIES) - 1),
        active=st.booleans(),
    ),
    max_size=8,
)


def build(tmp_path: Path, uses: list[Use]) -> tuple[Any, set[str], bool, list[Path]]:
    """The host, the entries that must survive, whether the view must be incomplete, FIFOs."""
    host = make_host(tmp_path, libvirt_uri="", quarantine_seconds=0)
    now = time.time()
    paths = [put(host, name, 2 * DAY, now=now) for name in ENTRIES]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kept: set[str] = set()
    incomplete = False
    fifos: list[Path] = []
    disks: dict[int, list[tuple[str, str | None]]] = {}
    os_files: dict[int, dict[str, str]] = {}
    networks: set[int] = set()
    active: dict[int, bool] = {}
    for i, use in enumerate(uses):
        entry = paths[use.entry]
        name = ENTRIES[use.entry]
        active[use.domain] = active.get(use.domain, False) or use.active
        file = elsewhere / f"{i}-{use.how}"
        fmt: str | None = "qcow2"
        if use.how == "entry":
            file, fmt = entry, "raw"
        elif use.how == "symlink":
            file.symlink_to(entry)
            fmt = "raw"
        elif use.how == "hardlink":
            os.link(entry, file)
            fmt = None
        elif use.how in ("overlay", "overlay-undeclared", "forged-raw"):
            make_overlay(file, entry)
            fmt = {"overlay": "qcow2", "overlay-undeclared": None, "forged-raw": "raw"}[use.how]
        elif use.how == "fifo":
            os.mkfifo(file)
            fifos.append(file)
            fmt = "raw"
        elif use.how == "missing":
            incomplete = True
        elif use.how == "dangling":
            file.symlink_to(tmp_path / "unmounted" / "disk.qcow2")
            incomplete = True
        elif use.how == "relative":
            file = Path(f"vols/{i}.qcow2")
            incomplete = True
        if use.how == "kernel":
            # One <os> per domain: a second use takes the next of its file elements.
            slots = os_files.setdefault(use.domain, {})
            free = [t for t in ("kernel", "initrd", "dtb", "loader") if t not in slots]
            if not free:
                continue
            slots[free[0]] = str(entry)
        elif use.how == "network":
            networks.add(use.domain)
        else:
            disks.setdefault(use.domain, []).append((str(file), fmt))
        if use.how not in ("fifo", "missing", "dangling", "relative", "network"):
            kept.add(name)  # every way of naming an entry keeps it, a forged header's too
    for path in paths:  # overlays and links were made after: the entries are old again
        os.utime(path, (now - 2 * DAY, now - 2 * DAY))
    rbd = (
        "<disk type='network' device='disk'><source protocol='rbd' name='p/i'>"
        "<host name='192.0.2.1'/></source><target dev='sdz' bus='scsi'/></disk>"
    )
    domains = sorted(set(disks) | set(os_files) | networks)
    xml = [
        domain_xml(
            f"dom{d}",
            disks=disks.get(d, []),
            os_files=os_files.get(d),
            extra_devices=rbd if d in networks else "",
            active=active.get(d, False),
        )
        for d in domains
    ]
    point(host, node(tmp_path, *xml))
    return host, kept, incomplete, fifos


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(uses=USES)
def test_no_hostile_libvirt_host_loses_an_entry_a_domain_uses(
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str], uses: list[Use]
) -> None:
    tmp_path = tmp_path_factory.mktemp("host")
    try:
        host, kept, incomplete, fifos = build(tmp_path, uses)
        with OpenWatch(*fifos) as watch:
            code, doc = cli(host, capsys, "clean", now=time.time())
            assert watch.opened() == set(), "a FIFO named as a disk was opened"
        left = {p.name for p in host.cache.iterdir()}
        assert kept <= left, (kept - left, doc["problems"])
        if incomplete:
            assert code == 1 and not doc["complete"]
            assert left >= set(ENTRIES), "an incomplete view removed something"
        else:
            assert code == 0, doc["problems"]
            assert left & set(ENTRIES) == kept, "an entry no domain uses was kept"
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)

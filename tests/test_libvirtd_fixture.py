"""tests/libvirtd.py gives a REAL libvirtd that runs a TCG guest on a real qcow2 chain.

The guest holds qemu's image locks and libvirt publishes the chain it resolved in the live XML,
as on a compute host: the "disk in use" situation other tests build on. Skipped unless root
with libvirtd and qemu-system-x86 installed (dev/bootstrap.sh).
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from tests.libvirtd import define_tcg_domain, running_libvirtd

SYSTEM_SOCKET = Path("/run/libvirt/libvirt-sock")


def _qemu_img_info(path: Path) -> subprocess.CompletedProcess[str]:
    """``qemu-img info`` WITHOUT -U: it takes the image's shared lock, so it fails in use."""
    return subprocess.run(
        ["qemu-img", "info", str(path)], check=False, capture_output=True, text=True
    )


def test_a_started_tcg_domain_uses_its_chain_and_everything_goes_at_the_end(
    tmp_path: Path,
) -> None:
    base = tmp_path / "base.raw"
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "1M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)],
        check=True,
    )
    assert _qemu_img_info(overlay).returncode == 0
    system_socket_before = SYSTEM_SOCKET.exists()

    with running_libvirtd(log_file=tmp_path / "libvirtd.log") as uri:
        private_tree = Path(uri.partition("?socket=")[2]).parent.parent
        assert uri.startswith("qemu:///system?socket=/tmp/")
        assert SYSTEM_SOCKET.exists() == system_socket_before  # the machine's socket untouched

        define_tcg_domain(uri, "ic-guest", overlay, start=True)
        conn = libvirt.open(uri)
        try:
            dom = conn.lookupByName("ic-guest")
            assert dom.isActive()
            disk = ET.fromstring(dom.XMLDesc(0)).find("devices/disk")
            assert disk is not None
            source = disk.find("source")
            assert source is not None and source.get("file") == str(overlay)
            backing = disk.find("backingStore/source")
            assert backing is not None and backing.get("file") == str(base)

            in_use = _qemu_img_info(overlay)
            assert in_use.returncode != 0
            assert 'Failed to get shared "write" lock' in in_use.stderr

            dom.destroy()
            dom.undefine()
            assert conn.listAllDomains() == []
        finally:
            conn.close()
        assert _qemu_img_info(overlay).returncode == 0, "qemu still holds the overlay's lock"

        define_tcg_domain(uri, "ic-left-running", overlay, start=True)  # the clean-up's job
        assert _qemu_img_info(overlay).returncode != 0

    assert _qemu_img_info(overlay).returncode == 0  # the domain left running was destroyed
    assert not private_tree.exists()  # sockets, state, logs of the daemon: all gone
    assert SYSTEM_SOCKET.exists() == system_socket_before

"""A hostile review of the libvirt source (issue 11): domain XML shapes, paths and Nova metadata
that lose a user, options that crash or hang a pass, and what an operator is told.

Every test runs real components: libvirt's test driver reading a node file, real qcow2 and VHD
images made by ``qemu-img``, the CLI. Each test was written against a bug the review found
(then fixed) or a rule it attacked that held; all are regression tests now.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from imagecache import naming
from imagecache.sources.libvirt import NOVA_NAMESPACES
from tests.opens import OpenWatch
from tests.qemu import make_overlay, qemu_img
from tests.test_executor import Host, cli, make_host, put
from tests.test_libvirt import DAY, domain_xml, node, nova_metadata, point

pytest.importorskip("libvirt", reason="libvirt-python is not installed")

A, B = "a" * 40, "b" * 40


def host_of(tmp_path: Path) -> Host:
    return make_host(tmp_path, libvirt_uri="", quarantine_seconds=0)


def old(*paths: Path) -> None:
    """Entries old again (making overlays on them reads them)."""
    for path in paths:
        os.utime(path, (time.time() - 2 * DAY,) * 2)


def clean(host: Host, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    return cli(host, capsys, "clean", now=time.time())


def codes(doc: dict[str, Any]) -> list[str]:
    return [p["code"] for p in doc["problems"]]


# --- Disk paths: the file qemu opens is not the one read -------------------------------------


@pytest.mark.parametrize("how", ["dangling", "loop"])
def test_a_domain_disk_that_is_an_unresolvable_symlink_blocks_removal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """/var/lib/libvirt/images/vm.qcow2 -> /mnt/nfs/vm.qcow2 with the volume not mounted: what
    the disk's chain uses is unknown, exactly as for a missing disk (domain-disk-missing), but a
    link that exists and resolves to nothing is skipped in silence and the view is complete."""
    host = host_of(tmp_path)
    base = put(host, A, 2 * DAY, now=time.time())
    link = tmp_path / "images" / "vm.qcow2"
    link.parent.mkdir()
    if how == "dangling":
        real = make_overlay(tmp_path / "mnt" / "vm.qcow2", base)
        old(base)
        real.parent.rename(tmp_path / "unmounted")  # the volume goes away
        link.symlink_to(real)
    else:
        other = tmp_path / "images" / "other"
        link.symlink_to(other)
        other.symlink_to(link)
    point(host, node(tmp_path, domain_xml("vm1", disks=[(str(link), "qcow2")])))

    code, doc = clean(host, capsys)
    assert base.exists(), "an entry a domain's unreachable disk may use was removed"
    assert code == 1 and not doc["complete"], doc["problems"]


def test_a_disk_path_with_dotdot_through_a_symlinked_directory_is_read_where_qemu_opens_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``os.path.normpath`` drops ``lnk/..`` lexically; the kernel (and qemu) resolve ``lnk``
    first. The source read is another file, and the real disk's base loses its user."""
    host = host_of(tmp_path)
    base = put(host, A, 2 * DAY, now=time.time())
    target = tmp_path / "vol" / "deep" / "sub"
    target.mkdir(parents=True)
    real = make_overlay(tmp_path / "vol" / "deep" / "disk.qcow2", base)
    old(base)
    (tmp_path / "inst").mkdir()
    (tmp_path / "inst" / "lnk").symlink_to(target)
    (tmp_path / "inst" / "disk.qcow2").write_bytes(b"\0" * 65536)  # what normpath names
    named = f"{tmp_path}/inst/lnk/../disk.qcow2"
    assert os.stat(named).st_ino == real.stat().st_ino  # what qemu opens
    point(host, node(tmp_path, domain_xml("vm1", disks=[(named, "qcow2")])))

    code, doc = clean(host, capsys)
    assert base.exists(), (code, doc["problems"])


def test_a_tab_in_a_disk_path_is_read_as_libvirt_wrote_it_not_as_a_space(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """libvirt writes a tab (newline, CR) in an attribute raw; XML attribute-value normalization
    turns it into a space, so ElementTree names another file (here a raw decoy with a space)."""
    host = host_of(tmp_path)
    base = put(host, A, 2 * DAY, now=time.time())
    real = make_overlay(tmp_path / "vols" / "vm\t1.qcow2", base)
    old(base)
    (tmp_path / "vols" / "vm 1.qcow2").write_bytes(b"\0" * 65536)
    point(host, node(tmp_path, domain_xml("vm1", disks=[(str(real), "qcow2")])))

    code, doc = clean(host, capsys)
    assert base.exists(), (code, doc["problems"])


def test_a_relative_disk_path_is_not_a_complete_view_that_removes_its_base(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """libvirt's qemu driver accepts a relative source (qemu:///embed loads it); qemu resolves it
    against libvirtd's working directory (/). imagecache counts it by basename and reads no chain,
    in silence: the overlay's base goes."""
    host = host_of(tmp_path)
    base = put(host, A, 2 * DAY, now=time.time())
    real = make_overlay(tmp_path / "vols" / "vm.qcow2", base)
    old(base)
    relative = os.path.relpath(real, "/")
    point(host, node(tmp_path, domain_xml("vm1", disks=[(relative, "qcow2")])))

    _, doc = clean(host, capsys)
    assert base.exists() or not doc["complete"], "a relative disk's base was removed in silence"


# --- Files a domain uses that are not read --------------------------------------------------


@pytest.mark.parametrize("how", ["filesystem-file-qcow2", "filesystem-file-raw", "nvram-template"])
def test_files_a_domain_names_outside_disk_and_os_kernel_are_users(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """``<filesystem type='file'>`` (LXC, qemu-nbd: a qcow2 overlay or a raw image) and
    ``<nvram template=...>`` (copied at first start) are files libvirt opens for the domain."""
    host = host_of(tmp_path)
    base = put(host, A, 2 * DAY, now=time.time())
    overlay = make_overlay(tmp_path / "v" / "root.qcow2", base)
    old(base)
    extra, os_part = "", ""
    if how == "filesystem-file-qcow2":
        extra = (
            "<filesystem type='file' accessmode='passthrough'><driver type='nbd' format='qcow2'/>"
            f"<source file='{overlay}'/><target dir='/'/></filesystem>"
        )
    elif how == "filesystem-file-raw":
        extra = (
            "<filesystem type='file' accessmode='passthrough'><driver type='loop' format='raw'/>"
            f"<source file='{base}'/><target dir='/'/></filesystem>"
        )
    else:
        os_part = (
            f"<loader readonly='yes' type='pflash'>{tmp_path / 'OVMF_CODE.fd'}</loader>"
            f"<nvram template='{base}'>{tmp_path / 'vm1_VARS.fd'}</nvram>"
        )
    xml = domain_xml("vm1", extra_devices=extra).replace("</os>", os_part + "</os>")
    point(host, node(tmp_path, xml))

    code, doc = clean(host, capsys)
    assert "libvirt-unavailable" not in codes(doc), doc["problems"]  # the XML is libvirt's
    assert base.exists(), (how, code, doc["problems"])


def test_a_libvirt_chain_deeper_than_64_still_protects_its_base(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A running domain's deleted disk: only libvirt's backingStore says what it uses, and it is
    cut at depth 64 in silence (no problem), so a base at depth 70 goes."""
    host = host_of(tmp_path)
    base = put(host, A, 2 * DAY, now=time.time())
    inner = f"<backingStore type='file'><format type='raw'/><source file='{base}'/><backingStore/></backingStore>"  # noqa: E501
    for i in range(69):
        inner = (
            f"<backingStore type='file'><format type='qcow2'/><source file='{tmp_path}/l{i}'/>"
            f"{inner}</backingStore>"
        )
    disk = (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{tmp_path / 'deleted' / 'disk'}'/>{inner}"
        "<target dev='vda' bus='virtio'/></disk>"
    )
    point(host, node(tmp_path, domain_xml("vm1", extra_devices=disk, active=True)))

    code, doc = clean(host, capsys)
    assert base.exists(), (code, doc["problems"])


# --- Guest bytes read as a header ------------------------------------------------------------


def test_a_fixed_vhd_whose_guest_wrote_a_qcow2_header_opens_nothing_it_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fixed VHD (``<driver type='vpc'>``) keeps guest data from offset 0 and its footer at the
    end: qemu reads it as vpc, so a qcow2 header at offset 0 is the guest's bytes. Only
    ``type='raw'`` (or none) is treated as guest-written; the forged header names a host file
    and that file is opened."""
    host = host_of(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"host file" * 100)
    vhd = tmp_path / "vols" / "d.vhd"
    vhd.parent.mkdir()
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", vhd, "1M")
    forged = make_overlay(tmp_path / "forged.qcow2", secret, backing_fmt="qcow2", unsafe_size="1M")
    with open(vhd, "r+b") as f:  # what the guest wrote to its first sector(s)
        f.write(forged.read_bytes()[:4096])
    assert "file format: vpc" in qemu_img("info", "-f", "vpc", vhd)  # qemu still reads it as vpc
    point(host, node(tmp_path, domain_xml("vm1", disks=[(str(vhd), "vpc")])))

    with OpenWatch(secret) as watch:
        cli(host, capsys, "plan", now=time.time())
        assert watch.opened() == set(), "a file named by a guest-written header was opened"


# --- Nova metadata ---------------------------------------------------------------------------


def test_nova_metadata_in_both_namespaces_protects_both_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1.1 and 1.0 both present with different images: only the first namespace is read, the
    other image's base goes. Keeping both is the safe reading."""
    host = host_of(tmp_path)
    new, legacy = "11111111-1111-4111-8111-111111111111", "00000000-0000-4000-8000-000000000000"
    kept = [put(host, naming.fingerprint(i), 2 * DAY, now=time.time()) for i in (new, legacy)]
    first = nova_metadata(new, ns=NOVA_NAMESPACES[0]).replace("</metadata>", "")
    metadata = first + nova_metadata(legacy, ns=NOVA_NAMESPACES[1]).replace("<metadata>", "")
    point(host, node(tmp_path, domain_xml("instance-00000001", nova=metadata)))

    code, doc = clean(host, capsys)
    assert all(p.exists() for p in kept), (code, doc["problems"])


# --- Options, output, act time ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_timeout_that_is_no_number_of_seconds_is_a_config_error_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """``nan`` passes ``min=0.1`` (every comparison is false) and waits forever on a hung
    daemon; ``inf`` raises OverflowError from ``Queue.get`` (a traceback) once the listing is
    not instant. Either must be exit 2 naming the option."""
    host = host_of(tmp_path)
    point(host, node(tmp_path, domain_xml("vm1")))
    text = host.config.read_text()
    host.config.write_text(
        text.replace("[imagecache]\n", f"[imagecache]\nlibvirt_timeout_seconds = {value}\n")
    )
    code, doc = cli(host, capsys, "plan", now=time.time())
    assert code == 2, doc.get("problems")
    assert "libvirt_timeout_seconds" in doc["error"]


def test_a_running_domains_network_disk_is_noted_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A running persistent domain's live and inactive XML are both parsed, and each adds the
    same network-disk note: every such disk is reported twice."""
    host = host_of(tmp_path)
    put(host, A, 2 * DAY, now=time.time())
    rbd = (
        "<disk type='network' device='disk'><source protocol='rbd' name='p/i'>"
        "<host name='192.0.2.1'/></source><target dev='sdz' bus='scsi'/></disk>"
    )
    point(host, node(tmp_path, domain_xml("vm1", extra_devices=rbd, active=True)))
    code, doc = cli(host, capsys, "plan", now=time.time())
    assert code == 0
    assert codes(doc).count("domain-network-disk") == 1, doc["problems"]


def test_libvirt_gone_between_plan_and_clean_says_why_nothing_was_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing is removed when libvirt stops answering after the plan, and the report says why
    (the act-time observation's blocking problems are the pass's own)."""
    host = host_of(tmp_path)
    base = put(host, A, 2 * DAY, now=time.time())
    uri = node(tmp_path, domain_xml("vm1"))
    point(host, uri)
    saved = tmp_path / "plan.json"
    code, doc = cli(host, capsys, "plan", "-o", str(saved), now=time.time())
    assert code == 0 and doc["entries"][0]["action"] == "remove"
    text = host.config.read_text()
    host.config.write_text(text.replace(uri, "qemu:///system?socket=/nonexistent/sock"))

    code, doc = cli(host, capsys, "clean", "--plan", str(saved), now=time.time())
    assert code == 1 and base.exists()  # the data-safety half holds
    assert "libvirt-unavailable" in json.dumps(doc), "the report does not say why"


# --- What held up (kept as regression tests) -------------------------------------------------


def test_held_up_libvirt_python_missing_in_a_real_process_is_a_clear_blocking_problem(
    tmp_path: Path,
) -> None:
    host = host_of(tmp_path)
    base = put(host, A, 2 * DAY, now=time.time())
    point(host, node(tmp_path, domain_xml("vm1")))
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('libvirt', 'libvirtmod'):\n"
        "            raise ImportError('hidden: ' + name)\n"
        "sys.meta_path.insert(0, _Hide())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(hide))
    argv = [sys.executable, "-m", "imagecache", "--config-file", str(host.config), "--json"]
    done = subprocess.run(
        [*argv, "clean"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    doc = json.loads(done.stdout)
    problem = next(p for p in doc["problems"] if p["code"] == "libvirt-unavailable")
    assert problem["blocking"] and "libvirt-python is not installed" in problem["message"]
    assert base.exists()


def test_held_up_control_characters_in_domain_names_are_escaped_in_text_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from imagecache.cli import main

    host = host_of(tmp_path)
    base = put(host, A, 2 * DAY, now=time.time())
    name = "evil\tname\u202e\u200bx"
    point(host, node(tmp_path, domain_xml(name, os_files={"kernel": str(base)})))
    argv = ["--config-file", str(host.config), "--inventory", str(host.inventory)]
    for args in (["explain", A], ["status"], ["plan"]):
        main([*argv, *args], clock=time.time)
        out = capsys.readouterr().out
        assert "\t" not in out and "\u202e" not in out and "\u200b" not in out, args
        assert "evil\\tname" in out, (args, out)

"""libvirt's domains as users (issue 11, part 1), against libvirt itself: the test driver
(``test:///node.xml``, every domain as libvirt parses it, inactive ones included) and the
embedded QEMU driver (``qemu:///embed?root=DIR``, domains defined as on a real host).

Each test that says something is kept also runs the same host with libvirt turned off, to show
that without the domain the entry would go: the domain is what keeps it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import pytest

from imagecache import naming
from imagecache.layout import Layout
from imagecache.model import ProblemCode, Source
from imagecache.settings import LibvirtSettings
from imagecache.sources.libvirt import NOVA_NAMESPACES, observe_domains, parse_domain
from tests.qemu import make_overlay
from tests.test_executor import Host, cli, make_host, put

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

A, B, K, R = "a" * 40, "b" * 40, "c" * 40, "d" * 40
DAY = 86400.0
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"


def domain_xml(
    name: str,
    *,
    disks: list[tuple[str, str | None]] = (),  # type: ignore[assignment]
    os_files: dict[str, str] | None = None,
    nova: str | None = None,
    active: bool = False,
    kind: str = "test",
    extra_devices: str = "",
    uuid: str | None = None,
) -> str:
    """A domain; ``disks`` are (path, driver type or None); inactive unless ``active``."""
    devices = "".join(
        "<disk type='file' device='disk'>"
        + (f"<driver name='qemu' type='{fmt}'/>" if fmt else "")
        + f"<source file={quoteattr(path)}/><target dev='vd{chr(97 + i)}' bus='virtio'/></disk>"
        for i, (path, fmt) in enumerate(disks)
    )
    os_part = "".join(f"<{tag}>{path}</{tag}>" for tag, path in (os_files or {}).items())
    arch = "<type arch='x86_64' machine='pc'>hvm</type>" if kind == "qemu" else "<type>hvm</type>"
    state = "" if active or kind != "test" else "<test:runstate>5</test:runstate>"
    ns = f" xmlns:test='{TEST_NS}'" if kind == "test" else ""
    return (
        f"<domain type='{kind}'{ns}><name>{name}</name>"
        f"<uuid>{uuid or uuidlib.uuid5(uuidlib.NAMESPACE_DNS, name)}</uuid>{state}"
        f"{nova or ''}<memory>65536</memory><os>{arch}{os_part}</os>"
        f"<devices>{devices}{extra_devices}</devices></domain>"
    )


def nova_metadata(
    image: str | None, *, swap: object = 0, ephemeral: object = 0, ns: str = NOVA_NAMESPACES[0]
) -> str:
    root = f"<nova:root type='image' uuid='{image}'/>" if image else ""
    return (
        f"<metadata><nova:instance xmlns:nova='{ns}'><nova:name>vm</nova:name>"
        f"<nova:flavor name='m1'><nova:memory>64</nova:memory><nova:disk>1</nova:disk>"
        f"<nova:swap>{swap}</nova:swap><nova:ephemeral>{ephemeral}</nova:ephemeral></nova:flavor>"
        f"{root}</nova:instance></metadata>"
    )


def node(tmp_path: Path, *domains: str) -> str:
    """A test-driver connection URI whose node holds ``domains`` (nothing else)."""
    path = tmp_path / f"node-{len(list(tmp_path.glob('node-*')))}.xml"
    path.write_text("<node>" + "".join(domains) + "</node>")
    return f"test://{path}"


def libvirt_host(tmp_path: Path, uri: str, **options: object) -> Host:
    return make_host(tmp_path, libvirt_uri=uri, quarantine_seconds=0, **options)


def point(host: Host, uri: str) -> None:
    """Point a host made before its domains at their connection."""
    text = host.config.read_text()
    host.config.write_text(text.replace("libvirt_uri = \n", f"libvirt_uri = {uri}\n"))


def entry(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in doc["entries"] if e["name"] == name)


def libvirt_users(doc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [u for u in entry(doc, name)["users"] if u["source"] == "libvirt"]


def codes(doc: dict[str, Any]) -> set[str]:
    return {p["code"] for p in doc["problems"]}


def clean(host: Host, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    return cli(host, capsys, "clean", now=time.time())


def plan(host: Host, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, doc = cli(host, capsys, "plan", now=time.time())
    assert code in (0, 1)
    return doc


def off(host: Host, *kept: Path) -> None:
    """The same host with libvirt turned off, and the entries the pass touched (in use) old
    again: what the domains kept is no longer kept."""
    text = host.config.read_text()
    host.config.write_text(text.replace("libvirt_uri = ", "libvirt_uri = none\n#"))
    for path in kept:
        os.utime(path, (time.time() - 2 * DAY,) * 2)


def test_a_base_used_only_by_a_shut_off_domain_outside_instances_path_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "volumes" / "vm1.qcow2"  # not under instances_path
    # The host is made first (it creates the cache); the node names the overlay on its base.
    host = libvirt_host(tmp_path, "")
    base = put(host, A, 2 * DAY, now=time.time())
    make_overlay(elsewhere, base)
    os.utime(base, (time.time() - 2 * DAY,) * 2)
    uri = node(tmp_path, domain_xml("vm1", disks=[(str(elsewhere), "qcow2")]))
    point(host, uri)

    code, doc = clean(host, capsys)
    assert code == 0, doc["problems"]
    assert base.exists()
    users = {(u["ref"], u["detail"]) for u in libvirt_users(doc, A)}
    assert ("vm1", f"direct backing file of {elsewhere}") in users
    assert entry(doc, A)["reason"] == "in-use"

    off(host, base)
    code, doc = clean(host, capsys)
    assert code == 0 and not base.exists(), doc["problems"]


def test_a_kernel_and_initrd_named_only_by_a_domains_os_are_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = libvirt_host(tmp_path, "")
    kernel = put(host, K, 2 * DAY, now=time.time())
    initrd = put(host, R, 2 * DAY, now=time.time())
    other = put(host, B, 2 * DAY, now=time.time())
    # The initrd through a link under another name: it counts as the file it is.
    link = tmp_path / "boot" / "initrd.img"
    link.parent.mkdir()
    link.symlink_to(initrd)
    os_files = {"kernel": str(kernel), "initrd": str(link)}
    uri = node(tmp_path, domain_xml("vm1", os_files=os_files))
    point(host, uri)

    code, doc = clean(host, capsys)
    assert code == 0, doc["problems"]
    assert kernel.exists() and initrd.exists() and not other.exists()
    assert {u["detail"] for u in libvirt_users(doc, K)} == {f"kernel: {kernel}"}
    assert {u["detail"] for u in libvirt_users(doc, R)} == {f"initrd: {link} via {link}"}

    off(host, kernel, initrd)
    code, doc = clean(host, capsys)
    assert code == 0 and not kernel.exists() and not initrd.exists()


@pytest.mark.parametrize("ns", NOVA_NAMESPACES)
def test_an_image_id_in_novas_domain_metadata_protects_its_entries_as_a_record_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ns: str
) -> None:
    image = "7d3c7f2e-1d0b-4e8a-9a57-5f7b0e4c2a11"
    fp = naming.fingerprint(image)
    swap, ephemeral = naming.swap_name(256), naming.ephemeral_name(4, None)
    names = (fp, fp + "_sm", image, swap, ephemeral)
    host = libvirt_host(tmp_path, "")
    text = host.config.read_text()  # legacy-id entries go too (Nova's [libvirt] option)
    host.config.write_text(text.replace("[libvirt]\n", "[libvirt]\nremove_unused_kernels = true\n"))
    paths = [put(host, n, 2 * DAY, now=time.time()) for n in names]
    unrelated = put(host, B, 2 * DAY, now=time.time())
    metadata = nova_metadata(image, swap=256, ephemeral=4, ns=ns)
    uri = node(tmp_path, domain_xml("instance-00000001", nova=metadata, active=True))
    point(host, uri)

    code, doc = clean(host, capsys)
    assert code == 0, doc["problems"]
    assert all(p.exists() for p in paths) and not unrelated.exists()
    domain_uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, "instance-00000001"))
    for name in names:
        users = entry(doc, name)["users"]
        assert [u["ref"] for u in users if u["source"] == "instance"] == [domain_uuid], name

    off(host, *paths)
    code, doc = clean(host, capsys)
    assert code == 0 and not any(p.exists() for p in paths), doc["problems"]


@pytest.mark.parametrize(
    "options",
    [
        {"libvirt_uri": "qemu:///system?socket=/nonexistent/libvirt-sock"},
        # Nova's own option says libvirt runs here: it is not optional either.
        {"libvirt_uri": "", "connection_uri": "qemu:///system?socket=/nonexistent/sock"},
    ],
    ids=["libvirt_uri", "nova-connection_uri"],
)
def test_libvirt_configured_but_down_removes_nothing_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: dict[str, str]
) -> None:
    host = make_host(tmp_path, quarantine_seconds=0, libvirt_uri=options["libvirt_uri"])
    if "connection_uri" in options:
        text = host.config.read_text().replace("libvirt_uri = \n", "")
        host.config.write_text(
            text.replace(
                "[libvirt]\n", f"[libvirt]\nconnection_uri = {options['connection_uri']}\n"
            )
        )
    base = put(host, A, 2 * DAY, now=time.time())

    code, doc = clean(host, capsys)
    assert code == 1
    assert base.exists()
    assert "libvirt-unavailable" in codes(doc)
    problem = next(p for p in doc["problems"] if p["code"] == "libvirt-unavailable")
    assert problem["blocking"] and "nothing is removed" in problem["message"]


def test_libvirt_not_configured_and_not_running_is_off_with_a_note(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path), "_base")
    unconfigured = LibvirtSettings(
        uri="qemu:///system?socket=/nonexistent", configured=False, timeout=5
    )
    found = observe_domains(unconfigured, layout, host="h1", sockets=[str(tmp_path / "no-sock")])
    assert [p.code for p in found.problems] == [ProblemCode.LIBVIRT_OFF]
    assert not found.problems[0].blocking
    # A daemon socket on the host: libvirt runs here, so not answering is not optional.
    sock = tmp_path / "libvirt-sock"
    sock.touch()
    found = observe_domains(unconfigured, layout, host="h1", sockets=[str(sock)])
    assert [p.code for p in found.problems] == [ProblemCode.LIBVIRT_UNAVAILABLE]
    assert found.problems[0].blocking


def test_a_network_disk_is_noted_not_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rbd = (
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
        "<source protocol='rbd' name='vms/vm1_disk'><host name='192.0.2.1' port='6789'/></source>"
        "<target dev='vdz' bus='virtio'/></disk>"
    )
    uri = node(tmp_path, domain_xml("vm1", extra_devices=rbd))
    host = libvirt_host(tmp_path, uri)
    base = put(host, A, 2 * DAY, now=time.time())

    code, doc = clean(host, capsys)
    assert code == 0
    assert not base.exists()
    notes = [p for p in doc["problems"] if p["code"] == "domain-network-disk"]
    assert len(notes) == 1 and not notes[0]["blocking"]
    assert "rbd vms/vm1_disk" in notes[0]["message"] or "rbd:vms/vm1_disk" in notes[0]["message"]


@pytest.mark.parametrize(
    ("swap", "why"),
    [("-1", "not a size"), ("1e3", "not a size"), ("99999999999999999999", "not a size")],
)
def test_a_domain_whose_nova_metadata_cannot_be_read_blocks_removal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], swap: str, why: str
) -> None:
    uri = node(tmp_path, domain_xml("vm1", nova=nova_metadata("x", swap=swap)))
    host = libvirt_host(tmp_path, uri)
    base = put(host, A, 2 * DAY, now=time.time())

    code, doc = clean(host, capsys)
    assert code == 1 and base.exists()
    problem = next(p for p in doc["problems"] if p["code"] == "domain-unreadable")
    assert problem["blocking"] and why in problem["message"] and "vm1" in problem["ref"]


def test_a_missing_disk_of_a_defined_domain_blocks_removal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = tmp_path / "unmounted" / "vm1.qcow2"
    uri = node(tmp_path, domain_xml("vm1", disks=[(str(gone), "qcow2")]))
    host = libvirt_host(tmp_path, uri)
    base = put(host, A, 2 * DAY, now=time.time())

    code, doc = clean(host, capsys)
    assert code == 1 and base.exists()
    problem = next(p for p in doc["problems"] if p["code"] == "domain-disk-missing")
    assert str(gone) in problem["message"] and problem["blocking"]


@pytest.mark.parametrize("active", [True, False], ids=["running", "shut-off"])
def test_a_disk_deleted_under_a_running_domain_hides_nothing_libvirts_chain_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], active: bool
) -> None:
    host = libvirt_host(tmp_path, "")
    base = put(host, A, 2 * DAY, now=time.time())
    gone = tmp_path / "deleted" / "disk"
    chain = (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{gone}'/><backingStore type='file'><format type='raw'/>"
        f"<source file='{base}'/><backingStore/></backingStore>"
        "<target dev='vda' bus='virtio'/></disk>"
    )
    point(host, node(tmp_path, domain_xml("vm1", extra_devices=chain, active=active)))

    code, doc = clean(host, capsys)
    assert base.exists()
    if active:  # libvirt resolved the chain of what qemu has open: nothing hidden
        assert code == 0 and "domain-disk-deleted" in codes(doc), doc["problems"]
        assert libvirt_users(doc, A)
    else:  # a defined domain's missing disk may be a volume not mounted: unknown
        assert code == 1 and "domain-disk-missing" in codes(doc)


def test_a_raw_domain_disk_is_a_guests_bytes_whose_header_names_are_never_opened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.opens import OpenWatch

    host = libvirt_host(tmp_path, "")
    base = put(host, A, 2 * DAY, now=time.time())
    secret = tmp_path / "secret"
    secret.write_bytes(b"host file")
    # The guest wrote a qcow2 header into its raw disk naming a host file and the base.
    forged = make_overlay(tmp_path / "vols" / "raw-disk", secret)
    chained = make_overlay(tmp_path / "vols" / "raw-disk-2", base)
    os.utime(base, (time.time() - 2 * DAY,) * 2)
    disks = [(str(forged), "raw"), (str(chained), None)]
    uri = node(tmp_path, domain_xml("vm1", disks=disks))
    point(host, uri)

    with OpenWatch(secret) as watch:  # (the base is opened: the cache scan reads entries)
        doc = plan(host, capsys)
        assert watch.opened() == set()
    # What a forged header names still counts (keeping too much is safe); nothing is blocked.
    assert doc["complete"], doc["problems"]
    assert libvirt_users(doc, A)


def test_hostile_domain_xml_is_refused_with_a_reason_never_a_crash() -> None:
    for text, why in [
        ("<!DOCTYPE d [<!ENTITY a 'aaaa'>]><domain>&a;</domain>", "document type"),
        ("<domain><devices><disk", "does not parse"),
        ("x" * (16 << 20 + 1), "larger than"),
        (domain_xml("d", nova=nova_metadata("i", ephemeral="four")), "not a size"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_domain(text)
    parsed = parse_domain(domain_xml("d", disks=[("relative/disk", "qcow2")]))
    assert parsed.sources == [("disk vda", "relative/disk", "qcow2")]


def test_libvirt_users_are_listed_with_source_libvirt_in_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = libvirt_host(tmp_path, "")
    base = put(host, A, 2 * DAY, now=time.time())
    disk = make_overlay(tmp_path / "v" / "d.qcow2", base)
    uri = node(tmp_path, domain_xml("vm1", disks=[(str(disk), "qcow2")]))
    point(host, uri)
    doc = plan(host, capsys)
    assert {u["source"] for u in entry(doc, A)["users"]} == {Source.LIBVIRT.value}


def test_embedded_qemu_driver_domains_are_seen_like_a_hosts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not Path("/usr/bin/qemu-system-x86_64").exists():
        pytest.skip("qemu-system-x86 is not installed (dev/bootstrap.sh installs it)")
    root = tmp_path / "libvirt"
    uri = f"qemu:///embed?root={root}"
    host = libvirt_host(tmp_path, uri)
    base = put(host, A, 2 * DAY, now=time.time())
    other = put(host, B, 2 * DAY, now=time.time())
    disk = make_overlay(tmp_path / "elsewhere" / "disk.qcow2", base)
    os.utime(base, (time.time() - 2 * DAY,) * 2)
    # Defined as libvirtd keeps a defined domain: its XML in the driver's configuration
    # directory, read when the driver starts (defineXML through the embedded driver re-probes
    # qemu's capabilities for half a minute on this machine; loading them probes once).
    config = root / "etc" / "qemu"
    config.mkdir(parents=True)
    xml = domain_xml("embedded", disks=[(str(disk), "qcow2")], kind="qemu")
    (config / "embedded.xml").write_text(xml)
    # In a process of its own: once the embedded driver is loaded, it claims every qemu:/// URI
    # of its process (qemu:///system included), which the other tests here connect to.
    argv = [sys.executable, "-m", "imagecache", "--config-file", str(host.config), "--json"]
    done = subprocess.run(
        [*argv, "clean"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert base.exists() and not other.exists()
    assert [u["ref"] for u in libvirt_users(doc, A)] == ["embedded"]


def test_a_real_libvirtd_guest_keeps_its_base_until_destroyed_and_undefined(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's end-to-end case: a TCG guest under a real libvirtd, on an overlay of a base.

    Running, the base is kept by its disk, its domain and qemu holding it open; with its instance
    directory deleted it is still kept, by the live domain (libvirt's resolved chain) and the open
    file; destroyed and undefined, it goes once its age has passed.
    """
    from tests.libvirtd import define_tcg_domain, running_libvirtd
    from tests.test_executor import use

    host = libvirt_host(tmp_path, "")
    base = put(host, A, 2 * DAY, now=time.time())
    other = put(host, B, 2 * DAY, now=time.time())
    disk = use(host, A, "inst-1")
    with running_libvirtd(log_file=tmp_path / "libvirtd.log") as uri:
        point(host, uri)
        define_tcg_domain(uri, "instance-00000001", disk, start=True)

        code, doc = clean(host, capsys)
        assert code == 0, doc["problems"]
        assert base.exists() and not other.exists()
        sources = {u["source"] for u in entry(doc, A)["users"]}
        assert sources == {"backing", "libvirt", "open-file"}, entry(doc, A)["users"]

        shutil.rmtree(disk.parent)  # the instance directory is gone; qemu still runs on it
        os.utime(base, (time.time() - 2 * DAY,) * 2)
        code, doc = clean(host, capsys)
        assert code == 0, doc["problems"]
        assert base.exists()
        users = entry(doc, A)["users"]
        assert {u["source"] for u in users} == {"libvirt", "open-file"}, users
        assert any("(libvirt)" in u["detail"] for u in users if u["source"] == "libvirt")
        assert "domain-disk-deleted" in codes(doc)  # noted: the live chain said what it used

        conn = libvirt.open(uri)
        try:
            domain = conn.lookupByName("instance-00000001")
            domain.destroy()
            domain.undefine()
        finally:
            conn.close()
        os.utime(base, (time.time() - 2 * DAY,) * 2)
        code, doc = clean(host, capsys)
        assert code == 0, doc["problems"]
        assert not base.exists()


def test_a_libvirtd_that_never_answers_costs_one_timeout_and_one_thread(tmp_path: Path) -> None:
    """A hung daemon (it accepts, then says nothing): the pass waits ``timeout`` once, the view
    is incomplete, and while that listing stays blocked no second thread is started."""
    import socket
    import threading

    path = tmp_path / "hung-sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    layout = Layout(str(tmp_path), "_base")
    hung = LibvirtSettings(uri=f"qemu:///system?socket={path}", configured=True, timeout=0.5)
    try:
        started = time.monotonic()
        found = observe_domains(hung, layout, host="h1")
        assert time.monotonic() - started < 5
        [problem] = found.problems
        assert problem.code is ProblemCode.LIBVIRT_UNAVAILABLE and problem.blocking
        assert "no answer within 0.5 s" in problem.message
        before = threading.active_count()
        found = observe_domains(hung, layout, host="h1")
        assert "still not returned" in found.problems[0].message
        assert threading.active_count() == before
    finally:
        stop.set()
        acceptor.join()
        for conn in accepted:
            conn.close()  # the blocked listing gets its error and ends
        server.close()
    deadline = time.monotonic() + 10
    while "still not returned" in observe_domains(hung, layout, host="h1").problems[0].message:
        assert time.monotonic() < deadline, "the blocked listing never ended"
        time.sleep(0.05)

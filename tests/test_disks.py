"""Instance disks on cached bases: real qemu-img overlays, real mkswap and mkfs, a real Glance."""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from imagecache import locks, naming
from imagecache import sources as scan
from imagecache.errors import ImageFormatError, LockTimeout, UnsafeImageError, UsageError
from imagecache.images.fetch import FetchOptions
from imagecache.images.glance import GlanceClient
from imagecache.images.overlays import DiskRequest, create_disks
from imagecache.images.url import UrlSource
from imagecache.layout import Layout
from imagecache.results import Result
from tests import qemu
from tests.defaults import fetch_options
from tests.glance_server import GlanceServer

UUID = "6b1f6a52-3c1e-4f4e-8d8e-0d5c1f3e2a10"
MIB = 1 << 20
CLI = (sys.executable, "-m", "imagecache")


def options(tmp_path: Path, *, lock_timeout: float = 60.0) -> FetchOptions:
    inst = tmp_path / "instances"
    return fetch_options(inst, lock_timeout=lock_timeout)


def blkid_type(path: Path) -> str:
    done = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip()


@pytest.fixture
def image_url(tmp_path: Path) -> str:
    return qemu.make_qcow2(tmp_path / "src" / "img.qcow2", "8M").as_uri()


def test_root_swap_and_ephemeral_overlays_with_disk_info(tmp_path: Path, image_url: str) -> None:
    opts = options(tmp_path)
    request = DiskRequest(
        instance=UUID,
        image=image_url,
        size=16 * MIB,
        swap_mb=64,
        ephemeral_gb=1,
        ephemeral_format="ext4",
    )

    made = create_disks(request, source=UrlSource(), options=opts)

    inst = tmp_path / "instances" / UUID
    cache = tmp_path / "instances" / "_base"
    base, swap, eph = naming.fingerprint(image_url), "swap_64", naming.ephemeral_name(1, "ext4")
    assert [(d.path.name, d.backing, d.result) for d in made] == [
        ("disk", base, Result.CACHED),
        ("disk.swap", swap, Result.CACHED),
        ("disk.local", eph, Result.CACHED),
    ]
    disk = qemu.info(inst / "disk")
    assert (disk["format"], disk["virtual-size"]) == ("qcow2", 16 * MIB)
    assert disk["backing-filename"] == str(cache / base)
    assert disk["backing-filename-format"] == "raw"
    for name, backing in (("disk.swap", swap), ("disk.local", eph)):
        assert qemu.info(inst / name)["backing-filename"] == str(cache / backing)
    assert blkid_type(cache / swap) == "swap" and (cache / swap).stat().st_size == 64 * MIB
    assert blkid_type(cache / eph) == "ext4" and (cache / eph).stat().st_size == 1 << 30
    assert json.loads((inst / "disk.info").read_text()) == {
        str(inst / "disk"): "qcow2",
        str(inst / "disk.swap"): "qcow2",
        str(inst / "disk.local"): "qcow2",
    }
    assert sorted(p.name for p in inst.iterdir()) == [
        "disk",
        "disk.info",
        "disk.local",
        "disk.swap",
    ]
    assert sorted(p.name for p in cache.iterdir() if p.name != ".imagecache") == sorted(
        [base, swap, eph]
    )


def test_again_leaves_disks_alone_and_touches_the_bases(tmp_path: Path, image_url: str) -> None:
    opts = options(tmp_path)
    request = DiskRequest(instance=UUID, image=image_url, swap_mb=16, ephemeral_gb=1)
    create_disks(request, source=UrlSource(), options=opts)
    cache = Path(opts.cache_dir)
    for entry in (e for e in cache.iterdir() if e.name != ".imagecache"):
        os.utime(entry, (1000, 1000))
    disk = Path(opts.instances_path, UUID, "disk")
    before = disk.read_bytes()

    again = create_disks(request, source=UrlSource(), options=opts)

    assert {d.result for d in again} == {Result.EXISTING} and disk.read_bytes() == before
    assert all(
        entry.stat().st_mtime > 1000 for entry in cache.iterdir() if entry.name != ".imagecache"
    )
    assert blkid_type(cache / naming.ephemeral_name(1, None)) == "vfat"


def test_overlay_waits_for_the_base_lock(tmp_path: Path, image_url: str) -> None:
    # The cleaner holds the base's lock while it decides; no overlay may appear meanwhile.
    opts = options(tmp_path, lock_timeout=0.2)
    name = naming.fingerprint(image_url)
    script = (
        "import sys, time; from imagecache import locks\n"
        "with locks.entry_lock(sys.argv[1], sys.argv[2], timeout=5):\n"
        "    print('held', flush=True); time.sleep(30)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, opts.instances_path, name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        # A holder that never prints must fail the test, not hang it.
        ready, _, _ = select.select([holder.stdout], [], [], 30)
        assert ready and holder.stdout.readline() == "held\n"
        with pytest.raises(LockTimeout):
            create_disks(
                DiskRequest(instance=UUID, image=image_url), source=UrlSource(), options=opts
            )
        assert not Path(opts.instances_path, UUID, "disk").exists()
        assert locks.is_locked(opts.instances_path, name)
    finally:
        holder.kill()
        holder.communicate()


def test_bad_requests(tmp_path: Path, image_url: str) -> None:
    opts = options(tmp_path)
    for request in (
        DiskRequest(instance="../x", image=image_url),
        DiskRequest(instance="_base", image=image_url),
        DiskRequest(instance=UUID, image=image_url, swap_mb=0),
    ):
        with pytest.raises(UsageError):
            create_disks(request, source=UrlSource(), options=opts)
    with pytest.raises(UsageError, match="smaller than the image"):
        create_disks(
            DiskRequest(instance=UUID, image=image_url, size=MIB), source=UrlSource(), options=opts
        )
    assert not Path(opts.instances_path, UUID, "disk").exists()


@pytest.mark.glance
def test_create_disk_command_from_glance(glance_server: GlanceServer, tmp_path: Path) -> None:
    image = qemu.make_qcow2(tmp_path / "g.qcow2", "4M")
    image_id = glance_server.upload(image, disk_format="qcow2")
    conf = tmp_path / "nova.conf"
    conf.write_text(
        f"[DEFAULT]\ninstances_path = {tmp_path / 'instances'}\nhost = h1\nmy_ip = 127.0.0.1\n"
        f"[glance]\napi_servers = {glance_server.endpoint}\n"
    )
    args = ["create-disk", "--image", image_id, "--instance", UUID, "--size", "1G", "--swap", "8"]
    done = subprocess.run(
        [*CLI, "--config-file", str(conf), "--json", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert [(Path(d["disk"]).name, d["result"]) for d in doc["disks"]] == [
        ("disk", "created"),
        ("disk.swap", "created"),
    ]
    info = qemu.info(tmp_path / "instances" / UUID / "disk")
    assert info["virtual-size"] == 1 << 30
    assert Path(info["backing-filename"]).name == naming.fingerprint(image_id)
    assert GlanceClient(glance_server.settings).get(image_id).virtual_size == 4 * MIB


# --- the base's format is the admitted one, never guessed from its bytes ------------------------


def _descriptor_over_host_file(tmp: Path) -> bytes:
    secret = tmp / "host-secret"
    secret.write_bytes(b"HOST-SECRET".ljust(MIB, b"\0"))
    return (
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\nRW 2048 FLAT "{secret}" 0\n'
    ).encode()


def test_qcow2_whose_guest_data_is_a_vmdk_descriptor_makes_no_disk(tmp_path: Path) -> None:
    # Converted to raw, the base would start with the descriptor; an overlay probing it (-F vmdk)
    # would show the guest the host file.
    guest = tmp_path / "guest.raw"
    guest.write_bytes(_descriptor_over_host_file(tmp_path).ljust(4 * MIB, b"\0"))
    image = tmp_path / "inner.qcow2"
    qemu.qemu_img("convert", "-f", "raw", "-O", "qcow2", guest, image)
    opts = options(tmp_path)

    with pytest.raises(UnsafeImageError):
        create_disks(
            DiskRequest(instance=UUID, image=image.as_uri()), source=UrlSource(), options=opts
        )
    assert not Path(opts.instances_path, UUID, "disk").exists()
    assert list(Path(opts.cache_dir).iterdir()) == []


@pytest.mark.parametrize("force_raw", [True, False])
def test_a_base_already_there_is_admitted_again(tmp_path: Path, force_raw: bool) -> None:
    # A base left by an older release (or written by someone else): checked as on download.
    opts = dataclasses.replace(options(tmp_path), force_raw=force_raw)
    url = (tmp_path / "gone.img").as_uri()  # never fetched: the base is found
    base = Path(opts.cache_dir, naming.fingerprint(url))
    base.parent.mkdir(parents=True)
    base.write_bytes(_descriptor_over_host_file(tmp_path).ljust(4 * MIB, b"\0"))

    with pytest.raises(ImageFormatError):
        create_disks(DiskRequest(instance=UUID, image=url), source=UrlSource(), options=opts)
    assert not Path(opts.instances_path, UUID, "disk").exists()


def test_force_raw_refuses_a_qcow2_base_already_there(tmp_path: Path) -> None:
    opts = options(tmp_path)
    url = (tmp_path / "gone.img").as_uri()
    base = Path(opts.cache_dir, naming.fingerprint(url))
    qemu.make_qcow2(base, "4M")
    with pytest.raises(UnsafeImageError, match="force_raw_images"):
        create_disks(DiskRequest(instance=UUID, image=url), source=UrlSource(), options=opts)
    assert not Path(opts.instances_path, UUID, "disk").exists()


def test_a_base_already_there_of_a_format_not_allowed_is_refused(tmp_path: Path) -> None:
    opts = dataclasses.replace(options(tmp_path), force_raw=False)
    url = (tmp_path / "gone.img").as_uri()
    base = Path(opts.cache_dir, naming.fingerprint(url))
    base.parent.mkdir(parents=True)
    qemu.qemu_img("create", "-q", "-f", "qed", base, "4M")
    with pytest.raises(UnsafeImageError, match="not an allowed disk format"):
        create_disks(DiskRequest(instance=UUID, image=url), source=UrlSource(), options=opts)
    assert not Path(opts.instances_path, UUID, "disk").exists()


@pytest.mark.parametrize(("fmt", "qemu_fmt"), [("vdi", "vdi"), ("vpc", "vpc"), ("vhdx", "vhdx")])
def test_without_force_raw_the_overlay_names_the_real_format(
    tmp_path: Path, fmt: str, qemu_fmt: str
) -> None:
    # Formats our parser reads as raw: the overlay must still say what qemu-img found.
    image = tmp_path / f"img.{fmt}"
    qemu.qemu_img("create", "-q", "-f", fmt, image, "4M")
    opts = dataclasses.replace(options(tmp_path), force_raw=False)
    create_disks(DiskRequest(instance=UUID, image=image.as_uri()), source=UrlSource(), options=opts)
    disk = qemu.info(Path(opts.instances_path, UUID, "disk"))
    assert disk["backing-filename-format"] == qemu_fmt


# --- instance names: only directories the cleaner scans ---------------------------------------


@pytest.mark.parametrize("cache_name", ["_base", "cache"])
def test_names_the_scanner_skips_are_refused(
    tmp_path: Path, image_url: str, cache_name: str
) -> None:
    # A disk in a directory the scanner skips has a base the cleaner would remove.
    inst = tmp_path / "instances"
    opts = fetch_options(inst, cache_name)
    # `_base_vm1` was accepted, then skipped by the scanner as a peer's cache (issue 8 A7):
    # both now ask Layout.is_instance_name.
    skipped = ("locks", cache_name, "_base_vm1", "_base", "a/b", "..", "", "\ud800")
    for name in skipped:
        with pytest.raises(UsageError):
            create_disks(
                DiskRequest(instance=name, image=image_url), source=UrlSource(), options=opts
            )
    made = [p.name for p in inst.iterdir()] if inst.exists() else []
    assert not any((inst / n / "disk").exists() for n in made), made
    assert all(not opts.layout.is_instance_name(n) for n in skipped)


def test_plain_instance_names_are_scanned(tmp_path: Path, image_url: str) -> None:
    opts = options(tmp_path)
    names = [UUID, "instance-0000002a", "_other"]
    for name in names:
        create_disks(DiskRequest(instance=name, image=image_url), source=UrlSource(), options=opts)
    disks, problems = scan.scan_instances(Layout(opts.instances_path, "_base"))
    assert problems == ()
    assert sorted(d.instance for d in disks) == sorted(names)

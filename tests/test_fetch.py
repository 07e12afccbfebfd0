"""Fetching into the cache from a real Glance (started by the suite), real files and qemu-img."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from imagecache import naming
from imagecache.errors import (
    ChecksumMismatch,
    ImageFormatError,
    ImageNotFound,
    ImageServiceUnreachable,
    ImageUnavailable,
    UnsafeImageError,
)
from imagecache.formats import read_header
from imagecache.images.fetch import FetchOptions, Sources, ensure_cached, precache
from imagecache.images.glance import GlanceClient
from imagecache.images.url import UrlSource
from imagecache.model import Kind
from imagecache.results import Result
from tests import qemu
from tests.defaults import fetch_options
from tests.defaults import glance as glance_settings
from tests.glance_server import GlanceServer

MIB = 1 << 20


def options(tmp_path: Path, **kw: Any) -> FetchOptions:
    inst = tmp_path / "instances"
    return fetch_options(inst, **kw)


def cache_files(opts: FetchOptions) -> list[str]:
    return sorted(p.name for p in Path(opts.cache_dir).iterdir() if p.is_file())


def pattern(size: int, seed: bytes = b"imagecache") -> bytes:
    block = hashlib.shake_256(seed).digest(MIB)
    return (block * (size // MIB + 1))[:size]


def nova_conf(tmp_path: Path, endpoint: str, **imagecache: object) -> Path:
    extra = "".join(f"{k} = {v}\n" for k, v in imagecache.items())
    conf = tmp_path / "nova.conf"
    conf.write_text(
        f"[DEFAULT]\ninstances_path = {tmp_path / 'instances'}\nhost = h1\nmy_ip = 127.0.0.1\n"
        f"[glance]\napi_servers = {endpoint}\n"
        f"[imagecache]\naudit_log = {tmp_path / 'audit.jsonl'}\n{extra}"
    )
    return conf


def cli(conf: Path, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "imagecache", "--config-file", str(conf), *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


Serve = Callable[[int, BaseHTTPRequestHandler], None]


@contextlib.contextmanager
def http_image(serve: Serve) -> Iterator[str]:
    """The URL of a tiny local HTTP server: ``serve(n, handler)`` answers its ``n``-th GET.

    For what Glance cannot be made to do: announce one size and send another, or stall.
    """
    count = itertools.count()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                serve(next(count), self)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/image.raw"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def send(handler: BaseHTTPRequestHandler, length: int, body: Iterable[bytes] = ()) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(length))
    handler.end_headers()
    for block in body:
        handler.wfile.write(block)


@pytest.fixture
def glance(glance_server: GlanceServer) -> GlanceClient:
    return GlanceClient(glance_server.settings)


# --- success ------------------------------------------------------------------------------------


@pytest.mark.glance
def test_raw_image_is_cached_byte_exact_once_then_touched(
    glance: GlanceClient, glance_server: GlanceServer, tmp_path: Path
) -> None:
    data = pattern(3 * MIB + 17)
    image_id = glance_server.upload(data)
    opts = options(tmp_path)

    got = ensure_cached(image_id, source=glance, options=opts)

    assert got.outcome is Result.CACHED and got.name == naming.fingerprint(image_id)
    assert got.path.read_bytes() == data and got.bytes == len(data)
    assert cache_files(opts) == [got.name]  # no temp file left behind
    assert Path(opts.instances_path, "locks", f"nova-{got.name}").is_file()
    os.utime(got.path, (1000, 1000))
    again = ensure_cached(image_id, source=glance, options=opts)
    assert again.outcome is Result.EXISTING and got.path.stat().st_mtime > 1000
    assert glance_server.downloads(image_id) == 1


@pytest.mark.glance
def test_a_download_asks_glance_for_the_metadata_once(
    glance: GlanceClient, glance_server: GlanceServer, tmp_path: Path
) -> None:
    image_id = glance_server.upload(pattern(MIB))
    asked = glance_server.access_log.read_text().count(f"GET /v2/images/{image_id} ")  # upload's
    got = ensure_cached(image_id, source=glance, options=options(tmp_path))
    assert got.outcome is Result.CACHED
    log = glance_server.access_log.read_text()
    asked = log.count(f"GET /v2/images/{image_id} ") - asked
    assert (asked, glance_server.downloads(image_id)) == (1, 1)


@pytest.mark.glance
def test_a_status_given_with_the_stream_is_the_one_checked(
    glance: GlanceClient, glance_server: GlanceServer
) -> None:
    # What the caller just read is what decides: a deactivated image is not downloaded.
    image_id = glance_server.upload(pattern(MIB))
    meta = glance.get(image_id)
    gone = dataclasses.replace(meta, status="deactivated")
    with pytest.raises(ImageUnavailable, match="deactivated"), glance.open_stream(image_id, gone):
        pass
    assert glance_server.downloads(image_id) == 0
    with glance.open_stream(image_id, meta) as chunks:
        assert b"".join(chunks) == pattern(MIB)


@pytest.mark.glance
def test_qcow2_is_converted_to_raw_unless_force_raw_is_off(
    glance: GlanceClient, glance_server: GlanceServer, tmp_path: Path
) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(pattern(4 * MIB, b"qcow2"))
    image = tmp_path / "src.qcow2"
    qemu.qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, image)
    image_id = glance_server.upload(image, disk_format="qcow2")

    got = ensure_cached(image_id, source=glance, options=options(tmp_path / "a"))
    kept = ensure_cached(image_id, source=glance, options=options(tmp_path / "b", force_raw=False))

    assert read_header(got.path).format == "raw" and got.path.read_bytes() == raw.read_bytes()
    assert read_header(kept.path).format == "qcow2"
    assert kept.path.read_bytes() == image.read_bytes()
    assert cache_files(options(tmp_path / "a")) == [got.name]


@pytest.mark.glance
def test_precache_caches_kernel_and_ramdisk_under_their_sha1_names(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    kernel = glance_server.upload(b"k" * 4096, disk_format="aki", container_format="aki")
    ramdisk = glance_server.upload(b"r" * 4096, disk_format="ari", container_format="ari")
    image_id = glance_server.upload(pattern(MIB), kernel_id=kernel, ramdisk_id=ramdisk)
    opts = options(tmp_path)
    sources = Sources(glance_server.settings)

    rows = precache([image_id, image_id], sources=sources, options=opts, concurrency=2)
    again = precache([image_id], sources=sources, options=opts)
    sources.close()

    assert [(r.image, r.role, r.result) for r in rows] == [
        (image_id, "image", Result.CACHED),
        (kernel, "kernel", Result.CACHED),
        (ramdisk, "ramdisk", Result.CACHED),
    ]
    assert {r.result for r in again} == {Result.EXISTING}
    assert Path(opts.cache_dir, naming.fingerprint(kernel)).read_bytes() == b"k" * 4096
    assert Path(opts.cache_dir, naming.fingerprint(ramdisk)).read_bytes() == b"r" * 4096
    assert len(cache_files(opts)) == 3


def test_file_url_is_cached_under_the_sha1_of_the_url(tmp_path: Path) -> None:
    src = qemu.make_qcow2(tmp_path / "img.qcow2", "2M")
    url = src.as_uri()
    opts = options(tmp_path)

    got = ensure_cached(url, source=UrlSource(), options=opts)

    assert got.name == naming.fingerprint(url) and read_header(got.path).format == "raw"
    assert got.bytes == 2 * MIB


def test_an_existing_entry_whose_touch_is_refused_is_still_existing(tmp_path: Path) -> None:
    # Nova ignores EACCES/EPERM when refreshing a base it finds (NFS, LP 1809123); so do we.
    src = qemu.make_qcow2(tmp_path / "img.qcow2", "2M")
    url = src.as_uri()
    opts = options(tmp_path)
    first = ensure_cached(url, source=UrlSource(), options=opts)
    done = subprocess.run(["chattr", "+i", str(first.path)], check=False, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i unsupported here: {done.stderr.decode().strip()}")
    try:
        again = ensure_cached(url, source=UrlSource(), options=opts)
    finally:
        subprocess.run(["chattr", "-i", str(first.path)], check=True)
    assert again.outcome is Result.EXISTING and again.path == first.path


# --- failures: each publishes nothing and leaves no temp file -----------------------------------


def test_unreachable_glance_is_an_error_row(tmp_path: Path) -> None:
    closed = glance_settings(api_servers=("http://127.0.0.1:9",), auth_type="none", timeout=5)
    opts = options(tmp_path)
    with pytest.raises(ImageServiceUnreachable):
        ensure_cached("a-1", source=GlanceClient(closed), options=opts)
    rows = precache(["a-1"], sources=Sources(closed), options=opts)
    assert rows[0].result is Result.FAILED and "ImageServiceUnreachable" in (rows[0].reason or "")
    assert cache_files(opts) == []


@pytest.mark.glance
def test_unknown_image_id(glance: GlanceClient, tmp_path: Path) -> None:
    opts = options(tmp_path)
    with pytest.raises(ImageNotFound):
        ensure_cached("0b5bd5c4-8d1c-4c4e-9a1f-000000000000", source=glance, options=opts)
    assert cache_files(opts) == []


@pytest.mark.glance
def test_corrupted_store_is_a_checksum_mismatch(
    glance: GlanceClient, glance_server: GlanceServer, tmp_path: Path
) -> None:
    image_id = glance_server.upload(pattern(2 * MIB))
    stored = glance_server.stored_file(image_id)
    with stored.open("r+b") as f:  # one flipped byte, same size: only the hash can tell
        f.seek(MIB)
        byte = f.read(1)
        f.seek(MIB)
        f.write(bytes([byte[0] ^ 0xFF]))
    opts = options(tmp_path)

    with pytest.raises(ChecksumMismatch, match="os_hash_value"):
        ensure_cached(image_id, source=glance, options=opts)
    assert cache_files(opts) == []


@pytest.mark.glance
def test_deactivated_image_is_unavailable(
    glance: GlanceClient, glance_server: GlanceServer, tmp_path: Path
) -> None:
    image_id = glance_server.upload(pattern(MIB))
    glance_server.deactivate(image_id)
    opts = options(tmp_path)
    with pytest.raises(ImageUnavailable, match="deactivated"):
        ensure_cached(image_id, source=glance, options=opts)
    assert cache_files(opts) == [] and glance_server.downloads(image_id) == 0


@pytest.mark.glance
def test_qcow2_with_a_backing_file_is_refused(
    glance: GlanceClient, glance_server: GlanceServer, tmp_path: Path
) -> None:
    base = qemu.make_raw(tmp_path / "base.raw", "1M")
    overlay = qemu.make_overlay(tmp_path / "overlay.qcow2", base)
    # Glance 33 inspects only container_format=bare uploads (and refuses this one); older
    # Glances, and other containers, store it as it is.
    image_id = glance_server.upload(overlay, disk_format="qcow2", container_format="ovf")
    opts = options(tmp_path)
    with pytest.raises(UnsafeImageError, match="backing file"):
        ensure_cached(image_id, source=glance, options=opts)
    assert cache_files(opts) == []


@pytest.mark.glance
def test_format_other_than_claimed_and_disallowed_vmdk_are_refused(
    glance: GlanceClient, glance_server: GlanceServer, tmp_path: Path
) -> None:
    disguised = glance_server.upload(qemu.make_qcow2(tmp_path / "q.qcow2"), disk_format="raw")
    vmdk = glance_server.upload(qemu.make_vmdk(tmp_path / "v.vmdk"), disk_format="vmdk")
    opts = options(tmp_path, vmdk_allowed_types=frozenset({"streamOptimized"}))
    with pytest.raises(UnsafeImageError, match="claims disk_format 'raw', its bytes are qcow2"):
        ensure_cached(disguised, source=glance, options=opts)
    with pytest.raises(UnsafeImageError, match="monolithicSparse"):
        ensure_cached(vmdk, source=glance, options=opts)
    assert issubclass(UnsafeImageError, ImageFormatError) and cache_files(opts) == []


def _descriptor_over_host_file(tmp: Path, *create_lines: str) -> Path:
    """A VMDK text descriptor whose one extent is a host file holding a secret."""
    secret = tmp / "host-secret"
    secret.write_bytes(b"HOST-SECRET".ljust(MIB, b"\0"))
    desc = tmp / "evil.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        + "".join(f"{line}\n" for line in create_lines)
        + f'RW 2048 FLAT "{secret}" 0\n'
    )
    return desc


def no_secret_in(opts: FetchOptions) -> bool:
    return all(b"HOST-SECRET" not in p.read_bytes() for p in Path(opts.cache_dir).iterdir())


@pytest.mark.glance
def test_vmdk_descriptor_with_two_create_types_is_refused(
    glance: GlanceClient, glance_server: GlanceServer, tmp_path: Path
) -> None:
    # qemu reads the first createType (monolithicFlat, then copies the host file it names).
    desc = _descriptor_over_host_file(
        tmp_path, 'createType="monolithicFlat"', 'createType="monolithicSparse"'
    )
    image_id = glance_server.upload(desc, disk_format="vmdk", container_format="ovf")
    opts = options(tmp_path)
    with pytest.raises(ImageFormatError, match="createType"):
        ensure_cached(image_id, source=glance, options=opts)
    assert cache_files(opts) == [] and no_secret_in(opts)


@pytest.mark.parametrize("force_raw", [True, False])
def test_vmdk_text_descriptor_is_refused_even_of_an_allowed_type(
    tmp_path: Path, force_raw: bool
) -> None:
    # An operator who allows monolithicFlat means VMDKs whose flat extent is in the image, not a
    # descriptor naming a host file: a downloaded image is one file.
    desc = _descriptor_over_host_file(tmp_path, 'createType="monolithicFlat"')
    allowed = frozenset({"monolithicFlat", "monolithicSparse", "streamOptimized"})
    opts = options(tmp_path, force_raw=force_raw, vmdk_allowed_types=allowed)
    with pytest.raises(UnsafeImageError, match="text descriptor"):
        ensure_cached(desc.as_uri(), source=UrlSource(), options=opts)
    assert cache_files(opts) == [] and no_secret_in(opts)


def test_sparse_vmdk_of_an_allowed_type_is_admitted(tmp_path: Path) -> None:
    image = qemu.make_vmdk(tmp_path / "ok.vmdk", "2M", subformat="streamOptimized")
    got = ensure_cached(image.as_uri(), source=UrlSource(), options=options(tmp_path))
    assert got.outcome is Result.CACHED and read_header(got.path).format == "raw"


@pytest.mark.glance
def test_qcow2_whose_guest_data_reads_as_a_vmdk_is_refused_after_conversion(
    glance: GlanceClient, glance_server: GlanceServer, tmp_path: Path
) -> None:
    # A clean qcow2; converted to raw, its first bytes are a descriptor naming a host file, and
    # anything probing the base (Nova: "Converted to raw, but format is now ...") reads vmdk.
    guest = tmp_path / "guest.raw"
    desc = _descriptor_over_host_file(tmp_path, 'createType="monolithicFlat"').read_bytes()
    guest.write_bytes(desc.ljust(4 * MIB, b"\0"))
    image = tmp_path / "inner.qcow2"
    qemu.qemu_img("convert", "-f", "raw", "-O", "qcow2", guest, image)
    image_id = glance_server.upload(image, disk_format="qcow2")
    opts = options(tmp_path)

    with pytest.raises(UnsafeImageError, match="converted to raw, but"):
        ensure_cached(image_id, source=glance, options=opts)
    assert cache_files(opts) == []
    kept = ensure_cached(image_id, source=glance, options=options(tmp_path / "b", force_raw=False))
    assert read_header(kept.path).format == "qcow2"


@pytest.mark.parametrize("fmt", ["qed", "parallels"])
@pytest.mark.parametrize("force_raw", [True, False])
def test_url_image_of_a_format_not_allowed_is_refused(
    tmp_path: Path, fmt: str, force_raw: bool
) -> None:
    # qemu opens these; Nova has no inspector for them, and no cached image needs them.
    image = tmp_path / f"img.{fmt}"
    qemu.qemu_img("create", "-q", "-f", fmt, image, "4M")
    opts = options(tmp_path, force_raw=force_raw)
    with pytest.raises(UnsafeImageError, match=f"'{fmt}' is not an allowed disk format"):
        ensure_cached(image.as_uri(), source=UrlSource(), options=opts)
    assert cache_files(opts) == []


@pytest.mark.parametrize("fmt", ["vdi", "vpc", "vhdx"])
def test_url_images_of_allowed_formats_are_admitted(tmp_path: Path, fmt: str) -> None:
    image = tmp_path / f"img.{fmt}"
    qemu.qemu_img("create", "-q", "-f", fmt, image, "4M")
    got = ensure_cached(image.as_uri(), source=UrlSource(), options=options(tmp_path))
    assert got.outcome is Result.CACHED and qemu.info(got.path)["format"] == "raw"


@pytest.mark.glance
def test_glance_claim_of_a_format_not_allowed_is_refused(
    glance: GlanceClient, glance_server: GlanceServer, tmp_path: Path
) -> None:
    image = tmp_path / "img.parallels"
    qemu.qemu_img("create", "-q", "-f", "parallels", image, "4M")
    image_id = glance_server.upload(image, disk_format="ploop", container_format="ovf")
    opts = options(tmp_path)
    with pytest.raises(UnsafeImageError, match="disk_format 'ploop' is not an allowed"):
        ensure_cached(image_id, source=glance, options=opts)
    assert cache_files(opts) == []


def test_download_longer_than_announced_stops_at_the_announced_size(tmp_path: Path) -> None:
    # The metadata request says 1 MiB, the download sends 64: stop at once, not at the end.
    block = pattern(MIB)

    def serve(n: int, handler: BaseHTTPRequestHandler) -> None:
        if n == 0:
            send(handler, MIB)
        else:
            send(handler, 64 * MIB, (block for _ in range(64)))

    received: list[int] = []
    opts = options(tmp_path)
    with http_image(serve) as url, pytest.raises(ChecksumMismatch, match="more than"):
        ensure_cached(url, source=UrlSource(), options=opts, on_bytes=received.append)
    assert sum(received) <= MIB and cache_files(opts) == []


@pytest.mark.parametrize("force_raw", [True, False])
def test_entry_published_meanwhile_by_an_unlocked_writer_is_existing(
    tmp_path: Path, force_raw: bool
) -> None:
    # Nova's pre-cache takes no lock: its copy may get the name while ours downloads.
    src = qemu.make_qcow2(tmp_path / "img.qcow2", "2M")
    url = src.as_uri()
    opts = options(tmp_path, force_raw=force_raw)
    final = Path(opts.cache_dir, naming.fingerprint(url))

    def nova_publishes(_: int) -> None:
        if not final.exists():
            final.write_bytes(b"\0" * 2 * MIB)

    got = ensure_cached(url, source=UrlSource(), options=opts, on_bytes=nova_publishes)

    assert got.outcome is Result.EXISTING and got.path == final
    assert cache_files(opts) == [final.name] and final.read_bytes() == b"\0" * 2 * MIB


def test_content_encoding_is_not_undone_before_the_checks(tmp_path: Path) -> None:
    # Size and digests are those of the bytes sent; gzip must not be inflated behind them.
    body = gzip.compress(b"\0" * 64 * MIB)

    def serve(n: int, handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Content-Encoding", "gzip")
        handler.end_headers()
        if n:
            handler.wfile.write(body)

    opts = options(tmp_path)
    with http_image(serve) as url:
        got = ensure_cached(url, source=UrlSource(), options=opts)
    assert got.path.read_bytes() == body


def test_download_killed_half_way_publishes_nothing(tmp_path: Path) -> None:
    # The server sends 4 MiB of 16 and stalls until the test has killed the downloader.
    size = 16 * MIB
    data = pattern(size, b"big")
    release = threading.Event()

    def serve(n: int, handler: BaseHTTPRequestHandler) -> None:
        if release.is_set():
            send(handler, size, (data,))
        else:
            send(handler, size, (data[: 4 * MIB],))
            handler.wfile.flush()
            release.wait(60)

    conf = nova_conf(tmp_path, "http://127.0.0.1:9")
    cache = tmp_path / "instances" / "_base"
    with http_image(serve) as url:
        final = cache / naming.fingerprint(url)
        proc = cli(conf, "precache", url)
        seen = 0
        deadline = time.monotonic() + 60
        try:
            while seen < 4 * MIB and time.monotonic() < deadline and proc.poll() is None:
                parts = list(cache.glob("*.part")) if cache.is_dir() else []
                seen = parts[0].stat().st_size if parts else 0
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            release.set()

        assert proc.returncode == -signal.SIGKILL and seen == 4 * MIB
        assert not final.exists()
        # SIGKILL leaves the temp file: a temp entry the reaper removes once stale and unlocked.
        leftovers = [p.name for p in cache.iterdir()]
        assert len(leftovers) == 1 and naming.classify(leftovers[0]) is Kind.TEMP
        retry = cli(conf, "--json", "precache", url)
        out, err = retry.communicate(timeout=60)
    assert retry.returncode == 0, err
    assert json.loads(out)["results"][0]["result"] == "cached"
    assert hashlib.sha256(final.read_bytes()).digest() == hashlib.sha256(data).digest()


@pytest.mark.glance
def test_twenty_concurrent_precaches_make_one_download(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    image_id = glance_server.upload(pattern(32 * MIB, b"twenty"))
    conf = nova_conf(tmp_path, glance_server.endpoint, lock_timeout_seconds=120)

    procs = [cli(conf, "--json", "precache", image_id) for _ in range(20)]
    outs = [p.communicate() for p in procs]

    assert [p.returncode for p in procs] == [0] * 20, [err for _, err in outs]
    results = sorted(json.loads(out)["results"][0]["result"] for out, _ in outs)
    assert results == ["cached"] + ["existing"] * 19
    assert glance_server.downloads(image_id) == 1
    cache = tmp_path / "instances" / "_base"
    assert [p.name for p in cache.iterdir() if p.name != ".imagecache"] == [
        naming.fingerprint(image_id)
    ]
    # Each precache added its row to the fetch totals (the state file's lock serialises them).
    totals = json.loads((cache / ".imagecache" / "state.json").read_text())["totals"]
    counts = {r["result"]: r["count"] for r in totals["fetches"]}
    assert counts == {"cached": 1, "existing": 19}
    assert [r["bytes"] for r in totals["fetches"] if r["result"] == "existing"] == [0]


@pytest.mark.glance
def test_cli_json_rows_and_exit_code(glance_server: GlanceServer, tmp_path: Path) -> None:
    image_id = glance_server.upload(pattern(MIB, b"cli"))
    conf = nova_conf(tmp_path, glance_server.endpoint, precache_concurrency=2)
    proc = cli(conf, "--json", "precache", image_id, "no-such-image")
    out, _ = proc.communicate()
    rows = json.loads(out)["results"]
    assert proc.returncode == 1
    assert rows[0] == {
        "image": image_id,
        "name": naming.fingerprint(image_id),
        "role": "image",
        "result": "cached",
        "reason": None,
        "bytes": MIB,
    }
    assert rows[1]["result"] == "failed" and "ImageNotFound" in rows[1]["reason"]


def test_cli_startup_does_not_import_the_image_service_clients() -> None:
    # plan/status must start fast: the clients load only in the commands that fetch.
    code = (
        "import sys, imagecache.cli; print(sorted({'keystoneauth1', 'requests'} & {*sys.modules}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("published", "wrong", "refused"),
    [
        (("md5", "sha512"), "sha512", True),  # the multihash is what is verified
        (("md5", "sha512"), "md5", False),  # ... and MD5 is not, beside it (as the clients)
        (("md5",), "md5", True),  # no multihash: MD5 is verified
        (("sha512",), "sha512", True),
    ],
)
def test_the_strongest_published_digest_is_verified(
    tmp_path: Path, published: tuple[str, ...], wrong: str, refused: bool
) -> None:
    from imagecache.errors import ChecksumMismatch
    from imagecache.images.base import ImageMeta
    from imagecache.images.fetch import _copy_verified

    data = b"image bytes " * 1000
    digests = {
        "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
        "sha512": hashlib.sha512(data).hexdigest(),
    }
    digests[wrong] = "0" * len(digests[wrong])
    multihash = "sha512" in published
    meta = ImageMeta(
        id="i1", status="active", size=len(data),
        checksum=digests["md5"] if "md5" in published else None,
        hash_algo="sha512" if multihash else None,
        hash_value=digests["sha512"] if multihash else None,
    )  # fmt: skip
    with (tmp_path / "out").open("wb") as out:
        if refused:
            with pytest.raises(ChecksumMismatch, match=wrong):
                _copy_verified([data[:5000], data[5000:]], out, meta, on_bytes=None)
        else:
            _copy_verified([data[:5000], data[5000:]], out, meta, on_bytes=None)
            assert (tmp_path / "out").read_bytes() == data


def test_writeback_runs_while_writing_and_gives_up_quietly_where_refused(tmp_path: Path) -> None:
    from imagecache.store import fsops

    path = tmp_path / "f"
    with path.open("wb", buffering=0) as out:
        wb = fsops.Writeback(out.fileno(), window=1 << 16)
        for i in range(10):
            out.write(bytes([i]) * 50_000)
            wb.wrote(50_000)
        assert wb.enabled and wb.started == (500_000 // (1 << 16)) * (1 << 16)
    assert path.read_bytes() == b"".join(bytes([i]) * 50_000 for i in range(10))
    read, write = os.pipe()  # sync_file_range on a pipe: ESPIPE, and the final fsync does it
    try:
        wb = fsops.Writeback(write, window=10)
        wb.wrote(100)
        assert not wb.enabled
    finally:
        os.close(read)
        os.close(write)


@pytest.mark.parametrize(
    ("allowed", "match"),
    [
        ({"monolithicFlat"}, "is not the image file itself"),
        ({"monolithicSparse", "streamOptimized"}, "create type"),
    ],
)
def test_qemu_view_of_a_vmdk_is_checked_too(tmp_path: Path, allowed: set[str], match: str) -> None:
    # Defence in depth behind the parser: what qemu itself says the file reads.
    from imagecache.images import admission, process

    desc = _descriptor_over_host_file(tmp_path, 'createType="monolithicFlat"')
    with pytest.raises(UnsafeImageError, match=match):
        admission._check_qemu_vmdk(desc, process.qemu_img_info(desc), allowed)

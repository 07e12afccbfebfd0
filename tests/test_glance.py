"""The image sources against a real Glance, a real HTTP server and real files; no mocks."""

from __future__ import annotations

import builtins
import functools
import hashlib
import inspect
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import keystoneauth1.exceptions
import pytest
import requests
import requests.exceptions
import urllib3.exceptions

from imagecache.errors import (
    ConfigError,
    ImageNotFound,
    ImageServiceError,
    ImageServiceUnreachable,
    ImageUnavailable,
)
from imagecache.images import cache_name, open_source
from imagecache.images.base import ImageSource
from imagecache.images.glance import CHUNK_SIZE, GlanceClient
from imagecache.images.url import UrlSource
from imagecache.settings import GlanceSettings
from tests import qemu
from tests.defaults import glance as glance_settings
from tests.glance_server import GlanceServer

KERNEL = b"kernel bytes"
RAMDISK = b"ramdisk bytes"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _sha512(source: ImageSource, ref: str) -> tuple[str, list[int]]:
    """Stream ``ref``: its sha512 and the chunk sizes seen."""
    digest = hashlib.sha512()
    sizes = []
    with source.open_stream(ref) as chunks:
        for chunk in chunks:
            digest.update(chunk)
            sizes.append(len(chunk))
    return digest.hexdigest(), sizes


@pytest.fixture
def glance(glance_server: GlanceServer) -> Iterator[GlanceClient]:
    client = GlanceClient(glance_server.settings)
    yield client
    client.close()


@pytest.fixture(scope="module")
def payload() -> bytes:
    # Not a multiple of the chunk size, so the last chunk is a short one.
    return hashlib.shake_256(b"imagecache").digest(3 * CHUNK_SIZE + 12345)


# --- Glance -----------------------------------------------------------------------------------


@pytest.mark.glance
def test_get_returns_glance_metadata(
    glance: GlanceClient, glance_server: GlanceServer, payload: bytes
) -> None:
    kernel = glance_server.upload(KERNEL, disk_format="aki", container_format="aki")
    ramdisk = glance_server.upload(RAMDISK, disk_format="ari", container_format="ari")
    image_id = glance_server.upload(
        payload, name="meta-test", kernel_id=kernel, ramdisk_id=ramdisk, hw_foo="bar"
    )

    meta = glance.get(image_id)

    assert meta.id == image_id
    assert meta.name == "meta-test"
    assert meta.status == "active"
    assert (meta.disk_format, meta.container_format) == ("raw", "bare")
    assert meta.size == len(payload)
    assert meta.checksum == hashlib.md5(payload, usedforsecurity=False).hexdigest()
    assert meta.hash_algo == "sha512"
    assert meta.hash_value == hashlib.sha512(payload).hexdigest()
    assert (meta.kernel_id, meta.ramdisk_id) == (kernel, ramdisk)
    assert glance.get(kernel).kernel_id is None


@pytest.mark.glance
def test_get_reports_the_virtual_size_of_a_qcow2(
    glance: GlanceClient, glance_server: GlanceServer, tmp_path: Path
) -> None:
    image = qemu.make_qcow2(tmp_path / "disk.qcow2", "5M")
    image_id = glance_server.upload(image, disk_format="qcow2")

    meta = glance.get(image_id)

    assert (meta.disk_format, meta.virtual_size) == ("qcow2", 5 * 1024 * 1024)
    assert meta.size == image.stat().st_size


@pytest.mark.glance
def test_stream_yields_the_uploaded_bytes_in_bounded_chunks(
    glance: GlanceClient, glance_server: GlanceServer, payload: bytes
) -> None:
    image_id = glance_server.upload(payload)

    digest, sizes = _sha512(glance, image_id)

    assert digest == hashlib.sha512(payload).hexdigest() == glance.get(image_id).hash_value
    assert sum(sizes) == len(payload)
    assert len(sizes) > 1 and max(sizes) <= CHUNK_SIZE


@pytest.mark.glance
def test_unknown_image_is_not_found(glance: GlanceClient) -> None:
    unknown = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(ImageNotFound):
        glance.get(unknown)
    with pytest.raises(ImageNotFound), glance.open_stream(unknown):
        pass


@pytest.mark.glance
@pytest.mark.parametrize("ref", ["", "..", "../../v2/images", "a/b", "id?x=1"])
def test_refs_that_are_not_image_ids_never_reach_the_url(glance: GlanceClient, ref: str) -> None:
    with pytest.raises(ImageNotFound, match="not a Glance image id"):
        glance.get(ref)


@pytest.mark.glance
def test_deactivated_image_is_unavailable_although_glance_would_serve_it(
    glance: GlanceClient, glance_server: GlanceServer
) -> None:
    image_id = glance_server.upload(b"soon deactivated")
    glance_server.deactivate(image_id)

    assert glance.get(image_id).status == "deactivated"
    with pytest.raises(ImageUnavailable, match="deactivated"), glance.open_stream(image_id):
        pass
    # Why the status check: this Glance's context is admin, and admins may still download.
    raw = requests.get(f"{glance_server.endpoint}/v2/images/{image_id}/file", timeout=10)
    assert (raw.status_code, raw.content) == (200, b"soon deactivated")

    glance_server.reactivate(image_id)
    assert _sha512(glance, image_id)[0] == hashlib.sha512(b"soon deactivated").hexdigest()


@pytest.mark.glance
def test_image_without_data_is_unavailable(
    glance: GlanceClient, glance_server: GlanceServer
) -> None:
    created = requests.post(
        f"{glance_server.endpoint}/v2/images",
        json={"name": "queued", "disk_format": "raw", "container_format": "bare"},
        timeout=10,
    )
    image_id = created.json()["id"]

    assert glance.get(image_id).status == "queued"
    with pytest.raises(ImageUnavailable, match="queued"), glance.open_stream(image_id):
        pass


def test_closed_port_is_unreachable() -> None:
    client = GlanceClient(glance_settings(api_servers=(f"http://127.0.0.1:{_closed_port()}",)))
    try:
        with pytest.raises(ImageServiceUnreachable):
            client.get("00000000-0000-4000-8000-000000000000")
        with pytest.raises(ImageServiceUnreachable), client.open_stream("some-id"):
            pass
    finally:
        client.close()


def test_unreachable_keystone_is_unreachable() -> None:
    closed = f"http://127.0.0.1:{_closed_port()}"
    settings = glance_settings(
        api_servers=(closed,),
        auth_type="password",
        auth_options={"auth_url": f"{closed}/v3", "username": "nova", "password": "secret"},
    )
    client = GlanceClient(settings)
    try:
        with pytest.raises(ImageServiceUnreachable):
            client.get("some-id")
    finally:
        client.close()


@pytest.mark.glance
@pytest.mark.parametrize("form", ["{}", "{}/", "{}/v2", "{}/v2/", "host:port"])
def test_api_servers_are_taken_as_nova_writes_them(glance_server: GlanceServer, form: str) -> None:
    endpoint = glance_server.endpoint
    server = endpoint.removeprefix("http://") if form == "host:port" else form.format(endpoint)
    image_id = glance_server.upload(b"any form")
    client = GlanceClient(glance_settings(api_servers=(server,)))
    try:
        assert client.get(image_id).size == len(b"any form")
    finally:
        client.close()


@pytest.mark.glance
# openstacksdk 4.22's config loader always passes an InfluxDB section to CloudRegion, which
# then warns that InfluxDB support is deprecated, whatever clouds.yaml says. Matched by message
# only: the category (RemovedInSDK60Warning) does not exist in older openstacksdk (the floor).
@pytest.mark.filterwarnings("ignore:Support for InfluxDB requires")
def test_os_cloud_from_clouds_yaml(glance_server: GlanceServer, tmp_path: Path) -> None:
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(
        "clouds:\n"
        "  devstack:\n"
        "    auth_type: none\n"
        f"    auth: {{endpoint: '{glance_server.endpoint}'}}\n"
        f"    image_endpoint_override: '{glance_server.endpoint}'\n"
    )
    image_id = glance_server.upload(b"from a cloud")
    client = GlanceClient(glance_settings(os_cloud="devstack", clouds_yaml=str(clouds)))
    try:
        assert _sha512(client, image_id)[0] == hashlib.sha512(b"from a cloud").hexdigest()
    finally:
        client.close()

    with pytest.raises(ConfigError, match="os-cloud elsewhere"):
        GlanceClient(glance_settings(os_cloud="elsewhere", clouds_yaml=str(clouds)))


def test_os_cloud_without_openstacksdk_names_the_extra() -> None:
    # A plain `pip install imagecache` has no openstacksdk (the `clouds` extra). In a fresh
    # process a None in sys.modules makes `import openstack...` fail exactly as if it were absent.
    probe = (
        "import sys\n"
        "sys.modules['openstack'] = None\n"
        "from imagecache.errors import ConfigError\n"
        "from imagecache.images.glance import GlanceClient\n"
        "from tests.defaults import glance\n"
        "try:\n"
        "    GlanceClient(glance(os_cloud='devstack'))\n"
        "except ConfigError as exc:\n"
        "    print(exc.exit_code, exc)\n"
    )
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=repo, check=True, capture_output=True, text=True
    )
    assert done.stdout.startswith(
        "2 --os-cloud needs openstacksdk: pip install 'imagecache[clouds]'"
    ), done.stdout + done.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (glance_settings(), "api_servers is needed"),
        (glance_settings(api_servers=("g:9292",), auth_type="kerberos9"), "unknown auth plugin"),
        (
            glance_settings(auth_type="password", auth_options={"username": "nova"}),
            "auth_type password",
        ),
    ],
)
def test_settings_that_cannot_make_a_client(settings: GlanceSettings, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GlanceClient(settings)


# --- URLs -------------------------------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves the directory; ``/status/<code>`` answers with that HTTP status."""

    def do_GET(self) -> None:
        if self.path.startswith("/status/"):
            self.send_error(int(self.path.removeprefix("/status/")))
        else:
            super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # UrlSource.get reads only the headers of its GET and hangs up: the handler's write of
        # the body then fails with a broken pipe, which is expected.
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a temporary directory: (base URL, directory)."""
    root = tmp_path / "www"
    root.mkdir()
    server = _QuietServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def urls() -> Iterator[UrlSource]:
    source = UrlSource(timeout=10)
    yield source
    source.close()


def test_http_url(urls: UrlSource, http_root: tuple[str, Path], payload: bytes) -> None:
    base, root = http_root
    (root / "cirros.img").write_bytes(payload)
    url = f"{base}/cirros.img"

    meta = urls.get(url)
    digest, sizes = _sha512(urls, url)

    assert (meta.id, meta.name, meta.status, meta.size) == (
        url,
        "cirros.img",
        "active",
        len(payload),
    )
    assert (meta.checksum, meta.hash_value, meta.disk_format) == (None, None, None)
    assert digest == hashlib.sha512(payload).hexdigest()
    assert max(sizes) <= CHUNK_SIZE


def test_http_url_not_found(urls: UrlSource, http_root: tuple[str, Path]) -> None:
    base, _ = http_root
    with pytest.raises(ImageNotFound, match="404"):
        urls.get(f"{base}/missing.img")
    with pytest.raises(ImageNotFound), urls.open_stream(f"{base}/missing.img"):
        pass


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (403, ImageUnavailable),
        (404, ImageNotFound),
        (410, ImageNotFound),
        (401, ImageServiceError),
        (500, ImageServiceError),
        (502, ImageServiceUnreachable),
        (503, ImageServiceUnreachable),
        (504, ImageServiceUnreachable),
    ],
)
def test_http_status_mapping(
    urls: UrlSource,
    http_root: tuple[str, Path],
    status: int,
    expected: type[ImageServiceError],
) -> None:
    base, _ = http_root
    with pytest.raises(ImageServiceError, match=f"HTTP {status}") as caught:
        urls.get(f"{base}/status/{status}")
    assert type(caught.value) is expected


def test_http_url_unreachable(urls: UrlSource) -> None:
    with pytest.raises(ImageServiceUnreachable):
        urls.get(f"http://127.0.0.1:{_closed_port()}/x.img")


def test_http_url_credentials_stay_out_of_messages(urls: UrlSource) -> None:
    with pytest.raises(ImageServiceUnreachable) as caught:
        urls.get(f"http://admin:s3cret@127.0.0.1:{_closed_port()}/x.img")
    assert "s3cret" not in str(caught.value)


def test_file_url(urls: UrlSource, tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "my image.raw"
    path.write_bytes(payload)
    url = path.as_uri()  # file:///.../my%20image.raw

    meta = urls.get(url)

    assert (meta.id, meta.name, meta.size) == (url, "my image.raw", len(payload))
    assert _sha512(urls, url)[0] == hashlib.sha512(payload).hexdigest()


def test_file_url_missing_or_not_a_file(urls: UrlSource, tmp_path: Path) -> None:
    for url in [(tmp_path / "nope").as_uri(), tmp_path.as_uri()]:
        with pytest.raises(ImageNotFound):
            urls.get(url)
        with pytest.raises(ImageNotFound), urls.open_stream(url):
            pass
    with pytest.raises(ImageServiceError, match="local file"):
        urls.get("file://otherhost/etc/hostname")


def test_consumer_errors_are_not_image_service_errors(urls: UrlSource, tmp_path: Path) -> None:
    """An OSError while writing the copy (a full disk) must not pass for a source failure."""
    path = tmp_path / "img"
    path.write_bytes(b"x" * 10)
    with pytest.raises(OSError, match="No space") as caught, urls.open_stream(path.as_uri()):
        raise OSError(28, "No space left on device")
    assert not isinstance(caught.value, ImageServiceError)


# --- names and dispatch -----------------------------------------------------------------------


def test_cache_name_is_the_sha1_of_the_id_or_url() -> None:
    assert cache_name("1") == "356a192b7913b04c54574d18c28d46e6395428ab"  # DESIGN.md §6
    url = "http://images.example/cirros.img"
    assert cache_name(url) == hashlib.sha1(url.encode(), usedforsecurity=False).hexdigest()


def test_open_source_dispatches_on_the_reference() -> None:
    settings = glance_settings(api_servers=("http://127.0.0.1:9",))
    for ref, kind in [
        ("http://h/x.img", UrlSource),
        ("HTTPS://h/x.img", UrlSource),
        ("file:///x.img", UrlSource),
        ("6b1f0a4e-1111-2222-3333-444455556666", GlanceClient),
    ]:
        source = open_source(ref, settings)
        assert isinstance(source, kind), ref
        source.close()
    with pytest.raises(ImageServiceError, match="unsupported URL scheme 'ftp'"):
        open_source("ftp://h/x.img", settings)


# --- the error mapping ------------------------------------------------------------------------


def _exception_types(module: Any) -> list[type[BaseException]]:
    """The exceptions a library defines (not warnings, not what it imports from elsewhere)."""
    package = module.__name__.partition(".")[0]
    return [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Exception)
        and not issubclass(cls, Warning)
        and cls.__module__.partition(".")[0] == package
    ]


# Everything the adapter can meet from keystoneauth1, requests (and the urllib3 under it) and
# file:// I/O. openstacksdk is only used to load clouds.yaml; its errors become ConfigError.
FOREIGN = sorted(
    {
        *_exception_types(keystoneauth1.exceptions),
        *_exception_types(requests.exceptions),
        *_exception_types(urllib3.exceptions),
        *(cls for cls in _exception_types(builtins) if issubclass(cls, OSError)),
    },
    key=lambda cls: f"{cls.__module__}.{cls.__qualname__}",
)


@pytest.mark.parametrize("foreign", FOREIGN, ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_every_foreign_exception_maps_to_an_image_service_error(
    foreign: type[BaseException],
) -> None:
    from imagecache.images.base import HANDLED, translate

    exc = foreign.__new__(foreign)  # no constructor: some need arguments, the mapping needs none
    assert isinstance(exc, HANDLED), f"{foreign} escapes the adapter"
    assert isinstance(translate(exc, "x"), ImageServiceError)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (keystoneauth1.exceptions.ConnectFailure("refused"), ImageServiceUnreachable),
        (keystoneauth1.exceptions.ConnectTimeout("slow"), ImageServiceUnreachable),
        (keystoneauth1.exceptions.SSLError("bad cert"), ImageServiceError),
        (keystoneauth1.exceptions.EndpointNotFound("no image"), ImageServiceError),
        (keystoneauth1.exceptions.Unauthorized("wrong password"), ImageServiceError),
        (keystoneauth1.exceptions.NotFound(), ImageServiceError),  # Keystone's, not Glance's
        (keystoneauth1.exceptions.ServiceUnavailable(), ImageServiceUnreachable),
        (requests.exceptions.ConnectionError("reset"), ImageServiceUnreachable),
        (requests.exceptions.ReadTimeout("slow"), ImageServiceUnreachable),
        (requests.exceptions.ChunkedEncodingError("truncated"), ImageServiceError),
        (requests.exceptions.SSLError("bad cert"), ImageServiceError),
        (FileNotFoundError(2, "No such file"), ImageNotFound),
        (PermissionError(13, "Permission denied"), ImageUnavailable),
        (OSError(5, "I/O error"), ImageServiceError),
        (ValueError("Expecting value"), ImageServiceError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.__name__,
)
def test_exception_mapping(exc: BaseException, expected: type[ImageServiceError]) -> None:
    from imagecache.images.base import translate

    assert type(translate(exc, "x")) is expected

"""``evict_deleted_images_first`` (issue 13): the image service's listing orders capacity evictions.

Against the real Glance of the suite: images are uploaded, deactivated and deleted there, the
cache entries are plain files named by :func:`imagecache.images.cache_name`, and ``plan --json``
shows which go. At the network edge, a tiny local HTTP server plays a broken or hostile image
service: whatever it answers, the listing is a note (``upstream-unavailable``), never an exception.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from imagecache.cli import main
from imagecache.errors import ImageServiceError
from imagecache.images import cache_name
from imagecache.images.glance import GlanceClient
from imagecache.images.upstream import observe_upstream
from imagecache.model import ProblemCode
from tests.defaults import glance as glance_settings
from tests.glance_server import GlanceServer
from tests.test_executor import NOW, Host, make_host, put

HOUR = 3600
UNAVAILABLE = ProblemCode.UPSTREAM_UNAVAILABLE


# -- against the real Glance ------------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    """Four images in Glance: two active, one deactivated, one deleted."""

    old: str
    older: str
    deactivated: str
    deleted: str


@pytest.fixture(scope="module")
def images(glance_server: GlanceServer) -> Images:
    old, older, deactivated, deleted = (glance_server.upload(b"x" * 4096) for _ in range(4))
    glance_server.deactivate(deactivated)
    glance_server.delete(deleted)
    return Images(old=old, older=older, deactivated=deactivated, deleted=deleted)


def cached_host(tmp_path: Path, images: Images, api_server: str, **options: object) -> Host:
    """A host whose cache holds an entry of each image; the deleted and the deactivated image
    were used most recently, so plain LRU order keeps them. The size limit lets two go."""
    host = make_host(tmp_path, **options)
    ages = {images.older: 5 * HOUR, images.old: 4 * HOUR}
    ages |= {images.deactivated: 2 * HOUR, images.deleted: 1 * HOUR}
    paths = [put(host, cache_name(image), age) for image, age in ages.items()]
    allocated = [p.stat().st_blocks * 512 for p in paths]
    assert len(set(allocated)) == 1  # equal sizes: exactly two must go
    limit = sum(allocated) - allocated[0] - 1
    config = host.config.read_text()
    config = config.replace("[imagecache]\n", f"[imagecache]\nmax_cache_bytes = {limit}\n")
    host.config.write_text(f"{config}[glance]\napi_servers = {api_server}\ntimeout = 10\n")
    return host


def plan(host: Host, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    argv = ["--config-file", str(host.config), "--inventory", str(host.inventory)]
    code = main([*argv, "plan", "--json"], clock=lambda: NOW)
    return code, json.loads(capsys.readouterr().out)


def evicted(doc: dict[str, Any]) -> set[str]:
    return {e["name"] for e in doc["entries"] if e["action"] == "remove"}


def upstream_notes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in doc["problems"] if p["code"] == str(UNAVAILABLE)]


@pytest.mark.glance
def test_deleted_and_deactivated_images_go_first_though_used_more_recently(
    tmp_path: Path,
    images: Images,
    glance_server: GlanceServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    host = cached_host(tmp_path, images, glance_server.endpoint, evict_deleted_images_first="true")
    code, doc = plan(host, capsys)
    assert evicted(doc) == {cache_name(images.deleted), cache_name(images.deactivated)}
    assert {e["reason"] for e in doc["entries"] if e["action"] == "remove"} == {"over-size"}
    assert upstream_notes(doc) == [] and code == 0


@pytest.mark.glance
def test_a_clean_lists_the_image_service_once_whatever_its_batches(
    tmp_path: Path,
    images: Images,
    glance_server: GlanceServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The observations under the entry locks reuse the pass's listing (it only orders the
    evictions): throttled, each eviction is a batch of its own, and each would list Glance."""
    host = cached_host(tmp_path, images, glance_server.endpoint, evict_deleted_images_first="true",
                       remove_max_bytes_per_second=1e12, quarantine_seconds=0)  # fmt: skip
    before = list_requests(glance_server)
    argv = ["--config-file", str(host.config), "--inventory", str(host.inventory), "--json"]
    assert main([*argv, "clean"], clock=lambda: NOW) == 0
    gone = {o["name"] for o in json.loads(capsys.readouterr().out)["outcomes"]
            if o["result"] == "removed"}  # fmt: skip
    assert gone == {cache_name(images.deleted), cache_name(images.deactivated)}
    assert list_requests(glance_server) - before == 2  # one listing: visible, then hidden


@pytest.mark.glance
def test_with_the_option_off_plain_lru_order_holds(
    tmp_path: Path,
    images: Images,
    glance_server: GlanceServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    host = cached_host(tmp_path, images, glance_server.endpoint, evict_deleted_images_first="false")
    code, doc = plan(host, capsys)
    assert evicted(doc) == {cache_name(images.older), cache_name(images.old)}
    assert upstream_notes(doc) == [] and code == 0


@pytest.mark.glance
def test_glance_unreachable_plans_lru_order_with_a_note_and_the_same_exit_code(
    tmp_path: Path, images: Images, capsys: pytest.CaptureFixture[str]
) -> None:
    with closed_port() as port:
        on = cached_host(
            tmp_path / "on", images, f"http://127.0.0.1:{port}", evict_deleted_images_first="true"
        )
        off = cached_host(
            tmp_path / "off", images, f"http://127.0.0.1:{port}", evict_deleted_images_first="false"
        )
        code, doc = plan(on, capsys)
        code_off, doc_off = plan(off, capsys)
    assert evicted(doc) == {cache_name(images.older), cache_name(images.old)} == evicted(doc_off)
    [note] = upstream_notes(doc)
    assert note["blocking"] is False and "not evicted first" in note["message"]
    assert doc["complete"] is True and code == code_off == 0
    assert upstream_notes(doc_off) == []  # the option off asks nothing


@pytest.mark.glance
def test_the_listing_has_every_visibility_hidden_images_and_no_deleted_one(
    images: Images, glance_server: GlanceServer
) -> None:
    hidden = glance_server.upload(b"h" * 4096)
    community = glance_server.upload(b"c" * 4096)
    patch(glance_server, hidden, "/os_hidden", True)
    patch(glance_server, community, "/visibility", "community")
    upstream, problems = observe_upstream(glance_server.settings)
    assert problems == () and upstream is not None and upstream.complete
    statuses = dict(upstream.statuses)
    assert statuses[images.deactivated] == "deactivated"
    assert statuses[images.old] == statuses[hidden] == statuses[community] == "active"
    assert images.deleted not in statuses
    assert list(statuses) == sorted(statuses)


@pytest.mark.glance
def test_pages_are_followed_to_the_last(images: Images, glance_server: GlanceServer) -> None:
    for _ in range(3):  # whatever ran before: at least six images, three pages of two
        glance_server.upload(b"p" * 4096)
    whole, _ = observe_upstream(glance_server.settings)
    before = list_requests(glance_server)
    paged, problems = observe_upstream(glance_server.settings, page_size=2)
    assert whole is not None and paged is not None and problems == ()
    assert len(whole.statuses) >= 6
    assert paged == whole
    assert list_requests(glance_server) - before >= len(whole.statuses) // 2 + 1


def patch(glance_server: GlanceServer, image_id: str, path: str, value: object) -> None:
    resp = requests.patch(
        f"{glance_server.endpoint}/v2/images/{image_id}",
        data=json.dumps([{"op": "replace", "path": path, "value": value}]),
        headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
        timeout=10,
    )
    assert resp.status_code == 200, resp.text


def list_requests(glance_server: GlanceServer) -> int:
    return glance_server.access_log.read_text().count("GET /v2/images?")


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port nothing listens on: bound (so nothing else takes it) but never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_no_image_service_configured_is_a_note() -> None:
    upstream, problems = observe_upstream(glance_settings())
    assert upstream is None
    assert [(p.code, p.blocking) for p in problems] == [(UNAVAILABLE, False)]
    assert "api_servers" in problems[0].message


# -- a hostile image service at the network edge ------------------------------------------------

Answer = tuple[int, dict[str, str], bytes]
Serve = Callable[[str, dict[str, list[str]]], Answer]


@dataclass
class Service:
    """A tiny HTTP server; ``serve(path, query)`` answers each GET; ``paths`` records them."""

    serve: Serve
    paths: list[str] = field(default_factory=list)
    url: str = ""


@contextlib.contextmanager
def service(serve: Serve) -> Iterator[Service]:
    recorded = Service(serve)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            recorded.paths.append(self.path)
            parts = urlsplit(self.path)
            status, headers, body = recorded.serve(parts.path, parse_qs(parts.query))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    recorded.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield recorded
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def page(images: object, next_link: object = None) -> Answer:
    doc: dict[str, object] = {"images": images}
    if next_link is not None:
        doc["next"] = next_link
    return 200, {"Content-Type": "application/json"}, json.dumps(doc).encode()


def image(n: int, status: object = "active") -> dict[str, object]:
    return {"id": f"00000000-0000-0000-0000-{n:012d}", "status": status}


def raw(body: bytes) -> Serve:
    return lambda path, query: (200, {"Content-Type": "application/json"}, body)


def looping(path: str, query: dict[str, list[str]]) -> Answer:
    # Every page points back at the first marker.
    return page([image(1), image(2)], "/v2/images?marker=00000000-0000-0000-0000-000000000001")


def fresh_markers(path: str, query: dict[str, list[str]]) -> Answer:
    n = int(query.get("marker", ["0-0"])[0].rsplit("-", 1)[1]) + 1
    return page([image(n), image(n + 1)], f"/v2/images?marker={image(n + 1)['id']}")


def empty_with_next(path: str, query: dict[str, list[str]]) -> Answer:
    return page([], f"/v2/images?marker={image(1)['id']}")


@functools.cache
def _bomb() -> bytes:
    return gzip.compress(b'{"images": [' + b" " * (65 << 20) + b"]}", compresslevel=1)


def gzip_bomb(path: str, query: dict[str, list[str]]) -> Answer:
    # 65 MiB once inflated, from some 70 KiB on the wire.
    return 200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, _bomb()


def redirect(path: str, query: dict[str, list[str]]) -> Answer:
    return 302, {"Location": "http://127.0.0.2:1/v2/images"}, b""


HOSTILE: dict[str, tuple[Serve, str]] = {
    "not JSON": (raw(b"<html>oops</html>"), "not JSON"),
    "deeply nested JSON": (raw(b"[" * 200_000), "not JSON"),
    "not UTF-8": (raw(b'{"images": ["\xff"]}'), "not JSON"),
    "a list, not an object": (raw(b"[]"), "not a Glance image list"),
    "images not a list": (raw(b'{"images": {"id": "x"}}'), "not a Glance image list"),
    "an id that is a number": (lambda p, q: page([{"id": 7, "status": "active"}]), "valid id"),
    "an id that leaves the path": (
        lambda p, q: page([{"id": "../../etc", "status": "active"}]),
        "valid id",
    ),
    "a status with a newline": (lambda p, q: page([image(1, "active\nroot")]), "valid status"),
    "a status that is a list": (lambda p, q: page([image(1, ["active"])]), "valid status"),
    "a missing status": (lambda p, q: page([{"id": image(1)["id"]}]), "valid status"),
    "more images than asked": (lambda p, q: page([image(n) for n in range(3)]), "on a page of 2"),
    "a next that is not a string": (lambda p, q: page([image(1), image(2)], 3), "not a string"),
    "a next to another path": (
        lambda p, q: page([image(1), image(2)], f"/v2/other?marker={image(2)['id']}"),
        "another path",
    ),
    "a relative next": (
        lambda p, q: page([image(1), image(2)], f"v2/images?marker={image(2)['id']}"),
        "another path",
    ),
    "a next without a marker": (lambda p, q: page([image(1), image(2)], "/v2/images"), "marker"),
    "a next with a path as marker": (
        lambda p, q: page([image(1), image(2)], "/v2/images?marker=../x"),
        "marker",
    ),
    "a marker loop": (looping, "(a loop)"),
    "an empty page with a next": (empty_with_next, "empty page"),
    "a page inflating past 64 MiB": (gzip_bomb, "larger than"),
    "HTTP 500": (lambda p, q: (500, {}, b"boom"), "HTTP 500"),
    "a redirect": (redirect, "HTTP 302"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_image_service_is_a_note_never_an_exception(case: str) -> None:
    serve, expected = HOSTILE[case]
    with service(serve) as svc:
        settings = glance_settings(api_servers=(svc.url,), auth_type="none", timeout=5)
        upstream, problems = observe_upstream(settings, page_size=2)
    assert upstream is None
    assert [(p.code, p.blocking) for p in problems] == [(UNAVAILABLE, False)]
    assert expected in problems[0].message
    assert len(svc.paths) <= 3  # refused at once, a loop seen on its first return
    assert all(urlsplit(p).path == "/v2/images" for p in svc.paths)


def test_a_next_link_to_another_host_is_never_followed() -> None:
    with service(lambda p, q: page([image(9)])) as elsewhere:

        def serve(path: str, query: dict[str, list[str]]) -> Answer:
            return page([image(1), image(2)], f"{elsewhere.url}/v2/images?marker={image(2)['id']}")

        with service(serve) as svc:
            settings = glance_settings(api_servers=(svc.url,), auth_type="none", timeout=5)
            upstream, problems = observe_upstream(settings, page_size=2)
    assert upstream is None and "another endpoint" in problems[0].message
    assert elsewhere.paths == [] and len(svc.paths) == 1


def test_endless_fresh_markers_stop_at_the_page_and_image_caps() -> None:
    with service(fresh_markers) as svc:
        settings = glance_settings(api_servers=(svc.url,), auth_type="none", timeout=5)
        client = GlanceClient(settings)
        with pytest.raises(ImageServiceError, match="more than 5 pages"):
            client.list_images(page_size=2, max_pages=5)
        assert len(svc.paths) == 5
        with pytest.raises(ImageServiceError, match="more than 7 images"):
            client.list_images(page_size=2, max_images=7)
        assert len(svc.paths) == 5 + 4
        client.close()


def test_a_service_that_never_answers_times_out_into_a_note() -> None:
    release = threading.Event()

    def stall(path: str, query: dict[str, list[str]]) -> Answer:
        release.wait(10)
        return page([])

    with service(stall) as svc:
        settings = glance_settings(api_servers=(svc.url,), auth_type="none", timeout=0.5)
        upstream, problems = observe_upstream(settings)
        release.set()
    assert upstream is None and [p.code for p in problems] == [UNAVAILABLE]


def test_an_endpoint_under_a_path_follows_glances_own_next_links() -> None:
    """Glance writes ``next`` as ``/v2/images?...`` even when it is served under ``/image``; the
    marker is taken from it, and the request stays this client's own, under the prefix."""

    def serve(path: str, query: dict[str, list[str]]) -> Answer:
        assert path == "/image/v2/images" and query["visibility"] == ["all"]
        if "marker" not in query:
            return page([image(1), image(2)], f"/v2/images?limit=2&marker={image(2)['id']}")
        assert query["marker"] == [image(2)["id"]]
        return page([image(3, "deactivated")])

    with service(serve) as svc:
        settings = glance_settings(api_servers=(f"{svc.url}/image",), auth_type="none", timeout=5)
        upstream, problems = observe_upstream(settings, page_size=2)
    assert problems == () and upstream is not None and upstream.complete
    listed = {image(1)["id"]: "active", image(2)["id"]: "active", image(3)["id"]: "deactivated"}
    assert dict(upstream.statuses) == listed
    # Two pages for the visible images, one for the hidden ones (the same answers here).
    assert len(svc.paths) == 4
    assert [parse_qs(urlsplit(p).query)["os_hidden"] for p in svc.paths] == [["false"]] * 2 + [
        ["true"]
    ] * 2

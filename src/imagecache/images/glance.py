"""Image sources: Glance v2 through keystoneauth1, and plain ``http(s)://`` / ``file://`` URLs.

Glance is configured the way operators already do it: nova.conf's ``[glance]`` section
(``api_servers`` and the keystoneauth auth options, which ``config.py`` turns into a frozen
:class:`GlanceSettings`), or a ``clouds.yaml`` cloud read by openstacksdk's config loader. Requests
go through a keystoneauth ``Adapter`` for the ``image`` service: the catalog (with version
discovery) when there is no endpoint override, else the first api server. Hosts without Glance
give a URL as the image reference; its cache name is the SHA-1 of the URL.

openstacksdk's ``Connection``/``image`` proxy is not used for requests: 4.22 warns about its own
internal calls on every resource and request, and its ``download_image`` fetches the metadata a
second time. Two plain GETs (metadata, then ``/file``) are all this needs, and a paged
``GET /v2/images`` for ``evict_deleted_images_first`` (:meth:`GlanceClient.list_images`).

Every foreign exception (keystoneauth1, requests, ``OSError``; openstacksdk's while loading a
cloud) is translated at the boundary, through :mod:`imagecache.images.base`'s one table, into
:mod:`imagecache.errors`. URLs are served by :mod:`imagecache.images.url`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from keystoneauth1 import adapter, loading, session
from keystoneauth1 import exceptions as ks_exc

from imagecache.errors import ConfigError, ImageNotFound, ImageServiceError, ImageUnavailable
from imagecache.images import is_url
from imagecache.images.base import (
    CHUNK_SIZE,
    ImageMeta,
    ImageSource,
    check_status,
    mapped,
    response_chunks,
)
from imagecache.settings import GlanceSettings

__all__ = [
    "CHUNK_SIZE",
    "LIST_PAGE_SIZE",
    "MAX_LIST_IMAGES",
    "MAX_LIST_PAGES",
    "GlanceClient",
    "GlanceSettings",
    "ImageMeta",
    "ImageSource",
]

# Listing every image (``list_images``): Glance's page cap is its ``api_limit_max``, 1000 by
# default (a larger limit gets that many). The caps bound what a hostile or broken service can
# make a pass do: requests, images kept in memory, bytes read per page.
LIST_PAGE_SIZE = 1000
MAX_LIST_PAGES = 10_000
MAX_LIST_IMAGES = 1_000_000
_MAX_PAGE_BYTES = 64 << 20
_LIST_TIMEOUT = 30.0  # seconds per read when [glance] timeout is not set: a listing never hangs
_STATUS = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_LIST = "glance image list"

# A Glance image id goes into a URL path: refuse anything that could leave /images/<id>.
_IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]*")
_VERSIONED = re.compile(r"/v2(\.[0-9]+)?/?$")
_NOAUTH = frozenset({"none", "noauth"})


def _text(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return value if isinstance(value, str) else None


def _int(doc: Mapping[str, Any], key: str) -> int | None:
    value = doc.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _image_meta(doc: Any, what: str) -> ImageMeta:
    if not isinstance(doc, dict) or not _text(doc, "id") or not _text(doc, "status"):
        raise ImageServiceError(f"{what}: not a Glance image document")
    return ImageMeta(
        id=doc["id"],
        name=_text(doc, "name"),
        status=doc["status"],
        disk_format=_text(doc, "disk_format"),
        container_format=_text(doc, "container_format"),
        size=_int(doc, "size"),
        checksum=_text(doc, "checksum"),
        hash_algo=_text(doc, "os_hash_algo"),
        hash_value=_text(doc, "os_hash_value"),
        kernel_id=_text(doc, "kernel_id"),
        ramdisk_id=_text(doc, "ramdisk_id"),
        virtual_size=_int(doc, "virtual_size"),
    )


def _glance_v2(url: str) -> str:
    """An api_servers entry as a v2 endpoint (Nova accepts ``host:port`` and unversioned URLs)."""
    url = url.strip().rstrip("/")
    if not is_url(url):
        url = f"http://{url}"
    return url if _VERSIONED.search(url) else f"{url}/v2"


def _auth_plugin(settings: GlanceSettings, endpoint: str | None) -> Any:
    name = settings.auth_type or "none"
    name = "none" if name in _NOAUTH else name
    try:
        loader: Any = loading.get_plugin_loader(name)
        names = {opt.dest for opt in loader.get_options()}
        # [glance] holds more than auth options: keep only the ones this plugin takes.
        given = {key.replace("-", "_"): value for key, value in settings.auth_options.items()}
        options = {key: value for key, value in given.items() if key in names}
        if name == "none":
            options.setdefault("endpoint", endpoint or "")
        return loader.load_from_options(**options)
    except ks_exc.NoMatchingPlugin as exc:
        raise ConfigError(f"[glance] auth_type: unknown auth plugin {name!r}") from exc
    except ks_exc.OptionError as exc:
        raise ConfigError(f"[glance] auth_type {name}: {exc}") from exc


def _from_cloud(settings: GlanceSettings) -> tuple[session.Session, str | None, Any, str | None]:
    """Session, image endpoint override, interface and region of a clouds.yaml cloud.

    Raises ConfigError when openstacksdk (the ``clouds`` extra) is not installed, or the cloud
    cannot be loaded.
    """
    try:
        import openstack.config
        import openstack.exceptions
    except ImportError as exc:  # an optional dependency: only --os-cloud needs it
        raise ConfigError(
            f"--os-cloud needs openstacksdk: pip install 'imagecache[clouds]' ({exc})"
        ) from exc

    files = [settings.clouds_yaml] if settings.clouds_yaml else None
    try:
        config = openstack.config.OpenStackConfig(config_files=files, load_envvars=False)
        region = config.get_one(cloud=settings.os_cloud, region_name=settings.region_name)
        sess = region.get_session()
    except (openstack.exceptions.SDKException, ks_exc.ClientException) as exc:
        raise ConfigError(f"--os-cloud {settings.os_cloud}: {exc}") from exc
    endpoint = region.get_endpoint("image")
    return sess, endpoint, region.get_interface("image"), region.get_region_name("image")


class GlanceClient:
    """An :class:`ImageSource` over Glance v2, through one keystoneauth session."""

    def __init__(self, settings: GlanceSettings) -> None:
        """Prepare the session (no request is made yet).

        Raises ConfigError when the settings cannot make a client: an unknown cloud or auth
        plugin, missing auth options, or neither an endpoint nor a way to find one.
        """
        override = settings.api_servers[0] if settings.api_servers else None
        interface: Any = list(settings.valid_interfaces)
        region_name = settings.region_name
        if settings.os_cloud:
            self._session, cloud_endpoint, interface, region_name = _from_cloud(settings)
            override = override or cloud_endpoint
            if settings.timeout is not None:
                self._session.timeout = settings.timeout
        else:
            if override is None and (settings.auth_type or "none") in _NOAUTH:
                raise ConfigError("[glance] api_servers is needed when auth_type is not set")
            self._session = session.Session(
                auth=_auth_plugin(settings, override and _glance_v2(override)),
                verify=False if settings.insecure else (settings.cafile or True),
                timeout=settings.timeout,
            )
        self._adapter = adapter.Adapter(
            self._session,
            service_type="image",
            interface=interface,
            region_name=region_name,
            endpoint_override=override and _glance_v2(override),
            # The catalog's image endpoint is unversioned: let keystoneauth discover v2.
            version=None if override else "2",
            raise_exc=False,
        )

    def get(self, image_ref: str) -> ImageMeta:
        """Glance's metadata of ``image_ref``.

        Raises ImageNotFound (no such image, or not visible), ImageServiceUnreachable, or
        ImageServiceError (authentication, catalog, a malformed answer, other HTTP errors).
        """
        what = f"glance image {image_ref}"
        path = self._path(image_ref)
        with mapped(what):
            resp = self._adapter.get(path)
            check_status(resp, what)
            return _image_meta(resp.json(), what)

    @contextlib.contextmanager
    def open_stream(
        self, image_ref: str, meta: ImageMeta | None = None
    ) -> Iterator[Iterator[bytes]]:
        """The image's bytes, in chunks of at most CHUNK_SIZE, streamed from Glance.

        Raises as :meth:`get`, and ImageUnavailable when the image is not ``active``
        (deactivated, queued, saving, killed). Status is checked in the metadata (``meta``, when
        the caller has just read it: one request less per download), not by the download's HTTP
        code: Glance lets admin contexts download deactivated images.
        """
        if meta is None:
            meta = self.get(image_ref)
        what = f"glance image {image_ref}"
        if meta.status != "active":
            raise ImageUnavailable(f"{what} is {meta.status}, not active")
        with mapped(what):
            resp = self._adapter.get(f"{self._path(image_ref)}/file", stream=True)
        try:
            check_status(resp, f"{what} data")
            yield response_chunks(resp, f"{what} data")
        finally:
            resp.close()

    def list_images(
        self,
        *,
        page_size: int = LIST_PAGE_SIZE,
        max_pages: int = MAX_LIST_PAGES,
        max_images: int = MAX_LIST_IMAGES,
    ) -> tuple[tuple[str, str], ...]:
        """Every image's (id, status) these credentials can list, sorted by id, all pages read.

        Every visibility (``visibility=all``: community images are otherwise left out), every
        shared image whatever its member status, hidden images (``os_hidden``) as well as the
        others; deactivated ones are listed like any. Each page's ``next`` link gives only the
        marker: the request is always this client's own, to this endpoint.

        Raises ImageServiceUnreachable, or ImageServiceError: an HTTP error or redirect, a
        malformed page, a ``next`` link to another host or path, a marker seen before, more than
        ``max_pages`` pages or ``max_images`` images.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        found: dict[str, str] = {}
        pages = received = 0
        # Glance lists hidden images only when asked for them, and then only them.
        for hidden in ("false", "true"):
            marker: str | None = None
            markers: set[str] = set()
            while True:
                pages += 1
                if pages > max_pages:
                    raise ImageServiceError(f"{_LIST}: more than {max_pages} pages")
                images, marker = self._list_page(page_size, hidden, marker)
                received += len(images)
                if received > max_images:
                    raise ImageServiceError(f"{_LIST}: more than {max_images} images")
                found.update(images)
                if marker is None:
                    break
                if marker in markers:
                    raise ImageServiceError(f"{_LIST}: the marker {marker} came back (a loop)")
                markers.add(marker)
        return tuple(sorted(found.items()))

    def _list_page(
        self, page_size: int, hidden: str, marker: str | None
    ) -> tuple[list[tuple[str, str]], str | None]:
        """One page's (id, status) pairs and the marker of the next page (None: the last)."""
        params = {
            "limit": str(page_size),
            "visibility": "all",
            "member_status": "all",
            "os_hidden": hidden,
            # Oldest first: an image created while the listing runs lands after the marker.
            "sort_key": "created_at",
            "sort_dir": "asc",
        }
        if marker is not None:
            params["marker"] = marker
        timeout = self._session.timeout or _LIST_TIMEOUT
        with mapped(_LIST):
            resp = self._adapter.get(
                "/images", params=params, stream=True, redirect=False, timeout=timeout
            )
        try:
            check_status(resp, _LIST)
            body = _bounded_body(resp)
            url = resp.url
        finally:
            resp.close()
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ImageServiceError(f"{_LIST}: not JSON ({type(exc).__name__})") from exc
        return _page(doc, page_size, url)

    def close(self) -> None:
        self._session.session.close()

    @staticmethod
    def _path(image_ref: str) -> str:
        if not _IMAGE_ID.fullmatch(image_ref):
            raise ImageNotFound(f"{image_ref!r} is not a Glance image id")
        return f"/images/{quote(image_ref)}"


def _bounded_body(resp: Any) -> bytes:
    """The answer's body, decoded (a JSON API may gzip it), refused beyond _MAX_PAGE_BYTES."""
    parts: list[bytes] = []
    size = 0
    with mapped(_LIST):
        for chunk in resp.iter_content(CHUNK_SIZE):
            size += len(chunk)
            if size > _MAX_PAGE_BYTES:
                raise ImageServiceError(f"{_LIST}: a page larger than {_MAX_PAGE_BYTES} bytes")
            parts.append(chunk)
    return b"".join(parts)


def _page(doc: Any, page_size: int, url: str) -> tuple[list[tuple[str, str]], str | None]:
    """A listing page's (id, status) pairs and next marker; raises ImageServiceError."""
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise ImageServiceError(f"{_LIST}: not a Glance image list")
    if len(images) > page_size:
        raise ImageServiceError(f"{_LIST}: {len(images)} images on a page of {page_size}")
    pairs = []
    for image in images:
        image_id = image.get("id") if isinstance(image, dict) else None
        status = image.get("status") if isinstance(image, dict) else None
        if not isinstance(image_id, str) or not _is_image_id(image_id):
            raise ImageServiceError(f"{_LIST}: an image without a valid id")
        if not isinstance(status, str) or not _STATUS.fullmatch(status):
            raise ImageServiceError(f"{_LIST}: image {image_id} without a valid status")
        pairs.append((image_id, status))
    link = doc.get("next")
    if link is None:
        return pairs, None
    if not isinstance(link, str):
        raise ImageServiceError(f"{_LIST}: a next link that is not a string")
    if not pairs:
        # Glance links a next page only after a full one: an empty page with a link is a loop.
        raise ImageServiceError(f"{_LIST}: an empty page with a next link")
    return pairs, _next_marker(link, url)


def _next_marker(link: str, url: str) -> str:
    """The marker of a ``next`` link, which must name this endpoint's image list.

    Glance writes it as ``/v2/images?...``, without the path prefix of an endpoint such as
    ``https://cloud/image/v2``; a scheme and host, if given, must be the request's.
    """
    try:
        given, asked = urlsplit(link), urlsplit(url)
    except ValueError as exc:
        raise ImageServiceError(f"{_LIST}: a malformed next link") from exc
    if given.scheme and given.scheme.lower() != asked.scheme.lower():
        raise ImageServiceError(f"{_LIST}: a next link to another endpoint, refused")
    if given.netloc and given.netloc.lower() != asked.netloc.lower():
        raise ImageServiceError(f"{_LIST}: a next link to another endpoint, refused")
    if given.scheme and not given.netloc:
        raise ImageServiceError(f"{_LIST}: a malformed next link")
    path = given.path
    if not path.startswith("/") or not path.endswith("/v2/images") or not asked.path.endswith(path):
        raise ImageServiceError(f"{_LIST}: a next link to another path than the image list")
    markers = parse_qs(given.query).get("marker", [])
    if len(markers) != 1 or not _is_image_id(markers[0]):
        raise ImageServiceError(f"{_LIST}: a next link without one valid marker")
    return markers[0]


def _is_image_id(text: str) -> bool:
    return len(text) <= 255 and _IMAGE_ID.fullmatch(text) is not None

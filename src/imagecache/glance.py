"""Image sources: Glance v2 through keystoneauth1, and plain ``http(s)://`` / ``file://`` URLs.

Glance is configured the way operators already do it: nova.conf's ``[glance]`` section
(``api_servers`` and the keystoneauth auth options, which ``config.py`` turns into a frozen
:class:`GlanceSettings`), or a ``clouds.yaml`` cloud read by openstacksdk's config loader. Requests
go through a keystoneauth ``Adapter`` for the ``image`` service: the catalog (with version
discovery) when there is no endpoint override, else the first api server. Hosts without Glance
give a URL as the image reference; its cache name is the SHA-1 of the URL.

openstacksdk's ``Connection``/``image`` proxy is not used for requests: 4.22 warns about its own
internal calls on every resource and request, and its ``download_image`` fetches the metadata a
second time. Two plain GETs (metadata, then ``/file``) are all this needs.

Every foreign exception (keystoneauth1, requests, ``OSError``; openstacksdk's while loading a
cloud) is translated here, at the boundary, into :mod:`imagecache.errors`.
"""

from __future__ import annotations

import contextlib
import re
import stat
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Protocol
from urllib.parse import quote, unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

import requests
import urllib3.exceptions
from keystoneauth1 import adapter, loading, session
from keystoneauth1 import exceptions as ks_exc

from imagecache.config import GlanceSettings
from imagecache.errors import (
    ConfigError,
    ImageNotFound,
    ImageServiceError,
    ImageServiceUnreachable,
    ImageUnavailable,
)
from imagecache.naming import fingerprint

__all__ = [
    "CHUNK_SIZE",
    "GlanceClient",
    "GlanceSettings",
    "ImageMeta",
    "ImageSource",
    "UrlSource",
    "cache_name",
    "open_source",
]

CHUNK_SIZE = 1 << 20
_URL_SCHEMES = frozenset({"http", "https", "file"})
# A Glance image id goes into a URL path: refuse anything that could leave /images/<id>.
_IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]*")
_VERSIONED = re.compile(r"/v2(\.[0-9]+)?/?$")
_NOAUTH = frozenset({"none", "noauth"})


@dataclass(frozen=True, slots=True)
class ImageMeta:
    """What the image service says about an image (for a URL, only what HTTP or stat can say)."""

    id: str
    status: str
    name: str | None = None
    disk_format: str | None = None
    container_format: str | None = None
    size: int | None = None
    checksum: str | None = None  # MD5 hex, Glance's legacy checksum
    hash_algo: str | None = None  # Glance's os_hash_algo, e.g. "sha512"
    hash_value: str | None = None  # Glance's os_hash_value
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    virtual_size: int | None = None


class ImageSource(Protocol):
    def get(self, image_ref: str) -> ImageMeta:
        """Metadata; raises ImageNotFound, ImageServiceUnreachable or ImageServiceError."""
        ...

    def open_stream(self, image_ref: str) -> AbstractContextManager[Iterator[bytes]]:
        """The image's bytes in chunks of at most CHUNK_SIZE; raises as ``get``, and
        ImageUnavailable when the image exists but has no downloadable data."""
        ...

    def close(self) -> None: ...


# What an HTTP status other than 200 from Glance or a URL means; any other: ImageServiceError.
_BY_STATUS: Mapping[int, type[ImageServiceError]] = MappingProxyType(
    {
        204: ImageUnavailable,  # Glance's answer for an image without data (queued)
        403: ImageUnavailable,  # e.g. a deactivated image, for a non-admin
        404: ImageNotFound,
        410: ImageNotFound,
        502: ImageServiceUnreachable,  # a proxy or load balancer in front of a dead service
        503: ImageServiceUnreachable,
        504: ImageServiceUnreachable,
    }
)

# Foreign exception types, first match wins: requests' exceptions are OSErrors and
# keystoneauth's SSLError is one of its ConnectionErrors, so the specific ones come first.
_BY_TYPE: tuple[tuple[type[BaseException], type[ImageServiceError]], ...] = (
    (ks_exc.SSLError, ImageServiceError),  # a certificate problem is not an outage
    (ks_exc.ConnectionError, ImageServiceUnreachable),  # refused, DNS, connect timeout
    (ks_exc.RetriableConnectionFailure, ImageServiceUnreachable),  # a mixin, not a subclass
    # Glance's answers are checked by status (raise_exc=False); HTTP errors raised by
    # keystoneauth come from Keystone, and a 404 there is no ImageNotFound.
    (ks_exc.BadGateway, ImageServiceUnreachable),
    (ks_exc.ServiceUnavailable, ImageServiceUnreachable),
    (ks_exc.GatewayTimeout, ImageServiceUnreachable),
    (ks_exc.ClientException, ImageServiceError),  # auth, catalog, discovery, other HTTP
    (requests.exceptions.SSLError, ImageServiceError),
    (requests.exceptions.ConnectionError, ImageServiceUnreachable),
    (requests.exceptions.Timeout, ImageServiceUnreachable),
    (requests.exceptions.RequestException, ImageServiceError),  # truncated body, bad URL, ...
    # requests wraps urllib3's errors; these catch any that slip through.
    (urllib3.exceptions.TimeoutError, ImageServiceUnreachable),
    (urllib3.exceptions.ProtocolError, ImageServiceUnreachable),
    (urllib3.exceptions.HTTPError, ImageServiceError),
    (FileNotFoundError, ImageNotFound),
    (NotADirectoryError, ImageNotFound),
    (IsADirectoryError, ImageNotFound),
    (PermissionError, ImageUnavailable),
    (OSError, ImageServiceError),
    (ValueError, ImageServiceError),  # a malformed JSON answer
)
_HANDLED = tuple(foreign for foreign, _ in _BY_TYPE)


def _translate(exc: BaseException, what: str) -> ImageServiceError:
    """Our error for a foreign exception met while doing ``what`` (``raise ... from exc``)."""
    ours = next((ours for foreign, ours in _BY_TYPE if isinstance(exc, foreign)), None)
    return (ours or ImageServiceError)(f"{what}: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    # The translation must not fail itself: some foreign __str__ need attributes that a
    # half-built exception lacks.
    try:
        text = str(exc)
    except Exception:
        text = ""
    return text or type(exc).__name__


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except _HANDLED as exc:
        raise _translate(exc, what) from exc


def _check(resp: requests.Response, what: str) -> None:
    """Raise our error for an HTTP answer that is not 200 OK."""
    if resp.status_code != 200:
        ours = _BY_STATUS.get(resp.status_code, ImageServiceError)
        raise ours(f"{what}: HTTP {resp.status_code} {resp.reason}")


def _chunks(resp: requests.Response, what: str) -> Iterator[bytes]:
    # iter_content reads CHUNK_SIZE at a time from the socket: memory stays constant.
    with _mapped(what):
        yield from resp.iter_content(CHUNK_SIZE)


def _file_chunks(f: BinaryIO, what: str) -> Iterator[bytes]:
    # Only the reads are translated: an OSError the consumer meets while writing its copy is
    # not an image service error, and must not be reported as one.
    while True:
        with _mapped(what):
            chunk = f.read(CHUNK_SIZE)
        if not chunk:
            return
        yield chunk


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
    if "://" not in url:
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
    """Session, image endpoint override, interface and region of a clouds.yaml cloud."""
    import openstack.config
    import openstack.exceptions

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
        with _mapped(what):
            resp = self._adapter.get(path)
            _check(resp, what)
            return _image_meta(resp.json(), what)

    @contextlib.contextmanager
    def open_stream(self, image_ref: str) -> Iterator[Iterator[bytes]]:
        """The image's bytes, in chunks of at most CHUNK_SIZE, streamed from Glance.

        Raises as :meth:`get`, and ImageUnavailable when the image is not ``active``
        (deactivated, queued, saving, killed). Status is checked in the metadata, not by the
        download's HTTP code: Glance lets admin contexts download deactivated images.
        """
        meta = self.get(image_ref)
        what = f"glance image {image_ref}"
        if meta.status != "active":
            raise ImageUnavailable(f"{what} is {meta.status}, not active")
        with _mapped(what):
            resp = self._adapter.get(f"{self._path(image_ref)}/file", stream=True)
        try:
            _check(resp, f"{what} data")
            yield _chunks(resp, f"{what} data")
        finally:
            resp.close()

    def close(self) -> None:
        self._session.session.close()

    @staticmethod
    def _path(image_ref: str) -> str:
        if not _IMAGE_ID.fullmatch(image_ref):
            raise ImageNotFound(f"{image_ref!r} is not a Glance image id")
        return f"/images/{quote(image_ref)}"


def _redacted(url: str) -> str:
    """The URL without user:password, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _local_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageServiceError(f"{_redacted(url)}: file URLs must name a local file")
    return Path(url2pathname(parts.path))


class UrlSource:
    """An :class:`ImageSource` for ``http://``, ``https://`` and ``file://`` image references.

    The image id is the URL itself; nothing is known of its format or checksum (``None``).
    """

    def __init__(
        self,
        *,
        timeout: float | None = None,
        verify: bool | str = True,
        http: requests.Session | None = None,
    ) -> None:
        self._timeout = timeout
        self._http = http or requests.Session()
        self._http.verify = verify

    def get(self, image_ref: str) -> ImageMeta:
        """What the server (its status and Content-Length) or the file system says of the URL.

        Raises ImageNotFound (404/410, no such file), ImageUnavailable (403, unreadable file),
        ImageServiceUnreachable, or ImageServiceError.
        """
        what = _redacted(image_ref)
        name = Path(unquote(urlsplit(image_ref).path)).name or None
        if _scheme(image_ref) == "file":
            with _mapped(what):
                st = _local_path(image_ref).stat()
            if not stat.S_ISREG(st.st_mode):
                raise ImageNotFound(f"{what}: not a regular file")
            size: int | None = st.st_size
        else:
            with self._request(image_ref, what) as resp:
                length = resp.headers.get("Content-Length", "")
                size = int(length) if length.isdigit() else None
        return ImageMeta(id=image_ref, status="active", name=name, size=size)

    @contextlib.contextmanager
    def open_stream(self, image_ref: str) -> Iterator[Iterator[bytes]]:
        """The URL's bytes in chunks of at most CHUNK_SIZE; raises as :meth:`get`."""
        what = _redacted(image_ref)
        if _scheme(image_ref) == "file":
            with _mapped(what):
                f = _local_path(image_ref).open("rb")
            with f:
                yield _file_chunks(f, what)
        else:
            with self._request(image_ref, what) as resp:
                yield _chunks(resp, what)

    def close(self) -> None:
        self._http.close()

    @contextlib.contextmanager
    def _request(self, url: str, what: str) -> Iterator[requests.Response]:
        # GET, not HEAD: signed URLs (S3, Swift temp URLs) are often valid for GET only.
        with _mapped(what):
            resp = self._http.get(url, stream=True, timeout=self._timeout)
        try:
            _check(resp, what)
            yield resp
        finally:
            resp.close()


def _scheme(image_ref: str) -> str | None:
    if "://" not in image_ref:
        return None
    return urlsplit(image_ref).scheme.lower()


def cache_name(image_ref: str) -> str:
    """The cache entry name of an image id or URL: Nova's SHA-1 fingerprint of the string."""
    return fingerprint(image_ref)


def open_source(image_ref: str, settings: GlanceSettings) -> ImageSource:
    """The source that serves ``image_ref``: a URL source for URLs, else Glance.

    Raises ImageServiceError for a URL scheme other than http, https or file, and ConfigError
    when Glance is needed and ``settings`` cannot make a client.
    """
    scheme = _scheme(image_ref)
    if scheme is None:
        return GlanceClient(settings)
    if scheme not in _URL_SCHEMES:
        raise ImageServiceError(f"{_redacted(image_ref)}: unsupported URL scheme {scheme!r}")
    return UrlSource(
        timeout=settings.timeout,
        verify=False if settings.insecure else (settings.cafile or True),
    )

"""What every image source shares: the metadata value, the protocol, and the error mapping.

Glance (:mod:`imagecache.images.glance`) and plain URLs (:mod:`imagecache.images.url`) both
answer over HTTP or from files; every foreign exception they meet (keystoneauth1, requests, urllib3,
``OSError``) is translated here, in one table, into :mod:`imagecache.errors`. A test checks the
table is complete for every exception those libraries define.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3.exceptions
from keystoneauth1 import exceptions as ks_exc

from imagecache.errors import (
    ImageNotFound,
    ImageServiceError,
    ImageServiceUnreachable,
    ImageUnavailable,
)

__all__ = [
    "CHUNK_SIZE",
    "HANDLED",
    "ImageMeta",
    "ImageSource",
    "check_status",
    "mapped",
    "redacted",
    "response_chunks",
    "translate",
]

CHUNK_SIZE = 1 << 20


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

    def open_stream(
        self, image_ref: str, meta: ImageMeta | None = None
    ) -> AbstractContextManager[Iterator[bytes]]:
        """The image's bytes in chunks of at most CHUNK_SIZE; raises as ``get``, and
        ImageUnavailable when the image exists but has no downloadable data. ``meta``: what
        ``get`` just gave for it, so as not to ask the service again."""
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
HANDLED = tuple(foreign for foreign, _ in _BY_TYPE)


def translate(exc: BaseException, what: str) -> ImageServiceError:
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
def mapped(what: str) -> Iterator[None]:
    try:
        yield
    except HANDLED as exc:
        raise translate(exc, what) from exc


def check_status(resp: requests.Response, what: str) -> None:
    """Raise our error for an HTTP answer that is not 200 OK."""
    if resp.status_code != 200:
        ours = _BY_STATUS.get(resp.status_code, ImageServiceError)
        raise ours(f"{what}: HTTP {resp.status_code} {resp.reason}")


def response_chunks(resp: requests.Response, what: str) -> Iterator[bytes]:
    """The body's bytes exactly as sent, CHUNK_SIZE at a time (memory stays constant).

    Not ``iter_content``: it undoes a ``Content-Encoding`` (gzip, deflate), so the size and the
    digests would be checked on bytes the server did not send, and a small compressed body could
    inflate without bound. urllib3's errors go through the one table (:func:`mapped`).
    """
    with mapped(what):
        yield from resp.raw.stream(CHUNK_SIZE, decode_content=False)


def redacted(url: str) -> str:
    """The URL without user:password, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))

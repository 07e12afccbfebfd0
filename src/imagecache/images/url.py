"""Images from plain ``http(s)://`` and ``file://`` URLs, for hosts without Glance.

The image id is the URL itself and its cache name the SHA-1 of the URL; nothing is known of its
format or checksum, so only the size can be checked.
"""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import requests

from imagecache.errors import ImageNotFound, ImageServiceError
from imagecache.images import url_scheme
from imagecache.images.base import (
    CHUNK_SIZE,
    ImageMeta,
    check_status,
    mapped,
    redacted,
    response_chunks,
)

__all__ = ["UrlSource"]


def _file_chunks(f: BinaryIO, what: str) -> Iterator[bytes]:
    # Only the reads are translated: an OSError the consumer meets while writing its copy is
    # not an image service error, and must not be reported as one.
    while True:
        with mapped(what):
            chunk = f.read(CHUNK_SIZE)
        if not chunk:
            return
        yield chunk


def _local_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageServiceError(f"{redacted(url)}: file URLs must name a local file")
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
        what = redacted(image_ref)
        name = Path(unquote(urlsplit(image_ref).path)).name or None
        if url_scheme(image_ref) == "file":
            with mapped(what):
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
    def open_stream(
        self, image_ref: str, meta: ImageMeta | None = None
    ) -> Iterator[Iterator[bytes]]:
        """The URL's bytes in chunks of at most CHUNK_SIZE; raises as :meth:`get`. A URL has
        no metadata but its size: ``meta`` changes nothing."""
        what = redacted(image_ref)
        if url_scheme(image_ref) == "file":
            with mapped(what):
                f = _local_path(image_ref).open("rb")
            with f:
                yield _file_chunks(f, what)
        else:
            with self._request(image_ref, what) as resp:
                yield response_chunks(resp, what)

    def close(self) -> None:
        self._http.close()

    @contextlib.contextmanager
    def _request(self, url: str, what: str) -> Iterator[requests.Response]:
        # GET, not HEAD: signed URLs (S3, Swift temp URLs) are often valid for GET only.
        with mapped(what):
            resp = self._http.get(url, stream=True, timeout=self._timeout)
        try:
            check_status(resp, what)
            yield resp
        finally:
            resp.close()

"""Images into the cache: sources (Glance, URLs), digests, admission, fetching, overlays.

This package's ``__init__`` stays light (no keystoneauth, no requests): ``plan`` and ``status``
import nothing of it, and ``precache`` pays for the HTTP stack only when it opens a source. It
holds the one question every module asks of an image reference, :func:`is_url`, and the one
dispatch on its answer, :func:`open_source`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from imagecache.naming import fingerprint

if TYPE_CHECKING:
    from imagecache.images.base import ImageSource
    from imagecache.settings import GlanceSettings

__all__ = ["URL_SCHEMES", "cache_name", "is_url", "open_source", "url_scheme"]

URL_SCHEMES = frozenset({"http", "https", "file"})


def is_url(image_ref: str) -> bool:
    """Whether ``image_ref`` is a URL (``scheme://...``) rather than a Glance image id."""
    return "://" in image_ref


def url_scheme(image_ref: str) -> str | None:
    """The lower-case scheme of a URL reference, or None for a Glance image id."""
    return urlsplit(image_ref).scheme.lower() if is_url(image_ref) else None


def cache_name(image_ref: str) -> str:
    """The cache entry name of an image id or URL: Nova's SHA-1 fingerprint of the string."""
    return fingerprint(image_ref)


def open_source(image_ref: str, settings: GlanceSettings) -> ImageSource:
    """The source that serves ``image_ref``: a URL source for URLs, else Glance.

    Raises:
        ImageServiceError: a URL scheme other than http, https or file.
        ConfigError: Glance is needed and ``settings`` cannot make a client.
    """
    from imagecache.errors import ImageServiceError
    from imagecache.images.base import redacted

    scheme = url_scheme(image_ref)
    if scheme is None:
        from imagecache.images.glance import GlanceClient

        return GlanceClient(settings)
    if scheme not in URL_SCHEMES:
        raise ImageServiceError(f"{redacted(image_ref)}: unsupported URL scheme {scheme!r}")
    from imagecache.images.url import UrlSource

    return UrlSource(
        timeout=settings.timeout,
        verify=False if settings.insecure else (settings.cafile or True),
    )

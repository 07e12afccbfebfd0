"""What the image service says of its images, for ``evict_deleted_images_first``.

:func:`observe_upstream` lists every image Glance shows these credentials (all pages, every
visibility, hidden ones too) as one :class:`~imagecache.model.Upstream`. Only a listing read to
its last page is returned, so that ``complete`` can tell a deleted image from one not yet read.

It never raises: an image service that cannot be listed, whole (unreachable, not configured, an
HTTP error, a malformed or hostile answer), only turns the preference off for the pass, as a note
(``upstream-unavailable``) that blocks nothing.
"""

from __future__ import annotations

from imagecache.errors import ConfigError, ImageServiceError
from imagecache.model import Problem, ProblemCode, Upstream
from imagecache.settings import GlanceSettings

__all__ = ["observe_upstream"]

_REF = "glance"


def observe_upstream(
    settings: GlanceSettings, *, page_size: int | None = None
) -> tuple[Upstream | None, tuple[Problem, ...]]:
    """Every image's (id, status) the image service lists; None and a note when it cannot.

    ``page_size``: images asked for per request (default: Glance's usual maximum, 1000).
    """
    # keystoneauth and requests only when the option asks for them (plan alone needs neither).
    from imagecache.images.glance import LIST_PAGE_SIZE, GlanceClient

    try:
        client = GlanceClient(settings)
    except ConfigError as exc:
        return None, (_unavailable(f"no image service to ask: {exc}"),)
    try:
        statuses = client.list_images(page_size=LIST_PAGE_SIZE if page_size is None else page_size)
    except ImageServiceError as exc:
        return None, (_unavailable(str(exc)),)
    finally:
        client.close()
    return Upstream(statuses=statuses, complete=True), ()


def _unavailable(why: str) -> Problem:
    return Problem(
        ProblemCode.UPSTREAM_UNAVAILABLE,
        _REF,
        f"cannot list the image service's images ({why}): deleted and deactivated images are "
        "not evicted first this pass",
    )

"""What the image service says of the cached images, for ``evict_deleted_images_first``.

:func:`observe_upstream` never raises: an image service that cannot be listed, whole, only
turns the preference off for the pass (a note, ``upstream-unavailable``).
"""

from __future__ import annotations

from imagecache.model import Problem, ProblemCode, Upstream
from imagecache.settings import GlanceSettings

__all__ = ["observe_upstream"]


def observe_upstream(settings: GlanceSettings) -> tuple[Upstream | None, tuple[Problem, ...]]:
    """Every image's (id, status) the image service lists; None and a note when it cannot."""
    del settings
    return None, (
        Problem(ProblemCode.UPSTREAM_UNAVAILABLE, "glance", "listing images is not built yet"),
    )

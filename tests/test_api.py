from __future__ import annotations

import imagecache


def test_public_api_is_explicit_and_sorted() -> None:
    assert imagecache.__all__ == sorted(imagecache.__all__)
    for name in imagecache.__all__:
        assert getattr(imagecache, name) is not None

"""Pinned images, ``<cache>/.imagecache/pins.json``: what ``imagecache pin`` keeps forever.

On the cache's own storage, so every host sharing the cache reads the same pins. Read as
hostile input; a file that exists and cannot be read is ``pins-unreadable`` (blocking: which
entries are pinned is unknown, so nothing is removed).
"""

from __future__ import annotations

import math
import os
from typing import Any

from imagecache.layout import Layout
from imagecache.model import Pin, Problem, ProblemCode
from imagecache.store import fsops
from imagecache.store.jsonfile import read_json_at

__all__ = ["PINS_FILE", "read_pins"]

PINS_FILE = "pins.json"
MAX_BYTES = 4 << 20


def read_pins(layout: Layout) -> tuple[tuple[Pin, ...], tuple[Problem, ...]]:
    """The pins of the cache, and what kept them from being read."""
    ref = f"{layout.state_dir}/{PINS_FILE}"
    try:
        fd = fsops.open_dir(layout.state_dir)
    except FileNotFoundError:
        return (), ()
    except OSError as exc:
        return (), (_unreadable(ref, exc.strerror or str(exc)),)
    try:
        return _pins_from(read_json_at(fd, PINS_FILE, max_bytes=MAX_BYTES)), ()
    except FileNotFoundError:
        return (), ()
    except OSError as exc:
        return (), (_unreadable(ref, exc.strerror or str(exc)),)
    except (ValueError, RecursionError) as exc:
        return (), (_unreadable(ref, str(exc)),)
    finally:
        os.close(fd)


def _unreadable(ref: str, why: str) -> Problem:
    return Problem(
        ProblemCode.PINS_UNREADABLE,
        ref,
        f"cannot read the pins: {why}; which entries are pinned is unknown, so nothing is "
        "removed (fix or remove the file; `imagecache pin` rewrites it)",
    )


def _pins_from(doc: Any) -> tuple[Pin, ...]:
    if not isinstance(doc, dict) or not isinstance(doc.get("pins"), list):
        raise ValueError("not a pins document (an object with a 'pins' list)")
    out = []
    for item in doc["pins"]:
        if not isinstance(item, dict):
            raise ValueError("a pin is not an object")
        image, at, by = item.get("image"), item.get("pinned_at_epoch"), item.get("by")
        comment = item.get("comment", "")
        if not isinstance(image, str) or not image or not isinstance(by, str):
            raise ValueError("a pin has no image or host")
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
            raise ValueError(f"pin {image!r}: pinned_at_epoch is not a number")
        if not isinstance(comment, str):
            raise ValueError(f"pin {image!r}: comment is not text")
        out.append(Pin(image, float(at), by, comment))
    return tuple(out)

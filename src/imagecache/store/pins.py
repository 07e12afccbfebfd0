"""Pinned images, ``<cache>/.imagecache/pins.json``: what ``imagecache pin`` keeps forever.

On the cache's own storage, so every host sharing the cache reads the same pins. Changed only
by :func:`pin` and :func:`unpin`, each a read-modify-write under ``.imagecache/pins.lock``,
replaced atomically (temp name, fsync, rename, all through the directory's descriptor: a
symlink swapped in for ``.imagecache`` is refused, one swapped in for ``pins.json`` is neither
followed nor opened)::

    {"schema": 1, "version": "0.1.0",
     "pins": [{"image": "6b1f...", "entry": "356a...", "by": "h1",
               "pinned_at": "2026-12-01T10:00:00+00:00", "pinned_at_epoch": 1796119200.0,
               "comment": "golden image of the CI"}]}

``entry`` (the image's fingerprint) is for people; readers derive it from ``image``. Read as
hostile input: a file that exists and is not such a document is ``pins-unreadable`` (blocking:
which entries are pinned is unknown, so nothing is removed), and a writer refuses to replace it
(which would lose every other pin).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from imagecache import locks, naming
from imagecache._version import __version__
from imagecache.errors import ImageCacheError
from imagecache.layout import Layout
from imagecache.model import Pin, Problem, ProblemCode
from imagecache.plan import iso
from imagecache.store import fsops
from imagecache.store.jsonfile import read_json_at

__all__ = ["MAX_IMAGE", "PINS_FILE", "SCHEMA", "PinsError", "check_image", "pin", "read_pins",
           "unpin"]  # fmt: skip

SCHEMA = 1
PINS_FILE = "pins.json"
PINS_LOCK = "pins.lock"
MAX_BYTES = 4 << 20  # thousands of pins of the longest references
MAX_IMAGE = 1024  # a Glance id is 36 characters; a URL rarely more than a few hundred
MAX_COMMENT = 1024
MAX_HOST = 1024
_MAX_EPOCH = float(1 << 63)
# A temp file of pins.json, left by a writer killed between creating and renaming it.
_TEMP = re.compile(re.escape(PINS_FILE) + r"\.[0-9]+\.[0-9a-f]+" + re.escape(naming.TEMP_SUFFIX))


class PinsError(ImageCacheError):
    """The pins cannot be changed: the file cannot be read (it is then left as it is), or the
    state directory cannot be opened or written."""

    exit_code = 1


def check_image(image: str) -> str:
    """``image`` if it can be pinned: a Glance image id or a URL, as given.

    Raises:
        ValueError: empty, longer than :data:`MAX_IMAGE` characters, or with whitespace or a
            character that is not printable (a control character, an undecodable byte).
    """
    if not image:
        raise ValueError("an image reference must not be empty")
    if len(image) > MAX_IMAGE:
        raise ValueError(f"an image reference has at most {MAX_IMAGE} characters")
    if not image.isprintable() or any(c.isspace() for c in image):
        raise ValueError(
            "an image reference (a Glance id or a URL) has no whitespace and no control or "
            "undecodable characters"
        )
    return image


def read_pins(layout: Layout) -> tuple[tuple[Pin, ...], tuple[Problem, ...]]:
    """The pins of the cache, and what kept them from being read; never raises."""
    try:
        fd = fsops.open_dir(layout.state_dir)
    except FileNotFoundError:
        return (), ()
    except OSError as exc:
        return (), (_unreadable(_ref(layout), exc.strerror or str(exc)),)
    try:
        return _read_at(fd, _ref(layout)), ()
    except PinsError as exc:
        return (), (_unreadable(_ref(layout), str(exc)),)
    finally:
        os.close(fd)


def pin(
    layout: Layout, image: str, *, host: str, now: float, comment: str = "", timeout: float = 10
) -> bool:
    """Pin ``image`` (by ``host``, at ``now``); False if it was pinned already (nothing changed:
    the first pin's comment stays; unpin and pin again to change it).

    The state directory is made when missing; the cache directory must exist.

    Raises:
        ValueError: ``image`` cannot be pinned (:func:`check_image`), or ``comment`` is longer
            than 1024 characters.
        PinsError: the pins file cannot be read (left untouched), pinning would make it larger
            than it may be, ``host`` is longer than 1024 characters, or the state directory
            cannot be opened or written.
        LockTimeout: another writer held the pins lock for ``timeout`` seconds.
    """
    check_image(image)
    if len(comment) > MAX_COMMENT:
        raise ValueError(f"a comment has at most {MAX_COMMENT} characters")
    if len(host) > MAX_HOST:  # what a reader would refuse, and then every pin with it
        raise PinsError(f"a host name has at most {MAX_HOST} characters")

    def add(pins: tuple[Pin, ...]) -> tuple[Pin, ...] | None:
        if any(p.image == image for p in pins):
            return None
        return (*pins, Pin(image, now, host, comment))

    return _update(layout, add, create=True, timeout=timeout)


def unpin(layout: Layout, image: str, *, timeout: float = 10) -> bool:
    """Unpin ``image``; False if it was not pinned (nothing changed, no file made).

    Raises:
        PinsError: the pins file cannot be read (left untouched), or the state directory cannot
            be opened or written.
        LockTimeout: another writer held the pins lock for ``timeout`` seconds.
    """

    def drop(pins: tuple[Pin, ...]) -> tuple[Pin, ...] | None:
        kept = tuple(p for p in pins if p.image != image)
        return kept if len(kept) < len(pins) else None

    return _update(layout, drop, create=False, timeout=timeout)


def _update(
    layout: Layout,
    change: Callable[[tuple[Pin, ...]], tuple[Pin, ...] | None],
    *,
    create: bool,
    timeout: float,
) -> bool:
    ref = _ref(layout)
    try:
        with _locked(layout, create=create, timeout=timeout) as dir_fd:
            if dir_fd is None:
                return False  # no state directory: nothing is pinned
            try:
                current = _read_at(dir_fd, ref)
            except PinsError as exc:
                raise PinsError(f"{exc}; left as it is (fix it, or move it away and pin the "
                                "images again)") from exc  # fmt: skip
            new = change(current)
            if new is None:
                return False
            data = _encode(new)
            if len(data) > MAX_BYTES:
                raise PinsError(f"{ref}: more pins than fit in {MAX_BYTES} bytes; unpin some")
            _drop_dead_temps(dir_fd)
            temp = naming.temp_name(PINS_FILE, os.getpid(), secrets.token_hex(4))
            fsops.replace_at(dir_fd, PINS_FILE, data, temp=temp)
            return True
    except OSError as exc:
        raise PinsError(f"cannot change the pins in {layout.state_dir}: {_why(exc)}") from exc


@contextmanager
def _locked(layout: Layout, *, create: bool, timeout: float) -> Iterator[int | None]:
    """The state directory's descriptor, with the pins lock in it held; None when there is no
    state directory and ``create`` is false.

    The lock is taken by path: its file must be the one in the directory opened, or the
    directory was replaced meanwhile and the lock protects another one.
    """
    try:
        dir_fd = fsops.open_dir(layout.state_dir, create=create)
    except FileNotFoundError:
        if create:
            raise PinsError(f"{layout.cache_dir}: no cache directory") from None
        yield None
        return
    try:
        path = posixpath.join(layout.state_dir, PINS_LOCK)
        with locks.held_lock(path, timeout=timeout, poll=0.05, what="pins") as lock_fd:
            held, here = os.fstat(lock_fd), os.stat(PINS_LOCK, dir_fd=dir_fd, follow_symlinks=False)
            if (held.st_dev, held.st_ino) != (here.st_dev, here.st_ino):
                raise PinsError(f"{layout.state_dir} was replaced while it was locked; try again")
            yield dir_fd
    finally:
        os.close(dir_fd)


def _drop_dead_temps(dir_fd: int) -> None:
    """Temp files of pins.json: under the lock, every one is a dead writer's; best effort."""
    for name in os.listdir(dir_fd):
        if _TEMP.fullmatch(name):
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    fsops.remove(name, dir_fd=dir_fd)


def _encode(pins: tuple[Pin, ...]) -> bytes:
    doc = {
        "schema": SCHEMA,
        "version": __version__,
        "pins": [
            {
                "image": p.image,
                "entry": naming.fingerprint(p.image),
                "by": p.by,
                "pinned_at": iso(p.pinned_at),
                "pinned_at_epoch": p.pinned_at,
                "comment": p.comment,
            }
            for p in pins
        ],
    }
    return (json.dumps(doc, indent=1, ensure_ascii=True) + "\n").encode("ascii")


def _ref(layout: Layout) -> str:
    return posixpath.join(layout.state_dir, PINS_FILE)


def _why(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _unreadable(ref: str, why: str) -> Problem:
    return Problem(
        ProblemCode.PINS_UNREADABLE,
        ref,
        f"cannot read the pins: {why}; which entries are pinned is unknown, so nothing is "
        "removed (fix the file, or move it away and pin again)",
    )


# Reading: the file sits in a directory every host of the storage (and root) can write.


def _read_at(dir_fd: int, ref: str) -> tuple[Pin, ...]:
    """The pins in ``dir_fd``'s pins file; none if it is missing.

    Raises:
        PinsError: it is not a regular file (a symlink, a FIFO, a directory: none is opened),
            is larger than :data:`MAX_BYTES`, cannot be read, or is not a pins document.
    """
    try:
        doc = read_json_at(dir_fd, PINS_FILE, max_bytes=MAX_BYTES,
                           object_pairs_hook=_no_duplicates)  # fmt: skip
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise PinsError(f"{ref}: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise PinsError(f"{ref}: not a pins document: {str(exc)[:200]}") from exc
    try:
        return _pins_from(doc)
    except ValueError as exc:
        raise PinsError(f"{ref}: not a pins document: {str(exc)[:200]}") from exc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two "pins" keys: JSON readers disagree which one counts, so neither is trusted.
    doc = dict(pairs)
    if len(doc) < len(pairs):
        raise ValueError("a key appears twice in one object")
    return doc


def _text(item: dict[str, Any], key: str, limit: int, default: str | None = None) -> str:
    value = item.get(key, default)
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{key} is not text of at most {limit} characters")
    return value


def _epoch(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("pinned_at_epoch is not epoch seconds")
    if not -_MAX_EPOCH < value < _MAX_EPOCH or not math.isfinite(value):  # ints compare exactly
        raise ValueError("pinned_at_epoch is not finite epoch seconds")
    return float(value)


def _pins_from(doc: Any) -> tuple[Pin, ...]:
    if not isinstance(doc, dict) or not isinstance(doc.get("pins"), list):
        raise ValueError("not an object with a 'pins' list")
    schema = doc.get("schema")
    if type(schema) is not int or schema != SCHEMA:
        raise ValueError(f"schema {str(schema)[:20]} is not {SCHEMA}")
    out: dict[str, Pin] = {}
    for n, item in enumerate(doc["pins"]):
        if not isinstance(item, dict):
            raise ValueError(f"pin {n} is not an object")
        image = item.get("image")
        if not isinstance(image, str):
            raise ValueError(f"pin {n} has no image")
        try:
            check_image(image)
            at = _epoch(item.get("pinned_at_epoch"))
            by, comment = _text(item, "by", MAX_HOST), _text(item, "comment", MAX_COMMENT, "")
        except ValueError as exc:
            raise ValueError(f"pin {n}: {exc}") from None
        # The same image twice (an edit by hand): one pin, the first.
        out.setdefault(image, Pin(image, at, by, comment))
    return tuple(out.values())

"""Fetch images into the cache: once, verified, atomically, under the entry lock.

``ensure_cached(image)`` is Nova's ``Image.cache`` + ``fetch_to_raw`` done the safe way
(nova-imagecache.md §4 and §9.1 items 5 and 8):

1. take the entry lock ``locks/nova-<sha1(image)>``, the lock Nova and our cleaner take;
2. under it, look for the entry: present → touch it (it is in use again) → ``existing``;
3. absent → stream the bytes into a temp file unique to this writer
   (``<name>.<pid>.<token>.part``, never Nova's ``<name>.part``) while hashing them (Glance's
   ``os_hash_algo``; its MD5 ``checksum`` only without one); compare size and digest; inspect
   the format with our own header parser and ``qemu-img info``
   (:mod:`imagecache.images.admission`); convert to raw when ``force_raw_images`` and check
   the result still reads as raw to both; fsync; rename into place without replacing →
   ``cached``.

Any failure removes the temp files and publishes nothing. A process killed mid-download leaves
its temp file for the reaper (a ``temp`` entry, removed after ``stale_temp_seconds`` when its lock
is free). Kernels and ramdisks named by an image are cached the same way, without conversion.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from imagecache import locks
from imagecache.errors import (
    ChecksumMismatch,
    EntryChanged,
    ImageCacheError,
    ImageServiceError,
)
from imagecache.images import admission, cache_name, hashing, is_url, open_source, process
from imagecache.images.base import ImageMeta, ImageSource
from imagecache.integrity import LOCAL, Digest, DigestRecord, DigestSource, Verdict
from imagecache.layout import Layout
from imagecache.results import Result
from imagecache.settings import FetchSettings, GlanceSettings
from imagecache.store import digests, fsops

__all__ = [
    "FetchOptions",
    "FetchResult",
    "Fetched",
    "Sources",
    "ensure_cached",
    "fetch_locked",
    "precache",
]

LOG = logging.getLogger(__name__)

OnBytes = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class FetchOptions:
    """Where the cache is and how to fill it: the layout and the fetch section of the settings."""

    layout: Layout
    lock_timeout: float
    force_raw: bool
    vmdk_allowed_types: frozenset[str]

    @classmethod
    def of(cls, layout: Layout, fetch: FetchSettings) -> FetchOptions:
        return cls(layout, fetch.lock_timeout, fetch.force_raw, fetch.vmdk_allowed_types)

    @property
    def instances_path(self) -> str:
        return self.layout.instances_path

    @property
    def cache_dir(self) -> str:
        return self.layout.cache_dir


@dataclass(frozen=True, slots=True)
class Fetched:
    """An entry that is in the cache now: downloaded by this call, or found there."""

    image: str
    name: str
    path: Path
    outcome: Result  # cached or existing
    bytes: int  # size of the cache entry
    meta: ImageMeta | None  # what the service said, when it was asked (downloads)


@dataclass(frozen=True, slots=True)
class FetchResult:
    """One row of a pre-cache report."""

    image: str
    name: str
    result: Result  # cached, existing or failed
    role: str = "image"  # or "kernel", "ramdisk" of the image before it
    reason: str | None = None
    bytes: int | None = None

    @property
    def failed(self) -> bool:
        return self.result is Result.FAILED

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "name": self.name,
            "role": self.role,
            "result": str(self.result),
            "reason": self.reason,
            "bytes": self.bytes,
        }


def ensure_cached(
    image_ref: str,
    *,
    source: ImageSource,
    options: FetchOptions,
    convert: bool = True,
    on_bytes: OnBytes | None = None,
) -> Fetched:
    """Make sure ``image_ref`` (a Glance id or a URL) is in the cache; download it at most once.

    Takes the entry lock, then does :func:`fetch_locked`. ``convert=False`` keeps the image as
    downloaded (kernels, ramdisks). ``on_bytes(n)`` is called after each chunk written.

    Raises:
        LockTimeout: another process held the entry for ``lock_timeout`` seconds.
        ImageServiceError: the service failed, the image is unknown or not active
            (ImageNotFound, ImageUnavailable, ImageServiceUnreachable), or the bytes do not match
            its size, checksum or hash (ChecksumMismatch).
        ImageFormatError: the bytes are not the claimed format, or are unsafe (UnsafeImageError).
        ProcessError: qemu-img failed.
        OSError: the cache directory or the lock cannot be created or written (disk full, ...).
    """
    name = cache_name(image_ref)
    fsops.ensure_dir(options.cache_dir)
    with locks.entry_lock(options.instances_path, name, timeout=options.lock_timeout):
        return fetch_locked(
            image_ref, source=source, options=options, convert=convert, on_bytes=on_bytes
        )


def fetch_locked(
    image_ref: str,
    *,
    source: ImageSource,
    options: FetchOptions,
    convert: bool = True,
    on_bytes: OnBytes | None = None,
) -> Fetched:
    """:func:`ensure_cached` for a caller that already holds the entry lock (``create-disk``).

    Raises as :func:`ensure_cached`, except LockTimeout.
    """
    name = cache_name(image_ref)
    path = Path(options.cache_dir, name)
    if path.exists():
        touch_in_use(path)
        return Fetched(image_ref, name, path, Result.EXISTING, path.stat().st_size, None)
    meta = source.get(image_ref)
    try:
        found = _download(
            image_ref,
            path,
            source=source,
            meta=meta,
            options=options,
            convert=convert,
            on_bytes=on_bytes,
        )
    except EntryChanged:
        # Nova's pre-cache takes no lock: its copy got the name while ours was being made (our
        # temp files are gone). Theirs passed Nova's own checks; it is in the cache now.
        if not path.exists():
            raise
        LOG.info("%s appeared as %s while it was being fetched; keeping it", image_ref, name)
        touch_in_use(path)
        return Fetched(image_ref, name, path, Result.EXISTING, path.stat().st_size, meta)
    LOG.info("cached %s as %s (%s)", image_ref, name, found.format)
    return Fetched(image_ref, name, path, Result.CACHED, path.stat().st_size, meta)


@dataclass(frozen=True, slots=True)
class _Copy:
    """A verified, admitted (and converted) copy of an image in a temp file of the cache."""

    path: Path
    found: admission.Admitted
    digest: str  # xxh3-128 of ``path``'s bytes
    converted: bool


@contextmanager
def _prepared(
    image_ref: str,
    name: str,
    *,
    source: ImageSource,
    meta: ImageMeta,
    options: FetchOptions,
    convert: bool,
    on_bytes: OnBytes | None,
) -> Iterator[_Copy]:
    """Download, verify, admit and convert ``image_ref`` into a temp file of the cache; the
    temp files are removed when the ``with`` block ends (the one published meanwhile is gone)."""
    made: list[Path] = []
    try:
        with fsops.temp_file(options.cache_dir, name) as (temp, stream):
            made.append(temp)
            with source.open_stream(image_ref, meta) as chunks:
                digest = _copy_verified(chunks, stream, meta, on_bytes=on_bytes)
        found = admission.check_format(
            temp, claimed=meta.disk_format, vmdk_allowed_types=options.vmdk_allowed_types
        )
        copy = _Copy(temp, found, digest, converted=False)
        if convert and options.force_raw and found.format != "raw":
            with fsops.temp_path(options.cache_dir, name) as converted:
                made.append(converted)
                process.convert_to_raw(temp, converted, source_format=found.qemu_format)
                admission.check_raw(converted)
                fd = os.open(converted, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:  # the conversion's output is a new file: read once for its digest
                    digest = hashing.hash_file(fd, (LOCAL,))[LOCAL]
                finally:
                    os.close(fd)
            copy = _Copy(converted, found, digest, converted=True)
        yield copy
    finally:
        for path in made:
            path.unlink(missing_ok=True)


@contextmanager
def fetched_copy(
    image_ref: str, *, source: ImageSource, options: FetchOptions, convert: bool, name: str
) -> Iterator[str]:
    """A verified copy of ``image_ref`` as it would be cached, in a temp file of the cache that
    is removed after the ``with`` block (``verify --repair`` reads the good bytes from it).

    Raises as :func:`ensure_cached`, except LockTimeout.
    """
    meta = source.get(image_ref)
    with _prepared(image_ref, name, source=source, meta=meta, options=options,
                   convert=convert, on_bytes=None) as copy:  # fmt: skip
        yield str(copy.path)


def _download(
    image_ref: str,
    path: Path,
    *,
    source: ImageSource,
    meta: ImageMeta,
    options: FetchOptions,
    convert: bool,
    on_bytes: OnBytes | None,
) -> admission.Admitted:
    """Download, verify, admit, convert and publish ``image_ref`` as ``path``, with its digest
    record; see the module.

    Raises as :func:`fetch_locked`, and EntryChanged when ``path`` appeared meanwhile (the temp
    files are removed in every case).
    """
    with _prepared(image_ref, path.name, source=source, meta=meta, options=options,
                   convert=convert, on_bytes=on_bytes) as copy:  # fmt: skip
        fsops.atomic_publish(copy.path, path)
    _record(options, image_ref, path, meta, copy)
    return copy.found


def _record(
    options: FetchOptions, image_ref: str, path: Path, meta: ImageMeta, copy: _Copy
) -> None:
    """The digest record of a published entry: ``glance`` (the service's digest of these very
    bytes), ``converted`` (our conversion of a download that digest verified), or ``first-seen``
    for a URL that publishes no digest. A record that cannot be written is logged: the entry is
    good, and a later verification hashes it as new."""
    published = None
    if meta.hash_algo and meta.hash_value:
        published = Digest(meta.hash_algo, meta.hash_value.lower())
    elif meta.checksum:
        published = Digest("md5", meta.checksum.lower())
    if copy.converted:
        source = DigestSource.CONVERTED
    else:
        source = DigestSource.GLANCE if published else DigestSource.FIRST_SEEN
    try:
        st = path.stat()
        record = DigestRecord(
            # Verified as it streamed in, just before the rename that set its ctime.
            path.name, copy.digest, st.st_dev, st.st_ino, st.st_size, st.st_ctime, Verdict.GOOD,
            source, expected=None if copy.converted else published, image=image_ref,
            image_digest=published, ctime_ns=st.st_ctime_ns, birth_ns=fsops.birth_ns(path),
        )  # fmt: skip
        digests.write_record(options.layout, record)
    except (OSError, ValueError) as exc:
        LOG.warning("%s: cached, but its digest record cannot be written: %s", path.name, exc)


def touch_in_use(path: Path) -> None:
    """Refresh an entry found in use again, so no pass (ours on a peer, or Nova's) finds it old.

    A refused touch (EACCES/EPERM: a base owned by libvirt-qemu on NFS, LP 1809123) is a
    warning, as in Nova's spawn path: the image is there, and the next pass touches it again.
    Raises OSError for anything else (the entry vanished).
    """
    try:
        fsops.touch(path)
    except PermissionError as exc:
        LOG.warning("cannot refresh the mtime of %s (%s); using it anyway", path, exc.strerror)


def _hashers(meta: ImageMeta) -> list[tuple[str, str, Any]]:
    """(label, expected hex digest, hash object) of the digest to verify the bytes with: the
    strongest the image service publishes.

    Glance's multihash (``os_hash_algo``/``os_hash_value``, SHA-512 by default) when there is
    one; its legacy MD5 ``checksum`` only when there is none (an image uploaded before Rocky,
    a store that sets only that). The same choice as python-glanceclient's and openstacksdk's
    downloads. Verifying MD5 besides SHA-512 adds nothing SHA-512 does not already prove and
    cost 16 % of a 1 GiB precache (issue 14). None for a source that publishes neither (a URL):
    only the size is checked.
    """
    if meta.hash_algo and meta.hash_value:
        try:
            hasher = hashlib.new(meta.hash_algo)
        except ValueError as exc:
            raise ImageServiceError(
                f"image {meta.id}: unsupported os_hash_algo {meta.hash_algo!r}"
            ) from exc
        return [(f"os_hash_value ({meta.hash_algo})", meta.hash_value, hasher)]
    if meta.checksum:
        return [("checksum (md5)", meta.checksum, hashlib.md5(usedforsecurity=False))]
    return []


def _copy_verified(
    chunks: Iterable[bytes], stream: BinaryIO, meta: ImageMeta, *, on_bytes: OnBytes | None
) -> str:
    """Write every chunk to ``stream`` while hashing it; raise ChecksumMismatch on any difference.
    Returns the bytes' local digest (xxh3-128, for the entry's digest record): computed as they
    stream in, so the record costs no second read of the file.

    The hashes run in threads of :class:`hashing.Digests`: hashlib and xxhash release the GIL,
    so receiving, writing and hashing proceed on separate cores instead of one after the other.
    """
    hashers = _hashers(meta)
    local = hashing.new(LOCAL)
    total = 0
    writeback = fsops.Writeback(stream.fileno())
    with hashing.Digests([local, *(h for _, _, h in hashers)]) as digests:
        for chunk in chunks:
            # Stop as soon as the bytes outgrow what the service announced: a store or server
            # sending more must not fill the cache's disk first. A URL without Content-Length
            # has no size (None): nothing to stop at, as for Nova's download of such a URL.
            if meta.size is not None and total + len(chunk) > meta.size:
                raise ChecksumMismatch(
                    f"image {meta.id}: got more than the {meta.size} bytes the service says"
                )
            digests.feed(chunk)
            view = memoryview(chunk)
            while view:
                view = view[stream.write(view) :]
            total += len(chunk)
            writeback.wrote(len(chunk))  # the disk writes while the network receives
            if on_bytes is not None:
                on_bytes(len(chunk))
        # While the hash catches up, flush what is left: the file is durable before it is
        # published (writeback alone flushes no metadata and promises nothing).
        os.fsync(stream.fileno())
    if meta.size is not None and total != meta.size:
        raise ChecksumMismatch(f"image {meta.id}: got {total} bytes, the service says {meta.size}")
    for label, expected, hasher in hashers:
        if hasher.hexdigest() != expected.lower():
            raise ChecksumMismatch(
                f"image {meta.id}: {label} mismatch: got {hasher.hexdigest()}, "
                f"the service says {expected}"
            )
    return local.hexdigest()


class Sources:
    """The image source of each reference: one shared Glance client, a URL source per URL.

    Thread-safe; ``close()`` closes what was opened.
    """

    def __init__(self, settings: GlanceSettings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._opened: dict[str, ImageSource] = {}

    def __call__(self, image_ref: str) -> ImageSource:
        """Raises ConfigError (no usable Glance settings) or ImageServiceError (bad URL)."""
        key = image_ref if is_url(image_ref) else "glance"
        with self._lock:
            if key not in self._opened:
                self._opened[key] = open_source(image_ref, self._settings)
            return self._opened[key]

    def close(self) -> None:
        with self._lock:
            for source in self._opened.values():
                source.close()
            self._opened.clear()


def precache(
    image_refs: Sequence[str],
    *,
    sources: Callable[[str], ImageSource],
    options: FetchOptions,
    concurrency: int = 1,
    on_bytes: OnBytes | None = None,
    on_result: Callable[[FetchResult], None] | None = None,
) -> tuple[FetchResult, ...]:
    """Cache each image (and the kernel and ramdisk it names), ``concurrency`` at a time.

    Never raises for one image: each gets a row, ``error`` with the reason when it failed. Rows
    come in the order of ``image_refs`` (duplicates once), each image followed by its kernel and
    ramdisk. ``on_result`` is called as rows complete (from worker threads).
    """
    unique = list(dict.fromkeys(image_refs))

    def one(ref: str) -> list[FetchResult]:
        rows = _precache_one(ref, sources=sources, options=options, on_bytes=on_bytes)
        for row in rows:
            if on_result is not None:
                on_result(row)
        return rows

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        done = list(pool.map(one, unique))
    return tuple(row for rows in done for row in rows)


def _precache_one(
    ref: str,
    *,
    sources: Callable[[str], ImageSource],
    options: FetchOptions,
    on_bytes: OnBytes | None,
) -> list[FetchResult]:
    try:
        source = sources(ref)
        got = ensure_cached(ref, source=source, options=options, on_bytes=on_bytes)
    except (ImageCacheError, OSError) as exc:
        LOG.warning("precache %s: %s", ref, exc)
        return [FetchResult(ref, cache_name(ref), Result.FAILED, reason=_reason(exc))]
    rows = [FetchResult(ref, got.name, got.outcome, bytes=got.bytes)]
    if is_url(ref):
        return rows  # URLs name no kernel or ramdisk
    meta = got.meta
    if meta is None:
        try:
            meta = source.get(ref)
        except ImageServiceError as exc:
            # The image itself is here; only its kernel and ramdisk cannot be looked up now.
            LOG.warning("precache %s: cannot look up its kernel and ramdisk: %s", ref, exc)
            return rows
    for role, dep in (("kernel", meta.kernel_id), ("ramdisk", meta.ramdisk_id)):
        if not dep:
            continue
        try:
            dep_got = ensure_cached(
                dep, source=source, options=options, convert=False, on_bytes=on_bytes
            )
        except (ImageCacheError, OSError) as exc:
            LOG.warning("precache %s %s of %s: %s", role, dep, ref, exc)
            rows.append(
                FetchResult(dep, cache_name(dep), Result.FAILED, role=role, reason=_reason(exc))
            )
        else:
            rows.append(FetchResult(dep, dep_got.name, dep_got.outcome, role, bytes=dep_got.bytes))
    return rows


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"

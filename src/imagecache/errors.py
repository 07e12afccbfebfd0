"""The one exception tree of imagecache.

Every error the library raises on purpose derives from :class:`ImageCacheError`. Adapters translate
foreign exceptions (``OSError``, ``CalledProcessError``, HTTP and keystoneauth errors) at the
boundary with ``raise X(...) from exc``; only the command line turns them into exit codes::

    ImageCacheError                      exit 1 unless noted
    ├── ConfigError                      exit 2: a bad option value, a missing or unparsable file
    ├── UsageError                       exit 2: a bad command line
    ├── ImageFormatError                 a header that cannot be parsed or is unsafe
    │   └── UnsafeImageError             a valid image we refuse (backing or data file, VMDK type)
    ├── ObservationError                 a source of the view cannot be read (inventory, registry)
    ├── LockTimeout                      an entry lock was not obtained in time
    ├── EntryChanged                     a planned entry differs from what was observed
    ├── ImageServiceError                Glance / URL transfer failed
    │   ├── ImageNotFound                no such image (or not visible to us)
    │   ├── ImageUnavailable             exists but cannot be downloaded now (deactivated, queued)
    │   ├── ImageServiceUnreachable      connection refused, DNS, timeout
    │   └── ChecksumMismatch             bytes do not match the service's checksum or hash
    └── ProcessError                     a helper process (qemu-img, mkfs, mkswap) failed
"""

from __future__ import annotations

__all__ = [
    "ChecksumMismatch",
    "ConfigError",
    "EntryChanged",
    "ImageCacheError",
    "ImageFormatError",
    "ImageNotFound",
    "ImageServiceError",
    "ImageServiceUnreachable",
    "ImageUnavailable",
    "LockTimeout",
    "ObservationError",
    "ProcessError",
    "UnsafeImageError",
    "UsageError",
]


class ImageCacheError(Exception):
    """Root of every error imagecache raises on purpose."""

    exit_code = 1


class ConfigError(ImageCacheError):
    """A configuration value or file is wrong; the message names the option."""

    exit_code = 2


class UsageError(ImageCacheError):
    """The command line is wrong."""

    exit_code = 2


class ImageFormatError(ImageCacheError):
    """An image header is truncated, inconsistent or otherwise unparsable."""


class UnsafeImageError(ImageFormatError):
    """A well-formed image that must not enter the cache (backing file, data file, VMDK type)."""


class ObservationError(ImageCacheError):
    """A source of the view (inventory file, registry, directory) could not be read."""


class LockTimeout(ImageCacheError):
    """An entry lock was not obtained within the configured wait."""


class EntryChanged(ImageCacheError):
    """A cache entry is no longer the file that was planned (inode, size or mtime differ)."""


class ImageServiceError(ImageCacheError):
    """The image service (Glance, an HTTP server, a file URL) failed."""


class ImageNotFound(ImageServiceError):
    """The image does not exist or is not visible to this client."""


class ImageUnavailable(ImageServiceError):
    """The image exists but cannot be downloaded now (deactivated, queued, killed)."""


class ImageServiceUnreachable(ImageServiceError):
    """The image service could not be reached at all."""


class ChecksumMismatch(ImageServiceError):
    """Downloaded bytes do not match the checksum or hash the service published."""


class ProcessError(ImageCacheError):
    """A helper process (qemu-img, mkfs, mkswap) exited with an error."""

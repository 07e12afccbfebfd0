"""Every mutation of the filesystem, each one crash-safe (DESIGN.md §4, STYLE.md habit 7).

A process killed at any instant leaves every file either as it was or as it was meant to become:

- new content is written under a temporary name in the same directory, fsynced, then renamed over
  the final name (:func:`atomic_write`), or renamed into a name that must not exist yet
  (:func:`atomic_publish`);
- removal goes through a quarantine (:mod:`imagecache.store.trash`);
- every rename and unlink is followed by an fsync of the directories it changed, so it survives a
  power loss too.

Directories this project owns inside the cache (``.imagecache/``, its ``trash/``) are reached only
through descriptors of real directories (:func:`open_dir`, ``O_NOFOLLOW``), and renamed into,
unlinked from and synced through those descriptors: a symlink swapped in for one of them is refused,
never followed out of the tree. Functions taking ``dir_fd`` resolve the *last component* of the path
they are given in that directory; the whole path only names the file in error messages.

None of these functions lock anything: the caller holds the entry lock
(:func:`imagecache.locks.entry_lock`) of the entry it changes and has re-checked it under the lock.
Functions that free space return the bytes they freed, measured (``st_blocks * 512`` of an
``lstat`` just before), not estimated.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, cast

from imagecache import naming, owners
from imagecache.errors import EntryChanged

__all__ = [
    "Writeback",
    "atomic_publish",
    "atomic_write",
    "birth_ns",
    "ensure_dir",
    "fsync_dir",
    "open_dir",
    "remove",
    "rename_noreplace",
    "replace_at",
    "temp_file",
    "temp_path",
    "touch",
]

StrPath = str | os.PathLike[str]

# Linux renameat2(2): fail with EEXIST instead of replacing the target, atomically.
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
# What renameat2 answers where it cannot help: an old kernel, or a filesystem (NFS, some FUSE)
# without RENAME_NOREPLACE support.
_NOREPLACE_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})


def _load_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    func = getattr(libc, "renameat2", None)  # glibc >= 2.28, musl >= 1.2.2
    if func is None:
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return cast("Callable[[int, bytes, int, bytes, int], int]", func)


_renameat2 = _load_renameat2()

# statx(2) for the birth time, which os.stat does not give on Linux (Python 3.11 has no
# os.statx): a file made later on a reused inode number is then not the file that was hashed.
_STATX_BTIME = 0x800
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_SIZE = 256
_BTIME_OFFSET = 80  # struct statx: stx_btime follows stx_atime at byte 64


def _load_statx() -> Callable[[int, bytes, int, int, Any], int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).statx
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    func.restype = ctypes.c_int
    return func


_statx = _load_statx()

# sync_file_range(2): start writeback of a range now, and wait for an earlier one, so that a
# download's final fsync has little left to flush (issue 14). Not in Python's os module.
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", func)


_sync_file_range = _load_sync_file_range()


class Writeback:
    """Writes back a file being written, window by window, while it is being written.

    Call :meth:`wrote` after each write. Every ``window`` bytes it starts the writeback of the
    window just written (``SYNC_FILE_RANGE_WRITE``, which does not wait) and waits for the one
    before it to be on disk: dirty pages never pile up to gigabytes, the disk writes while the
    network receives, and the final ``fsync`` (which is still what makes the file durable:
    ``sync_file_range`` flushes no metadata and promises nothing) has one window left. Where
    the call is missing or refused (ENOSYS; EINVAL, ESPIPE on some filesystems), it does
    nothing, and the final ``fsync`` does it all, as before.
    """

    def __init__(self, fd: int, *, window: int = 32 << 20) -> None:
        self.fd, self.window = fd, window
        self.written = 0
        self.started = 0  # writeback was started for [0, started)
        self.enabled = _sync_file_range is not None

    def wrote(self, nbytes: int) -> None:
        self.written += nbytes
        while self.enabled and self.written - self.started >= self.window:
            start = self.started
            self._range(start, self.window, _SYNC_FILE_RANGE_WRITE)
            if start >= self.window:  # the window before it: wait until it is written
                wait = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE
                self._range(start - self.window, self.window, wait | _SYNC_FILE_RANGE_WAIT_AFTER)
            self.started = start + self.window

    def _range(self, offset: int, nbytes: int, flags: int) -> None:
        if _sync_file_range is None or _sync_file_range(self.fd, offset, nbytes, flags) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP):
            self.enabled = False  # the final fsync does it all
            return
        raise OSError(err, os.strerror(err))


def birth_ns(name: StrPath, *, dir_fd: int | None = None) -> int:
    """When the file ``name`` (not followed if a symlink) was created, in nanoseconds since the
    epoch; 0 where the filesystem or the C library does not say (NFS, tmpfs on old kernels)."""
    if _statx is None:
        return 0
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    at = _AT_FDCWD if dir_fd is None else dir_fd
    if _statx(at, os.fsencode(name), _AT_SYMLINK_NOFOLLOW, _STATX_BTIME, buf) != 0:
        return 0
    mask = int.from_bytes(buf.raw[0:4], "little")
    if not mask & _STATX_BTIME:
        return 0
    sec = int.from_bytes(buf.raw[_BTIME_OFFSET : _BTIME_OFFSET + 8], "little", signed=True)
    nsec = int.from_bytes(buf.raw[_BTIME_OFFSET + 8 : _BTIME_OFFSET + 12], "little")
    return sec * 1_000_000_000 + nsec


def _check_name(name: str) -> None:
    if not naming.valid_entry_name(name):
        raise ValueError(f"not a valid entry name: {name!r}")


def _freed(st: os.stat_result) -> int:
    # A file with another hard link frees nothing when one name goes.
    return st.st_blocks * 512 if st.st_nlink <= 1 else 0


def fsync_dir(directory: StrPath | int) -> None:
    """Make the renames and unlinks in ``directory`` (a path or an open descriptor) durable.

    Raises:
        OSError: the directory cannot be opened, or the sync failed.
    """
    if isinstance(directory, int):
        _fsync_dir_fd(directory)
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync_dir_fd(fd)
    finally:
        os.close(fd)


def _fsync_dir_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems cannot fsync a directory; their renames are as durable as they get.
        if exc.errno != errno.EINVAL:
            raise


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _at(path: StrPath, dir_fd: int | None) -> str:
    """What to hand ``os.*``: ``path`` itself, or its last component when resolved in ``dir_fd``."""
    return os.fspath(path) if dir_fd is None else os.path.basename(os.fspath(path))


def _named(exc: OSError, path: StrPath, path2: StrPath | None = None) -> OSError:
    """``exc`` naming the whole ``path`` (a call through a directory descriptor saw a bare name)."""
    return OSError(exc.errno, exc.strerror, str(path), None, None if path2 is None else str(path2))


def _not_a_directory(path: StrPath, dir_fd: int | None, exc: OSError) -> OSError:
    # O_NOFOLLOW | O_DIRECTORY answers ENOTDIR for a symlink and for a file alike; say which.
    try:
        st = os.stat(_at(path, dir_fd), dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return exc
    if stat.S_ISLNK(st.st_mode):
        return OSError(errno.ELOOP, "a symlink, not a real directory; not followed", str(path))
    return OSError(errno.ENOTDIR, "not a directory", str(path))


_PARENT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def open_dir(path: StrPath, *, dir_fd: int | None = None, create: bool = False) -> int:
    """Open the real directory ``path``, never through a symlink; the caller closes the descriptor.

    The descriptor is ``O_RDONLY | O_DIRECTORY | O_NOFOLLOW``: a symlink in the last component is
    refused, not followed. With ``dir_fd`` that last component is looked up in the open directory
    ``dir_fd`` (its parent), so nothing above it is resolved again. With ``create`` a missing
    directory is made, and its parent synced so that it survives a crash.

    Raises:
        FileNotFoundError: it is missing (and ``create`` is false, or its parent is missing).
        OSError: it is a symlink (``ELOOP``, "a symlink, not a real directory; not followed") or
            something else than a directory (``ENOTDIR``), or it cannot be opened or created.
    """
    name = _at(path, dir_fd)
    try:
        return _open_real_dir(path, dir_fd)
    except FileNotFoundError:
        if not create:
            raise
    try:
        os.mkdir(name, dir_fd=dir_fd)
    except FileExistsError:
        return _open_real_dir(path, dir_fd)  # made meanwhile: open what is there, same checks
    fd = _open_real_dir(path, dir_fd)
    # The parent may be reached through a link the operator made (a symlinked cache): only the
    # new directory itself must be real.
    parent = dir_fd
    if parent is None:
        parent = os.open(os.path.dirname(os.path.abspath(name)), _PARENT_FLAGS)
    try:
        owners.adopt(fd, parent)  # root making it in nova's tree: nova's (see owners.py)
        fsync_dir(parent)
    finally:
        if dir_fd is None:
            os.close(parent)
    return fd


def _open_real_dir(path: StrPath, dir_fd: int | None) -> int:
    try:
        return os.open(_at(path, dir_fd), _DIR_FLAGS, dir_fd=dir_fd)
    except NotADirectoryError as exc:
        raise _not_a_directory(path, dir_fd, exc) from exc
    except OSError as exc:
        raise _named(exc, path) from exc


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path) -> None:
    """Create ``path`` and missing parents, each made durable in its parent directory."""
    if path.is_dir():
        return
    _ensure_dir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    fsync_dir(path.parent)


def ensure_dir(path: StrPath) -> None:
    """Create the directory ``path`` and missing parents (``mkdir -p``), durably.

    Raises:
        OSError: a component exists and is not a directory, or cannot be created.
    """
    _ensure_dir(Path(path))


def _link_and_unlink(
    src: StrPath, dst: StrPath, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None
) -> None:
    # link(2) never replaces an existing name either. A crash between the two calls leaves two
    # names of one inode: no data is lost and no name is clobbered, one extra link remains.
    os.link(
        _at(src, src_dir_fd),
        _at(dst, dst_dir_fd),
        src_dir_fd=src_dir_fd,
        dst_dir_fd=dst_dir_fd,
        follow_symlinks=False,
    )
    os.unlink(_at(src, src_dir_fd), dir_fd=src_dir_fd)


def rename_noreplace(
    src: StrPath, dst: StrPath, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None
) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists; raise FileExistsError if it does.

    With ``src_dir_fd`` / ``dst_dir_fd`` the last component of ``src`` / ``dst`` is resolved in
    that open directory (``renameat2`` and ``linkat`` take directory descriptors), so a symlink
    swapped in for a directory on the way cannot redirect the rename.

    Raises:
        FileExistsError: ``dst`` exists; nothing was renamed.
        OSError: ``src`` is missing (FileNotFoundError), or the rename failed.
    """
    if _renameat2 is not None:
        failed = _renameat2(
            _AT_FDCWD if src_dir_fd is None else src_dir_fd,
            os.fsencode(_at(src, src_dir_fd)),
            _AT_FDCWD if dst_dir_fd is None else dst_dir_fd,
            os.fsencode(_at(dst, dst_dir_fd)),
            _RENAME_NOREPLACE,
        )
        if not failed:
            return
        code = ctypes.get_errno()
        if code not in _NOREPLACE_UNSUPPORTED:
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    try:
        _link_and_unlink(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
    except OSError as exc:
        raise _named(exc, src, dst) from exc


def replace_at(dir_fd: int, name: str, data: bytes, *, temp: str, mode: int = 0o644) -> None:
    """Replace ``name`` in the open directory ``dir_fd`` with ``data``, all or nothing, durably.

    ``temp`` (a fresh name in the same directory) is created exclusively and never through a
    symlink, written, given exactly ``mode``, fsynced and renamed over ``name`` (a symlink there
    is replaced, not followed); the directory is then fsynced. Everything is resolved in
    ``dir_fd``, so a symlink swapped in for the directory on the way redirects nothing.

    Raises:
        OSError: the temp file cannot be created or written (it is then removed), or the rename
            failed.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, mode, dir_fd=dir_fd)
    try:
        with open(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
            owners.adopt(fd, dir_fd)
            os.fsync(fd)
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    _fsync_dir_fd(dir_fd)


def atomic_write(
    path: StrPath, data: bytes, *, mode: int = 0o644, owner: tuple[int, int] | None = None
) -> None:
    """Replace the file ``path`` with ``data``, all or nothing, durably.

    The bytes go to ``naming.temp_name(<name>, pid, token)`` in the same directory (a temp name the
    reaper recognises, should we die), which is fsynced, given exactly ``mode`` (and ``owner``,
    a (uid, gid) pair, when given: a file another service rewrites keeps its owner), renamed over
    ``path``, and the directory is fsynced. Readers see the old content or the new one, never a
    mix, even if the process is killed.

    Raises:
        OSError: the directory does not exist or is not writable, the disk is full, ``path`` is a
            directory, or ``owner`` cannot be given (not root; NFS root squash). The temp file is
            removed on failure.
    """
    final = Path(path)
    temp = final.with_name(naming.temp_name(final.name, os.getpid(), secrets.token_hex(4)))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, mode)
    try:
        with open(fd, "wb") as stream:
            os.fchmod(fd, mode)  # exactly the documented mode, whatever the umask
            if owner is not None:
                os.fchown(fd, *owner)
            stream.write(data)
            stream.flush()
            os.fsync(fd)
        temp.replace(final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


@contextmanager
def temp_path(directory: StrPath, entry: str) -> Iterator[Path]:
    """A fresh temp name for ``entry`` in ``directory``, removed if the ``with`` block raises.

    The name is ``naming.temp_name(entry, pid, token)``: unique per writer (never Nova's own
    ``<entry>.part``), and what the reaper recognises if we die before cleaning up. Nothing is
    created: the block (or the process it runs, ``qemu-img convert``) creates the file. On
    success the block has published or removed it; whatever is left stays (for the reaper).

    Raises:
        ValueError: ``entry`` is not a plain entry name.
    """
    _check_name(entry)
    temp = Path(directory, naming.temp_name(entry, os.getpid(), secrets.token_hex(4)))
    try:
        yield temp
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextmanager
def temp_file(
    directory: StrPath, entry: str, *, mode: int = 0o644
) -> Iterator[tuple[Path, BinaryIO]]:
    """A new temp file for ``entry`` (see :func:`temp_path`), open for writing, unbuffered.

    The file is created exclusively with exactly ``mode`` and closed when the block ends; it is
    removed if the block raises. Publish it with :func:`atomic_publish` after the block.

    Raises:
        ValueError: ``entry`` is not a plain entry name.
        OSError: the file cannot be created (no directory, no space, no permission).
    """
    with temp_path(directory, entry) as temp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temp, flags, mode)
        with open(fd, "wb", buffering=0) as stream:
            os.fchmod(fd, mode)  # exactly the documented mode, whatever the umask
            yield temp, stream


def atomic_publish(temp_path: StrPath, final_path: StrPath) -> None:
    """Give the finished file ``temp_path`` its final name ``final_path``, never replacing one.

    The file is fsynced, then renamed with ``renameat2(RENAME_NOREPLACE)`` so an entry that appeared
    meanwhile (another fetcher, Nova) is never clobbered, then the directories are fsynced. Where
    the filesystem lacks RENAME_NOREPLACE (NFS) it falls back to ``link`` + ``unlink``, which never
    replaces either; a crash in between leaves the temp name as a second link to the published
    file, which the temp reaper removes later.

    Raises:
        EntryChanged: ``final_path`` exists; ``temp_path`` is left in place for the caller.
        OSError: ``temp_path`` is missing, or the rename or a sync failed.
    """
    temp, final = Path(temp_path), Path(final_path)
    _fsync_file(temp)
    try:
        rename_noreplace(temp, final)
    except FileExistsError as exc:
        raise EntryChanged(f"{final} already exists; {temp.name} was not published") from exc
    fsync_dir(final.parent)
    if temp.parent != final.parent:
        fsync_dir(temp.parent)


def touch(path: StrPath, now: float | None = None) -> None:
    """Set the access and modification times of ``path`` to ``now`` (the current time if None).

    A symlink itself is touched, never its target. With ``now=None`` the filesystem supplies the
    time (on NFS the server's clock, as Nova's touch does).

    Raises:
        OSError: ``path`` is gone (FileNotFoundError) or belongs to someone else
            (PermissionError); callers report it and carry on, as Nova ignores EACCES.
    """
    os.utime(path, None if now is None else (now, now), follow_symlinks=False)


def remove(path: StrPath, *, dir_fd: int | None = None) -> int:
    """Unlink ``path`` (a file or symlink, never a directory) durably; return the bytes freed.

    The bytes are ``st_blocks * 512`` from an ``lstat`` just before, or 0 when the file has other
    hard links. A process that still has the file open keeps the space until it closes it. With
    ``dir_fd`` the last component of ``path`` is unlinked from that open directory, which is then
    synced.

    Raises:
        OSError: ``path`` is gone (FileNotFoundError), is a directory, or cannot be unlinked.
    """
    name = _at(path, dir_fd)
    try:
        freed = _freed(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
        os.unlink(name, dir_fd=dir_fd)
    except OSError as exc:
        raise _named(exc, path) from exc
    fsync_dir(Path(path).parent if dir_fd is None else dir_fd)
    return freed

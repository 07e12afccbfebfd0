"""Directory descriptors in fsops: operations stay in the directory opened, whatever its path is.

Each test opens a real directory, then moves it away and plants a symlink to an outside directory
under its old path. Everything done through the descriptor must land in the moved directory and
never in the outside one.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagecache.store import fsops


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "a").write_bytes(b"outside a")
    (path / "b").write_bytes(b"outside b")
    return path


@pytest.fixture
def swapped(tmp_path: Path, outside: Path) -> Iterator[tuple[Path, Path, int]]:
    """``(path, moved, fd)``: ``fd`` opened on ``path``, which is now a symlink to ``outside``."""
    path = tmp_path / "dir"
    path.mkdir()
    (path / "a").write_bytes(b"inside a")
    fd = fsops.open_dir(path)
    moved = tmp_path / "moved"
    path.rename(moved)
    path.symlink_to(outside)
    try:
        yield path, moved, fd
    finally:
        os.close(fd)


def _outside_untouched(outside: Path) -> None:
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == {
        "a": b"outside a",
        "b": b"outside b",
    }


def test_rename_noreplace_goes_through_the_descriptors(
    swapped: tuple[Path, Path, int], outside: Path
) -> None:
    path, moved, fd = swapped
    fsops.rename_noreplace(path / "a", path / "c", src_dir_fd=fd, dst_dir_fd=fd)
    assert [p.name for p in moved.iterdir()] == ["c"]
    assert (moved / "c").read_bytes() == b"inside a"
    (moved / "b").write_bytes(b"inside b")
    with pytest.raises(FileExistsError, match=str(path / "c")):
        fsops.rename_noreplace(path / "c", path / "b", src_dir_fd=fd, dst_dir_fd=fd)
    assert (moved / "b").read_bytes() == b"inside b"
    _outside_untouched(outside)


def test_the_link_fallback_goes_through_the_descriptors(
    swapped: tuple[Path, Path, int], outside: Path
) -> None:
    # What rename_noreplace falls back to where renameat2 cannot help (NFS), called directly.
    path, moved, fd = swapped
    with pytest.raises(FileExistsError):
        fsops._link_and_unlink(path / "a", path / "a", src_dir_fd=fd, dst_dir_fd=fd)
    fsops._link_and_unlink(path / "a", path / "c", src_dir_fd=fd, dst_dir_fd=fd)
    assert [p.name for p in moved.iterdir()] == ["c"]
    _outside_untouched(outside)


def test_rename_across_two_descriptors(tmp_path: Path, outside: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "x").write_bytes(b"x")
    fd_one, fd_two = fsops.open_dir(one), fsops.open_dir(two)
    try:
        two.rename(tmp_path / "two-moved")
        two.symlink_to(outside)
        fsops.rename_noreplace(one / "x", two / "a", src_dir_fd=fd_one, dst_dir_fd=fd_two)
        fsops.fsync_dir(fd_one)
        fsops.fsync_dir(fd_two)
    finally:
        os.close(fd_one)
        os.close(fd_two)
    assert (tmp_path / "two-moved" / "a").read_bytes() == b"x"
    assert list(one.iterdir()) == []
    _outside_untouched(outside)


def test_remove_goes_through_the_descriptor(swapped: tuple[Path, Path, int], outside: Path) -> None:
    path, moved, fd = swapped
    assert fsops.remove(path / "a", dir_fd=fd) > 0
    assert list(moved.iterdir()) == []
    with pytest.raises(FileNotFoundError, match=str(path / "b")):
        fsops.remove(path / "b", dir_fd=fd)  # there is a "b" outside, not in the directory
    _outside_untouched(outside)


def test_open_dir_refuses_links_and_files_and_makes_what_is_missing(
    tmp_path: Path, outside: Path
) -> None:
    (tmp_path / "link").symlink_to(outside)
    with pytest.raises(OSError, match="a symlink, not a real directory; not followed") as caught:
        fsops.open_dir(tmp_path / "link")
    assert caught.value.errno == errno.ELOOP
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        fsops.open_dir(tmp_path / "file")
    with pytest.raises(FileNotFoundError):
        fsops.open_dir(tmp_path / "missing")
    parent = fsops.open_dir(tmp_path)
    try:
        with pytest.raises(OSError, match="not followed"):
            fsops.open_dir(tmp_path / "link", dir_fd=parent, create=True)
        fd = fsops.open_dir(tmp_path / "made", dir_fd=parent, create=True)
        os.close(fd)
    finally:
        os.close(parent)
    assert (tmp_path / "made").is_dir() and not (tmp_path / "made").is_symlink()
    _outside_untouched(outside)

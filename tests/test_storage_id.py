"""The storage's own id (``_base/.imagecache/storage-id``): one per storage, whoever makes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagecache.layout import Layout
from imagecache.store.identity import STORAGE_ID_FILE, storage_id

_MAKE = """
import sys
from imagecache.layout import Layout
from imagecache.store.identity import storage_id
print(storage_id(Layout(sys.argv[1])))
"""


def test_hosts_racing_to_make_it_agree_on_one(tmp_path: Path) -> None:
    (tmp_path / "_base").mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", _MAKE, str(tmp_path)], stdout=subprocess.PIPE,
                         text=True)
        for _ in range(8)
    ]  # fmt: skip
    ids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(ids) == 1 and all(p.returncode == 0 for p in procs)
    state = tmp_path / "_base" / ".imagecache"
    assert (state / STORAGE_ID_FILE).read_text().strip() in ids
    assert not [n for n in os.listdir(state) if n.endswith(".tmp")]  # no temp left behind
    assert storage_id(Layout(str(tmp_path))) in ids  # read back, not made again


@pytest.mark.parametrize("kind", ["symlink", "garbage", "directory", "fifo"])
def test_an_id_file_that_is_not_one_is_refused_never_replaced(tmp_path: Path, kind: str) -> None:
    state = tmp_path / "_base" / ".imagecache"
    state.mkdir(parents=True)
    path = state / STORAGE_ID_FILE
    if kind == "symlink":
        (tmp_path / "elsewhere").write_text("0" * 32)
        path.symlink_to(tmp_path / "elsewhere")
    elif kind == "garbage":
        path.write_text("not an id\n")
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    before = os.lstat(path)
    with pytest.raises(OSError):
        storage_id(Layout(str(tmp_path)))
    after = os.lstat(path)
    assert (before.st_ino, before.st_mode) == (after.st_ino, after.st_mode)

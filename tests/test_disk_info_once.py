"""``disk.info`` is read once per instance directory: the bytes of its header read are reused.

What it says must not change: the disks it records as raw are the guest's (a garbage header there
is only a warning, what a forged header names is only ``stat``-ed), and a ``disk.info`` the JSON
reader would refuse (a symlink, too large, not UTF-8 JSON) protects nothing, as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecache import sources as scan
from imagecache.errors import ImageFormatError
from imagecache.formats import read_header_data
from imagecache.layout import DISK_INFO, Layout
from imagecache.sources import disks
from tests.opens import OpenWatch

GARBAGE = b"QFI\xfb" + b"\xff" * 100  # a qcow2 magic with nonsense after it


def _instance(tmp_path: Path, info: bytes) -> tuple[Path, Path]:
    inst = tmp_path / "instances"
    d = inst / "u1"
    d.mkdir(parents=True)
    (inst / "_base").mkdir()
    (d / "disk").write_bytes(GARBAGE)
    (d / "disk.local").write_bytes(GARBAGE)
    (d / DISK_INFO).write_bytes(info)
    return inst, d


def _blocking(inst: Path) -> list[str]:
    _, problems = scan.scan_instances(Layout(str(inst), "_base"))
    return sorted(os.path.basename(p.ref) for p in problems if p.blocking)


def test_disk_info_is_opened_once_and_still_says_what_is_raw(tmp_path: Path) -> None:
    inst, d = _instance(tmp_path, b"")
    (d / DISK_INFO).write_text(json.dumps({str(d / "disk"): "raw", "disk.local": "qcow2"}))
    with OpenWatch(d / DISK_INFO) as watch:
        assert _blocking(inst) == ["disk.local"]  # the raw disk's garbage is only a warning
        assert watch.events() == [d / DISK_INFO]


def test_a_disk_info_longer_than_a_header_read_is_read_whole(tmp_path: Path) -> None:
    doc = json.dumps({"disk": "raw"}) + " " * (1 << 17)  # 128 KiB: past the 64 KiB header read
    inst, d = _instance(tmp_path, doc.encode())
    with OpenWatch(d / DISK_INFO) as watch:
        assert _blocking(inst) == ["disk.local"]
        assert len(watch.events()) == 2  # the header read, then the whole file as JSON


def test_a_symlinked_disk_info_protects_nothing(tmp_path: Path) -> None:
    inst, d = _instance(tmp_path, b"")
    (d / DISK_INFO).unlink()
    elsewhere = tmp_path / "forged.json"
    elsewhere.write_text(json.dumps({"disk": "raw", "disk.local": "raw"}))
    (d / DISK_INFO).symlink_to(elsewhere)
    assert _blocking(inst) == ["disk", "disk.local"]


def test_a_disk_info_that_is_no_json_protects_nothing(tmp_path: Path) -> None:
    inst, _ = _instance(tmp_path, b'{"disk": "raw"')
    assert _blocking(inst) == ["disk", "disk.local"]


# Around the sizes the header read changes behaviour at: its first 4 KiB read, its 64 KiB.
_PAD = st.sampled_from([0, 1, 4000, 4095, 4096, 4097, 65000, 65535, 65536, 65537, 70000])
_VALUE = st.sampled_from(["raw", "qcow2", "RAW", None, 0, ["raw"]])
_NAME = st.sampled_from(["disk", "disk.local", "/x/u1/disk", "../disk", "", "disk\x00"])


@st.composite
def _disk_info(draw: st.DrawFn) -> bytes:
    doc = json.dumps(draw(st.dictionaries(_NAME, _VALUE, max_size=4)))
    data = (doc + " " * draw(_PAD)).encode()
    damage = draw(st.sampled_from(["none", "truncate", "latin1", "list", "magic"]))
    if damage == "truncate":
        data = data[: max(0, len(data) // 2)]
    elif damage == "latin1":
        data = data.replace(b"{", b"{\xe9", 1)
    elif damage == "list":
        data = b"[" + data + b"]"
    elif damage == "magic":
        data = GARBAGE + data
    return data


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(info=_disk_info())
def test_the_bytes_of_the_header_read_say_what_the_json_reader_says(
    tmp_path: Path, info: bytes
) -> None:
    d = tmp_path / "u"
    d.mkdir(exist_ok=True)
    (d / DISK_INFO).write_bytes(info)
    (entry,) = (e for e in os.scandir(d) if e.name == DISK_INFO)
    offered = disks._GuestWritten(str(d), {DISK_INFO})
    try:
        header, st_, data = read_header_data(entry.path)
    except ImageFormatError:
        pass  # a garbage header: the scan offers nothing, the JSON reader decides
    else:
        if not header.is_disk_image:
            offered.offer(entry, st_, data)
    reread = disks._GuestWritten(str(d), {DISK_INFO})  # nothing offered: read again as JSON
    for name in ("disk", "disk.local", "", "console.log", "other"):
        assert (name in offered) == (name in reread), (name, info[:80])

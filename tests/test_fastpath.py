"""The shortcuts of a scan give exactly what the reference code gives, or step aside.

``qcow2.parse_common`` (the common header, read with ``struct.unpack_from``) against the full
parser, and ``follow_chain`` with a scan's ``HeaderCache`` (one walk shared by the overlays of a
base) against the walk without one: on every image the formats and chain tests build with
qemu-img, on the damaged headers of the formats tests, and on random mutations of real headers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagecache.errors import ImageFormatError
from imagecache.formats import (
    HEAD_BYTES,
    ImageHeader,
    parse_header,
    qcow2,
    read_header,
    resolve_chain,
)
from imagecache.formats.chain import HeaderCache
from tests import qemu
from tests.test_chain import CHAIN_FIXTURES
from tests.test_formats import HEADER_FIXTURES, QCOW2_DAMAGE

FIRST_READ = 4096  # what read_header_stat reads first, and gives the shortcut

Builder = Callable[[Path], Path]
MATRIX: dict[str, Builder] = {
    **{f"formats-{name}": build for name, build in HEADER_FIXTURES.items()},
    **{f"chain-{name}": build for name, build in CHAIN_FIXTURES.items()},
}
# The images of the matrix the shortcut must take (the rest it must leave to the full parser).
COMMON = {
    "formats-qcow2-v3",
    "formats-qcow2-v2",
    "formats-overlay-v3-relative",
    "formats-overlay-v2-relative",
    "formats-overlay-absolute",
    "formats-overlay-parent-dir",
    "formats-overlay-raw-base",
    "formats-overlay-missing",
    "chain-v3-relative",
    "chain-raw-base",
    "chain-absolute",
    "chain-three-deep",
}
UNUSUAL = {
    "formats-data-file",
    "formats-data-file-and-backing",
    "chain-data-file-and-backing",
    "formats-overlay-no-format",  # an extension unknown to the shortcut (see qemu.py)
}


def _full(data: bytes, whole: bytes) -> ImageHeader | None:
    """The full parser's header of ``data`` (the first bytes of ``whole``), None if it refuses."""
    try:
        return parse_header(data, read_at=lambda offset, length: whole[offset : offset + length])
    except ImageFormatError:
        return None


def _shortcut(whole: bytes) -> ImageHeader | None:
    """What the shortcut makes of a file's first read, checked against the full parser."""
    data = whole[:FIRST_READ]
    if data[:4] != qcow2.MAGIC:
        return None
    fast = qcow2.parse_common(data)
    if fast is not None:
        full = _full(whole[:HEAD_BYTES], whole)
        assert full is not None, "the shortcut accepted a header the full parser refuses"
        assert (fast, fast.extents) == (full, full.extents)
    return fast


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.parametrize("fixture", MATRIX, ids=list(MATRIX))
def test_shortcut_header_is_the_full_parsers(tmp_path: Path, fixture: str) -> None:
    top = MATRIX[fixture](tmp_path)
    for path in _files(tmp_path):
        whole = path.read_bytes()
        _shortcut(whole)
        # The file read as a scan reads it (shortcut first) is what the full parser says.
        assert read_header(path) == parse_header(whole[:HEAD_BYTES], read_at=_at(whole))
    taken = _shortcut(top.read_bytes()) is not None
    if fixture in COMMON:
        assert taken
    if fixture in UNUSUAL:
        assert not taken


def _at(whole: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, length: whole[offset : offset + length]


def test_matrix_names_exist() -> None:
    # A fixture renamed in the formats or chain tests must not drop out of COMMON in silence.
    assert set(MATRIX) >= (COMMON | UNUSUAL)


def _overlay(tmp: Path, *, compat: str = "1.1", fmt: str | None = "qcow2") -> bytes:
    qemu.make_qcow2(tmp / "base.qcow2")
    image = qemu.make_overlay(tmp / "o.qcow2", "base.qcow2", backing_fmt="qcow2", compat=compat)
    if fmt is None:
        qemu.drop_backing_format(image)
    return image.read_bytes()[:HEAD_BYTES]


@pytest.mark.parametrize("damage", QCOW2_DAMAGE, ids=list(QCOW2_DAMAGE))
def test_damaged_headers_go_to_the_full_parser(tmp_path: Path, damage: str) -> None:
    good = _overlay(tmp_path)
    assert _shortcut(good) is not None
    bad = QCOW2_DAMAGE[damage][0](good)
    assert _full(bad, bad) is None  # refused, so the shortcut must not have answered
    assert _shortcut(bad) is None


@pytest.mark.parametrize(
    ("what", "offset", "value"),
    [
        ("encrypted", 32, b"\0\0\0\x01"),
        ("dirty bit", 79, b"\x01"),
        ("external data file bit", 79, b"\x04"),
        ("autoclear bitmaps", 95, b"\x01"),
        ("version 4", 4, b"\0\0\0\x04"),
        ("header_length 120", 100, b"\0\0\0\x78"),
    ],
)
def test_unusual_headers_go_to_the_full_parser(
    tmp_path: Path, what: str, offset: int, value: bytes
) -> None:
    good = bytearray(_overlay(tmp_path))
    assert _shortcut(bytes(good)) is not None
    good[offset : offset + len(value)] = value
    assert _shortcut(bytes(good)) is None, what


def test_unknown_extension_goes_to_the_full_parser(tmp_path: Path) -> None:
    good = _overlay(tmp_path)
    assert good[112:116] == b"\xe2\x79\x2a\xca"  # the backing format extension comes first
    unknown = good[:112] + b"\x12\x34\x56\x78" + good[116:]
    assert _full(unknown, unknown) is not None  # the full parser skips it ...
    assert _shortcut(unknown) is None  # ... the shortcut does not guess


@pytest.fixture(scope="module")
def real_headers(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    root = tmp_path_factory.mktemp("headers")
    made = []
    for i, (compat, fmt) in enumerate([("1.1", "qcow2"), ("0.10", "qcow2"), ("1.1", None)]):
        (root / str(i)).mkdir()
        made.append(_overlay(root / str(i), compat=compat, fmt=fmt))
    return made


def _mutate(good: bytes, changes: list[tuple[int, int]], words: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(good)
    for at, byte in changes:
        data[at] = byte
    for at, word in words:
        data[at : at + len(word)] = word
    return bytes(data)


_WORDS = st.sampled_from([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\0\0\x10\0", b"\0\0\0\x70"])


@settings(max_examples=400, deadline=None)
@given(
    which=st.integers(0, 2),
    changes=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), max_size=6),
    words=st.lists(st.tuples(st.integers(0, 508), _WORDS), max_size=2),
    cut=st.integers(0, FIRST_READ),
)
def test_mutated_headers_agree(
    real_headers: list[bytes],
    which: int,
    changes: list[tuple[int, int]],
    words: list[tuple[int, bytes]],
    cut: int,
) -> None:
    whole = _mutate(real_headers[which], changes, words)
    _shortcut(whole)  # checks itself against the full parser
    _shortcut(whole[:cut])  # a short file: nothing beyond it


def test_mutations_reach_both_sides_of_the_shortcut(real_headers: list[bytes]) -> None:
    # The property above only means something if mutated headers are both taken and refused.
    rng = random.Random(20260101)
    taken = refused = 0
    for _ in range(3000):
        good = rng.choice(real_headers)
        changes = [(rng.randrange(512), rng.randrange(256)) for _ in range(rng.randint(1, 3))]
        if _shortcut(_mutate(good, changes, [])) is None:
            refused += 1
        else:
            taken += 1
    assert taken > 300
    assert refused > 300


# --- walks shared between the overlays of one scan --------------------------------------------


def _chains_agree(root: Path) -> int:
    """Every image under ``root`` resolved with one shared cache (twice, so the second time
    replays) and with none: the same chains. Returns how many walks the cache kept."""
    headers = HeaderCache()
    images = [p for p in _files(root) if read_header(p).is_disk_image]
    for _ in range(2):
        for image in images:
            assert resolve_chain(image, headers=headers) == resolve_chain(image)
    return len(headers.tails)


@pytest.mark.parametrize("fixture", MATRIX, ids=list(MATRIX))
def test_shared_walks_are_the_plain_walks(tmp_path: Path, fixture: str) -> None:
    MATRIX[fixture](tmp_path)
    _chains_agree(tmp_path)


def test_overlays_of_one_base_share_a_walk(tmp_path: Path) -> None:
    base = qemu.make_qcow2(tmp_path / "base.qcow2")
    for name in ("a", "b", "c"):
        qemu.make_overlay(tmp_path / name, str(base), backing_fmt="qcow2")
    (tmp_path / "i").mkdir()
    qemu.make_overlay(tmp_path / "i" / "rel", "../base.qcow2", backing_fmt="qcow2")
    assert _chains_agree(tmp_path) == 2  # one absolute name, one relative name


def test_a_walk_that_loops_back_to_its_disk_is_walked_afresh(tmp_path: Path) -> None:
    # a -> b -> a: the walk from a's header, shared, would meet a itself as a backing file.
    qemu.make_qcow2(tmp_path / "a")
    qemu.make_overlay(tmp_path / "b", "a", backing_fmt="qcow2")
    qemu.make_overlay(tmp_path / "c", "b", backing_fmt="qcow2")
    qemu.rebase_unsafe(tmp_path / "a", "b")
    headers = HeaderCache()
    for name in ("c", "a", "b", "a"):
        shared = resolve_chain(tmp_path / name, headers=headers)
        assert shared == resolve_chain(tmp_path / name)
        assert shared.error is not None and "loops back" in shared.error


def test_a_file_found_by_stat_then_read_empties_the_walks(tmp_path: Path) -> None:
    # b is first met declared raw (found by stat alone), then as qcow2: its header is read then,
    # and no walk that saw it unread may be replayed.
    base = qemu.make_qcow2(tmp_path / "base")
    qemu.make_overlay(tmp_path / "b", str(base), backing_fmt="qcow2")
    qemu.make_overlay(tmp_path / "raw-user", str(tmp_path / "b"), backing_fmt="raw")
    qemu.make_overlay(tmp_path / "qcow2-user", str(tmp_path / "b"), backing_fmt="qcow2")
    headers = HeaderCache()
    first = resolve_chain(tmp_path / "raw-user", headers=headers)
    assert len(headers.tails) == 1
    second = resolve_chain(tmp_path / "qcow2-user", headers=headers)
    assert len(headers.tails) == 1  # emptied, then this walk kept
    assert first == resolve_chain(tmp_path / "raw-user")
    assert second == resolve_chain(tmp_path / "qcow2-user")
    assert len(second.links) == 2

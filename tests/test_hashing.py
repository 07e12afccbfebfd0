"""images.hashing: streaming digests of real files, equal to one-shot digests; pacing, stopping."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecache.images import hashing
from tests.defaults import FakeClock

ALGORITHMS = ("xxh3_128", "sha256", "sha1", "sha512", "md5")
BLOCK = 4096


def expected(data: bytes) -> dict[str, str]:
    out = {"xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    for name in ALGORITHMS[1:]:
        out[name] = hashlib.new(name, data).hexdigest()
    return out


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """A real file of 10 blocks and 123 bytes, open for reading."""
    data = os.urandom(10 * BLOCK + 123)
    path = tmp_path / "base"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def hash_path(path: Path, algorithms: tuple[str, ...] = ALGORITHMS, **kw: object) -> dict[str, str]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return hashing.hash_file(fd, algorithms, **kw)  # type: ignore[arg-type]
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "size",
    [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, 3 * BLOCK + 7],
    ids=lambda n: f"{n}B",
)
def test_digests_equal_one_shot_digests(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert hash_path(tmp_path / "f", block_size=BLOCK) == expected(data)


def test_default_block_size_over_several_blocks(tmp_path: Path) -> None:
    # 2.5 default blocks: more blocks than buffers, so every buffer is reused while in flight.
    data = os.urandom(hashing.BLOCK_SIZE * 5 // 2)
    (tmp_path / "f").write_bytes(data)
    assert hash_path(tmp_path / "f", ("xxh3_128", "sha256")) == {
        k: v for k, v in expected(data).items() if k in ("xxh3_128", "sha256")
    }


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=20_000), block_size=st.integers(1, 9000))
def test_any_size_any_block_size(tmp_path: Path, data: bytes, block_size: int) -> None:
    (tmp_path / "f").write_bytes(data)
    assert hash_path(tmp_path / "f", block_size=block_size) == expected(data)


def test_reads_from_offset_zero_and_leaves_the_offset_alone(opened: tuple[int, bytes]) -> None:
    fd, data = opened
    os.lseek(fd, 5000, os.SEEK_SET)
    assert hashing.hash_file(fd, ["sha256"]) == {"sha256": hashlib.sha256(data).hexdigest()}
    assert os.lseek(fd, 0, os.SEEK_CUR) == 5000


def test_duplicate_algorithms_are_hashed_once(opened: tuple[int, bytes]) -> None:
    fd, data = opened
    assert hashing.hash_file(fd, ["md5", "md5"]) == {"md5": hashlib.md5(data).hexdigest()}


def test_on_bytes_sums_to_the_size_a_block_at_a_time(opened: tuple[int, bytes]) -> None:
    fd, data = opened
    seen: list[int] = []
    hashing.hash_file(fd, ["xxh3_128"], block_size=BLOCK, on_bytes=seen.append)
    assert sum(seen) == len(data)
    assert seen == [BLOCK] * 10 + [123]


def test_max_rate_sleeps_on_the_clock_for_the_whole_file(opened: tuple[int, bytes]) -> None:
    fd, data = opened
    fake = FakeClock()
    rate = 2 * BLOCK  # bytes per second: half a second per block
    seen: list[int] = []
    ahead: list[float] = []  # bytes read beyond what the rate allows by then, at each block

    def on_bytes(n: int) -> None:
        seen.append(n)
        ahead.append(sum(seen) - rate * fake.mono_now)

    digests = hashing.hash_file(
        fd, ["xxh3_128"], block_size=BLOCK, max_rate=rate, clock=fake.clock, on_bytes=on_bytes
    )
    assert digests == {"xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    assert fake.slept == pytest.approx(len(data) / rate)
    # Paced a block at a time: the bytes read never run more than one block ahead of the rate.
    assert max(ahead) <= BLOCK


def test_max_rate_does_not_sleep_when_reading_is_slower(opened: tuple[int, bytes]) -> None:
    fd, _ = opened
    fake = FakeClock()

    def slow(n: int) -> None:
        fake.mono_now += 1.0  # each block "took" a second; the rate allows a block in half that

    hashing.hash_file(
        fd, ["xxh3_128"], block_size=BLOCK, max_rate=2 * BLOCK, clock=fake.clock, on_bytes=slow
    )
    assert fake.slept == 0.0


@pytest.mark.parametrize(
    "kw",
    [
        {"max_rate": 1000.0},  # no clock
        {"max_rate": 0.0, "clock": FakeClock().clock},
        {"block_size": 0},
    ],
)
def test_bad_pacing_or_block_size_is_refused_before_reading(
    opened: tuple[int, bytes], kw: dict[str, object]
) -> None:
    fd, _ = opened
    seen: list[int] = []
    with pytest.raises(ValueError):
        hashing.hash_file(fd, ["sha256"], on_bytes=seen.append, **kw)  # type: ignore[arg-type]
    assert seen == []


def test_should_stop_stops_between_blocks_and_raises(opened: tuple[int, bytes]) -> None:
    fd, _ = opened
    seen: list[int] = []
    asked = iter([False, False, False, True])
    with pytest.raises(hashing.HashStopped, match=f"after {3 * BLOCK} bytes"):
        hashing.hash_file(
            fd, ["sha256"], block_size=BLOCK, on_bytes=seen.append, should_stop=lambda: next(asked)
        )
    assert seen == [BLOCK] * 3


def test_should_stop_never_true_hashes_everything(opened: tuple[int, bytes]) -> None:
    fd, data = opened
    calls = 0

    def never() -> bool:
        nonlocal calls
        calls += 1
        return False

    got = hashing.hash_file(fd, ["sha1"], block_size=BLOCK, should_stop=never)
    assert got == {"sha1": hashlib.sha1(data).hexdigest()}
    assert calls == 12  # before each of the 11 blocks, and before the read that finds EOF


@pytest.mark.parametrize("name", ["nope", "xxh3_64x", "shake_128", ""])
def test_an_unknown_algorithm_is_refused_before_reading(
    opened: tuple[int, bytes], name: str
) -> None:
    fd, _ = opened
    seen: list[int] = []
    with pytest.raises(ValueError):
        hashing.hash_file(fd, ["sha256", name], on_bytes=seen.append)
    assert seen == []
    with pytest.raises(ValueError):
        hashing.new(name)


def test_new_names_and_fresh_objects() -> None:
    assert hashing.new("xxh3_128").name.lower() == "xxh3_128"
    assert hashing.new("md5").name == "md5"
    one, two = hashing.new("sha256"), hashing.new("sha256")
    one.update(b"x")
    assert two.hexdigest() == hashlib.sha256().hexdigest() != one.hexdigest()


def test_read_errors_propagate_and_no_thread_is_left_behind(tmp_path: Path) -> None:
    before = threading.active_count()
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: preadv fails with EISDIR
    try:
        with pytest.raises(IsADirectoryError):
            hashing.hash_file(fd, ["xxh3_128", "sha256"])
    finally:
        os.close(fd)
    assert threading.active_count() == before


def test_a_stopped_hash_leaves_no_thread_behind(opened: tuple[int, bytes]) -> None:
    fd, _ = opened
    before = threading.active_count()
    asked = iter([False, True])
    with pytest.raises(hashing.HashStopped):
        hashing.hash_file(fd, ALGORITHMS, block_size=BLOCK, should_stop=lambda: next(asked))
    assert threading.active_count() == before


class _Recorder:
    """A hash that records what it was fed (to see when ``done`` runs)."""

    name = "recorder"

    def __init__(self) -> None:
        self.fed: list[bytes] = []

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        self.fed.append(bytes(data))

    def hexdigest(self) -> str:
        return b"".join(self.fed).hex()


def test_digests_call_done_once_after_every_hash_has_the_chunk() -> None:
    hashers = [_Recorder(), _Recorder(), _Recorder()]
    done: list[list[int]] = []
    with hashing.Digests(hashers) as digests:
        for chunk in (b"a", b"", b"bc"):  # an empty chunk is a chunk, not the end
            digests.feed(chunk, lambda: done.append([len(h.fed) for h in hashers]))
        digests.feed(b"d")
    assert [h.hexdigest() for h in hashers] == [b"abcd".hex()] * 3
    assert len(done) == 3
    # The i-th done ran when every hash had been fed at least i chunks: its buffer was free.
    assert all(min(counts) >= i for i, counts in enumerate(done, 1))


def test_digests_without_hashers_release_at_once() -> None:
    done: list[int] = []
    with hashing.Digests([]) as digests:
        digests.feed(b"x", lambda: done.append(1))
    assert done == [1]

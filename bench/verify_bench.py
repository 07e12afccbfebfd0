"""How fast verification hashes cached files, against the read floor and ``sha256sum``.

    .venv/bin/python bench/verify_bench.py [--files 4] [--mib 512] [--repeat 5] [--workdir DIR]

Makes ``--files`` files of ``--mib`` MiB of random bytes (at least 2 GiB in all by default), once
in ``--workdir`` (reused by later runs; a temporary directory, removed afterwards, without it),
then, with the page cache warm (one untimed run of each first; it is never dropped, which needs
root and hurts others), measures in the same run, median of ``--repeat``:

  (a) ``cat FILES > /dev/null``: the read floor, one process reading the page cache;
  (b) ``sha256sum FILES``: what an operator would script;
  (c) ``hashing.hash_file(fd, ["xxh3_128"])`` over each file in this process: the hashing that
      verification does (and, for insight, at 1 and 8 MiB blocks besides the default, and a
      one-thread loop that reads and hashes in turn through one 512 KiB buffer);
  (d) the verification step of a pass (``imagecache.verify.verify``) over a cache of those
      files, first with no records (all hashed, records written), then again over the
      unchanged cache whose records are fresh (``stat`` only; target under 1 % of the first).

Prints MB/s (10^6 bytes per second) and the ratios. Not a test: nothing here asserts a time; the
digests of (b) and (c) are checked against one-shot digests, so the figures are of right answers.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import xxhash

from imagecache import naming, verify
from imagecache.clock import Clock
from imagecache.images import hashing
from imagecache.layout import Layout
from imagecache.settings import VerifySettings

MIB = 1 << 20


def make_files(workdir: Path, count: int, mib: int) -> list[Path]:
    """``count`` files of ``mib`` MiB of random bytes in ``workdir``; existing ones are reused."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = [workdir / f"base-{i}-{mib}m" for i in range(count)]
    for path in paths:
        if path.exists() and path.stat().st_size == mib * MIB:
            continue
        temp = path.with_suffix(".part")
        with temp.open("wb") as out:
            for _ in range(mib // 16):
                out.write(os.urandom(16 * MIB))
            out.write(os.urandom(mib % 16 * MIB))
        temp.rename(path)
    return paths


def timed(func: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` runs of ``func``, after one untimed run (warms the cache)."""
    func()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cat(paths: Sequence[Path]) -> None:
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", *map(str, paths)], stdout=null, check=True)


def sha256sum(paths: Sequence[Path]) -> list[str]:
    out = subprocess.run(["sha256sum", *map(str, paths)], capture_output=True, check=True)
    return [line.split()[0] for line in out.stdout.decode().splitlines()]


def ours(paths: Sequence[Path], block_size: int = hashing.BLOCK_SIZE) -> list[str]:
    digests = []
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            digests.append(hashing.hash_file(fd, ["xxh3_128"], block_size=block_size)["xxh3_128"])
        finally:
            os.close(fd)
    return digests


def one_thread(paths: Sequence[Path], block_size: int = 512 << 10) -> None:
    """For insight: read and hash in turn in one thread, into one buffer that stays in L2."""
    buf = bytearray(block_size)
    view = memoryview(buf)
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            hasher, offset = xxhash.xxh3_128(), 0
            while n := os.preadv(fd, [buf], offset):
                hasher.update(view[:n])
                offset += n
        finally:
            os.close(fd)


def check(paths: Sequence[Path]) -> None:
    """Exit unless (b) and (c) give the one-shot digests of every file."""
    xxh, sha = [], []
    for path in paths:
        data = path.read_bytes()
        xxh.append(xxhash.xxh3_128_hexdigest(data))
        sha.append(hashlib.sha256(data).hexdigest())
        del data
    if ours(paths) != xxh or sha256sum(paths) != sha:
        sys.exit("a digest differs from the one-shot digest")


def measure_unchanged(paths: Sequence[Path], repeat: int) -> tuple[float, float]:
    """(d) The verification step of a pass, first with no records (every file hashed and its
    record written) and then over the unchanged cache whose records are fresh (stats only):
    (first pass seconds, median seconds of the second). The files are hard-linked into a cache
    directory under original-entry names, so nothing is copied."""
    cache = paths[0].parent.parent / "verify-host" / "instances" / "_base"
    if cache.parent.parent.exists():
        shutil.rmtree(cache.parent.parent)
    cache.mkdir(parents=True)
    for i, path in enumerate(paths):
        os.link(path, cache / naming.fingerprint(f"bench-{i}"))
    layout = Layout(str(cache.parent))
    settings = VerifySettings(checksum_base_images=True, checksum_interval=3600,
                              max_bytes_per_pass=0, max_bytes_per_second=0.0)  # fmt: skip
    clock = Clock(wall=time.time, monotonic=time.monotonic, sleep=time.sleep)
    start = time.perf_counter()
    first = verify.verify(layout, settings, clock=clock)
    first_seconds = time.perf_counter() - start
    if len(first.results) != len(paths) or first.corrupt:
        sys.exit(f"the first verification hashed {len(first.results)} of {len(paths)} files")

    def again() -> None:
        if verify.verify(layout, settings, clock=clock).results:
            sys.exit("the second verification hashed something")

    return first_seconds, timed(again, repeat)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=4, metavar="N")
    parser.add_argument("--mib", type=int, default=512, metavar="M", help="size of each file")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each measurement")
    parser.add_argument("--workdir", type=Path, help="make (or reuse) the files here")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="imagecache-verify-bench-"))
    try:
        start = time.perf_counter()
        paths = make_files(workdir.resolve() / "verify", args.files, args.mib)
        total = sum(p.stat().st_size for p in paths)
        print(
            f"{len(paths)} files, {total / MIB:.0f} MiB in all, in {paths[0].parent} (ready in "
            f"{time.perf_counter() - start:.1f} s); {os.cpu_count()} CPUs; page cache warm, "
            f"median of {args.repeat} after one untimed run of each"
        )
        check(paths)
        measure(paths, total, args.repeat)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir)
    return 0


def measure(paths: Sequence[Path], total: int, repeat: int) -> None:
    a = timed(lambda: cat(paths), repeat)
    b = timed(lambda: sha256sum(paths), repeat)
    c = timed(lambda: ours(paths), repeat)
    c1 = timed(lambda: ours(paths, 1 * MIB), repeat)
    c8 = timed(lambda: ours(paths, 8 * MIB), repeat)
    e = timed(lambda: one_thread(paths), repeat)
    unchanged = measure_unchanged(paths, repeat)
    block = hashing.BLOCK_SIZE // MIB
    rows = [
        ("(a) cat FILES > /dev/null (the read floor)", a),
        ("(b) sha256sum FILES", b),
        (f"(c) hash_file(xxh3_128), {block} MiB blocks (verification)", c),
        ("    the same, 1 MiB blocks", c1),
        ("    the same, 8 MiB blocks", c8),
        ("    for insight: one thread, read then hash 512 KiB blocks", e),
    ]
    print()
    for label, seconds in rows:
        print(f"{label:<58} {seconds:8.3f} s {total / seconds / 1e6:8.0f} MB/s")
    first, d = unchanged
    print(f"{'(d) verification step of a pass, no records yet':<58} {first:8.3f} s "
          f"{total / first / 1e6:8.0f} MB/s")  # fmt: skip
    print(f"{'    the next pass, unchanged cache, records fresh':<58} {d:8.3f} s")
    print()
    print(f"c speed / a speed = {a / c:5.2f}x   (target >= 0.7x of the read floor)")
    print(f"c speed / b speed = {b / c:5.1f}x   (ours against sha256sum)")
    print(f"second / first = {d / first:.3%}   (target < 1 %)")


if __name__ == "__main__":
    sys.exit(main())

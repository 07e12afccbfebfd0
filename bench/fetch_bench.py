"""Download throughput of ``imagecache precache`` from a real Glance, against ``curl`` and the
OpenStack client.

    .venv/bin/python bench/fetch_bench.py [--sizes 256,1024] [--runs 3] [--port 19493] [--keep]
                                          [--osc-venv bench/out/osc-venv]

Starts a Glance 33 with ``dev/glance_up.sh`` in a temporary directory, uploads one random raw
image per size (MiB), then, alternating, for ``--runs`` rounds:

  (a) ``curl -s -o FILE .../v2/images/<id>/file``: the transfer alone, no verification, no fsync;
  (b) ``curl -s -o FILE ... && sync FILE`` (coreutils ``sync FILE`` fsyncs that file): durable,
      unverified, the anchor a cached image is held to;
  (c) ``curl -s ... | tee FILE | sha512sum``: the transfer plus the hash Glance publishes, i.e.
      the least a verified download costs;
  (d) ``openstack image save --chunk-size 1048576 --file FILE <id>`` and (e) the same with the
      client's default chunk size (1024 bytes): what an operator would type. openstacksdk checks
      ``os_hash_value`` only (MD5 when there is none), in its one thread, and does not fsync.
      The test Glance has no Keystone: the client is pointed at it with ``--os-auth-type none
      --os-endpoint URL``; its output's SHA-512 is compared with Glance's once per size;
  (f) ``imagecache precache <id>`` into an empty cache (a child process): metadata, lock,
      download, SHA-512 verification, ``qemu-img info``, fsync, publish. Its peak RSS comes from
      ``wait4``;
  (g) a diagnostic, the transfer alone: ``curl -o /dev/null`` against imagecache's own stream
      loop (``GlanceClient.open_stream``, 1 MiB chunks written to ``/dev/null``, no hash) in a
      child Python, so that neither disk writeback nor hashing is in the figure.

After each run the output file is removed and ``sync`` run (not timed), so no run starts with
another's dirty pages still being written.

python-openstackclient is not a dependency of imagecache, and ``.venv`` is pinned for CI: on
first use the bench makes its own venv (``--osc-venv``, by default ``bench/out/osc-venv``, which
git ignores) with ``python3 -m venv`` and ``pip install python-openstackclient`` from PyPI.

Prints best and median wall times, MiB/s and precache's speed against each anchor
(anchor time / precache time: above 1 means precache is faster). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from plan_bench import child_env

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20

# (key, label) in the order they run and are printed; precache is compared with every anchor.
METHODS = (
    ("curl", "`curl -o FILE`"),
    ("sync", "`curl -o FILE && sync FILE`"),
    ("sha", "`curl \\| tee FILE \\| sha512sum`"),
    ("osc1m", "`openstack image save --chunk-size 1MiB`"),
    ("oscdef", "`openstack image save` (1 KiB chunks)"),
    ("ours", "**`imagecache precache`**"),
    ("null", "`curl -o /dev/null`"),
    ("loop", "our stream loop to /dev/null"),
)
ANCHORS = ("sync", "osc1m", "oscdef", "sha", "curl")


def sh(*args: str, **kw: object) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=True, **kw)  # type: ignore[call-overload]
    out: str = done.stdout
    return out


def openstack_cli(venv: Path) -> Path:
    """The ``openstack`` command of ``venv``, made on first use (see the module)."""
    cli = venv / "bin" / "openstack"
    if not cli.exists():
        print(f"installing python-openstackclient into {venv} ...", file=sys.stderr)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q", "python-openstackclient"]
        subprocess.run(pip, check=True)
    return cli


def make_image(path: Path, size_mib: int) -> str:
    """Write ``size_mib`` MiB of random bytes to ``path``; their SHA-512."""
    sha = hashlib.sha512()
    with path.open("wb") as f:
        for _ in range(size_mib):
            block = os.urandom(MIB)
            sha.update(block)
            f.write(block)
    return sha.hexdigest()


def upload(endpoint: str, path: Path) -> str:
    doc = json.loads(
        sh(
            "curl", "-sf", "-X", "POST", f"{endpoint}/v2/images",
            "-H", "Content-Type: application/json",
            "-d", json.dumps({"name": path.name, "disk_format": "raw", "container_format": "bare"}),
        )
    )  # fmt: skip
    image_id: str = doc["id"]
    sh(
        "curl", "-sf", "-X", "PUT", f"{endpoint}/v2/images/{image_id}/file",
        "-H", "Content-Type: application/octet-stream", "-T", str(path),
    )  # fmt: skip
    return image_id


def file_sha512(path: Path) -> str:
    sha = hashlib.sha512()
    with path.open("rb") as f:
        while block := f.read(4 * MIB):
            sha.update(block)
    return sha.hexdigest()


def timed(run: Callable[[], int]) -> tuple[float, int]:
    """Wall seconds of ``run`` and what it returns (a peak RSS in KiB, or 0)."""
    start = time.perf_counter()
    rss = run()
    return time.perf_counter() - start, rss


def child(argv: list[str], **kw: object) -> int:
    """Run ``argv`` to completion; its peak RSS in KiB (``wait4``)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]}... failed with {proc.returncode}")
    return int(usage.ru_maxrss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024", help="image sizes in MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=19493)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--osc-venv", type=Path, default=REPO / "bench" / "out" / "osc-venv")
    args = parser.parse_args()
    osc = openstack_cli(args.osc_venv)
    work = Path(tempfile.mkdtemp(prefix="fetch-bench."))
    endpoint = f"http://127.0.0.1:{args.port}"
    sh(str(REPO / "dev" / "glance_up.sh"), str(work / "glance"), str(args.port))
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        results = [bench_size(work, endpoint, osc, size, args.runs) for size in sizes]
    finally:
        stop(int((work / "glance" / "gunicorn.pid").read_text()))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(sizes, results, args.runs)


def stop(pid: int) -> None:
    """SIGTERM the Glance master and wait (10 s at most) for it to go: its workers write their
    logs as they exit, and would otherwise recreate the work directory behind ``rmtree``."""
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def print_tables(sizes: list[int], results: list[Times], runs: int) -> None:
    print(f"\n{os.cpu_count()} CPUs; best of {runs} (median in parentheses)\n")
    print("| | " + " | ".join(f"{size} MiB" for size in sizes) + " |")
    print("|---" * (len(sizes) + 1) + "|")
    for key, label in METHODS:
        cells = []
        for size, res in zip(sizes, results, strict=True):
            best, med = min(res.times[key]), statistics.median(res.times[key])
            cells.append(f"{best:.2f} s = {size / best:.0f} MiB/s ({med:.2f} s)")
        print(f"| {label} | " + " | ".join(cells) + " |")
    peaks = " | ".join(f"{res.peak_kib / 1024:.0f} MiB" for res in results)
    print(f"| precache peak RSS | {peaks} |")
    print("\nprecache's speed against each anchor (anchor time / precache time): best/best "
          "(median of the per-round ratios)\n")  # fmt: skip
    print("| precache vs | " + " | ".join(f"{size} MiB" for size in sizes) + " |")
    print("|---" * (len(sizes) + 1) + "|")
    labels = dict(METHODS)
    for key in ANCHORS:
        cells = []
        for res in results:
            best = min(res.times[key]) / min(res.times["ours"])
            rounds = [a / o for a, o in zip(res.times[key], res.times["ours"], strict=True)]
            cells.append(f"{best:.2f}x ({statistics.median(rounds):.2f}x)")
        print(f"| {labels[key]} | " + " | ".join(cells) + " |")


class Times:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {key: [] for key, _ in METHODS}
        self.peak_kib = 0


def bench_size(work: Path, endpoint: str, osc: Path, size_mib: int, runs: int) -> Times:
    src = work / f"img-{size_mib}.raw"
    sha512 = make_image(src, size_mib)
    image_id = upload(endpoint, src)
    src.unlink()
    url = f"{endpoint}/v2/images/{image_id}/file"
    out = work / "out"
    conf = work / "nova.conf"
    conf.write_text(
        f"[DEFAULT]\ninstances_path = {work / 'instances'}\nhost = bench\nmy_ip = 127.0.0.1\n"
        f"[glance]\napi_servers = {endpoint}\n"
    )
    cli = [sys.executable, "-m", "imagecache", "--config-file", str(conf), "precache"]
    env = child_env(work)  # our children have their bytecode, as an installed package has
    # No Keystone in front of the test Glance: keystoneauth's "none" plugin with its endpoint.
    save = [str(osc), "--os-auth-type", "none", "--os-endpoint", endpoint, "image", "save"]

    def curl() -> int:
        return child(["curl", "-sf", "-o", str(out), url])

    def curl_sync() -> int:
        return child(["bash", "-c", f"curl -sf -o {out} {url} && sync {out}"])

    def curl_sha() -> int:
        pipe = f"curl -sf {url} | tee {out} | sha512sum"
        return child(["bash", "-o", "pipefail", "-c", pipe])

    def osc_1m() -> int:
        return child([*save, "--chunk-size", str(MIB), "--file", str(out), image_id])

    def osc_default() -> int:
        return child([*save, "--file", str(out), image_id])

    def stream() -> int:
        code = (
            "import dataclasses, os, sys\n"
            "from imagecache.config import load_settings\n"
            "from imagecache.images.glance import GlanceClient\n"
            "g = dataclasses.replace(\n"
            "    load_settings([]).glance, api_servers=(sys.argv[1],), auth_type='none')\n"
            "c = GlanceClient(g)\n"
            "fd = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\n"
            "with c.open_stream(sys.argv[2]) as chunks:\n"
            "    for chunk in chunks: os.write(fd, chunk)\n"
        )
        return child([sys.executable, "-c", code, endpoint, image_id, os.devnull], env=env)

    def curl_null() -> int:
        return child(["curl", "-sf", "-o", os.devnull, url])

    def precache() -> int:
        return child([*cli, image_id], env=env)

    runners = {
        "curl": curl, "sync": curl_sync, "sha": curl_sha, "osc1m": osc_1m,
        "oscdef": osc_default, "ours": precache, "null": curl_null, "loop": stream,
    }  # fmt: skip
    res = Times()
    for round_ in range(runs):
        for key, _ in METHODS:
            seconds, rss = timed(runners[key])
            res.times[key].append(seconds)
            if key == "ours":
                res.peak_kib = max(res.peak_kib, rss)
            if round_ == 0 and key in ("osc1m", "oscdef") and file_sha512(out) != sha512:
                raise RuntimeError(f"openstack image save ({key}) saved other bytes")
            out.unlink(missing_ok=True)
            shutil.rmtree(work / "instances", ignore_errors=True)
            os.sync()  # not timed: the next run starts with no dirty pages of this one
    return res


if __name__ == "__main__":
    main()

"""Download throughput of ``imagecache precache`` from a real Glance, against ``curl``.

    .venv/bin/python bench/fetch_bench.py [--sizes 256,1024] [--runs 3] [--port 19493] [--keep]

Starts a Glance 33 with ``dev/glance_up.sh`` in a temporary directory, uploads one random raw
image per size (MiB), then, alternating, for ``--runs`` rounds:

  (a) ``curl -s -o FILE .../v2/images/<id>/file``: the transfer alone, no verification, no fsync;
  (b) ``curl -s ... | tee FILE | sha512sum``: the same plus the hash Glance publishes, i.e. the
      least a verified download costs;
  (c) ``imagecache precache <id>`` into an empty cache (a child process): metadata, lock,
      download, SHA-512 verification, ``qemu-img info``, fsync, publish. Its peak RSS comes from
      ``wait4``;
  (d) a diagnostic, the transfer alone: ``curl -o /dev/null`` against imagecache's own stream
      loop (``GlanceClient.open_stream``, 1 MiB chunks written to ``/dev/null``, no hash) in a
      child Python, so that neither disk writeback nor hashing is in the figure.

Prints best and median wall times, MiB/s and the ratios. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def sh(*args: str, **kw: object) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=True, **kw)  # type: ignore[call-overload]
    out: str = done.stdout
    return out


def make_image(path: Path, size_mib: int) -> None:
    with path.open("wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MIB))


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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fetch-bench."))
    endpoint = f"http://127.0.0.1:{args.port}"
    sh(str(REPO / "dev" / "glance_up.sh"), str(work / "glance"), str(args.port))
    try:
        rows = [bench_size(work, endpoint, int(s), args.runs) for s in args.sizes.split(",")]
    finally:
        os.kill(int((work / "glance" / "gunicorn.pid").read_text()), signal.SIGTERM)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{os.cpu_count()} CPUs; best of {args.runs} (median in parentheses)\n")
    print("| image | curl -o | curl \\| sha512sum | imagecache precache | vs curl -o "
          "| vs curl+sha512 | precache peak RSS | curl to /dev/null "
          "| our loop to /dev/null |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)


def bench_size(work: Path, endpoint: str, size_mib: int, runs: int) -> str:
    src = work / f"img-{size_mib}.raw"
    make_image(src, size_mib)
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

    def curl() -> int:
        return child(["curl", "-sf", "-o", str(out), url])

    def curl_sha() -> int:
        pipe = f"curl -sf {url} | tee {out} | sha512sum"
        return child(["bash", "-o", "pipefail", "-c", pipe])

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
        return child([sys.executable, "-c", code, endpoint, image_id, os.devnull])

    def curl_null() -> int:
        return child(["curl", "-sf", "-o", os.devnull, url])

    def precache() -> int:
        shutil.rmtree(work / "instances", ignore_errors=True)
        return child([*cli, image_id])

    times: dict[str, list[float]] = {"curl": [], "sha": [], "ours": [], "null": [], "loop": []}
    peak = 0
    for _ in range(runs):
        for key, run in (
            ("curl", curl),
            ("sha", curl_sha),
            ("ours", precache),
            ("null", curl_null),
            ("loop", stream),
        ):
            seconds, rss = timed(run)
            times[key].append(seconds)
            if key == "ours":
                peak = max(peak, rss)
            out.unlink(missing_ok=True)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}

    def cell(key: str) -> str:
        return f"{best[key]:.2f} s = {size_mib / best[key]:.0f} MiB/s ({med[key]:.2f} s)"

    return (
        f"| {size_mib} MiB | {cell('curl')} | {cell('sha')} | {cell('ours')} "
        f"| {best['curl'] / best['ours']:.2f}x | {best['sha'] / best['ours']:.2f}x "
        f"| {peak / 1024:.0f} MiB | {cell('null')} | {cell('loop')} |"
    )


if __name__ == "__main__":
    main()

"""How fast is ``imagecache plan`` on a big host, against the shell method and against the floor.

    .venv/bin/python bench/plan_bench.py [--instances N] [--entries M] [--workdir DIR] [--keep]

Builds a synthetic host (N instances with ``disk``, ``disk.local`` and ``disk.swap`` qcow2 overlays
made by qemu-img, ``disk.info`` and ``console.log``; M cache entries of every kind, a few of them
qcow2 with their own backing file; an inventory file), then measures, with a warm page cache (one
untimed run of each first; the cache is never dropped, that needs root and hurts others):

  (a) the real CLI, ``imagecache --config-file F --inventory F plan --json``, as a child process:
      wall time, CPU time and its own peak RSS; also the startup alone (the same command
      on an empty host) and ``manager.plan_pass`` in-process;
  (b) the classic method: ``qemu-img info -U --output=json`` per disk on a random sample of disks,
      scaled linearly to all disks, plus one ``grep -c NAME`` per cache entry over the list of
      backing names of all disks (measured at full size, not scaled);
  (c) the floor: a bare Python loop that opens every disk and reads its first 64 KiB;
  (d) the job floor: the least a Python process doing this job can cost, as its own child
      process (it imports oslo.config, lists every instance directory and opens, fstats, reads
      4 KiB of and closes every file in them), run alternately with (a): ``--rounds`` rounds of
      plan, floor; reported as the median of the per-round ratios.

Not a test: nothing here asserts a time. Generated data goes to a temporary directory (removed
unless ``--keep``) or to ``--workdir``, where a host built before with the same sizes is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from imagecache import naming

HOST = "bench-host"
DAY = 86400
HEAD = 65536
BLOCK = 4096
EPHEMERAL_FORMATS = ("ext4", None, "xfs")


@dataclass(frozen=True)
class Host:
    root: Path
    config: Path
    inventory: Path
    cache_dir: Path
    disks: tuple[str, ...]  # every instance disk, absolute
    backing: tuple[str, ...]  # the basename of each disk's direct backing file, same order
    entries: tuple[str, ...]  # every name in the cache
    in_use: frozenset[str]  # what a pass must find in use


# --- building the host -------------------------------------------------------------------------


def _entry_mix(m: int) -> dict[str, int]:
    counts = {
        "small": m // 8,
        "resized": m * 7 // 40,
        "swap": m * 3 // 40,
        "ephemeral": m * 3 // 40,
    }
    counts["original"] = m - sum(counts.values())
    return counts


def _write_raw(path: Path, size: int, seed: int) -> None:
    # One real block of data (not a known magic), the rest sparse.
    with path.open("wb") as fh:
        fh.write((b"RAWDATA-" + seed.to_bytes(8, "big")) * (BLOCK // 16))
        fh.truncate(size)


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _sparse_template(path: Path) -> tuple[int, tuple[tuple[int, bytes], ...]]:
    """A qcow2 file as (length, non-zero blocks), to write copies of it cheaply and sparsely."""
    data = path.read_bytes()
    blocks = tuple(
        (off, data[off : off + BLOCK])
        for off in range(0, len(data), BLOCK)
        if data[off : off + BLOCK].strip(b"\0")
    )
    return len(data), blocks


def _write_copy(path: str, template: tuple[int, tuple[tuple[int, bytes], ...]]) -> None:
    length, blocks = template
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off, block in blocks:
            os.pwrite(fd, block, off)
        os.ftruncate(fd, length)
    finally:
        os.close(fd)


@dataclass
class _Cache:
    """The cache as generated: which names exist, and what the instances may use."""

    image_of: dict[str, str]  # original or resized name -> image id
    qcow2_bases: dict[str, str]  # qcow2 original -> the raw original backing it
    swaps: list[str]
    ephemerals: dict[str, tuple[int, str | None]]  # name -> (size GB, filesystem)


def _make_cache(base: Path, rng: random.Random, mix: dict[str, int]) -> _Cache:
    fp = naming.fingerprint
    originals = [
        str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(mix["original"])
    ]
    for i, img in enumerate(originals):
        _write_raw(base / fp(img), (1 + i % 20) << 30, i)
    # Image snapshots kept as qcow2 (force_raw_images off): a qcow2 base backed by a raw original.
    qcow2_bases: dict[str, str] = {}
    raw_pool = originals[: len(originals) // 2]
    for img in originals[len(originals) - max(1, len(originals) // 20) :]:
        parent = fp(rng.choice(raw_pool))
        (base / fp(img)).unlink()
        _qemu_img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            str(base / parent),
            str(base / fp(img)),
        )
        qcow2_bases[fp(img)] = parent
    small = [fp(img) + "_sm" for img in rng.sample(originals, mix["small"])]
    sizes = (10, 20, 40, 80)
    resized = {
        fp(img) + f"_{rng.choice(sizes)}": img for img in rng.sample(originals, mix["resized"])
    }
    swaps = [naming.swap_name(256 + 64 * i) for i in range(mix["swap"])]
    n_fs = len(EPHEMERAL_FORMATS)
    ephemerals = {
        naming.ephemeral_name(1 + i // n_fs, EPHEMERAL_FORMATS[i % n_fs]): (
            1 + i // n_fs,
            EPHEMERAL_FORMATS[i % n_fs],
        )
        for i in range(mix["ephemeral"])
    }
    for i, name in enumerate([*small, *resized, *swaps, *ephemerals], start=len(originals)):
        _write_raw(base / name, (1 + i % 8) << 30, i)
    return _Cache({fp(img): img for img in originals} | resized, qcow2_bases, swaps, ephemerals)


def build_host(root: Path, n_instances: int, n_entries: int, seed: int = 42) -> Host:
    """Create the host under ``root`` (empty) and return what the measurements need."""
    rng = random.Random(seed)
    inst, templates = root / "instances", root / "templates"
    base = inst / "_base"
    base.mkdir(parents=True)
    templates.mkdir()
    cache = _make_cache(base, rng, _entry_mix(n_entries))

    # About 70 % of each kind is used by some instance; the rest is old and unused.
    def used(names: list[str]) -> list[str]:
        return rng.sample(names, max(1, len(names) * 7 // 10))

    roots, swaps, ephemerals = (
        used(sorted(cache.image_of)),
        used(cache.swaps),
        used(sorted(cache.ephemerals)),
    )
    # One real overlay per base, made by qemu-img; each instance disk is a sparse copy of it.
    tmpl = {}
    for name in {*roots, *swaps, *ephemerals}:
        fmt = "qcow2" if name in cache.qcow2_bases else "raw"
        made = templates / name
        _qemu_img("create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(base / name), str(made))
        tmpl[name] = _sparse_template(made)
    shutil.rmtree(templates)

    disks: list[str] = []
    backing: list[str] = []
    records: list[dict[str, object]] = []
    in_use: set[str] = set()
    for i in range(n_instances):
        d = inst / str(uuid.UUID(int=rng.getrandbits(128), version=4))
        d.mkdir()
        root_base, swap, eph = rng.choice(roots), rng.choice(swaps), rng.choice(ephemerals)
        for disk_name, base_name in (("disk", root_base), ("disk.local", eph), ("disk.swap", swap)):
            _write_copy(str(d / disk_name), tmpl[base_name])
            disks.append(str(d / disk_name))
            backing.append(base_name)
        (d / "disk.info").write_text(
            json.dumps({f"{d}/{n}": "qcow2" for n in ("disk", "disk.local", "disk.swap")})
        )
        (d / "console.log").write_text(f"instance-{i:08x} booted\n")
        img = cache.image_of[root_base]
        gb, fs = cache.ephemerals[eph]
        records.append(
            {
                "uuid": d.name,
                "name": f"instance-{i:08x}",
                "host": HOST,
                "image_ref": img,
                "swap_mb": int(swap.removeprefix("swap_")),
                "ephemeral_gb": gb,
                "ephemeral_format": fs,
                "vm_state": "active",
            }
        )
        fp = naming.fingerprint(img)
        in_use.update((root_base, swap, eph, fp, fp + "_sm", cache.qcow2_bases.get(root_base, "")))

    # A qcow2 cache entry names its backing entry: that one is in use whoever uses the first.
    in_use.update(cache.qcow2_bases.values())
    entries = tuple(sorted(os.listdir(base)))
    old = time.time() - 2 * DAY
    for name in entries:
        os.utime(base / name, (old, old))
    (inst / "compute_nodes").write_text(json.dumps({HOST: time.time()}))
    (root / "inventory.json").write_text(json.dumps({"instances": records}))
    (root / "nova.conf").write_text(
        f"[DEFAULT]\nstate_path = {root}\ninstances_path = $state_path/instances\nhost = {HOST}\n"
        "[image_cache]\nmanager_interval = -1\n"  # Nova's own manager off, as beside imagecache
    )
    doc = {"disks": disks, "backing": backing, "in_use": sorted(in_use & set(entries))}
    (root / "host.json").write_text(json.dumps(doc))
    return load_host(root)


def load_host(root: Path) -> Host:
    doc = json.loads((root / "host.json").read_text())
    base = root / "instances" / "_base"
    return Host(
        root,
        root / "nova.conf",
        root / "inventory.json",
        base,
        tuple(doc["disks"]),
        tuple(doc["backing"]),
        tuple(sorted(os.listdir(base))),
        frozenset(doc["in_use"]),
    )


# --- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Child:
    seconds: float
    cpu_seconds: float  # user + system: what contention from other processes does not inflate
    maxrss_kib: int
    returncode: int


# Runs one command and reports on it. A child forked from this (large) process would count our
# pages in its peak RSS until it execs, so the command is started from this small helper instead.
_RUNNER = """
import json, resource, subprocess, sys, time
with open(sys.argv[1], "wb") as out, open(sys.argv[2], "wb") as err:
    start = time.perf_counter()
    rc = subprocess.call(sys.argv[3:], stdout=out, stderr=err)
    seconds = time.perf_counter() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps([seconds, ru.ru_utime + ru.ru_stime, ru.ru_maxrss, rc]))
"""


# (d): the job floor. What any pass must do at least: start Python, import oslo.config (the
# configuration is Nova's), list each instance directory, open, fstat, read the first 4 KiB of
# and close each file in it (a disk is known by its header, not its name). Prints the file count.
_JOB_FLOOR = """
import os, sys
import oslo_config.cfg
n = 0
with os.scandir(sys.argv[1]) as top:
    dirs = [e.path for e in top if e.is_dir() and not e.name.startswith("_base")]
for d in dirs:
    with os.scandir(d) as it:
        for f in it:
            fd = os.open(f.path, os.O_RDONLY)
            os.fstat(fd)
            os.read(fd, 4096)
            os.close(fd)
            n += 1
print(n)
"""


def child_env(out: Path) -> dict[str, str]:
    """The environment of a measured child: this one's, with a bytecode cache.

    An installed package has its ``.pyc`` files (pip compiles them); the editable checkout the
    bench runs from has none, and with ``PYTHONDONTWRITEBYTECODE`` set (as on the project
    machine) every child would compile the whole package again, ~0.1 s of every run. The cache
    lives beside the outputs, so nothing is written into the source tree.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(out.resolve() / "pycache")
    return env


def run_child(argv: Sequence[str], stdout: Path) -> Child:
    """Run ``argv`` with stdout to a file: its wall and CPU time, its own peak RSS, its status.

    The child has a bytecode cache (:func:`child_env`), as an installed package has.
    """
    err = stdout.with_suffix(".err")
    runner = [sys.executable, "-c", _RUNNER, str(stdout), str(err), *argv]
    env = child_env(stdout.parent)
    done = subprocess.run(runner, check=True, capture_output=True, text=True, env=env)
    seconds, cpu, maxrss, rc = json.loads(done.stdout)
    return Child(seconds, cpu, maxrss, rc)


def timed(
    func: Callable[[], object], repeat: int, clock: Callable[[], float] = time.perf_counter
) -> list[float]:
    func()  # warm-up, untimed
    times = []
    for _ in range(repeat):
        start = clock()
        func()
        times.append(clock() - start)
    return times


def floor_read(disks: Sequence[str], size: int = HEAD) -> None:
    for path in disks:
        fd = os.open(path, os.O_RDONLY)
        os.read(fd, size)
        os.close(fd)


def classic_info(sample: Sequence[str]) -> list[str]:
    names = []
    for path in sample:
        out = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", path], check=True, capture_output=True
        )
        names.append(os.path.basename(json.loads(out.stdout).get("backing-filename", "")))
    return names


def classic_grep(entries: Sequence[str], listing: Path) -> None:
    for name in entries:
        subprocess.run(["grep", "-c", name, str(listing)], capture_output=True, check=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--instances", type=int, default=10_000, metavar="N")
    parser.add_argument("--entries", type=int, default=2_000, metavar="M")
    parser.add_argument("--workdir", type=Path, help="build (or reuse) the host here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary host")
    parser.add_argument("--sample", type=int, default=500, help="disks for qemu-img info")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of (c)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating runs of (a) and (d)")
    args = parser.parse_args(argv)

    name = f"host-{args.instances}-{args.entries}"
    if args.workdir is not None:
        root = (args.workdir / name).resolve()
        reuse = (root / "host.json").exists()
    else:
        root = Path(tempfile.mkdtemp(prefix="imagecache-bench-")) / name
        reuse = False
    try:
        if reuse:
            print(f"reusing {root}")
            host = load_host(root)
        else:
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
            start = time.perf_counter()
            host = build_host(root, args.instances, args.entries)
            print(f"built {root} in {time.perf_counter() - start:.1f} s")
        measure(host, sample_size=args.sample, repeat=args.repeat, rounds=args.rounds)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(root.parent)
        elif args.workdir is None:
            print(f"kept {root}")
    return 0


def measure_cli(host: Host, repeat: int, rounds: int) -> dict[str, float]:
    """(a): the plan command and its startup alone, as child processes; plan_pass in-process.

    (d): the job floor, as a child process too, alternating with (a) (plan, floor, plan, ...) so
    that a change of machine load hits both alike.
    """
    out = host.root / "out"
    out.mkdir(exist_ok=True)
    (out / "empty").mkdir(exist_ok=True)
    cli = str(Path(sys.executable).parent / "imagecache")
    config = ["--config-file", str(host.config)]
    plan_argv = [cli, *config, "--inventory", str(host.inventory), "plan", "--json"]
    startup_argv = [cli, *config, "--instances-path", str(out / "empty"), "plan", "--json"]
    floor_argv = [sys.executable, "-c", _JOB_FLOOR, str(host.root / "instances")]
    runs, floors = [], []
    for i in range(rounds + 1):  # the first round warms up, untimed
        plan_run = run_child(plan_argv, out / "plan.json")
        floor_run = run_child(floor_argv, out / "floor.txt")
        if i:
            runs.append(plan_run)
            floors.append(floor_run)
    if any(r.returncode != 0 for r in runs):
        sys.exit(f"plan failed: {(out / 'plan.err').read_text()}")
    if any(r.returncode != 0 for r in floors):
        sys.exit(f"job floor failed: {(out / 'floor.err').read_text()}")
    floor_files = int((out / "floor.txt").read_text())
    startups = [run_child(startup_argv, out / "startup.json") for _ in range(repeat + 1)][1:]
    doc = json.loads((out / "plan.json").read_text())
    found = frozenset(e["name"] for e in doc["entries"] if e["in_use"])
    check = "matches" if found == host.in_use and doc["complete"] else "DOES NOT MATCH"
    print(
        f"plan: {len(found)} of {len(doc['entries'])} entries in use, "
        f"complete={doc['complete']} ({check} the generator)"
    )
    print(f"command: {' '.join(plan_argv)}")

    from imagecache import manager
    from imagecache.config import load_settings
    from imagecache.plan import plan_to_dict
    from imagecache.render.text import dumps

    settings = load_settings([str(host.config)], ())
    inv = (str(host.inventory),)
    passes = timed(
        lambda: manager.plan_pass(settings, inventory_files=inv, now=time.time()), repeat
    )
    plan = manager.plan_pass(settings, inventory_files=inv, now=time.time())
    return {
        "a": statistics.median(r.seconds for r in runs),
        "d": statistics.median(r.seconds for r in floors),
        "d_cpu": statistics.median(r.cpu_seconds for r in floors),
        "d_files": floor_files,
        "a_d": statistics.median(a.seconds / d.seconds for a, d in zip(runs, floors, strict=True)),
        "a_d_cpu": statistics.median(
            a.cpu_seconds / d.cpu_seconds for a, d in zip(runs, floors, strict=True)
        ),
        "rounds": len(runs),
        "a_cpu": statistics.median(r.cpu_seconds for r in runs),
        "startup_cpu": statistics.median(r.cpu_seconds for r in startups),
        "startup": statistics.median(r.seconds for r in startups),
        "rss": max(r.maxrss_kib for r in runs) / 1024,
        "startup_rss": max(r.maxrss_kib for r in startups) / 1024,
        "pass": statistics.median(passes),
        "render": timed(lambda: dumps(plan_to_dict(plan)), 1)[0],
    }


def measure_classic(host: Host, sample_size: int) -> dict[str, float]:
    """(b): qemu-img info per disk on a sample, scaled; one grep per entry over all names."""
    n_disks = len(host.disks)
    sample_idx = random.Random(7).sample(range(n_disks), min(sample_size, n_disks))
    sample = [host.disks[i] for i in sample_idx]
    classic_info(sample)  # warm-up
    start = time.perf_counter()
    names = classic_info(sample)
    t_info = time.perf_counter() - start
    if names != [host.backing[i] for i in sample_idx]:
        sys.exit("qemu-img info disagrees with the generator about backing files")
    listing = host.root / "out" / "backing-names.txt"
    listing.write_text("".join(name + "\n" for name in host.backing))
    grep = timed(lambda: classic_grep(host.entries, listing), 1)[0]
    return {
        "info": t_info / len(sample) * n_disks,
        "per_info": t_info / len(sample),
        "grep": grep,
        "sample": len(sample),
    }


def measure(host: Host, *, sample_size: int, repeat: int, rounds: int) -> None:
    n_disks, n_entries = len(host.disks), len(host.entries)
    print(
        f"{n_disks // 3} instances, {n_disks} disks, {n_entries} cache entries; page cache warm "
        "(one untimed run of each first)"
    )
    a = measure_cli(host, repeat, rounds)
    c = statistics.median(timed(lambda: floor_read(host.disks), repeat))
    c_cpu = statistics.median(timed(lambda: floor_read(host.disks), repeat, time.process_time))
    c4k = statistics.median(timed(lambda: floor_read(host.disks, 4096), repeat))
    b = measure_classic(host, sample_size)
    b_total = b["info"] + b["grep"]
    rows = [
        (f"(a) imagecache plan --json (CLI, wall, median of {a['rounds']:.0f})", a["a"]),
        ("    startup alone (same command, empty host)", a["startup"]),
        ("    manager.plan_pass in-process", a["pass"]),
        ("    plan_to_dict + dumps in-process", a["render"]),
        (f"(b) qemu-img info x {n_disks} (scaled from {b['sample']:.0f})", b["info"]),
        (f"    + grep -c x {n_entries} over {n_disks} names", b["grep"]),
        ("    total", b_total),
        (f"(c) floor: open + read 64 KiB + close x {n_disks}", c),
        ("    (the same reading 4 KiB, for insight)", c4k),
        (f"(d) job floor: own process, oslo.config, {a['d_files']:.0f} files", a["d"]),
    ]
    print()
    for label, seconds in rows:
        print(f"{label:<58} {seconds:9.3f} s")
    print()
    print(
        f"a / d = {a['a_d']:7.2f}x   (target <= 1.5x; median of {a['rounds']:.0f} alternating "
        f"rounds; CPU time {a['a_d_cpu']:.2f}x)"
    )
    print(f"qemu-img info per disk / a = {b['info'] / a['a']:7.1f}x   (target >= 200x)")
    print(f"b / a = {b_total / a['a']:7.1f}x   (with the greps)")
    print(f"a / c = {a['a'] / c:7.2f}x")
    print(
        f"CPU time (user+sys), unaffected by other load: (a) {a['a_cpu']:.3f} s, startup "
        f"{a['startup_cpu']:.3f} s, (c) {c_cpu:.3f} s, (d) {a['d_cpu']:.3f} s; "
        f"a / c = {a['a_cpu'] / c_cpu:.2f}x"
    )
    print(
        f"peak RSS of the plan process: {a['rss']:.0f} MiB (startup alone "
        f"{a['startup_rss']:.0f} MiB; target < 300 MB)"
    )
    per = {"qemu-img info": b["per_info"] * 1e6, "floor": c / n_disks * 1e6}
    per["(a)"] = a["a"] / n_disks * 1e6
    print("per disk: " + ", ".join(f"{k} {v:.1f} us" for k, v in per.items()))


if __name__ == "__main__":
    sys.exit(main())

"""Shared storage: one host's ``plan`` with its peers' manifests against the whole-pool scan.

    .venv/bin/python bench/shared_bench.py [--hosts 10,30,100] [--instances 100] [--bases 100]
        [--repeat 7] [--sample 100] [--workdir DIR] [--keep]

For each number of hosts H, builds a pool on one directory: ``instances_path`` with ``_base``
holding ``--bases`` raw entries (sparse, two days old; the last tenth used by no instance, so a
complete plan frees them: quarantine, by default), H hosts ``h0`` .. ``h<H-1>`` of ``--instances``
instances each (a directory named by a uuid, holding a ``disk``: a qcow2 overlay of a random used
base, its absolute backing name as Nova writes it — one overlay per base made by ``qemu-img create
-f qcow2 -b BASE -F raw``, every disk a sparse copy of its base's overlay; directories and disks
two days old), ``compute_nodes`` listing all H hosts, and per host a ``nova.conf`` (its ``host``,
the shared ``instances_path``, Nova's manager off, libvirt off, its own audit log) and an inventory
file of its records (``{"uuid", "host"}``). Each host's manifest
(``_base/.imagecache/hosts/<host>.json``) is written directly with
``imagecache.store.manifests.write_manifest``, as that host's own pass would write it: the (name,
device, inode) of the bases its instances use, its directories, complete, now (rewritten, and
``compute_nodes`` re-stamped, at the start of every run, so that a reused pool is live).

It then measures host ``h0``, page cache warm (one untimed round first), the three runs of a
round alternating (the order rotating every round; median of ``--repeat``), each the real
``imagecache --config-file h0.conf --inventory h0.json plan --json`` as a child process:

  (a) with the manifests: the H-1 peers are live, their directories are not scanned;
  (b) the whole-pool scan: the hosts directory moved aside for the run, so no peer has a
      manifest and every instance directory of the pool is scanned (the plan is then blocked by
      the missing manifests, which does not change what the scan costs);
  startup: the same command with ``--instances-path`` an empty directory.

then, in-process for h0 (median of ``--repeat``, the cyclic GC paused as a pass pauses it),
``manager.plan_pass`` with the manifests and the parts of it that read the whole pool:
``read_manifests`` (every peer's manifest names its directories), ``scan_instances`` skipping
the live peers' directories, and of it ``_instance_dirs``, the listing of ``instances_path``
(one ``stat`` per directory of the pool, skipped or not); and, where the code has it,
``sources._unchanged_since`` (one ``stat`` per claimed directory: a directory is skipped only if
unchanged since its claimer's manifest).

(c) Nova's own method, as an anchor: every host's pass runs ``qemu-img info`` on the disk of
every instance of every host in ``compute_nodes``; timed (``-U --output=json``) on a random
sample of disks of the largest pool and scaled linearly to each pool (Nova's own wrapper, a
``prlimit`` child per call, costs more).

Not a test: nothing here asserts a time. The run checks that (a) is complete, scans only h0's
disks, counts every peer's users, and keeps what (b) finds in use. Generated data goes to a
temporary directory (removed unless ``--keep``) or to ``--workdir``, where a pool built before
with the same sizes is reused.
"""

from __future__ import annotations

import argparse
import gc
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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagecache import naming
from imagecache.layout import Layout
from imagecache.model import Manifest
from imagecache.store.manifests import HOSTS_DIR, write_manifest
from plan_bench import (
    Child,
    _qemu_img,
    _sparse_template,
    _write_copy,
    _write_raw,
    run_child,
    timed,
)

DAY = 86400
VARIANTS = ("manifests", "scan", "startup")


@dataclass(frozen=True)
class Pool:
    root: Path
    instances: Path
    cache: Path
    hosts: dict[str, list[str]]  # host -> its instance directories (uuids)
    bases_of: dict[str, list[str]]  # host -> the bases its instances use
    unused: list[str]  # bases no instance uses

    @property
    def n_instances(self) -> int:
        return sum(len(d) for d in self.hosts.values())

    def config(self, host: str) -> Path:
        return self.root / host / "nova.conf"

    def inventory(self, host: str) -> Path:
        return self.root / host / "inventory.json"

    def disks(self) -> list[str]:
        return [str(self.instances / d / "disk") for dirs in self.hosts.values() for d in dirs]


# --- building the pool -------------------------------------------------------------------------


def _host_config(pool_root: Path, instances: Path, host: str) -> str:
    """As tests/test_shared.py's ``pool()``: the shared path, this host, Nova's manager off."""
    return (
        f"[DEFAULT]\ninstances_path = {instances}\nhost = {host}\n"
        "[image_cache]\nmanager_interval = -1\n"
        f"[imagecache]\naudit_log = {pool_root / host / 'log' / 'audit.jsonl'}\n"
        "libvirt_uri = none\n"
    )


def build_pool(root: Path, n_hosts: int, per_host: int, n_bases: int, seed: int = 12) -> Pool:
    """Create the pool under ``root`` (empty): bases, instances, registry, configs, records."""
    rng = random.Random(seed)
    instances = root / "instances"
    cache = instances / "_base"
    cache.mkdir(parents=True)
    bases = [naming.fingerprint(str(uuid.UUID(int=rng.getrandbits(128), version=4)))
             for _ in range(n_bases)]  # fmt: skip
    for i, name in enumerate(bases):
        _write_raw(cache / name, (1 + i % 8) << 30, i)
    used = bases[: n_bases - max(1, n_bases // 10)]
    templates = root / "templates"
    templates.mkdir()
    tmpl = {}
    for name in used:  # one real overlay per base; every disk on it is a copy of its bytes
        made = templates / name
        _qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(cache / name), str(made))
        tmpl[name] = _sparse_template(made)
    shutil.rmtree(templates)
    hosts: dict[str, list[str]] = {}
    bases_of: dict[str, list[str]] = {}
    for h in range(n_hosts):
        host = f"h{h}"
        dirs, on = [], set()
        for _ in range(per_host):
            d = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            base = rng.choice(used)
            (instances / d).mkdir()
            _write_copy(str(instances / d / "disk"), tmpl[base])
            dirs.append(d)
            on.add(base)
        hosts[host], bases_of[host] = dirs, sorted(on)
        (root / host / "log").mkdir(parents=True)
        (root / host / "nova.conf").write_text(_host_config(root, instances, host))
        records = [{"uuid": d, "host": host} for d in dirs]
        (root / host / "inventory.json").write_text(json.dumps({"instances": records}))
    old = time.time() - 2 * DAY
    for name in bases:
        os.utime(cache / name, (old, old))
    for dirs in hosts.values():  # instances made long before their owners' last manifests
        for d in dirs:
            os.utime(instances / d / "disk", (old, old))
            os.utime(instances / d, (old, old))
    doc = {"hosts": hosts, "bases_of": bases_of, "unused": bases[len(used) :]}
    (root / "pool.json").write_text(json.dumps(doc))
    return load_pool(root)


def load_pool(root: Path) -> Pool:
    doc = json.loads((root / "pool.json").read_text())
    instances = root / "instances"
    return Pool(root, instances, instances / "_base", doc["hosts"], doc["bases_of"], doc["unused"])


def refresh(pool: Pool) -> float:
    """Every host live now: ``compute_nodes`` re-stamped, each host's manifest rewritten as its
    own pass writes it (the entries its instances use, its directories, complete). Seconds."""
    start = time.perf_counter()
    aside = pool.root / "hosts.aside"  # left by an interrupted run: the manifests are rewritten
    if aside.exists():
        shutil.rmtree(aside)
    layout = Layout(str(pool.instances))
    hosts = Path(layout.state_dir) / HOSTS_DIR
    if hosts.exists():  # only the manifests written below: none left from another run or version
        shutil.rmtree(hosts)
    now = time.time()
    (pool.instances / "compute_nodes").write_text(json.dumps(dict.fromkeys(pool.hosts, now)))
    for host, dirs in pool.hosts.items():
        entries = []
        for name in pool.bases_of[host]:
            st = os.stat(pool.cache / name)
            entries.append((name, st.st_dev, st.st_ino))
        write_manifest(layout, Manifest(host, now, True, tuple(entries), tuple(sorted(dirs))))
    return time.perf_counter() - start


# --- measuring ---------------------------------------------------------------------------------


def _argv(pool: Pool, variant: str, host: str = "h0") -> list[str]:
    cli = str(Path(sys.executable).parent / "imagecache")
    argv = [cli, "--config-file", str(pool.config(host)), "--inventory", str(pool.inventory(host))]
    if variant == "startup":
        argv += ["--instances-path", str(pool.root / "empty")]
    return [*argv, "plan", "--json"]


def _run(pool: Pool, variant: str, out: Path) -> Child:
    hosts = Path(Layout(str(pool.instances)).state_dir) / HOSTS_DIR
    aside = pool.root / "hosts.aside"
    if variant == "scan":
        hosts.rename(aside)
    try:
        run = run_child(_argv(pool, variant), out / f"plan-{variant}.json")
    finally:
        if variant == "scan":
            aside.rename(hosts)
    if run.returncode not in (0, 1) or (variant != "scan" and run.returncode != 0):
        err = (out / f"plan-{variant}.err").read_text()
        sys.exit(f"plan ({variant}, {len(pool.hosts)} hosts) exited {run.returncode}: {err}")
    return run


def measure_pool(pool: Pool, repeat: int) -> dict[str, list[Child]]:
    """The three variants for h0, alternating, the order rotating; round 0 untimed."""
    out = pool.root / "out"
    out.mkdir(exist_ok=True)
    (pool.root / "empty").mkdir(exist_ok=True)
    runs: dict[str, list[Child]] = {v: [] for v in VARIANTS}
    for round_ in range(repeat + 1):
        k = round_ % len(VARIANTS)
        for variant in VARIANTS[k:] + VARIANTS[:k]:
            run = _run(pool, variant, out)
            if round_:
                runs[variant].append(run)
    return runs


def measure_inprocess(pool: Pool, repeat: int) -> dict[str, float]:
    """(a) in-process for h0: ``manager.plan_pass``, and the parts of it that read the pool."""
    from imagecache import manager, sources
    from imagecache.config import load_settings
    from imagecache.sources.disks import _instance_dirs, scan_instances
    from imagecache.store.manifests import read_manifests

    settings = load_settings([str(pool.config("h0"))], ())
    layout, files = settings.layout, (str(pool.inventory("h0")),)
    now = time.time()
    manifests, _ = read_manifests(layout)
    claims = {d: m.written for m in manifests if m.host != "h0" for d in m.instance_dirs}
    claimed = frozenset(claims)
    parts: dict[str, Callable[[], object]] = {
        "plan_pass": lambda: manager.plan_pass(settings, inventory_files=files, now=now),
        "read_manifests": lambda: read_manifests(layout),
        "scan_instances": lambda: scan_instances(layout, skip=claimed),
        "instance_dirs": lambda: _instance_dirs(layout),
    }
    # The check that a claimed directory is unchanged since its claimer's manifest (a stat per
    # claimed directory), where the code has one.
    unchanged = getattr(sources, "_unchanged_since", None)
    if unchanged is not None:
        parts["unchanged_since"] = lambda: unchanged(layout, claims)
    gc.collect()
    gc.disable()  # as plan_pass runs its observation
    try:
        return {k: statistics.median(timed(f, repeat)) for k, f in parts.items()}
    finally:
        gc.enable()


def _users(doc: dict[str, Any]) -> Counter[str]:
    return Counter(u["source"] for e in doc["entries"] for u in e["users"])


def check(pool: Pool) -> list[str]:
    """What the last runs' plans say, against what the pool was built with; the failures."""
    out = pool.root / "out"
    a = json.loads((out / "plan-manifests.json").read_text())
    b = json.loads((out / "plan-scan.json").read_text())
    peers = set(pool.hosts) - {"h0"}
    own_disks = {str(pool.instances / d / "disk") for d in pool.hosts["h0"]}
    expected_in_use = {n for bases in pool.bases_of.values() for n in bases}
    failures = []
    blocking = [p["code"] for p in a["problems"] if p["blocking"]]
    if not a["complete"] or blocking:
        failures.append(f"(a) incomplete: {Counter(blocking)}")
    scanned = {u["ref"] for e in a["entries"] for u in e["users"] if u["source"] == "backing"}
    if scanned != own_disks:
        failures.append(f"(a) scanned {len(scanned)} disks, not h0's {len(own_disks)}")
    peer_refs = {u["ref"] for e in a["entries"] for u in e["users"] if u["source"] == "peer"}
    if peer_refs != peers:
        failures.append(f"(a) peer users from {len(peer_refs)} hosts, not {len(peers)}")
    for label, doc in (("(a)", a), ("(b)", b)):
        in_use = {e["name"] for e in doc["entries"] if e["in_use"]}
        if in_use != expected_in_use:
            failures.append(f"{label} {len(in_use)} entries in use, not {len(expected_in_use)}")
    unused = {e["name"] for e in a["entries"]} - expected_in_use  # pool.unused, and any not drawn
    freed = {e["name"] for e in a["entries"] if e["action"] in ("remove", "quarantine")}
    if freed != unused or not set(pool.unused) <= unused:
        failures.append(f"(a) frees {len(freed)} entries, not the {len(unused)} unused")
    scanned_b = {u["ref"] for e in b["entries"] for u in e["users"] if u["source"] == "backing"}
    if len(scanned_b) != pool.n_instances:
        failures.append(f"(b) scanned {len(scanned_b)} disks, not {pool.n_instances}")
    missing = [p["ref"] for p in b["problems"] if p["code"] == "peer-manifest-missing"]
    if b["complete"] or set(missing) != peers:
        failures.append(f"(b) not blocked by the {len(peers)} missing manifests: {len(missing)}")
    print(
        f"  checks: (a) complete={a['complete']}, users {dict(_users(a))}, "
        f"{a['summary']['in_use']} in use, actions {a['summary']['actions']}; "
        f"(b) complete={b['complete']}, users {dict(_users(b))}, "
        f"{len(missing)} peer-manifest-missing, actions {b['summary']['actions']}"
        + ("" if not failures else f" -- FAILED: {'; '.join(failures)}")
    )
    return failures


def nova_per_disk(pool: Pool, sample_size: int) -> tuple[float, int]:
    """(c): seconds per ``qemu-img info -U --output=json``, on a random sample of disks."""
    sample = random.Random(7).sample(pool.disks(), min(sample_size, pool.n_instances))

    def info() -> float:
        start = time.perf_counter()
        for path in sample:
            subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                           check=True, capture_output=True)  # fmt: skip
        return time.perf_counter() - start

    info()  # warm-up
    return info() / len(sample), len(sample)


def report(rows: list[dict[str, Any]], per_info: float, sample: int, repeat: int) -> None:
    print()
    print(
        "| hosts | pool instances | (a) plan with manifests | (b) whole-pool scan | b / a "
        "| (a) - startup | (b) - startup | ratio above startup | (a) CPU | (b) CPU "
        "| (c) Nova, `qemu-img info` x pool | c / a |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b, s = r["manifests"], r["scan"], r["startup"]
        print(
            f"| {r['hosts']} | {r['instances']:,} | **{a:.3f} s** | {b:.3f} s | **{b / a:.1f}x** "
            f"| {a - s:.3f} s | {b - s:.3f} s | {(b - s) / (a - s):.1f}x "
            f"| {r['manifests_cpu']:.3f} s | {r['scan_cpu']:.3f} s "
            f"| {per_info * r['instances']:.1f} s | {per_info * r['instances'] / a:.0f}x |"
        )
    print()
    print(
        f"wall times median of {repeat}; startup (same command, empty instances path) "
        + ", ".join(f"{r['startup']:.3f} s" for r in rows)
        + f"; (c) {per_info * 1e3:.2f} ms per disk (sample of {sample}), scaled"
    )
    print()
    print(
        "| hosts | (a) `plan_pass` in-process | `read_manifests` | `scan_instances` (skipping "
        "peers') | of it, `_instance_dirs` (every directory of the pool) "
        "| `_unchanged_since` (a stat per claimed directory) | the rest |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        check = r.get("unchanged_since", 0.0)
        rest = r["plan_pass"] - r["read_manifests"] - r["scan_instances"] - check
        print(
            f"| {r['hosts']} | {r['plan_pass'] * 1e3:.1f} ms | {r['read_manifests'] * 1e3:.1f} ms "
            f"| {r['scan_instances'] * 1e3:.1f} ms | {r['instance_dirs'] * 1e3:.1f} ms "
            f"| {check * 1e3:.1f} ms | {rest * 1e3:.1f} ms |"
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        hosts = last["hosts"] - first["hosts"]
        added = last["instances"] - first["instances"]
        print()
        print(f"from {first['hosts']} to {last['hosts']} hosts, per host added (and per instance):")
        for key, label in (
            ("manifests", "(a) plan with manifests, wall"),
            ("scan", "(b) whole-pool scan, wall"),
            ("plan_pass", "(a) plan_pass in-process"),
            ("instance_dirs", "    of it, _instance_dirs"),
            ("read_manifests", "    of it, read_manifests"),
            ("unchanged_since", "    of it, _unchanged_since"),
        ):
            if key not in last:
                continue
            grow = last[key] - first[key]
            print(f"  {label:<32} {grow / hosts * 1e3:+7.2f} ms ({grow / added * 1e6:+6.1f} us)")


def _pool_root(workdir: Path | None, n_hosts: int, per_host: int, n_bases: int) -> Path:
    name = f"pool-{n_hosts}x{per_host}-{n_bases}"
    if workdir is not None:
        return (workdir / name).resolve()
    return Path(tempfile.mkdtemp(prefix="imagecache-shared-bench-")) / name


def _pool(root: Path, n_hosts: int, per_host: int, n_bases: int) -> Pool:
    if (root / "pool.json").exists():
        print(f"reusing {root}")
        return load_pool(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    start = time.perf_counter()
    pool = build_pool(root, n_hosts, per_host, n_bases)
    print(f"built {root} in {time.perf_counter() - start:.1f} s")
    return pool


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--hosts", default="10,30,100", help="pool sizes, comma-separated")
    parser.add_argument("--instances", type=int, default=100, metavar="N", help="per host")
    parser.add_argument("--bases", type=int, default=100, metavar="M", help="cache entries")
    parser.add_argument("--workdir", type=Path, help="build (or reuse) the pools here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary pools")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs of each")
    parser.add_argument("--sample", type=int, default=100, help="disks for qemu-img info")
    args = parser.parse_args(argv)
    sizes = sorted({int(h) for h in args.hosts.split(",")})
    if sizes[0] < 2:
        parser.error("--hosts: a pool has at least 2 hosts")

    roots = [_pool_root(args.workdir, h, args.instances, args.bases) for h in sizes]
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    pool = None
    try:
        for n_hosts, root in zip(sizes, roots, strict=True):
            pool = _pool(root, n_hosts, args.instances, args.bases)
            took = refresh(pool)
            print(
                f"{n_hosts} hosts x {args.instances} instances ({pool.n_instances:,} disks), "
                f"{args.bases} bases; {n_hosts} manifests written in {took:.2f} s"
            )
            runs = measure_pool(pool, args.repeat)
            failures += check(pool)
            row: dict[str, Any] = {"hosts": n_hosts, "instances": pool.n_instances}
            for v in VARIANTS:
                row[v] = statistics.median(r.seconds for r in runs[v])
                row[f"{v}_cpu"] = statistics.median(r.cpu_seconds for r in runs[v])
            row |= measure_inprocess(pool, args.repeat)
            rows.append(row)
        assert pool is not None
        print(f"command: {' '.join(_argv(pool, 'manifests'))}")
        per_info, sample = nova_per_disk(pool, args.sample)
        report(rows, per_info, sample, args.repeat)
    finally:
        if args.workdir is None and not args.keep:
            for root in roots:
                shutil.rmtree(root.parent, ignore_errors=True)
        elif args.workdir is None:
            print(f"kept {', '.join(str(r) for r in roots)}")
    if failures:
        print("CHECKS FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

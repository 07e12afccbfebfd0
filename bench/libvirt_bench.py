"""What the libvirt source costs ``imagecache plan``: off, unset, and 1,000 test-driver domains.

    .venv/bin/python bench/libvirt_bench.py [--instances 1000] [--entries 200] [--workdir DIR]
        [--repeat 7] [--keep]

Builds a host with ``plan_bench.build_host`` (N instances, ``disk``, ``disk.local`` and
``disk.swap`` qcow2 overlays each; M cache entries; an inventory file), then two libvirt
test-driver node files of N domains, one per instance: a unique name and the instance's uuid,
its three disks (``<driver type='qcow2'>``), an ``<os>`` kernel (one shared file), Nova's
``<nova:instance>`` metadata (the image, swap and ephemeral sizes of the instance's inventory
record), every second domain shut off (``<test:runstate>5</test:runstate>``). In
``node-inside.xml`` the disks are the instance disks, whose chains the instance scan has read
already; in ``node-outside.xml`` they are copies of them outside ``instances_path``, whose
chains the libvirt source reads itself.

It then measures, page cache warm (one untimed run of each first), the real
``imagecache --config-file F --inventory F plan --json`` as a child process, runs of the four
configurations alternating (the order rotating every round; median of ``--repeat``):

  off      ``[imagecache] libvirt_uri = none``
  unset    no libvirt option, no daemon socket on this machine: off with a note (4 ``stat``)
  inside   ``libvirt_uri = test:///.../node-inside.xml``
  outside  ``libvirt_uri = test:///.../node-outside.xml``

and, in-process, ``sources.libvirt.observe_domains`` alone for each (with the instance scan's
chains, as a pass calls it), split into the listing (the worker thread: connect, list, two
``XMLDesc`` per running domain, one per shut-off one, parse; and, of it, the connection alone,
where the test driver loads and checks its whole node file) and the reading of what the domains
name (``stat`` per file, the disk chains not read by the instance scan).

Not a test: nothing here asserts a time. Generated data goes to a temporary directory (removed
unless ``--keep``) or to ``--workdir``, where a host built before with the same sizes is reused.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from imagecache.model import Problem
from imagecache.sources import libvirt as lv
from plan_bench import (
    Child,
    Host,
    _sparse_template,
    _write_copy,
    build_host,
    load_host,
    run_child,
    timed,
)

DISK_NAMES = ("disk", "disk.local", "disk.swap")
TARGETS = ("vda", "vdb", "vdc")
NOVA_NS = "http://openstack.org/xmlns/libvirt/nova/1.1"
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
VARIANTS = ("off", "unset", "inside", "outside")


@dataclass(frozen=True)
class Node:
    """The libvirt side of the host: node files and one configuration per variant."""

    configs: dict[str, Path]
    uris: dict[str, str]  # variant -> test:/// URI (inside, outside)
    domains: int
    running: int


# --- building the libvirt side -----------------------------------------------------------------


def _instances(host: Host) -> list[tuple[str, tuple[str, ...]]]:
    """(uuid, its three disks) per instance, in the generator's order."""
    out = []
    for i in range(0, len(host.disks), len(DISK_NAMES)):
        disks = host.disks[i : i + len(DISK_NAMES)]
        if tuple(os.path.basename(d) for d in disks) != DISK_NAMES:
            sys.exit(f"unexpected disks in the generated host: {disks}")
        out.append((os.path.basename(os.path.dirname(disks[0])), tuple(disks)))
    return out


def _copy_outside(host: Host, outside: Path) -> dict[str, str]:
    """A sparse copy of every instance disk under ``outside``: instance disk -> copy."""
    templates: dict[str, tuple[int, tuple[tuple[int, bytes], ...]]] = {}
    copies = {}
    for path, backing in zip(host.disks, host.backing, strict=True):
        if backing not in templates:  # every disk with one backing file has the same bytes
            templates[backing] = _sparse_template(Path(path))
        inst = os.path.basename(os.path.dirname(path))
        target = outside / inst / os.path.basename(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            _write_copy(str(target), templates[backing])
        copies[path] = str(target)
    return copies


def domain_xml(i: int, inst: str, disks: Sequence[str], kernel: str, record: dict[str, Any]) -> str:
    """One test-driver domain: the instance's disks, a kernel, Nova's metadata; odd ones off."""
    runstate = "<test:runstate>5</test:runstate>" if i % 2 else ""
    devices = "".join(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file={quoteattr(path)}/><target dev='{dev}' bus='virtio'/></disk>"
        for path, dev in zip(disks, TARGETS, strict=True)
    )
    image = quoteattr(str(record["image_ref"]))
    return (
        f"<domain type='test' xmlns:test='{TEST_NS}'>"
        f"<name>instance-{i:08x}</name><uuid>{inst}</uuid>{runstate}"
        f'<metadata><nova:instance xmlns:nova="{NOVA_NS}">'
        f"<nova:name>{record['name']}</nova:name>"
        f'<nova:flavor name="m1"><nova:swap>{record["swap_mb"]}</nova:swap>'
        f"<nova:ephemeral>{record['ephemeral_gb']}</nova:ephemeral></nova:flavor>"
        f'<nova:root type="image" uuid={image}/></nova:instance></metadata>'
        "<memory unit='MiB'>512</memory><vcpu>1</vcpu>"
        f"<os><type>hvm</type><kernel>{kernel}</kernel></os>"
        f"<devices>{devices}</devices></domain>\n"
    )


def build_node(host: Host) -> Node:
    """The node files, the outside copies (made once) and a configuration per variant."""
    base = host.root / "libvirt"
    base.mkdir(exist_ok=True)
    kernel = base / "vmlinuz"
    kernel.write_bytes(b"\0" * 4096)
    records = {r["uuid"]: r for r in json.loads(host.inventory.read_text())["instances"]}
    instances = _instances(host)
    copies = _copy_outside(host, base / "outside")
    uris = {}
    for variant, where in (("inside", None), ("outside", copies)):
        node = base / f"node-{variant}.xml"
        with node.open("w") as out:
            out.write("<node>\n")
            for i, (inst, disks) in enumerate(instances):
                named = disks if where is None else [where[d] for d in disks]
                out.write(domain_xml(i, inst, named, str(kernel), records[inst]))
            out.write("</node>\n")
        uris[variant] = f"test://{node.resolve()}"
    nova = host.config.read_text()
    if "[imagecache]" in nova or "[libvirt]" in nova:
        sys.exit(f"{host.config} already says something of libvirt")
    configs = {"unset": host.config}
    for variant, uri in (("off", "none"), *uris.items()):
        configs[variant] = base / f"{variant}.conf"
        configs[variant].write_text(f"{nova}[imagecache]\nlibvirt_uri = {uri}\n")
    n = len(instances)
    return Node(configs, uris, n, n - n // 2)


# --- measuring ---------------------------------------------------------------------------------


@contextmanager
def _gc_paused() -> Iterator[None]:
    """As ``manager.plan_pass`` runs its observation: the cyclic collector paused."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def measure_cli(host: Host, node: Node, repeat: int) -> dict[str, list[Child]]:
    """``plan --json`` per variant as child processes, alternating, the order rotating."""
    out = host.root / "out"
    out.mkdir(exist_ok=True)
    cli = str(Path(sys.executable).parent / "imagecache")

    def argv(variant: str) -> list[str]:
        config = ["--config-file", str(node.configs[variant])]
        return [cli, *config, "--inventory", str(host.inventory), "plan", "--json"]

    runs: dict[str, list[Child]] = {v: [] for v in VARIANTS}
    for round_ in range(repeat + 1):  # round 0: the untimed warm-up of each
        k = round_ % len(VARIANTS)
        for variant in VARIANTS[k:] + VARIANTS[:k]:
            run = run_child(argv(variant), out / f"plan-{variant}.json")
            if run.returncode != 0:
                err = (out / f"plan-{variant}.err").read_text()
                sys.exit(f"plan ({variant}) exited {run.returncode}: {err}")
            if round_:
                runs[variant].append(run)
    print(f"command: {' '.join(argv('inside'))}")
    for variant in VARIANTS:
        doc = json.loads((out / f"plan-{variant}.json").read_text())
        in_use = sum(1 for e in doc["entries"] if e["in_use"])
        codes: dict[str, int] = {}
        for p in doc["problems"]:
            codes[p["code"]] = codes.get(p["code"], 0) + 1
        print(
            f"  {variant:<8} {in_use} of {len(doc['entries'])} entries in use, "
            f"complete={doc['complete']}, problems {codes or 'none'}"
        )
    return runs


def _connect(uri: str) -> None:
    """Only the connection: for the test driver, loading and checking its whole node file."""
    import libvirt

    libvirt.openReadOnly(uri).close()


def _inprocess(config: Path, repeat: int) -> tuple[dict[str, float], lv.Domains]:
    """``observe_domains`` alone for one configuration, with the instance scan's chains."""
    from imagecache.config import load_settings
    from imagecache.sources.disks import scan_instances

    settings = load_settings([str(config)], ())
    layout, conf, host = settings.layout, settings.libvirt, settings.host
    scanned, _ = scan_instances(layout)
    disks = {d.path: d for d in scanned}
    with _gc_paused():
        found = lv.observe_domains(conf, layout, host=host, disks=disks)
        observe = timed(lambda: lv.observe_domains(conf, layout, host=host, disks=disks), repeat)
        row = {"observe": statistics.median(observe)}
        uri = conf.uri
        if uri is None or not uri.startswith("test:"):
            return row, found
        row["list"] = statistics.median(timed(lambda: lv._list(uri, conf.timeout), repeat))
        row["connect"] = statistics.median(timed(lambda: _connect(uri), repeat))
        listed = lv._list(uri, conf.timeout)
        if isinstance(listed, Problem):
            sys.exit(f"{config}: {listed.message}")

        def read() -> None:  # the rest of observe_domains: a reader fed the listed domains
            reader = lv._Reader(layout, host, disks)
            for item in listed:
                reader.add(uri, item)

        row["read"] = statistics.median(timed(read, repeat))
    return row, found


def measure_inprocess(node: Node, repeat: int) -> dict[str, dict[str, float]]:
    """``observe_domains`` alone per variant; for a URI, also its listing and its reading."""
    results = {}
    for variant in VARIANTS:
        results[variant], found = _inprocess(node.configs[variant], repeat)
        files = sum(len(d.files) for d in found.domains)
        print(
            f"  {variant:<8} {len(found.domains)} domains, {files} files, "
            f"{len(found.records)} records, problems {[str(p.code) for p in found.problems]}"
        )
    return results


def report(node: Node, runs: dict[str, list[Child]], inproc: dict[str, dict[str, float]]) -> None:
    wall = {v: statistics.median(r.seconds for r in runs[v]) for v in VARIANTS}
    cpu = {v: statistics.median(r.cpu_seconds for r in runs[v]) for v in VARIANTS}
    spread = {v: (min(r.seconds for r in runs[v]), max(r.seconds for r in runs[v])) for v in runs}
    n = node.domains
    labels = {
        "off": "libvirt off (`libvirt_uri = none`)",
        "unset": "libvirt unset, no daemon socket (off, a note)",
        "inside": f"test driver, {n:,} domains, disks inside `instances_path`",
        "outside": f"test driver, {n:,} domains, disks outside",
    }
    repeat = len(runs["off"])
    print()
    print(
        f"| `plan --json` ({n:,} instances, {n * 3:,} disks) | wall (median of {repeat}) "
        "| min-max | CPU | vs off | per domain | `observe_domains` | listing | of it, connect "
        "| reading |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        diff = wall[v] - wall["off"]
        row = inproc[v]

        def ms(key: str, row: dict[str, float] = row) -> str:
            return f"{row[key] * 1e3:.1f} ms" if key in row else "-"

        observe = ms("observe") if row["observe"] >= 1e-4 else f"{row['observe'] * 1e6:.1f} µs"
        per = f"{diff / n * 1e3:.2f} ms" if v in ("inside", "outside") else "-"
        print(
            f"| {labels[v]} | {wall[v]:.3f} s | {spread[v][0]:.3f}-{spread[v][1]:.3f} s "
            f"| {cpu[v]:.3f} s | {diff * 1e3:+.0f} ms | {per} | {observe} "
            f"| {ms('list')} | {ms('connect')} | {ms('read')} |"
        )
    print()
    for v in ("inside", "outside"):
        row = inproc[v]
        print(
            f"{v}: {wall[v] / wall['off']:.2f}x off; observe_domains {row['observe'] / n * 1e6:.0f}"
            f" us per domain (listing {row['list'] / n * 1e6:.0f}, of it connecting "
            f"{row['connect'] / n * 1e6:.0f}; reading {row['read'] / n * 1e6:.0f})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--instances", type=int, default=1_000, metavar="N")
    parser.add_argument("--entries", type=int, default=200, metavar="M")
    parser.add_argument("--workdir", type=Path, help="build (or reuse) the host here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary host")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs of each")
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
        start = time.perf_counter()
        node = build_node(host)
        print(f"libvirt node files and outside copies ready in {time.perf_counter() - start:.1f} s")
        sockets = [s for s in lv.DAEMON_SOCKETS if os.path.exists(s)]
        if sockets:
            print(f"WARNING: libvirt daemon sockets exist ({sockets}): 'unset' is not off here")
        else:
            print(f"no libvirt daemon socket ({', '.join(lv.DAEMON_SOCKETS)}): 'unset' is off")
        print(
            f"{node.domains} domains ({node.running} running, {node.domains - node.running} "
            f"shut off); page cache warm (one untimed run of each first)"
        )
        runs = measure_cli(host, node, args.repeat)
        print("in-process, observe_domains:")
        inproc = measure_inprocess(node, args.repeat)
        report(node, runs, inproc)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(root.parent)
        elif args.workdir is None:
            print(f"kept {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

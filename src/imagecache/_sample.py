"""Build a realistic sample host: ``python -m imagecache._sample DIR`` (demo and end-to-end tests).

Everything is real: raw bases with data in them, qcow2 overlays made by ``qemu-img`` with
absolute, relative and 3-deep backing chains, a ``nova.conf``, an inventory file and Nova's
``compute_nodes`` registry. :data:`EXPECTED` says what a pass must decide for each entry, in words
an operator would use; the end-to-end tests hold the tool to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from imagecache import naming

__all__ = ["EXPECTED", "HOST", "SampleHost", "build"]

HOST = "sample-host"
HOUR, DAY = 3600, 86400

IMG_USED = "7c3ad6a2-5f0d-4d1c-9a48-1f0e6f0b1a01"  # root disk of most instances
IMG_RELATIVE = "7c3ad6a2-5f0d-4d1c-9a48-1f0e6f0b1a02"  # overlay with a relative backing name
IMG_RESCUE = "7c3ad6a2-5f0d-4d1c-9a48-1f0e6f0b1a03"  # only disk.rescue uses it
IMG_DEEP_TOP = "7c3ad6a2-5f0d-4d1c-9a48-1f0e6f0b1a04"  # qcow2 base that itself has a backing file
IMG_DEEP_BOTTOM = "7c3ad6a2-5f0d-4d1c-9a48-1f0e6f0b1a05"  # used only at depth 3
IMG_RECORD_ONLY = "7c3ad6a2-5f0d-4d1c-9a48-1f0e6f0b1a06"  # shelved: only its record uses it
IMG_OLD = "7c3ad6a2-5f0d-4d1c-9a48-1f0e6f0b1a07"  # unused for two days
IMG_YOUNG = "7c3ad6a2-5f0d-4d1c-9a48-1f0e6f0b1a08"  # unused, pre-cached ten minutes ago
KERNEL = "aa11aa11-0000-4000-8000-00000000000a"
RAMDISK = "aa11aa11-0000-4000-8000-00000000000b"
LEGACY_KERNEL = "bb22bb22-0000-4000-8000-00000000000c"  # pre-2013 kernel under its raw id
IMG_OTHER_HOST = "cc33cc33-0000-4000-8000-00000000000d"  # used only by a host not sharing storage

fp = naming.fingerprint

# entry name -> (kind, action, reason): what one pass with the sample's nova.conf must decide.
EXPECTED: dict[str, tuple[str, str, str]] = {
    fp(IMG_USED): ("original", "keep", "in-use"),
    fp(IMG_RELATIVE): ("original", "keep", "in-use"),
    fp(IMG_RESCUE): ("original", "keep", "in-use"),
    fp(IMG_DEEP_TOP): ("original", "keep", "in-use"),
    fp(IMG_DEEP_BOTTOM): ("original", "keep", "in-use"),
    fp(IMG_RECORD_ONLY): ("original", "keep", "in-use"),
    fp(IMG_OLD): ("original", "quarantine", "unused-expired"),
    fp(IMG_YOUNG): ("original", "keep", "too-young"),
    fp(IMG_OTHER_HOST): ("original", "quarantine", "unused-expired"),
    fp(KERNEL): ("original", "keep", "in-use"),
    fp(RAMDISK): ("original", "keep", "in-use"),
    fp(IMG_USED) + "_sm": ("small", "keep", "in-use"),
    fp(IMG_OLD) + "_sm": ("small", "quarantine", "unused-expired"),
    fp(IMG_RELATIVE) + "_20": ("resized", "keep", "in-use"),
    fp(IMG_USED) + "_5": ("resized", "quarantine", "unused-expired"),
    "swap_512": ("swap", "keep", "in-use"),
    "swap_2048": ("swap", "keep", "in-use"),
    "swap_1024": ("swap", "quarantine", "unused-expired"),
    naming.ephemeral_name(4, "ext4"): ("ephemeral", "keep", "in-use"),
    naming.ephemeral_name(1, None): ("ephemeral", "keep", "in-use"),
    naming.ephemeral_name(8, None): ("ephemeral", "quarantine", "unused-expired"),
    LEGACY_KERNEL: ("legacy-id", "keep", "legacy-id-disabled"),
    fp(IMG_OLD) + ".part": ("temp", "reap", "stale-temp"),
    naming.temp_name(fp(IMG_YOUNG), 4242, "a1b2c3"): ("temp", "keep", "temp-too-young"),
    "notes.txt": ("unknown", "keep", "unknown-kind"),
    "latest": ("unknown", "keep", "not-a-regular-file"),
}


@dataclass(frozen=True)
class SampleHost:
    root: Path
    instances_path: Path
    cache_dir: Path
    config: Path
    inventory: Path


def _qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def _raw(path: Path, mib: int, seed: int) -> None:
    # Real bytes, so sizes and checksums mean something; deterministic per seed.
    block = (seed.to_bytes(4, "big") * 256) * 1024
    with path.open("wb") as fh:
        for _ in range(mib):
            fh.write(block)


def _overlay(path: Path, backing: str | Path, fmt: str = "raw") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _qemu_img("create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(backing), path)


def _age(path: Path, seconds: float, now: float) -> None:
    os.utime(path, (now - seconds, now - seconds), follow_symlinks=False)


def build(root: Path, *, now: float | None = None) -> SampleHost:
    """Create the sample host under ``root`` (which must not hold one already) and return it."""
    now = time.time() if now is None else now
    inst = root / "instances"
    base = inst / "_base"
    base.mkdir(parents=True)

    raws = {
        IMG_USED: 4, IMG_RELATIVE: 3, IMG_RESCUE: 1, IMG_DEEP_BOTTOM: 2, IMG_RECORD_ONLY: 2,
        IMG_OLD: 3, IMG_YOUNG: 1, KERNEL: 1, RAMDISK: 1, IMG_OTHER_HOST: 1,
    }  # fmt: skip
    for seed, (image_id, mib) in enumerate(raws.items(), start=1):
        _raw(base / fp(image_id), mib, seed)
    # A qcow2 base that is itself an overlay (an image snapshot kept as qcow2 with force_raw off).
    _overlay(base / fp(IMG_DEEP_TOP), base / fp(IMG_DEEP_BOTTOM))
    for name, mib, seed in (
        (fp(IMG_USED) + "_sm", 1, 20), (fp(IMG_OLD) + "_sm", 1, 21),
        (fp(IMG_RELATIVE) + "_20", 3, 22), (fp(IMG_USED) + "_5", 2, 23),
        ("swap_512", 1, 24), ("swap_2048", 1, 25), ("swap_1024", 1, 26),
        (naming.ephemeral_name(4, "ext4"), 1, 27), (naming.ephemeral_name(1, None), 1, 28),
        (naming.ephemeral_name(8, None), 1, 29), (LEGACY_KERNEL, 1, 30),
        (fp(IMG_OLD) + ".part", 1, 31), (naming.temp_name(fp(IMG_YOUNG), 4242, "a1b2c3"), 1, 32),
    ):  # fmt: skip
        _raw(base / name, mib, seed)
    (base / "notes.txt").write_text("operator notes: do not delete\n")
    (base / "latest").symlink_to(fp(IMG_USED))

    uuids = [f"{i:08d}-7c0e-4000-8000-4f9e8d7c0000" for i in range(1, 13)]
    records: list[dict[str, object]] = []
    for i, uuid in enumerate(uuids):
        d = inst / uuid
        d.mkdir()
        record: dict[str, object] = {"uuid": uuid, "name": f"instance-{i + 1:08x}", "host": HOST,
                                     "image_ref": IMG_USED, "vm_state": "active"}  # fmt: skip
        _overlay(d / "disk", base / fp(IMG_USED))
        (d / "console.log").write_text("boot ok\n")
        (d / "disk.info").write_text(json.dumps({str(d / "disk"): "qcow2"}))
        records.append(record)

    # Kernel and ramdisk: only instance records name them (the bug Nova fixed late).
    records[0].update(kernel_id=KERNEL, ramdisk_id=RAMDISK)
    # disk.local on an ext4 ephemeral, disk.swap on swap_512: used through the chain alone
    # (the records do not mention them, as with a second ephemeral disk Nova ignores).
    _overlay(inst / uuids[1] / "disk.local", base / naming.ephemeral_name(4, "ext4"))
    _overlay(inst / uuids[1] / "disk.swap", base / "swap_512")
    # swap_2048 and ephemeral_1_<vfat>: named only by the record (disks on other storage).
    records[2].update(swap_mb=2048, ephemeral_gb=1)
    # A rescue disk on another image.
    _overlay(inst / uuids[3] / "disk.rescue", base / fp(IMG_RESCUE))
    # A relative backing name, and a legacy Folsom resized base.
    rel = inst / uuids[4] / "disk"
    rel.unlink()
    _overlay(rel, Path("..") / "_base" / fp(IMG_RELATIVE))
    records[4]["image_ref"] = IMG_RELATIVE
    legacy = inst / uuids[5] / "disk"
    legacy.unlink()
    _overlay(legacy, base / (fp(IMG_RELATIVE) + "_20"))
    # 3-deep: disk -> disk.snap (instance-local qcow2) -> _base/<deep top> -> _base/<deep bottom>.
    deep = inst / uuids[6]
    (deep / "disk").unlink()
    _overlay(deep / "disk.snap", base / fp(IMG_DEEP_TOP), "qcow2")
    _overlay(deep / "disk", "disk.snap", "qcow2")
    # The _sm copy of the image in use is protected by the image id, as in Essex.
    # A resize in progress: the old copy lives in <uuid>_resize and still uses the base.
    _overlay(inst / f"{uuids[7]}_resize" / "disk", base / fp(IMG_USED))
    # A shelved-offloaded instance: no directory, only its record protects its image.
    records.append({"uuid": "99999999-7c0e-4000-8000-4f9e8d7c0000", "host": HOST,
                    "image_ref": IMG_RECORD_ONLY, "vm_state": "shelved_offloaded"})  # fmt: skip
    # An instance of a host that does not share this storage protects nothing here.
    records.append({"uuid": "88888888-7c0e-4000-8000-4f9e8d7c0000", "host": "elsewhere",
                    "image_ref": IMG_OTHER_HOST})  # fmt: skip
    # A volume-booted instance: image_ref "" must not be hashed into a name.
    records.append({"uuid": "77777777-7c0e-4000-8000-4f9e8d7c0000", "host": HOST, "image_ref": ""})

    (inst / "compute_nodes").write_text(json.dumps({HOST: now - 600}))
    inventory = root / "inventory.json"
    inventory.write_text(json.dumps({"instances": records}, indent=1))
    config = root / "nova.conf"
    config.write_text(
        f"[DEFAULT]\nstate_path = {root}\ninstances_path = $state_path/instances\nhost = {HOST}\n"
        # Nova's own manager off, as beside imagecache it must be (its interval is then 2400).
        f"[image_cache]\nmanager_interval = -1\n"
        f"[imagecache]\naudit_log = {root}/audit.jsonl\n"
        # The sample's instances are its directories and records; the machine's own libvirt
        # (if any) runs none of them.
        "libvirt_uri = none\n"
    )

    ages = {name: (2 * DAY if action != "keep" or reason == "in-use" else 0)
            for name, (_, action, reason) in EXPECTED.items()}  # fmt: skip
    ages.update({fp(IMG_YOUNG): 600, naming.temp_name(fp(IMG_YOUNG), 4242, "a1b2c3"): 60})
    ages.update({fp(IMG_USED) + "_5": 2 * HOUR, LEGACY_KERNEL: 30 * DAY, "notes.txt": 9 * DAY})
    ages["latest"] = DAY
    for name, seconds in ages.items():
        _age(base / name, seconds, now)
    return SampleHost(root, inst, base, config, inventory)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m imagecache._sample DIR", file=sys.stderr)
        return 2
    host = build(Path(argv[0]).resolve())
    print(host.config)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))

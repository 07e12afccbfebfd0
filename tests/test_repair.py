"""``verify --repair`` end to end, a precache's digest record, and SIGKILL during both.

Real components only: a real Glance (started by the suite) serves the image, ``precache`` caches
it, a real qcow2 overlay made by ``qemu-img`` uses the base and a real ``qemu-io`` reads through
it, the kernel (inotify) says what read the published file, and the command line runs as a
separate process where it is killed. Bit rot is one flipped byte, size and mtime kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from imagecache import naming
from imagecache.config import load_settings
from imagecache.images.glance import GlanceClient
from imagecache.store import digests
from tests import qemu
from tests.glance_server import GlanceServer
from tests.opens import DirWatch
from tests.test_executor import Host, cli, make_host, put, use
from tests.test_verify import rot

MIB = 1 << 20
GOOD, GUEST = 0xAB, 0x11  # the image's own bytes; what the guest wrote into its overlay


def glance_host(tmp_path: Path, server: GlanceServer, **options: object) -> Host:
    host = make_host(tmp_path, **options)
    with host.config.open("a") as conf:
        conf.write(f"[glance]\napi_servers = {server.endpoint}\n")
    return host


def patterned(path: Path, size: int, *, fmt: str = "raw") -> Path:
    """An image of ``fmt`` whose guest sees ``GOOD`` in every byte, written by ``qemu-io``."""
    qemu.qemu_img("create", "-q", "-f", fmt, path, str(size))
    done = qemu.qemu_io(path, f"write -P {GOOD:#x} 0 {size}", fmt=fmt, read_only=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return path


def precache(host: Host, capsys: pytest.CaptureFixture[str], image_id: str) -> str:
    code, doc = cli(host, capsys, "precache", image_id, now=time.time())
    assert code == 0, doc
    (row,) = doc["results"]
    assert row["result"] == "cached"
    name: str = row["name"]
    return name


def record_of(host: Host, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(digests_dir(host).joinpath(f"{name}.json").read_text())
    return doc


def digests_dir(host: Host) -> Path:
    return host.cache / ".imagecache" / "digests"


def repair(host: Host, capsys: pytest.CaptureFixture[str], name: str) -> tuple[int, Any]:
    return cli(host, capsys, "verify", "--repair", name, now=time.time())


def temps(host: Host) -> list[str]:
    return sorted(p.name for p in host.cache.iterdir() if p.name.endswith(naming.TEMP_SUFFIX))


def guest_reads(disk: Path, offset: int, length: int) -> bool:
    """Whether a fresh qemu-io reads ``GOOD`` through ``disk`` over that range."""
    done = qemu.qemu_io(disk, f"read -P {GOOD:#x} {offset} {length}")
    return done.returncode == 0 and "verification failed" not in done.stdout


class Guest:
    """A running ``qemu-io`` on an overlay: it holds the base open, as a guest's qemu does."""

    def __init__(self, disk: Path) -> None:
        self._proc = subprocess.Popen(
            ["qemu-io", "-r", "-f", "qcow2", str(disk)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=disk.parent,
        )
        self._until_prompt()

    def _until_prompt(self) -> str:
        assert self._proc.stdout is not None
        out = b""
        deadline = time.monotonic() + 30
        while not out.endswith(b"qemu-io> "):
            assert time.monotonic() < deadline, out
            chunk = os.read(self._proc.stdout.fileno(), 4096)
            assert chunk, f"qemu-io exited: {out!r}"
            out += chunk
        return out.decode(errors="replace")

    def reads(self, offset: int, length: int) -> bool:
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"read -P {GOOD:#x} {offset} {length}\n".encode())
        self._proc.stdin.flush()
        out = self._until_prompt()
        assert "read " in out, out
        return "verification failed" not in out

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=30)
        assert self._proc.stdout is not None
        self._proc.stdout.close()


@pytest.fixture
def guest() -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for g in started:
        g.close()


# --- repair in place from a real Glance --------------------------------------------------------


@pytest.mark.glance
@pytest.mark.parametrize("case", [("raw", "glance"), ("qcow2", "converted")], ids=str)
def test_repair_restores_the_good_bytes_in_place_and_a_guest_reads_them(
    glance_server: GlanceServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    guest: list[Guest],
    case: tuple[str, str],
) -> None:
    fmt, source = case  # the image's format in Glance; the record's source once cached
    host = glance_host(tmp_path, glance_server)
    image = patterned(tmp_path / f"image.{fmt}", 4 * MIB, fmt=fmt)
    # What the cache must hold, made by qemu-img alone: the image itself, or its raw conversion.
    original = tmp_path / "original.raw"
    qemu.qemu_img("convert", "-f", fmt, "-O", "raw", image, original)
    image_id = glance_server.upload(image, disk_format=fmt)
    name = precache(host, capsys, image_id)
    base = host.path(name)
    assert base.read_bytes() == original.read_bytes()
    assert record_of(host, name)["source"] == source
    disk = use(host, name)
    qemu.write_pattern(disk, GUEST)  # the guest's own first 64 KiB live in its overlay
    inode = base.stat().st_ino

    rot(base, offset=2 * MIB + 12345)
    running = Guest(disk)
    guest.append(running)
    assert not running.reads(MIB, 3 * MIB)  # the rot reaches the guest through its overlay
    code, doc = cli(host, capsys, "verify", name, now=time.time())
    assert code == 1 and [r["verdict"] for r in doc["results"]] == ["corrupt"]
    (kept,) = doc["corrupt_in_use"]
    assert kept["ref"] == name and str(disk) in kept["message"]
    assert base.exists() and doc["quarantined"] == []
    assert record_of(host, name)["verdict"] == "corrupt"

    code, doc = repair(host, capsys, name)

    assert code == 0, doc
    assert (doc["result"], doc["blocks_written"], doc["bytes_written"]) == ("repaired", 1, MIB)
    assert base.stat().st_ino == inode  # in place: the guest's open file is the repaired one
    assert base.read_bytes() == original.read_bytes()
    after = record_of(host, name)
    assert (after["verdict"], after["source"], after["observed_xxh3_128"]) == ("good", source, None)
    assert after["inode"] == inode
    assert running.reads(MIB, 3 * MIB)  # the same qemu-io, its file never reopened
    assert guest_reads(disk, MIB, 3 * MIB)
    assert qemu.reads_pattern(disk, GUEST)  # the overlay's own data untouched
    assert temps(host) == []  # the good copy fetched for the repair is gone
    code, doc = cli(host, capsys, "verify", name, now=time.time())
    assert code == 0 and [r["verdict"] for r in doc["results"]] == ["good"]


@pytest.mark.glance
def test_a_converted_entry_is_converted_again_whatever_force_raw_says_now(
    glance_server: GlanceServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The record says how the entry was made: a base converted from qcow2 is repaired from a
    conversion even after the operator turned ``force_raw_images`` off."""
    host = glance_host(tmp_path, glance_server)
    image = patterned(tmp_path / "image.qcow2", 2 * MIB, fmt="qcow2")
    name = precache(host, capsys, glance_server.upload(image, disk_format="qcow2"))
    assert record_of(host, name)["source"] == "converted"
    use(host, name)
    good = host.path(name).read_bytes()
    rot(host.path(name))
    text = host.config.read_text()
    host.config.write_text(text.replace("[DEFAULT]\n", "[DEFAULT]\nforce_raw_images = false\n"))
    assert not load_settings([str(host.config)]).fetch.force_raw

    code, doc = repair(host, capsys, name)

    assert code == 0, doc
    assert doc["result"] == "repaired" and host.path(name).read_bytes() == good


@pytest.mark.glance
def test_repair_of_an_intact_entry_writes_nothing(
    glance_server: GlanceServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = glance_host(tmp_path, glance_server)
    image_id = glance_server.upload(patterned(tmp_path / "image.raw", 3 * MIB + 4096))
    name = precache(host, capsys, image_id)
    use(host, name)
    before = host.path(name).stat()

    code, doc = repair(host, capsys, name)

    assert code == 0, doc
    assert (doc["result"], doc["blocks_written"]) == ("intact", 0)
    after = host.path(name).stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_ctime_ns,
    )
    assert record_of(host, name)["verdict"] == "good"


def test_a_first_seen_entry_cannot_be_repaired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    name = naming.fingerprint("someone-elses-image")
    put(host, name, 60)
    use(host, name)
    assert cli(host, capsys, "verify", name)[0] == 0
    assert record_of(host, name)["source"] == "first-seen"
    assert record_of(host, name)["image"] is None
    rot(host.path(name))
    rotten = host.path(name).read_bytes()

    code, doc = repair(host, capsys, name)

    assert code == 1
    assert doc["result"] == "refused" and "cannot be repaired" in doc["message"]
    assert host.path(name).read_bytes() == rotten


def test_a_forged_record_never_has_a_host_file_written_into_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone who can write in ``.imagecache/digests/`` names a host file as the entry's image,
    with that file's own digest as the reference: repair must not fetch it (the ref is not the
    one the entry's name was made from), and the entry keeps its bytes."""
    host = make_host(tmp_path)
    name = naming.fingerprint("someone-elses-image")
    put(host, name, 60)
    assert cli(host, capsys, "verify", name)[0] == 0
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret\n" * (host.path(name).stat().st_size // 12 + 1))
    secret.write_bytes(secret.read_bytes()[: host.path(name).stat().st_size])
    path = digests_dir(host) / f"{name}.json"
    forged = json.loads(path.read_text())
    forged.update(image=secret.as_uri(), source="glance", verdict="corrupt",
                  xxh3_128=xxhash.xxh3_128(secret.read_bytes()).hexdigest())  # fmt: skip
    path.write_text(json.dumps(forged))
    before = host.path(name).read_bytes()

    code, doc = repair(host, capsys, name)

    assert code == 1
    assert doc["result"] == "refused" and "not made from" in doc["message"]
    assert host.path(name).read_bytes() == before


def test_an_entry_without_a_record_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    name = naming.fingerprint("never-verified")
    put(host, name, 60)
    code, doc = repair(host, capsys, name)
    assert code == 1 and doc["result"] == "refused" and "no digest record" in doc["message"]


@pytest.mark.glance
@pytest.mark.parametrize("lie", ["record", "store"])
def test_a_copy_that_does_not_match_the_record_writes_nothing(
    glance_server: GlanceServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], lie: str
) -> None:
    """The record's reference digest edited, or the image service's store rotten too: the copy
    fetched again is not the record's bytes, so not one byte of the base is written."""
    host = glance_host(tmp_path, glance_server)
    image_id = glance_server.upload(patterned(tmp_path / "image.raw", 2 * MIB))
    name = precache(host, capsys, image_id)
    use(host, name)
    base = host.path(name)
    rot(base)
    assert cli(host, capsys, "verify", name, now=time.time())[0] == 1
    path = digests_dir(host) / f"{name}.json"
    if lie == "record":
        doc = json.loads(path.read_text())
        doc["xxh3_128"] = "0" * 32
        path.write_text(json.dumps(doc))
        why = "nothing written"
    else:
        rot(glance_server.stored_file(image_id), offset=MIB)
        why = "mismatch"
    rotten, kept, before = base.read_bytes(), path.read_bytes(), base.stat()

    code, doc = repair(host, capsys, name)

    assert code == 1
    assert doc["result"] == "failed" and why in doc["message"], doc
    assert base.read_bytes() == rotten and base.stat().st_ctime_ns == before.st_ctime_ns
    assert path.read_bytes() == kept  # the record still says corrupt
    assert temps(host) == []


# --- precache: a glance record, and no second read -------------------------------------------


@pytest.mark.glance
def test_precache_records_glances_digest_without_reading_the_published_file(
    glance_server: GlanceServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = glance_host(tmp_path, glance_server)
    data = hashlib.shake_256(b"precache").digest(8 * MIB + 4321)
    image_id = glance_server.upload(data)
    with DirWatch(host.cache) as watch:
        name = precache(host, capsys, image_id)
        events = watch.events()
        base = host.path(name)
        base.read_bytes()  # the watch sees a read of the published file when there is one
        assert ("read", name) in watch.events()

    (publish,) = [i for i, event in enumerate(events) if event == ("moved-in", name)]
    (temp,) = {n for kind, n in events[:publish] if kind == "created"}
    assert re.fullmatch(re.escape(name) + r"\.\d+\.[0-9a-f]+\.part", temp)
    assert ("read", temp) in events[:publish]  # its header was read under the temp name
    assert [e for e in events[publish + 1 :] if e[0] == "read"] == []  # nothing read after
    assert ("read", name) not in events

    meta = GlanceClient(glance_server.settings).get(image_id)
    rec, st = record_of(host, name), base.stat()
    assert rec["source"] == "glance" and rec["verdict"] == "good"
    assert rec["expected"] == {"algorithm": meta.hash_algo, "value": meta.hash_value}
    assert meta.hash_value == hashlib.new(str(meta.hash_algo), data).hexdigest()
    assert rec["xxh3_128"] == xxhash.xxh3_128(base.read_bytes()).hexdigest()
    assert (rec["device"], rec["inode"], rec["size"]) == (st.st_dev, st.st_ino, len(data))
    assert rec["image"] == image_id


# --- SIGKILL ---------------------------------------------------------------------------------


def imagecache(host: Host, *args: str, strace: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "imagecache", "--config-file", str(host.config), *args]
    if strace:
        argv = ["strace", "-f", "-qq", "-o", "/dev/null", *strace, *argv]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def python_of(proc: subprocess.Popen[bytes]) -> int:
    """The pid of the imagecache process: ``proc`` itself, or strace's child."""
    if Path(f"/proc/{proc.pid}/exe").resolve().name != "strace":
        return proc.pid
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError("strace started no child")


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the imagecache process (never strace first: its tracee would go on unheld)."""
    os.kill(python_of(proc), signal.SIGKILL)
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # strace 6.1 can lose track of a tracee killed mid-delay
        proc.kill()
        proc.communicate(timeout=10)


def wait_for(
    condition: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {proc.communicate()}")
        assert time.monotonic() < deadline, "the moment to kill never came"
        time.sleep(0.005)


def strict_records(host: Host) -> dict[str, dict[str, Any]]:
    """Every file in the digests directory is a whole record (else the test fails), or a temp
    name of this project's; the records by entry name."""
    layout = load_settings([str(host.config)]).layout
    files = (
        sorted(p.name for p in digests_dir(host).iterdir()) if digests_dir(host).exists() else []
    )
    names = [f.removesuffix(".json") for f in files if f.endswith(".json")]
    parsed = digests.read_records(layout)
    assert sorted(parsed) == sorted(names), "a record that does not parse"
    others = [f for f in files if not f.endswith(".json")]
    for other in others:
        assert re.fullmatch(r"[0-9a-f]{40}\.json\.\d+\.[0-9a-f]{8}\.part", other), other
    return {n: record_of(host, n) for n in names}


needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


def test_sigkill_during_verify_leaves_whole_records_and_a_later_verify_completes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed at a random moment while verifying a cache slowly (rate-limited), many times:
    every record is whole, and the next verification finishes the work."""
    rng = random.Random(20261210)
    host = make_host(tmp_path, verify_max_bytes_per_second=32 * MIB)
    names = [naming.fingerprint(f"kill-verify-{i}") for i in range(8)]
    for name in names:
        put(host, name, 60, size=4 * MIB)
    seen: set[str] = set()
    for _ in range(4):
        proc = imagecache(host, "verify", "--all")
        time.sleep(rng.uniform(0.05, 0.9))  # the whole run takes ~1 s
        kill(proc)
        seen.update(strict_records(host))
    assert seen, "never killed after a record was written"

    code, doc = cli(host, capsys, "verify", "--all", now=time.time())
    assert code == 0 and sorted(r["name"] for r in doc["results"]) == sorted(names)
    records = strict_records(host)
    assert {n: r["verdict"] for n, r in records.items()} == dict.fromkeys(names, "good")


def killed_while_renaming_a_record(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> tuple[str, dict[str, Any], str]:
    """A verification of a rotten entry killed while strace holds the rename of its new record
    (``renameat``): (the entry, its old record, the temp name left in the digests directory)."""
    name = naming.fingerprint("kill-record")
    put(host, name, 60)
    assert cli(host, capsys, "verify", name)[0] == 0
    old = record_of(host, name)
    rot(host.path(name))
    held = digests_dir(host)
    proc = imagecache(host, "verify", name,
                      strace=("-e", "trace=renameat,renameat2",
                              "-e", "inject=renameat,renameat2:delay_enter=20000000"))  # fmt: skip
    wait_for(lambda: any(p.suffix == ".part" for p in held.iterdir()), proc)
    kill(proc)
    (left,) = [p.name for p in held.iterdir() if p.suffix == ".part"]
    return name, old, left


@needs_strace
def test_sigkill_while_a_record_is_renamed_into_place_leaves_the_old_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The old record is whole and still says what it said; the new one is a temp name
    beside it, which no reader takes for a record."""
    host = make_host(tmp_path)
    name, old, left = killed_while_renaming_a_record(host, capsys)
    assert strict_records(host) == {name: old}
    assert left.startswith(f"{name}.json.")
    code, doc = cli(host, capsys, "verify", name, now=time.time())
    assert code == 1 and [r["verdict"] for r in doc["results"]] == ["corrupt"]


@needs_strace
def test_a_record_temp_left_by_a_kill_is_reaped_by_a_later_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    _, _, left = killed_while_renaming_a_record(host, capsys)
    assert cli(host, capsys, "clean", now=time.time() + 2 * 86400)[0] == 0
    assert left not in {p.name for p in digests_dir(host).iterdir()}


@pytest.mark.glance
@needs_strace
def test_sigkill_during_repair_leaves_old_or_good_blocks_and_a_later_repair_completes(
    glance_server: GlanceServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """strace slows each block write of the repair (``pwrite64``, 0.3 s) so the kill lands
    between blocks: the record still says corrupt, every 1 MiB block is the old or the good
    bytes, and the next ``--repair`` writes the rest. The good copy the killed repair fetched
    is a temp the reaper recognises and removes once stale."""
    blocks = 12
    host = glance_host(tmp_path, glance_server)
    image = patterned(tmp_path / "image.raw", blocks * MIB)
    good = image.read_bytes()
    image_id = glance_server.upload(image)
    name = precache(host, capsys, image_id)
    use(host, name)
    base = host.path(name)
    inode = base.stat().st_ino
    for i in range(blocks):  # every block rotten, so every block is written
        rot(base, offset=i * MIB + 777)
    rotten = base.read_bytes()
    assert cli(host, capsys, "verify", name, now=time.time())[0] == 1

    def written() -> int:
        data = base.read_bytes()
        return sum(data[i * MIB : (i + 1) * MIB] == good[i * MIB : (i + 1) * MIB]
                   for i in range(blocks))  # fmt: skip

    proc = imagecache(host, "verify", "--repair", name,
                      strace=("-e", "trace=pwrite64",
                              "-e", "inject=pwrite64:delay_exit=300000"))  # fmt: skip
    wait_for(lambda: written() >= 2, proc)
    kill(proc)

    data = base.read_bytes()
    for i in range(blocks):
        now = data[i * MIB : (i + 1) * MIB]
        assert now in (good[i * MIB : (i + 1) * MIB], rotten[i * MIB : (i + 1) * MIB]), i
    done = written()
    assert 2 <= done < blocks  # killed midway
    assert strict_records(host)[name]["verdict"] == "corrupt"
    assert base.stat().st_ino == inode
    (left,) = temps(host)  # the good copy of the killed repair
    assert left.startswith(f"{name}.")

    code, doc = repair(host, capsys, name)

    assert code == 0, doc
    assert (doc["result"], doc["blocks_written"]) == ("repaired", blocks - done)
    assert base.read_bytes() == good and base.stat().st_ino == inode
    assert strict_records(host)[name]["verdict"] == "good"
    # A pass once the leftover is stale reaps it (its entry lock is free); the base is in use.
    code, doc = cli(host, capsys, "clean", now=time.time() + 2 * 86400)
    assert code == 0, doc
    assert temps(host) == [] and base.exists()
    assert ("reaped", "stale-temp") in {(o["result"], o["reason"]) for o in doc["outcomes"]}

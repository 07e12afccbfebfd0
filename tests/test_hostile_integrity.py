"""Attack findings on integrity (issue 10): digest records, verification, acting on corrupt.

Each test drives the real command line (or ``verify.verify``) on real files in ``tmp_path``, with
a fixed clock; Nova's lock is taken by another process; nothing is patched. A test here that
fails is a finding; one that passes is an attack that held up (kept as a guard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecache import verify
from imagecache.cli import main
from imagecache.clock import Clock
from imagecache.config import load_settings
from tests.opens import OpenWatch
from tests.test_executor import DAY, NOW, A, B, Host, cli, make_host, put, use
from tests.test_locks import nova_holds
from tests.test_verify import record, rot, verdicts

SWAP = "swap_512"
HOUR = 3600.0


def digests_dir(host: Host) -> Path:
    return host.cache / ".imagecache" / "digests"


def clock_at(now: float) -> Clock:
    return Clock(wall=lambda: now, monotonic=time.monotonic, sleep=time.sleep)


# --- An entry Nova is still writing in place, under its lock, is recorded as seen. ---------------


def test_a_swap_file_nova_is_writing_in_place_is_not_recorded_then_called_corrupt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nova makes swap and ephemeral backing files *in place under their final name*, holding
    the entry lock: ``qemu-img create -f raw swap_512 512M`` (final size, zeros), then ``mkswap``
    (or mkfs) writes the header into the same inode. A verification that hashes the entry
    meanwhile (a pass, or ``verify --all``) takes no lock and records the zeros as ``first-seen``;
    once Nova is done the file has the same device, inode and size, so the next verification
    calls it corrupt: unused, it is quarantined at once; in use, every pass exits 1 with a
    repair that is refused (first-seen). Verification must not hash an entry whose lock is held
    (or must hash it under the lock)."""
    host = make_host(tmp_path)
    swap = host.path(SWAP)
    with nova_holds(host.instances, SWAP):
        with swap.open("wb") as f:  # qemu-img create -f raw: the final size, all zeros
            f.truncate(1 << 20)
        code, doc = cli(host, capsys, "verify", "--all")
        # Its lock is held: left for later, recorded as nothing (not a failure of verify).
        assert code == 0 and verdicts(doc) == {SWAP: None} and doc["results"][0]["skipped"]
        assert not (digests_dir(host) / f"{SWAP}.json").exists()
        with swap.open("r+b") as f:  # mkswap: the header into the same inode, same size
            f.seek(1024)
            f.write(b"\x01\x00\x00\x00" + os.urandom(16) + b"SWAPSPACE2")
    os.utime(swap, (NOW - 60, NOW - 60))

    code, doc = cli(host, capsys, "verify", "--all", now=NOW + 10)
    assert verdicts(doc) == {SWAP: "good"}, doc
    assert code == 0 and swap.exists()


# --- A record that outlives its file: identity reuse. ---------------------------------------------


def test_a_record_of_an_entry_our_own_pass_removed_is_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No code removes a digest record: every entry ever cached leaves one behind, read by
    every observation (twice a pass with checksums on) for ever, and waiting to be matched
    against whatever file gets the same name, device, inode and size (next test)."""
    host = make_host(tmp_path, quarantine_seconds=0)
    put(host, SWAP, 2 * DAY)
    assert cli(host, capsys, "verify", "--all")[0] == 0
    _, doc = cli(host, capsys, "clean", now=NOW + 60)
    assert [(o["name"], o["result"]) for o in doc["outcomes"]] == [(SWAP, "removed")]
    cli(host, capsys, "clean", now=NOW + 120)
    assert not (digests_dir(host) / f"{SWAP}.json").exists(), "the record stays behind"


def test_a_new_file_on_a_reused_inode_is_not_judged_against_the_old_ones_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Identity is (device, inode, size). ext4 and XFS hand a freed inode to the next file made
    in the directory, and a swap file Nova makes again has the same size and a new mkswap UUID:
    the new file is judged against the old one's bytes and called corrupt. In use, every pass
    exits 1 and the repair is refused (first-seen). Identity needs something a new file cannot
    reuse (the birth time, ``statx`` ``stx_btime``), or records must go with their files."""
    host = make_host(tmp_path)
    swap = put(host, SWAP, 60)
    assert cli(host, capsys, "verify", "--all")[0] == 0
    old = record(host, SWAP)
    swap.unlink()  # removed (by Nova's manager, an operator, our own pass)
    # Made again. Publish, by rename (the inode is kept), the probe that got the freed inode.
    probes = [host.cache / f".probe-{i}" for i in range(16)]
    for probe in probes:
        probe.write_bytes(os.urandom(old["size"]))
    reused = [p for p in probes if p.stat().st_ino == old["inode"]]
    for probe in probes:
        if probe not in reused:
            probe.unlink()
    if not reused:
        pytest.skip("this filesystem did not reuse the inode")
    reused[0].rename(swap)
    os.utime(swap, (NOW - 60, NOW - 60))
    use(host, SWAP)
    code, doc = cli(host, capsys, "verify", "--all", now=NOW + 2 * HOUR)
    assert verdicts(doc) == {SWAP: "good"}, doc
    assert code == 0


# --- A stale corrupt record quarantines a good entry without a second look. ----------------------


@pytest.mark.parametrize("checksums", ["true", "false"])
def test_a_stale_corrupt_record_does_not_quarantine_a_good_entry_unhashed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], checksums: str
) -> None:
    """An in-use entry found corrupt is kept; the operator puts the good bytes back behind our
    back (or a repair's record write failed); the instance goes. The next pass quarantines the
    now good entry for ``corrupt``, whatever its age, without reading a byte: the verdict comes
    from a record that is up to ``checksum_interval_seconds`` old (and forever when
    ``checksum_base_images`` is off: records are read by every observation). A quarantine
    *for corruption* must be confirmed by hashing under the entry lock."""
    host = make_host(tmp_path, checksum_base_images=checksums)
    put(host, A, 60)
    disk = use(host, A)
    assert cli(host, capsys, "verify", "--all")[0] == 0
    rot(host.path(A))
    code, doc = cli(host, capsys, "verify", "--all", now=NOW + 10)
    assert code == 1 and verdicts(doc) == {A: "corrupt"} and host.path(A).exists()
    rot(host.path(A))  # the same byte flipped back: the file is good again, same inode
    shutil.rmtree(disk.parent)  # the instance is deleted

    code, doc = cli(host, capsys, "clean", now=NOW + 60)  # 50 s later: not due again
    assert [o for o in doc["outcomes"] if o["result"] == "quarantined"] == [], doc
    assert host.path(A).exists()


# --- The digests directory: symlink, regular file. -----------------------------------------------


def test_a_symlink_swapped_in_for_the_digests_directory_is_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """store/digests.py says a symlink swapped in for ``.imagecache`` or ``digests`` is refused,
    never followed; that holds for writes only. ``read_records`` joins paths and follows the
    link, so records we would never write (and cannot update: writes there fail with ELOOP)
    decide: a forged corrupt verdict there quarantines a young, good, unused entry."""
    host = make_host(tmp_path)
    put(host, A, 60)
    assert cli(host, capsys, "verify", A)[0] == 0
    elsewhere = tmp_path / "elsewhere"
    shutil.move(digests_dir(host), elsewhere)
    forged = json.loads((elsewhere / f"{A}.json").read_text())
    forged.update(verdict="corrupt", observed_xxh3_128="0" * 32)
    (elsewhere / f"{A}.json").write_text(json.dumps(forged))
    digests_dir(host).symlink_to(elsewhere)

    _, plan = cli(host, capsys, "plan", now=NOW + 60)
    assert plan["entries"][0]["integrity"] == "unverified", plan["entries"][0]
    _, doc = cli(host, capsys, "clean", now=NOW + 60)
    assert host.path(A).exists(), doc["outcomes"]


def test_a_digests_path_that_cannot_hold_records_does_not_rehash_the_cache_every_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``.imagecache/digests`` a regular file (or unwritable): no record can be written, and
    nothing reads as one, so every pass hashes every entry as new, in full, forever, and says
    so only in a warning per entry: no problem in the pass's report, ``clean`` exits 0. On a
    fleet this is a silent full re-read of every cache every interval. Either say so as a
    problem of the pass (and fail it), or do not re-read."""
    host = make_host(tmp_path, checksum_base_images="true")
    paths = [put(host, name, 60, size=1 << 20) for name in (A, B)]
    digests_dir(host).parent.mkdir(parents=True, exist_ok=True)
    digests_dir(host).write_text("not a directory\n")
    assert cli(host, capsys, "clean")[0] in (0, 1)
    with OpenWatch(*paths, reads=True) as watch:
        code, doc = cli(host, capsys, "clean", now=NOW + 60)
        reread = watch.opened()
    found = [*doc.get("problems", []), *doc.get("apply_problems", [])]
    reported = [p for p in found if "digest" in json.dumps(p)]
    assert reread == set() or (reported and code == 1), (reread, code, doc.get("problems"))


# --- Names that cannot have a record. ------------------------------------------------------------


def test_an_entry_whose_name_cannot_have_a_record_is_not_hashed_in_full_every_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ephemeral_<gb>_<any 7 characters>`` is verifiable, and the 7 may be undecodable bytes;
    ``write_record`` refuses names that are not valid Unicode, so the entry is ``new`` on every
    pass: hashed in full each time (before every due entry, ahead in the budget's queue), and
    ``verify --all`` exits 1 forever. A name a record cannot be written for should be skipped
    (or the record keyed by the name's bytes)."""
    host = make_host(tmp_path, checksum_base_images="true")
    raw = os.fsencode(host.cache) + b"/ephemeral_20_" + b"\xff" * 7
    with open(raw, "wb") as f:
        f.write(b"\x00" * (1 << 20))
    name = os.fsdecode(raw).rsplit("/", 1)[1]
    settings_ = load_settings([str(host.config)])
    first = verify.verify(settings_.layout, settings_.verify, clock=clock_at(NOW))
    assert [r.name for r in first.results] == []  # no record can be kept for it: not verifiable
    assert cli(host, capsys, "verify", "--all")[0] == 0
    again = verify.verify(settings_.layout, settings_.verify, clock=clock_at(NOW + 60))
    assert [(r.name, r.reason, r.message) for r in again.results] == [], "hashed again as new"
    assert name


# --- The rate limit. ----------------------------------------------------------------------------


def test_a_low_rate_limit_never_sleeps_past_a_stop_or_the_watchdog(tmp_path: Path) -> None:
    """``verify_max_bytes_per_second`` paces by sleeping *after* each 4 MiB block for as long as
    the block is ahead: at 1000 B/s that is one sleep of 70 minutes, with neither
    ``should_stop`` (SIGTERM: systemd's TimeoutStopSec is 90 s) nor the watchdog ping
    (WatchdogSec=10min: the daemon is killed and restarted mid-verify, for ever) consulted in
    between. Sleeps must be bounded (a tick) with ``should_stop`` asked between them."""
    host = make_host(tmp_path)
    put(host, A, 60, size=8 << 20)
    s = load_settings([str(host.config)])
    slow = dataclasses.replace(s.verify, max_bytes_per_second=1000.0)
    slept: list[float] = []
    mono = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        mono[0] += seconds

    clock = Clock(wall=lambda: NOW, monotonic=lambda: mono[0], sleep=sleep)
    asked = [0]

    def should_stop() -> bool:
        asked[0] += 1
        return False

    verify.verify(s.layout, slow, clock=clock, names=[A], should_stop=should_stop)
    assert slept and max(slept) <= 60, f"one sleep of {max(slept):.0f} s"


# --- A FIFO as Nova's legacy .sha1. --------------------------------------------------------------


def test_a_fifo_as_a_legacy_sha1_file_is_never_opened(tmp_path: Path) -> None:
    """``<entry>.info`` goes through ``read_json`` (``stat`` first: anything but a regular file
    is refused unopened, as that module says it must be: opening a FIFO wakes its writer).
    ``<entry>.sha1`` is opened first and checked after: a process blocked opening the FIFO for
    writing is woken by our open (then meets a closed pipe). The same stat-first rule should
    apply."""
    host = make_host(tmp_path)
    put(host, A, 60)
    fifo = host.cache / f"{A}.sha1"
    os.mkfifo(fifo)
    writer = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; os.open(sys.argv[1], os.O_WRONLY)", str(fifo)]
    )
    try:
        _blocked_in_open(writer.pid)
        s = load_settings([str(host.config)])
        done = verify.verify(s.layout, s.verify, clock=clock_at(NOW), names=[A])
        assert [r.verdict for r in done.results] == ["good"]
        with contextlib.suppress(subprocess.TimeoutExpired):
            writer.wait(timeout=2)
        assert writer.returncode is None, "our open of the FIFO woke its writer"
    finally:
        if writer.returncode is None:
            writer.kill()
            writer.wait(timeout=10)


def _blocked_in_open(pid: int) -> None:
    """Wait until process ``pid`` sleeps in the kernel's FIFO open, waiting for a reader."""
    limit = time.monotonic() + 20
    wchan = Path(f"/proc/{pid}/wchan")
    while wchan.read_text() not in ("wait_for_partner", "fifo_open"):
        assert time.monotonic() < limit, "the writer never blocked opening the FIFO"
        time.sleep(0.01)


# --- Exit codes. ---------------------------------------------------------------------------------


def test_verify_exits_1_while_a_known_corrupt_entry_is_in_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``imagecache verify`` (what is due) from cron: an in-use entry already known corrupt, not
    due again, and the command says all is well (exit 0) while ``status`` and ``plan`` exit 1
    for the very same state. The help says "Exit 1 when anything is corrupt"."""
    host = make_host(tmp_path)
    put(host, A, 60)
    use(host, A)
    assert cli(host, capsys, "verify", "--all")[0] == 0
    rot(host.path(A))
    assert cli(host, capsys, "verify", "--all", now=NOW + 10)[0] == 1
    assert cli(host, capsys, "status", now=NOW + 20)[0] == 1
    code, doc = cli(host, capsys, "verify", now=NOW + 20)
    # A corrupt entry is due every time (rare, and no verdict may grow old), and still corrupt.
    assert verdicts(doc) == {A: "corrupt"} and doc["corrupt_in_use"]
    assert code == 1


# --- Attacks that held up (guards). --------------------------------------------------------------


def test_held_a_saved_plan_claiming_corrupt_is_decided_again_from_a_fresh_observation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    put(host, A, 60)
    assert cli(host, capsys, "verify", "--all")[0] == 0
    saved = tmp_path / "plan.json"
    assert cli(host, capsys, "plan", "-o", str(saved))[0] == 0
    doc = json.loads(saved.read_text())
    for e in doc["entries"]:
        e.update(integrity="corrupt", action="quarantine", reason="corrupt")
    saved.write_text(json.dumps(doc))
    _, done = cli(host, capsys, "clean", "--plan", str(saved), now=NOW + 60)
    assert host.path(A).exists(), done
    assert all(o["result"] != "quarantined" for o in done.get("outcomes", []))


def test_held_a_corrupt_unused_entry_is_kept_on_an_incomplete_view(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    put(host, A, 60)
    assert cli(host, capsys, "verify", "--all")[0] == 0
    broken = host.instances / "inst-2" / "disk"
    broken.parent.mkdir()
    broken.write_bytes(b"QFI\xfb\x00\x00\x00\x09" + b"\x00" * 200)  # unreadable: incomplete
    rot(host.path(A))
    code, doc = cli(host, capsys, "verify", "--all", now=NOW + 10)
    assert code == 1 and verdicts(doc) == {A: "corrupt"}
    assert host.path(A).exists()
    code, doc = cli(host, capsys, "clean", now=NOW + 20)
    assert code == 1 and host.path(A).exists()


def test_held_a_symlink_swapped_in_for_an_entry_is_not_followed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    put(host, A, 60)
    target = tmp_path / "host-file"
    target.write_bytes(b"secret" * 1000)
    host.path(A).unlink()
    host.path(A).symlink_to(target)
    with OpenWatch(target) as watch:
        _, doc = cli(host, capsys, "verify", "--all")
        assert watch.opened() == set()
    assert doc["results"] == [] and target.exists()


# --- Property: a whole hostile digests directory. ------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _record_like(good: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A real record with any fields replaced by anything (keeping identity half the time)."""
    keys = st.sampled_from(sorted(good))
    return st.dictionaries(keys, _json | st.sampled_from(
        ["corrupt", "good", "glance", "first-seen", "nova-info", 2**64, -1, 10**400, "nan"]
    ), max_size=5).map(lambda changes: {**good, **changes})  # fmt: skip


_KINDS = st.sampled_from(["json", "record", "dir", "fifo", "symlink-zero", "symlink-other", "huge"])


def _run(host: Host, *args: str, now: float) -> tuple[int, dict[str, Any]]:
    argv = ["--config-file", str(host.config), "--inventory", str(host.inventory), "--json", *args]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv, clock=lambda: now)
    return code, json.loads(out.getvalue())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_held_a_hostile_digests_directory_crashes_nothing_and_removes_no_entry_in_use(
    data: st.DataObject,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        host = make_host(Path(tmp))
        put(host, A, 60)
        put(host, B, 60)
        use(host, A)
        assert _run(host, "verify", "--all", now=NOW)[0] == 0
        good = {n: json.loads((digests_dir(host) / f"{n}.json").read_text()) for n in (A, B)}
        for name in (A, B, "f" * 40, "..", "x"):
            path = digests_dir(host) / f"{name}.json"
            kind = data.draw(_KINDS)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                path.unlink()
            if kind == "json":
                path.write_text(json.dumps(data.draw(_json), allow_nan=True))
            elif kind == "record":
                like = data.draw(_record_like(good.get(name, good[A])))
                path.write_text(json.dumps(like, allow_nan=True))
            elif kind == "dir":
                path.mkdir(exist_ok=True)
            elif kind == "fifo":
                os.mkfifo(path)
            elif kind == "symlink-zero":
                path.symlink_to("/dev/zero")
            elif kind == "symlink-other":
                path.symlink_to(digests_dir(host) / f"{B}.json")
            else:
                path.write_text('{"schema": 1, "pad": "' + "x" * (1 << 17) + '"}')
        for args in (("plan",), ("status",), ("verify", "--all"), ("clean",)):
            code, _ = _run(host, *args, now=NOW + 60)
            assert code in (0, 1), args
        assert host.path(A).exists()  # in use: never moved, whatever the records say

"""Hostile small files and arguments: FIFOs, devices, huge numbers, text that is not text.

``compute_nodes``, inventory files, ``disk.info`` and saved plans are read by one reader
(:mod:`imagecache.store.jsonfile`): anything but a regular file is refused without being opened,
numbers must be sane, text must be text. Every command runs as a real child process with a
timeout: a FIFO that would block, or ``/dev/zero`` that never ends, must give a problem naming
the file (or exit 2 for a plan), never a hang and never a traceback — in particular ``clean``,
which reads ``compute_nodes`` while it holds Nova's registry lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_executor import DAY, Host, make_host, put, use

TIMEOUT = 60


def run(host: Host, *args: str | bytes, inventory: str | None = None) -> tuple[int, Any, str]:
    """``imagecache --json ARGS`` as a child process: exit code, its one document, stderr."""
    argv: list[str | bytes] = [
        sys.executable,
        "-m",
        "imagecache",
        "--config-file",
        str(host.config),
    ]
    argv += ["--inventory", inventory or str(host.inventory), "--json", *args]
    done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, check=False)
    err = done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    out = done.stdout.decode("utf-8")
    assert out.endswith("\n") and out.count("\n") == 1, (out, err)
    return done.returncode, json.loads(out), err


def problems(doc: dict[str, Any], *keys: str) -> list[tuple[str, str]]:
    """(code, ref) of the problems under ``keys``, but the note that no records were given."""
    found = [(p["code"], p["ref"]) for key in keys for p in doc.get(key, [])]
    return [p for p in found if p[0] != "records-absent"]


def entry_lock_free(host: Host) -> None:
    """Nova's registry lock is free again: the pass let go of it."""
    from tests.test_locks import nova_tries

    assert nova_tries(host.instances, "storage-registry-lock") == "got"


# -- 15: FIFOs and devices -----------------------------------------------------------------------


@pytest.mark.parametrize("what", ["fifo", "symlink-to-dev-zero", "directory"])
def test_compute_nodes_that_is_not_a_regular_file_is_a_problem_and_clean_finishes(
    tmp_path: Path, what: str
) -> None:
    host = make_host(tmp_path, quarantine_seconds=0)
    registry = host.instances / "compute_nodes"
    if what == "fifo":
        os.mkfifo(registry)
    elif what == "directory":
        registry.mkdir()
    else:
        registry.symlink_to("/dev/zero")
    put(host, "swap_1", 2 * DAY, now=time.time())

    code, doc, _ = run(host, "clean")
    assert code == 1 and doc["complete"] is False
    assert problems(doc, "problems") == [("registry-unreadable", str(registry))]
    [message] = [p["message"] for p in doc["problems"] if p["ref"] == str(registry)]
    assert message == ("is a symlink: not followed" if what.startswith("symlink") else
                       "is not a regular file")  # fmt: skip
    assert problems(doc, "apply_problems") == [("host-unregistered", str(registry))]
    assert host.path("swap_1").exists()  # an incomplete view removes nothing
    # Left exactly as it was, never replaced by a registry of this host alone.
    kinds = {"fifo": registry.is_fifo, "directory": registry.is_dir, "symlink-to-dev-zero":
             registry.is_symlink}  # fmt: skip
    assert kinds[what]()
    entry_lock_free(host)
    code, doc, _ = run(host, "status")
    assert code == 1 and problems(doc, "problems")[0][1] == str(registry)


def test_a_fifo_as_compute_nodes_is_never_opened(tmp_path: Path) -> None:
    # Opening a FIFO wakes a writer blocked in open(2); the reader must refuse it by its type
    # first. The writer here stays blocked through a whole pass.
    host = make_host(tmp_path)
    registry = host.instances / "compute_nodes"
    os.mkfifo(registry)
    writer = subprocess.Popen(
        [sys.executable, "-c", f"open({str(registry)!r}, 'wb').write(b'{{}}')"],
        stderr=subprocess.DEVNULL,
    )
    try:
        code, _, _ = run(host, "clean")
        assert code == 1
        time.sleep(0.3)  # a writer woken by an open would have exited by now
        assert writer.poll() is None, "the FIFO was opened"
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("what", ["fifo", "dev-zero", "symlink-to-dev-zero"])
def test_an_inventory_that_is_not_a_regular_file_is_a_problem(tmp_path: Path, what: str) -> None:
    host = make_host(tmp_path)
    inventory = tmp_path / "inventory.fifo"
    if what == "fifo":
        os.mkfifo(inventory)
    elif what == "symlink-to-dev-zero":
        inventory.symlink_to("/dev/zero")
    else:
        inventory = Path("/dev/zero")
    code, doc, _ = run(host, "plan", inventory=str(inventory))
    assert code == 1
    assert ("records-unreadable", str(inventory)) in problems(doc, "problems")
    [message] = [p["message"] for p in doc["problems"] if p["ref"] == str(inventory)]
    assert message == "is not a regular file"


@pytest.mark.parametrize("what", ["fifo", "dev-zero", "symlink-to-dev-zero", "directory"])
def test_a_saved_plan_that_is_not_a_regular_file_is_a_usage_error(
    tmp_path: Path, what: str
) -> None:
    host = make_host(tmp_path)
    plan = tmp_path / "plan.json"
    if what == "fifo":
        os.mkfifo(plan)
    elif what == "symlink-to-dev-zero":
        plan.symlink_to("/dev/zero")
    elif what == "directory":
        plan.mkdir()
    else:
        plan = Path("/dev/zero")
    code, doc, err = run(host, "clean", "--plan", str(plan))
    assert code == 2 and doc["exit_code"] == 2
    assert doc["error"] == f"plan {plan}: is not a regular file"
    assert err.count("\n") == 1


def test_a_fifo_as_disk_info_does_not_stop_the_scan(tmp_path: Path) -> None:
    # disk.info is read when a disk's header is garbage (to learn whether the guest wrote it).
    host = make_host(tmp_path)
    name = hashlib.sha1(b"image").hexdigest()
    put(host, name, 2 * DAY, now=time.time())
    use(host, name, "inst-1")
    broken = host.instances / "inst-1" / "disk.local"
    broken.write_bytes(b"QFI\xfb\x00\x00\x00\x09" + b"\x00" * 200)
    os.mkfifo(host.instances / "inst-1" / "disk.info")
    code, doc, _ = run(host, "plan")
    assert code == 1  # the garbage header is believed: nothing says the guest wrote it
    assert ("header-garbage", str(broken)) in problems(doc, "problems")
    assert {e["name"]: e["reason"] for e in doc["entries"]} == {name: "in-use"}


# -- 18: huge numbers, NaN -----------------------------------------------------------------------

HUGE_VALUES = {
    "1e400": "1e400",
    "minus-1e400": "-1e400",
    "400-digits": "1" + "0" * 400,
    "5000-digits": "9" * 5000,  # past Python's int parsing limit: json itself refuses it
    "nan": "NaN",
    "infinity": "Infinity",
    "string": '"yesterday"',
}


@pytest.mark.parametrize("case", sorted(HUGE_VALUES))
def test_compute_nodes_with_a_number_that_is_not_an_epoch_is_corrupt(
    tmp_path: Path, case: str
) -> None:
    host = make_host(tmp_path)
    registry = host.instances / "compute_nodes"
    text = '{"h0": 1700000000, "h1": ' + HUGE_VALUES[case] + "}\n"
    registry.write_text(text)
    code, doc, _ = run(host, "clean")
    assert code == 1
    assert problems(doc, "problems") == [("registry-corrupt", str(registry))]
    assert problems(doc, "apply_problems") == [("host-unregistered", str(registry))]
    assert registry.read_text() == text  # never reset (LP 1252659)


INVENTORY_CASES = {
    # case: (record, raw JSON token for "@") -- the record is written with "@" replaced
    "swap-1e400": ('{"uuid": "u1", "swap_mb": @}', "1e400"),
    "swap-400-digits": ('{"uuid": "u1", "swap_mb": @}', "1" + "0" * 400),
    "swap-nan": ('{"uuid": "u1", "swap_mb": @}', "NaN"),
    "swap-negative": ('{"uuid": "u1", "swap_mb": @}', "-1"),
    "ephemeral-infinity": ('{"uuid": "u1", "ephemeral_gb": @}', "Infinity"),
    "image-ref-lone-surrogate": ('{"uuid": "u1", "image_ref": @}', '"\\ud800"'),
    "image-ref-escaped-byte": ('{"uuid": "u1", "image_ref": @}', '"\\udcff"'),
    "uuid-lone-surrogate": ('{"uuid": @}', '"\\udfff"'),
    "host-number": ('{"uuid": "u1", "host": @}', "1e400"),
}


@pytest.mark.parametrize("case", sorted(INVENTORY_CASES))
def test_an_inventory_record_with_a_hostile_value_is_a_problem_naming_the_file(
    tmp_path: Path, case: str
) -> None:
    host = make_host(tmp_path)
    record, token = INVENTORY_CASES[case]
    good = '{"uuid": "u0", "image_ref": "i0"}'
    host.inventory.write_text('{"instances": [' + good + ", " + record.replace("@", token) + "]}")
    name = hashlib.sha1(b"i0").hexdigest()
    put(host, name, 2 * DAY, now=time.time())
    code, doc, _ = run(host, "plan")
    assert code == 1 and doc["complete"] is False
    assert problems(doc, "problems") == [("records-corrupt", f"{host.inventory}#instances[1]")]
    # The good record still counts.
    assert {e["name"]: e["reason"] for e in doc["entries"]} == {name: "in-use"}


def test_an_inventory_number_json_itself_refuses_is_a_corrupt_file(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    host.inventory.write_text('{"instances": [{"uuid": "u1", "swap_mb": ' + "9" * 5000 + "}]}")
    code, doc, _ = run(host, "plan")
    assert code == 1 and problems(doc, "problems") == [("records-corrupt", str(host.inventory))]


# -- 17: arguments and names that are not UTF-8 --------------------------------------------------


def test_explain_an_undecodable_image_id_hashes_its_bytes(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    name = hashlib.sha1(b"\xff\xfe").hexdigest()  # Nova's name of image id b"\xff\xfe"
    put(host, name, 2 * DAY, now=time.time())
    code, doc, _ = run(host, "explain", b"\xff\xfe")
    assert code == 0
    assert [e["name"] for e in doc["entries"]] == [name]
    assert doc["query"] == "\udcff\udcfe"  # surrogate-escaped, as Python reads the argument


def test_explain_an_undecodable_entry_name_finds_it(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    raw = b"\xff\x1b[31m.part"
    path = os.path.join(os.fsencode(host.cache), raw)
    with open(path, "wb") as f:
        f.write(b"partial")
    code, doc, _ = run(host, "explain", raw)
    assert code == 0
    [entry] = doc["entries"]
    assert os.fsencode(entry["name"]) == raw and entry["kind"] == "temp"
    # Not found: exit 1, still one document.
    code, doc, _ = run(host, "explain", b"\xfe-nothing")
    assert code == 1 and doc["entries"] == []

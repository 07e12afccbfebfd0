"""The command line end to end on the sample host (real qcow2 overlays made by qemu-img)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from imagecache import _sample as sample
from imagecache import naming
from imagecache.cli import main

COMMANDS = ["status", "plan", "explain", "clean", "restore", "precache", "create-disk"]


@pytest.fixture
def host(tmp_path: Path) -> sample.SampleHost:
    return sample.build(tmp_path / "host", now=time.time())


def run(host: sample.SampleHost, *args: str) -> list[str]:
    return ["--config-file", str(host.config), "--inventory", str(host.inventory), *args]


def plan_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict[str, Any]]:
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


def test_plan_json_decides_every_sample_entry_right(
    host: sample.SampleHost, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = plan_json(capsys, run(host, "plan", "--json"))
    assert code == 0 and doc["complete"] is True
    # Only the note that the other host's record protects nothing here (it shares no storage).
    assert [(p["source"], p["ref"], p["blocking"]) for p in doc["problems"]] == [
        ("inventory", "elsewhere", False)
    ]
    got = {e["name"]: (e["kind"], e["action"], e["reason"]) for e in doc["entries"]}
    assert got == sample.EXPECTED
    assert doc["host"] == sample.HOST and doc["cache_dir"] == str(host.cache_dir)


def test_users_name_the_disk_or_the_record(
    host: sample.SampleHost, capsys: pytest.CaptureFixture[str]
) -> None:
    _, doc = plan_json(capsys, run(host, "--json", "plan"))
    users = {e["name"]: {(u["source"], Path(u["ref"]).name) for u in e["users"]}
             for e in doc["entries"]}  # fmt: skip
    fp = naming.fingerprint
    # Two disks reach it through the middle of the chain, which is itself a cache entry: that
    # entry uses it too, while it exists.
    middle = next(e["name"] for e in doc["entries"] if ("backing", e["name"]) in
                  users[fp(sample.IMG_DEEP_BOTTOM)])  # fmt: skip
    assert users[fp(sample.IMG_DEEP_BOTTOM)] == {
        ("backing", "disk"), ("backing", "disk.snap"), ("backing", middle)}  # fmt: skip
    assert ("backing", "disk.rescue") in users[fp(sample.IMG_RESCUE)]
    assert users["swap_512"] == {("backing", "disk.swap")}
    assert users[naming.ephemeral_name(4, "ext4")] == {("backing", "disk.local")}
    assert {s for s, _ in users[fp(sample.KERNEL)]} == {"instance"}
    assert {s for s, _ in users[fp(sample.IMG_RECORD_ONLY)]} == {"instance"}
    assert users[fp(sample.IMG_RELATIVE) + "_20"] == {("backing", "disk")}
    deep = next(e for e in doc["entries"] if e["name"] == fp(sample.IMG_DEEP_BOTTOM))
    assert {u.get("detail") for u in deep["users"]} == {
        "backing chain depth 2", "backing chain depth 3", "direct backing file"}  # fmt: skip


def test_one_unreadable_disk_plans_no_removal_and_names_it(
    host: sample.SampleHost, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = host.instances_path / "00000009-7c0e-4000-8000-4f9e8d7c0000" / "disk.local"
    broken.write_bytes(b"QFI\xfb\x00\x00\x00\x09" + b"\x00" * 200)  # qcow2 magic, version 9
    code, doc = plan_json(capsys, run(host, "plan", "--json"))
    assert code == 1 and doc["complete"] is False
    assert [p["ref"] for p in doc["problems"] if p["blocking"]] == [str(broken)]
    assert {e["action"] for e in doc["entries"]} == {"keep"}
    assert "incomplete-view" in {e["reason"] for e in doc["entries"]}


def test_plan_output_file_is_the_same_document(
    host: sample.SampleHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plan.json"
    code, doc = plan_json(capsys, run(host, "plan", "--json", "-o", str(out)))
    assert code == 0 and json.loads(out.read_text()) == doc


def test_human_tables(host: sample.SampleHost, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(run(host, "status")) == 0
    status = capsys.readouterr().out
    assert "4.0 MiB" in status and "1 disk (00000002/disk.swap)" in status
    assert "11 records (00000001, ...)" in status
    assert main(run(host, "plan")) == 0
    plan = capsys.readouterr().out
    assert "quarantine" in plan and "unused-expired" in plan and "to free" in plan


def test_explain_by_image_id_and_by_name(
    host: sample.SampleHost, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(run(host, "explain", sample.IMG_USED)) == 0
    text = capsys.readouterr().out
    assert naming.fingerprint(sample.IMG_USED) + "_sm" in text  # its small copy too
    assert "used by backing" in text and "used by instance" in text
    assert main(run(host, "explain", sample.IMG_YOUNG)) == 0
    assert "becomes removable at" in capsys.readouterr().out
    assert main(run(host, "explain", "no-such-thing")) == 1
    assert "no cache entry" in capsys.readouterr().out


def test_bad_config_exits_2_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "nova.conf"
    conf.write_text("[image_cache]\nmanager_interval = soon\n")
    assert main(["--config-file", str(conf), "status"]) == 2
    err = capsys.readouterr().err
    assert "manager_interval" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: imagecache" in out and "exit codes: 0" in out


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def test_permission_denied_disk_is_a_problem_not_a_crash(host: sample.SampleHost) -> None:
    # Root reads anything; drop the capabilities that let it, so mode 000 really denies.
    denied = host.instances_path / "00000003-7c0e-4000-8000-4f9e8d7c0000" / "disk"
    denied.chmod(0)
    no_dac = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
    done = subprocess.run(
        [*no_dac, sys.executable, "-m", "imagecache", *run(host, "plan", "--json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    disk_problems = [p for p in doc["problems"] if p["source"] == "disk"]
    assert [(p["ref"], p["blocking"]) for p in disk_problems] == [(str(denied), True)]
    assert "Permission denied" in disk_problems[0]["message"]
    assert {e["action"] for e in doc["entries"]} == {"keep"}


def test_inventory_files_from_the_config_count_like_the_option(
    host: sample.SampleHost, capsys: pytest.CaptureFixture[str]
) -> None:
    with host.config.open("a") as fh:
        fh.write(f"inventory_files = {host.inventory}\n")  # the sample ends in [imagecache]
    code, doc = plan_json(capsys, ["--config-file", str(host.config), "plan", "--json"])
    assert code == 0
    assert {e["name"]: (e["kind"], e["action"], e["reason"]) for e in doc["entries"]} == (
        sample.EXPECTED
    )


def test_unwritable_output_is_one_line_exit_1(
    host: sample.SampleHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "no-such-dir" / "plan.json"
    assert main(run(host, "plan", "-o", str(out))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No such file or directory" in err[0]


def test_deprecated_option_names_are_quiet_unless_verbose(tmp_path: Path) -> None:
    (tmp_path / "i" / "_base").mkdir(parents=True)
    conf = tmp_path / "nova.conf"
    conf.write_text(
        f"[DEFAULT]\ninstances_path = {tmp_path}/i\nhost = h\nmy_ip = 10.0.0.1\n"
        "image_cache_manager_interval = 600\n"
    )
    base = [sys.executable, "-m", "imagecache", "--config-file", str(conf)]
    quiet = subprocess.run([*base, "status"], capture_output=True, text=True, check=False)
    loud = subprocess.run([*base, "-v", "status"], capture_output=True, text=True, check=False)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr
    assert "deprecated" not in quiet.stderr
    assert "image_cache_manager_interval" in loud.stderr and "deprecated" in loud.stderr


def test_quarantined_bytes_are_not_counted_as_freed(
    host: sample.SampleHost, capsys: pytest.CaptureFixture[str]
) -> None:
    _, doc = plan_json(capsys, run(host, "plan", "--json"))
    size = {e["name"]: e["bytes"] for e in doc["entries"]}
    act = {e["name"]: e["action"] for e in doc["entries"]}
    summary = doc["summary"]
    assert summary["bytes_to_free"] == sum(size[n] for n in size if act[n] in ("remove", "reap"))
    assert summary["bytes_to_quarantine"] == sum(size[n] for n in size if act[n] == "quarantine")
    assert summary["bytes_to_quarantine"] > 0


def test_instances_path_option_overrides_the_config(
    host: sample.SampleHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command line: --config-file nova.conf --instances-path DIR plan --json.
    conf = tmp_path / "nova.conf"
    conf.write_text(
        f"[DEFAULT]\ninstances_path = /nonexistent\nhost = {sample.HOST}\nmy_ip = 10.0.0.1\n"
    )
    argv = ["--config-file", str(conf), "--instances-path", str(host.instances_path)]
    code, doc = plan_json(capsys, [*argv, "--inventory", str(host.inventory), "plan", "--json"])
    assert code == 0 and doc["cache_dir"] == str(host.cache_dir)
    got = {e["name"]: (e["kind"], e["action"], e["reason"]) for e in doc["entries"]}
    assert got == sample.EXPECTED


def test_explain_finds_quarantined_entries(
    host: sample.SampleHost, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(run(host, "clean")) == 0
    capsys.readouterr()
    assert main(run(host, "explain", sample.IMG_OLD)) == 0
    text = capsys.readouterr().out
    fp = naming.fingerprint(sample.IMG_OLD)
    assert f"{fp}: quarantined at" in text and f"imagecache restore {fp}" in text
    code, doc = plan_json(capsys, run(host, "explain", "--json", fp))
    assert code == 0 and doc["entries"] == []
    assert {t["name"] for t in doc["trash"]} == {fp, fp + "_sm"}  # its small copy too


def test_odd_names_in_the_cache_are_kept_and_printed_escaped(
    host: sample.SampleHost, capsys: pytest.CaptureFixture[str]
) -> None:
    # A name that is not UTF-8 used to stop every pass on the host (plan ids hashed str.encode).
    with open(os.fsencode(host.cache_dir) + b"/bad\xff", "wb") as fh:
        fh.write(b"x")
    (host.cache_dir / "swap_10\nswap_20").write_bytes(b"x")
    assert main(run(host, "plan")) == 0
    out = capsys.readouterr().out
    assert "bad\\xff" in out and "swap_10\\nswap_20" in out
    assert not any(line.startswith("swap_20") for line in out.splitlines())
    code, doc = plan_json(capsys, run(host, "clean", "--json"))
    odd = {e["name"]: (e["kind"], e["action"]) for e in doc["entries"]}
    assert code == 0
    assert odd["bad\udcff"] == odd["swap_10\nswap_20"] == ("unknown", "keep")
    assert (host.cache_dir / "swap_10\nswap_20").exists()


def test_json_errors_are_one_json_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config-file", str(tmp_path / "missing.conf"), "--json", "status"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["exit_code"] == 2 and "missing.conf" in doc["error"]


def test_sigint_while_waiting_for_nova_is_a_clean_exit(host: sample.SampleHost) -> None:
    # nova-compute holds the lock of an entry to quarantine; Ctrl-C during clean's wait must
    # release what it holds and say so, not print a traceback.
    name = naming.fingerprint(sample.IMG_OLD)
    lock_dir = str(host.instances_path / "locks")
    child = [sys.executable, str(Path(__file__).with_name("_lock_child.py"))]
    with host.config.open("a") as fh:
        fh.write("lock_timeout_seconds = 60\n")  # the sample ends in [imagecache]
    audit = host.root / "audit.jsonl"
    hold = [*child, "hold", lock_dir, name]
    with subprocess.Popen(hold, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as nova:
        assert nova.stdin is not None and nova.stdout is not None
        assert nova.stdout.readline().strip() == "held"
        # As from a terminal, whatever started the suite: a shell running it in the background
        # without job control hands every child SIGINT ignored, and Python keeps it so.
        interactive = (
            "import signal, runpy; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('imagecache', run_name='__main__', alter_sys=True)"
        )
        argv = [sys.executable, "-c", interactive, *run(host, "--json", "clean")]
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as clean:
            # The five free entries are quarantined first; then clean waits for Nova's lock.
            for _ in range(200):
                if clean.poll() is not None or (
                    audit.exists() and audit.read_text().count("\n") >= 5
                ):
                    break
                time.sleep(0.1)
            assert clean.poll() is None, "clean finished before it waited for Nova's lock"
            clean.send_signal(signal.SIGINT)
            out, err = clean.communicate(timeout=30)
        nova.stdin.write("\n")
        nova.stdin.flush()
    assert clean.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert json.loads(out)["exit_code"] == 130
    assert (host.cache_dir / name).exists()  # the entry Nova held is untouched


def test_no_instance_records_is_said(
    host: sample.SampleHost, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without records, kernels, ramdisks and shelved images are unprotected: the plan says so.
    code, doc = plan_json(capsys, ["--config-file", str(host.config), "plan", "--json"])
    notes = [p for p in doc["problems"] if p["source"] == "inventory"]
    assert code == 0 and len(notes) == 1 and not notes[0]["blocking"]
    assert "no instance records" in notes[0]["message"]
    assert main(["--config-file", str(host.config), "plan"]) == 0
    assert "no instance records" in capsys.readouterr().out

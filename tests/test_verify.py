"""Verification end to end on real files: bit rot found, in-use kept and reported, unused
quarantined, Nova's legacy digests honoured, an unchanged cache read not at all."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from imagecache import verify
from imagecache.cli import main
from imagecache.clock import Clock
from imagecache.config import load_settings
from tests.opens import OpenWatch
from tests.test_executor import NOW, Host, cli, make_host, put, use

A, B, C = ("a" * 40, "b" * 40, "c" * 40)
DAY = 86400.0


def rot(path: Path, offset: int = 1000) -> None:
    """Flip one byte in place, keeping size and mtime: what bit rot looks like."""
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def record(host: Host, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        (host.cache / ".imagecache" / "digests" / f"{name}.json").read_text()
    )
    return doc


def verdicts(doc: dict[str, Any]) -> dict[str, str | None]:
    return {r["name"]: r["verdict"] for r in doc["results"]}


def checksums(tmp_path: Path, **options: object) -> Host:
    return make_host(tmp_path, checksum_base_images="true", **options)


def test_bit_rot_is_found_an_unused_entry_quarantined_an_in_use_one_kept_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    for name in (A, B, C):
        put(host, name, 60)  # young: no pass would remove them by age
    disk = use(host, B)
    code, doc = cli(host, capsys, "verify", "--all")
    assert code == 0 and verdicts(doc) == {A: "good", B: "good", C: "good"}
    assert record(host, A)["source"] == "first-seen"
    inode = host.path(B).stat().st_ino

    rot(host.path(A))
    rot(host.path(B))
    code, doc = cli(host, capsys, "verify", "--all", now=NOW + 10)
    assert code == 1
    assert verdicts(doc) == {A: "corrupt", B: "corrupt", C: "good"}
    assert doc["quarantined"] == [A]
    assert not host.path(A).exists() and list(host.trash()) == [A]
    (kept,) = doc["corrupt_in_use"]
    assert kept["ref"] == B and str(disk) in kept["message"]
    assert host.path(B).stat().st_ino == inode  # in use: never moved
    assert [line["action"] for line in host.audit_lines()] == ["quarantined"]
    assert host.audit_lines()[0]["reason"] == "corrupt"
    # Every other command sees it: status and plan show the state and exit 1.
    code, plan = cli(host, capsys, "plan", now=NOW + 20)
    assert code == 1
    (entry,) = [e for e in plan["entries"] if e["name"] == B]
    assert entry["integrity"] == "corrupt" and entry["action"] == "keep"
    assert [p["code"] for p in plan["problems"] if p["code"] == "entry-corrupt"] == [
        "entry-corrupt"
    ]


def test_a_pass_finds_bit_rot_once_its_interval_is_due(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = checksums(tmp_path, checksum_interval_seconds=3600)
    put(host, A, 60)
    code, _ = cli(host, capsys, "clean")
    assert code == 0 and record(host, A)["verdict"] == "good"
    rot(host.path(A))
    code, _ = cli(host, capsys, "clean", now=NOW + 600)  # not due yet: not read
    assert code == 0 and host.path(A).exists()
    code, doc = cli(host, capsys, "clean", now=NOW + 3600)
    assert code == 0
    assert record(host, A)["verdict"] == "corrupt"
    assert [(o["name"], o["result"], o["reason"]) for o in doc["outcomes"]] == [
        (A, "quarantined", "corrupt")
    ]


def test_verifying_an_unchanged_cache_with_fresh_records_reads_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The verification step of a pass costs stats, not reads, until an entry is due. (A pass
    also reads each entry's header, to find the entries that name others: not verification.)"""
    host = checksums(tmp_path)
    paths = [put(host, name, 60, size=1 << 20) for name in (A, B, C)]
    assert cli(host, capsys, "clean")[0] == 0
    settings = load_settings([str(host.config)])

    def step(now: float) -> set[Path]:
        clock = Clock(wall=lambda: now, monotonic=time.monotonic, sleep=time.sleep)
        with OpenWatch(*paths, reads=True) as watch:
            verify.verify(settings.layout, settings.verify, clock=clock)
            return watch.opened()

    assert step(NOW + 60) == set()
    assert step(NOW + 3600) == set(paths)  # due: each read again
    assert step(NOW + 3660) == set()


def test_a_rewritten_entry_is_hashed_again_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = checksums(tmp_path)
    put(host, A, 60)
    assert cli(host, capsys, "clean")[0] == 0
    first = record(host, A)
    # Another inode and size, as a new download renamed over it: a rewrite.
    new = put(host, B, 60, size=8192)
    new.replace(host.path(A))
    assert cli(host, capsys, "clean", now=NOW + 1)[0] == 0
    second = record(host, A)
    assert second["inode"] != first["inode"] and second["size"] == 8192
    assert second["verdict"] == "good"  # first-seen: trusted afresh


@pytest.mark.parametrize("legacy", ["info", "sha1"])
def test_novas_legacy_digests_are_honoured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], legacy: str
) -> None:
    host = make_host(tmp_path)
    for name in (A, B):
        put(host, name, 60)
    good = hashlib.sha1(host.path(A).read_bytes()).hexdigest()
    wrong = hashlib.sha1(b"something else").hexdigest()
    for name, digest in ((A, good), (B, wrong)):
        text = json.dumps({"sha1": digest}) if legacy == "info" else f"{digest}  {name}\n"
        host.cache.joinpath(f"{name}.{legacy}").write_text(text)
    code, doc = cli(host, capsys, "verify", A, B)
    assert code == 1
    assert verdicts(doc) == {A: "good", B: "corrupt"}
    assert record(host, A)["source"] == "nova-info"
    assert record(host, A)["expected"] == {"algorithm": "sha1", "value": good}
    assert doc["quarantined"] == [B]  # unused and corrupt by Nova's own digest


def test_verify_names_an_unknown_entry_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    put(host, A, 60)
    code, doc = cli(host, capsys, "verify", A, "notes.txt", "f" * 40)
    assert code == 1
    assert verdicts(doc) == {A: "good"} and doc["unknown"] == ["notes.txt", "f" * 40]


def test_a_record_that_is_not_one_is_ignored_and_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    put(host, A, 60)
    digests = host.cache / ".imagecache" / "digests"
    digests.mkdir(parents=True)
    # A hostile record claiming corruption (it would quarantine a good unused entry) or with
    # garbage in every field: never trusted.
    for text in ('{"schema": 1, "entry": "' + A + '", "verdict": "corrupt"}', "[]", "\xff"):
        (digests / f"{A}.json").write_text(text, errors="surrogateescape")
        code, plan = cli(host, capsys, "plan")
        assert code == 0
        assert plan["entries"][0]["integrity"] == "unverified"
    code, doc = cli(host, capsys, "verify", A)
    assert code == 0 and verdicts(doc) == {A: "good"}
    assert record(host, A)["verdict"] == "good"


def test_verify_json_is_one_versioned_document(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    put(host, A, 60)
    argv = ["--config-file", str(host.config), "--json", "verify", "--all"]
    assert main(argv, clock=lambda: NOW) == 0

"""Hostile saved plans: ``clean --plan FILE`` with a document someone edited by hand.

A saved plan is untrusted input. Each name in it must be a plain entry name, each number finite
and bounded, each text real text; a document that is not a plan is a usage error (exit 2, and
under ``--json`` exactly one JSON document on stdout), never a traceback. A valid document can
only ever do less than a fresh decision would: every action is re-decided under the lock with the
current policy, and touches reach only regular files a fresh listing of the cache shows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagecache import naming
from imagecache.cli import main
from tests.test_executor import (
    DAY,
    HOUR,
    NOW,
    A,
    B,
    C,
    D,
    Host,
    cli,
    digest,
    make_host,
    put,
    results,
    use,
)

RAW = "@@raw@@"  # replaced by a raw JSON token the json module would never write


@dataclass(frozen=True)
class Saved:
    host: Host
    path: Path
    doc: dict[str, Any]

    def entry(self, doc: dict[str, Any], name: str) -> dict[str, Any]:
        return next(e for e in doc["entries"] if e["name"] == name)

    def write(self, text: str | bytes) -> Path:
        out = self.path.with_name("edited.json")
        out.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        return out


def snapshot(host: Host) -> dict[str, str]:
    """Every file of the cache and the trash, by name, with its content digest (not the pass
    state a clean records in ``.imagecache/state.*``, nor the host's manifest in
    ``.imagecache/hosts/``: bookkeeping, no entry)."""
    return {
        str(p.relative_to(host.cache)): digest(p)
        for p in sorted(host.cache.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.parent.name not in (".imagecache", "hosts")
    }


def saved_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str], **options: object) -> Saved:
    """A host with an expired entry A, an entry B in use and C in the trash; its saved plan."""
    host = make_host(tmp_path, **{"quarantine_seconds": DAY, **options})
    put(host, C, 3 * DAY)
    code, _ = cli(host, capsys, "clean", now=NOW - HOUR)  # C quarantined an hour ago
    assert code == 0 and set(host.trash()) == {C}
    put(host, A, 2 * DAY)
    put(host, B, 2 * DAY)
    use(host, B)
    path = tmp_path / "plan.json"
    code, doc = cli(host, capsys, "plan", "-o", str(path))
    assert code == 0
    assert {e["name"]: e["action"] for e in doc["entries"]} == {A: "quarantine", B: "keep"}
    assert [(t["name"], t["action"]) for t in doc["trash"]] == [(C, "keep")]
    saved = json.loads(path.read_text())
    saved["entries"].sort(key=lambda e: e["name"] != A)  # A first, then B: the table's indexes
    return Saved(host, path, saved)


def run_json(host: Host, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    argv = ["--config-file", str(host.config), "--inventory", str(host.inventory), "--json", *args]
    code = main(argv, clock=lambda: NOW)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_document(out: str) -> dict[str, Any]:
    """``out`` is exactly one JSON document (compact, off a terminal: one line)."""
    assert out.endswith("\n") and out.count("\n") == 1, out
    doc: dict[str, Any] = json.loads(out)
    return doc


# -- 8, 17, 18: documents that are not plans -----------------------------------------------------


def _set(*path: str | int, value: Any) -> Callable[[dict[str, Any]], str]:
    def edit(doc: dict[str, Any]) -> str:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return json.dumps(doc)

    return edit


def _raw(*path: str | int, token: str) -> Callable[[dict[str, Any]], str]:
    def edit(doc: dict[str, Any]) -> str:
        return _set(*path, value=RAW)(doc).replace(json.dumps(RAW), token)

    return edit


def _delete(*path: str | int) -> Callable[[dict[str, Any]], str]:
    def edit(doc: dict[str, Any]) -> str:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return json.dumps(doc)

    return edit


def _name(value: str, *, entry: int = 0) -> Callable[[dict[str, Any]], str]:
    """Entry ``entry`` renamed to ``value``, with the kind that name has: only the name is bad."""

    def edit(doc: dict[str, Any]) -> str:
        doc["entries"][entry].update(name=value, kind=str(naming.classify(value)))
        return json.dumps(doc)

    return edit


def _trash_name(value: str) -> Callable[[dict[str, Any]], str]:
    """The trash entry renamed to ``value``, its trash name to match."""

    def edit(doc: dict[str, Any]) -> str:
        t = doc["trash"][0]
        t.update(name=value, trash_name=f"{value}@{int(t['quarantined_at_epoch'])}")
        return json.dumps(doc)

    return edit


HUGE = "1" + "0" * 400
# Entry 0 is A, the expired entry; entry 1 is B, in use.
BAD: dict[str, Callable[[dict[str, Any]], str | bytes]] = {
    # names
    "name-empty": _name(""),
    "name-dot": _name("."),
    "name-dotdot": _name(".."),
    "name-slash": _name("a/b"),
    "name-escape": _name("../../../etc/passwd"),
    "name-nul": _name("x\0y"),
    "name-temp-nul": _name("x\0y.part"),
    "name-temp-slash": _name("../x.part"),
    "name-temp-lone-surrogate": _name("\ud800.part"),
    "name-lone-surrogate": _name("\ud800"),
    "name-number": _set("entries", 0, "name", value=17),
    "trash-name-slash": _trash_name("a/b"),
    "trash-name-dotdot": _trash_name(".."),
    "trash-name-lone-surrogate": _trash_name("\ud800"),
    "trash-trash-name-escape": _set("trash", 0, "trash_name", value=f"../../{C}@1"),
    "trash-trash-name-other": _set("trash", 0, "trash_name", value=f"{A}@1"),
    # numbers
    "mtime-1e400": _raw("entries", 0, "mtime", token="1e400"),
    "mtime-minus-1e400": _raw("entries", 0, "mtime", token="-1e400"),
    "mtime-nan": _raw("entries", 0, "mtime", token="NaN"),
    "mtime-infinity": _raw("entries", 0, "mtime", token="Infinity"),
    "mtime-400-digits": _raw("entries", 0, "mtime", token=HUGE),
    "mtime-1e300": _raw("entries", 0, "mtime", token="1e300"),
    "removable-at-1e300": _raw("entries", 0, "removable_at_epoch", token="1e300"),
    "age-infinity": _raw("entries", 0, "age_seconds", token="-Infinity"),
    "inode-negative": _set("entries", 0, "inode", value=-1),
    "inode-400-digits": _raw("entries", 0, "inode", token=HUGE),
    "inode-5000-digits": _raw("entries", 0, "inode", token="9" * 5000),
    "inode-1e400": _raw("entries", 0, "inode", token="1e400"),
    "inode-float": _set("entries", 0, "inode", value=1.5),
    "inode-bool": _set("entries", 0, "inode", value=True),
    "inode-nan": _raw("entries", 0, "inode", token="NaN"),
    "bytes-negative": _set("entries", 0, "bytes", value=-5),
    "device-negative": _set("entries", 0, "device", value=-1),
    "threshold-nan": _raw("entries", 0, "threshold_seconds", token="NaN"),
    "now-nan": _raw("now_epoch", token="NaN"),
    "now-1e400": _raw("now_epoch", token="1e400"),
    "quarantined-at-1e400": _raw("trash", 0, "quarantined_at_epoch", token="1e400"),
    "policy-age-400-digits": _raw("policy", "original_age_seconds", token=HUGE),
    "policy-age-negative": _set("policy", "original_age_seconds", value=-1),
    "policy-quarantine-1e400": _raw("policy", "quarantine_seconds", token="1e400"),
    "schema-400-digits": _raw("schema", token=HUGE),
    "schema-2": _set("schema", value=2),
    # text that is not text
    "host-lone-surrogate": _set("host", value="\ud800"),
    "host-other": _set("host", value="h2"),
    "host-forging-a-line": _set("host", value="h1\n\x1b[31mimagecache: error: FORGED"),
    "cache-dir-lone-surrogate": _set("cache_dir", value="\ud800"),
    "user-ref-lone-surrogate": _set("entries", 1, "users", 0, "ref", value="\udfff"),
    "problem-message-lone-surrogate": _set(
        "problems", value=[{"code": "records-absent", "ref": "-", "message": "\ud800"}]
    ),
    "ephemeral-format-lone-surrogate": _set("policy", "default_ephemeral_format", value="\ud800"),
    "ephemeral-format-escaped-byte": _set("policy", "default_ephemeral_format", value="\udcff"),
    # kinds and choices
    "kind-temp-for-an-original": _set("entries", 0, "kind", value="temp"),
    "kind-original-for-a-symlink": _set("entries", 0, "file_type", value="symlink"),
    "action-unknown": _set("entries", 0, "action", value="obliterate"),
    "reason-unknown": _set("entries", 0, "reason", value="because"),
    # structure
    "entries-object": _set("entries", value={}),
    "entry-string": _set("entries", 0, value="x"),
    "policy-list": _set("policy", value=[]),
    "missing-name": _delete("entries", 0, "name"),
    "missing-policy": _delete("policy"),
    "top-list": lambda doc: "[]",
    "top-null": lambda doc: "null",
    "top-1e400": lambda doc: "1e400",
    "deep": lambda doc: "[" * 100_000 + "]" * 100_000,
    "not-utf8": lambda doc: b'{"host": "\xff"}',
    "empty": lambda doc: "",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_document_that_is_not_a_plan_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    saved = saved_plan(tmp_path, capsys)
    assert [e["name"] for e in saved.doc["entries"]] == [A, B]
    before, audited = snapshot(saved.host), saved.host.audit_lines()
    edited = saved.write(BAD[case](json.loads(json.dumps(saved.doc))))

    code, out, err = run_json(saved.host, capsys, "clean", "--plan", str(edited))
    assert code == 2, (out, err)
    doc = one_document(out)
    assert doc["exit_code"] == 2 and doc["error"]
    assert "Traceback" not in err and err.startswith("imagecache: error: ")
    # The message on the terminal is one line of printable text.
    assert err.count("\n") == 1 and err[:-1].isprintable(), err
    assert snapshot(saved.host) == before and saved.host.audit_lines() == audited


def test_the_unedited_plan_is_applied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The control for the table above: the same document, unedited, does what it says.
    saved = saved_plan(tmp_path, capsys)
    code, out, _ = run_json(saved.host, capsys, "clean", "--plan", str(saved.path))
    assert code == 0
    assert results(one_document(out)) == {A: ("quarantined", "unused-expired")}


def test_an_invalid_plan_without_json_is_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = saved_plan(tmp_path, capsys)
    edited = saved.write(_set("entries", 0, "name", value="x\n\x1b[31m/forged")(saved.doc))
    argv = ["--config-file", str(saved.host.config), "clean", "--plan", str(edited)]
    assert main(argv, clock=lambda: NOW) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "\x1b" not in captured.err
    assert "is not a plain entry name" in captured.err


# -- 9: a reap (or any action) only when the fresh decision is that action ------------------------


@pytest.mark.parametrize("quarantine", [0, DAY], ids=["remove", "quarantine"])
def test_a_plan_that_reaps_an_original_or_a_resized_entry_removes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quarantine: int
) -> None:
    host = make_host(tmp_path, quarantine_seconds=quarantine)
    put(host, A, 2 * DAY)
    put(host, A + "_5", 2 * DAY)
    put(host, D + "_sm", 2 * DAY)
    saved = tmp_path / "plan.json"
    cli(host, capsys, "plan", "-o", str(saved))
    doc = json.loads(saved.read_text())
    for entry in doc["entries"]:
        assert entry["kind"] in ("original", "resized", "small")
        entry.update(action="reap", reason="stale-temp")
    saved.write_text(json.dumps(doc))
    before = snapshot(host)

    code, done = cli(host, capsys, "clean", "--plan", str(saved))
    assert code == 0
    assert results(done) == dict.fromkeys((A, A + "_5", D + "_sm"), ("skipped", "now-kept"))
    assert snapshot(host) == before and host.trash() == {} and host.audit_lines() == []


@pytest.mark.parametrize(
    ("target", "action"),
    [
        ("temp", "remove"),  # a stale temp is reaped, never quarantined or removed by a plan
        ("temp", "quarantine"),
        ("young", "remove"),
        ("young", "reap"),
        ("in-use", "remove"),
        ("in-use", "quarantine"),
        ("trash", "purge"),  # still in quarantine
        ("trash", "restore"),  # nothing references it
    ],
)
def test_a_plan_action_the_fresh_decision_does_not_take_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str, action: str
) -> None:
    # Not touched first: an in-use entry stays the very file planned, and is refused as in use.
    saved = saved_plan(tmp_path, capsys, stale_temp_seconds=HOUR, touch_in_use="false")
    host = saved.host
    names = {"temp": D + ".part", "young": D, "in-use": B, "trash": C}
    if target == "temp":
        put(host, D + ".part", 2 * HOUR)
    elif target == "young":
        put(host, D, HOUR)
    code, doc = cli(host, capsys, "plan")
    if target == "trash":
        [edited] = doc["trash"]
    else:
        edited = next(e for e in doc["entries"] if e["name"] == names[target])
    edited["action"] = action
    path = saved.write(json.dumps(doc))
    before = snapshot(host)

    code, done = cli(host, capsys, "clean", "--plan", str(path))
    assert code == 0
    skipped = {n: r for n, r in results(done).items() if n != A}  # A is the plan's own action
    assert skipped == {names[target]: ("skipped", skipped[names[target]][1])}
    assert skipped[names[target]][1] in ("now-kept", "now-in-use", "now-too-young")
    after = snapshot(host)
    assert {k: v for k, v in after.items() if A not in k} == {
        k: v for k, v in before.items() if A not in k
    }


# -- 10: touches reach only what a fresh listing of the cache shows ------------------------------


def _claim_in_use(doc: dict[str, Any], like: dict[str, Any], name: str) -> None:
    """Add a hand-made in-use decision for ``name``, copied from the real in-use entry ``like``."""
    entry = dict(like, name=name, kind=str(naming.classify(name)))
    doc["entries"].append(entry)


def test_a_saved_plan_touches_only_regular_files_the_fresh_listing_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = saved_plan(tmp_path, capsys)
    host = saved.host
    outside = tmp_path / "outside"
    outside.write_text("not a cache entry")
    old = NOW - 5 * DAY
    os.utime(outside, (old, old))
    # A symlink in the cache under an entry's name, to a file outside it.
    link = host.path(D)
    link.symlink_to(outside)
    os.utime(link, (old, old), follow_symlinks=False)
    # An entry that is a regular file, but not the one the plan names (another inode).
    put(host, A + "_sm", 2 * DAY)
    replaced = put(host, A + "_9", 2 * DAY)
    doc = json.loads(json.dumps(saved.doc))
    b = saved.entry(doc, B)
    for name in (D, A + "_sm", "swap_64", ".imagecache"):
        _claim_in_use(doc, b, name)  # B's inode: none of them is that file
    _claim_in_use(doc, dict(b, inode=replaced.stat().st_ino + 1), A + "_9")
    doc["entries"] = [e for e in doc["entries"] if e["name"] != A]  # only touches are left
    path = saved.write(json.dumps(doc))
    state = host.cache / ".imagecache"

    code, done = cli(host, capsys, "clean", "--plan", str(path), now=NOW + 60)
    assert code == 0, done
    assert results(done, touched=True) == {
        B: ("touched", "in-use"),
        D: ("skipped", "changed-since-plan"),
        A + "_sm": ("skipped", "changed-since-plan"),
        A + "_9": ("skipped", "changed-since-plan"),
        "swap_64": ("skipped", "vanished"),
        ".imagecache": ("skipped", "vanished"),
    }
    assert host.path(B).stat().st_mtime == NOW + 60
    assert link.lstat().st_mtime == old and outside.stat().st_mtime == old
    assert host.path(A + "_sm").stat().st_mtime == NOW - 2 * DAY
    assert replaced.stat().st_mtime == NOW - 2 * DAY
    assert not host.path("swap_64").exists()
    # Never touched as an entry (its mtime moves only as the pass state is written in it).
    assert state.stat().st_mtime != NOW + 60


# -- 11: the current policy's quarantine wins over a plan's "remove" -----------------------------


@pytest.mark.parametrize("how", ["config-changed", "plan-edited"])
def test_a_plan_that_removes_quarantines_when_quarantine_is_configured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    host = make_host(tmp_path, quarantine_seconds=0 if how == "config-changed" else DAY)
    put(host, A, 2 * DAY)
    before = digest(host.path(A))
    saved = tmp_path / "plan.json"
    cli(host, capsys, "plan", "-o", str(saved))
    doc = json.loads(saved.read_text())
    if how == "config-changed":
        assert doc["entries"][0]["action"] == "remove"
        host.config.write_text(
            host.config.read_text().replace("quarantine_seconds = 0", f"quarantine_seconds = {DAY}")
        )
    else:
        assert doc["entries"][0]["action"] == "quarantine"
        doc["entries"][0]["action"] = "remove"
        doc["policy"]["quarantine_seconds"] = 0
        saved.write_text(json.dumps(doc))

    code, done = cli(host, capsys, "clean", "--plan", str(saved))
    assert code == 0
    assert results(done) == {A: ("quarantined", "unused-expired")}
    assert not host.path(A).exists() and digest(host.trash()[A]) == before
    assert [line["action"] for line in host.audit_lines()] == ["quarantined"]

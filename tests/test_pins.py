"""Operator pins (``imagecache pin`` / ``unpin`` / ``pins``) on real files, end to end.

A pin makes an image's entry and its ``_sm`` and resized copies in use (source ``pin``) against
the age rule and the capacity rule alike; the pins file, ``_base/.imagecache/pins.json``, is
read as hostile input (a file that cannot be read blocks every removal, and is never
overwritten), changed under its lock by concurrent processes without losing a pin, and every
change is audited.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecache import naming
from imagecache.cli import main
from imagecache.layout import Layout
from imagecache.model import ProblemCode
from imagecache.store import pins
from tests.test_executor import DAY, HOUR, NOW, Host, cli, make_host, put

fp = naming.fingerprint
IMAGE = "6b1f3a4e-27d4-4e4b-9d5a-3f0e8c1b2a90"  # a Glance id
A, B = fp(IMAGE), fp("image-b")
URL = "https://images.example.org/cirros-0.6.2-x86_64-disk.img"


def plan(host: Host, capsys: pytest.CaptureFixture[str], *, now: float = NOW) -> dict[str, Any]:
    _, doc = cli(host, capsys, "plan", now=now)
    return doc


def text(host: Host, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["--config-file", str(host.config), *args], clock=lambda: NOW) == 0
    return capsys.readouterr().out


def decisions(doc: dict[str, Any]) -> dict[str, tuple[str, str, list[str]]]:
    """Entry name: (action, reason, sources of its users)."""
    return {e["name"]: (e["action"], e["reason"], [u["source"] for u in e["users"]])
            for e in doc["entries"]}  # fmt: skip


def codes(doc: dict[str, Any]) -> set[str]:
    return {p["code"] for p in doc["problems"]}


def pins_file(host: Host) -> Path:
    return host.cache / ".imagecache" / "pins.json"


def layout(host: Host) -> Layout:
    return Layout(str(host.instances))


def document(*items: dict[str, Any], schema: Any = 1) -> dict[str, Any]:
    return {"schema": schema, "version": "0.1.0", "pins": list(items)}


def item(image: str = IMAGE, **fields: Any) -> dict[str, Any]:
    return {"image": image, "by": "h2", "pinned_at_epoch": NOW - DAY, "comment": "", **fields}


# Pins against the age rule and the capacity rule.


def test_a_pin_keeps_the_entry_and_its_copies_however_old_until_unpinned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    family = [A, f"{A}_sm", f"{A}_10737418240"]
    for name in [*family, B]:
        put(host, name, 30 * DAY)
    code, doc = cli(host, capsys, "pin", IMAGE, "--comment", "golden image")
    assert code == 0 and doc["changed"] is True and doc["entry"] == A
    got = decisions(plan(host, capsys))
    assert {n: got[n] for n in family} == {n: ("keep", "in-use", ["pin"]) for n in family}
    assert got[B][1] == "unused-expired"  # the unpinned one goes
    [user] = next(e for e in plan(host, capsys)["entries"] if e["name"] == A)["users"]
    assert user["ref"] == IMAGE and "golden image" in user["detail"]

    code, _ = cli(host, capsys, "clean")
    assert code == 0 and all(host.path(n).stat().st_mtime == NOW for n in family)  # touched
    assert not host.path(B).exists()

    assert cli(host, capsys, "unpin", IMAGE, now=NOW + 2 * DAY)[0] == 0
    got = decisions(plan(host, capsys, now=NOW + 2 * DAY))
    assert {n: got[n][:2] for n in family} == dict.fromkeys(
        family, ("quarantine", "unused-expired")
    )


def test_a_pin_by_url_protects_the_url_s_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    put(host, fp(URL), 30 * DAY)
    put(host, fp(URL + "?other"), 30 * DAY)
    assert cli(host, capsys, "pin", URL)[0] == 0
    got = decisions(plan(host, capsys))
    assert got[fp(URL)] == ("keep", "in-use", ["pin"])
    assert got[fp(URL + "?other")][1] == "unused-expired"


def test_a_pin_protects_against_the_size_limit_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, max_cache_bytes=1, remove_unused_base_images=True)
    put(host, A, 2 * HOUR)  # not old enough for the age rule: only capacity could take them
    put(host, B, 2 * HOUR)
    assert cli(host, capsys, "pin", IMAGE)[0] == 0
    doc = plan(host, capsys)
    got = decisions(doc)
    assert got[A] == ("keep", "in-use", ["pin"]) and got[B][:2] == ("remove", "over-size")
    assert doc["capacity"]["protected_bytes"] == {"pinned": 65536}
    assert "capacity-shortfall" in codes(doc)  # 1 byte cannot be reached: pinned
    code, _ = cli(host, capsys, "clean")
    assert code == 1 and host.path(A).exists() and not host.path(B).exists()


# The command line: listing, idempotence, the audit, refusals.


def test_pins_lists_the_operator_s_and_the_configured_pins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, pinned_images="cfg-image")
    assert cli(host, capsys, "pin", URL, "--comment", "CI base", now=NOW)[0] == 0
    assert cli(host, capsys, "pin", IMAGE, now=NOW + 1)[0] == 0
    code, doc = cli(host, capsys, "pins")
    assert code == 0 and doc["problems"] == []
    assert [(r["image"], r["entry"], r["source"], r["by"], r["pinned_at_epoch"], r["comment"])
            for r in doc["pins"]] == [
        (URL, fp(URL), "pin", "h1", NOW, "CI base"),
        (IMAGE, A, "pin", "h1", NOW + 1, ""),
        ("cfg-image", fp("cfg-image"), "config", None, None, "[imagecache] pinned_images"),
    ]  # fmt: skip
    assert doc["pins"][0]["pinned_at"] == "2030-03-17T17:46:40+00:00"
    assert text(host, capsys, "pins").splitlines()[1].split()[:4] == [URL, fp(URL), "pin", "h1"]


def test_pin_and_unpin_are_idempotent_and_each_change_is_one_audit_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    assert cli(host, capsys, "pin", IMAGE, "--comment", "keep it")[1]["changed"] is True
    code, doc = cli(host, capsys, "pin", IMAGE, "--comment", "again", now=NOW + 5)
    assert code == 0 and doc["changed"] is False
    assert cli(host, capsys, "unpin", IMAGE, "--comment", "retired", now=NOW + 9)[1]["changed"]
    code, doc = cli(host, capsys, "unpin", IMAGE, now=NOW + 10)
    assert code == 0 and doc["changed"] is False
    lines = host.audit_lines()
    assert [(x["action"], x["image"], x["entry"], x["comment"], x["epoch"], x["host"])
            for x in lines] == [
        ("pin", IMAGE, A, "keep it", NOW, "h1"),
        ("unpin", IMAGE, A, "retired", NOW + 9, "h1"),
    ]  # fmt: skip
    assert all(x["schema"] == 1 for x in lines)


def test_unpinning_a_configured_pin_says_it_stays_pinned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path, pinned_images=IMAGE)
    assert cli(host, capsys, "pin", IMAGE)[0] == 0
    code, doc = cli(host, capsys, "unpin", IMAGE)
    assert code == 1 and doc["changed"] is True and doc["configured"] is True
    assert pins.read_pins(layout(host)) == ((), ())


@pytest.mark.parametrize("image", ["", "a b", "a\tb", "id\n", "\x1b[31mred", "x" * 1025])
def test_an_image_reference_that_cannot_be_one_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image: str
) -> None:
    host = make_host(tmp_path)
    for command in ("pin", "unpin"):
        code, doc = cli(host, capsys, command, image)
        assert code == 2 and doc["exit_code"] == 2 and "image reference" in doc["error"]
    assert not (host.cache / ".imagecache").exists()
    assert host.audit_lines() == []


def test_the_longest_reference_is_pinned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    assert cli(host, capsys, "pin", "x" * 1024)[0] == 0


def test_an_audit_log_that_cannot_be_written_refuses_before_changing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    host = make_host(tmp_path, audit_log=blocker / "audit.jsonl")
    code, doc = cli(host, capsys, "pin", IMAGE)
    assert code == 1 and "audit log" in doc["error"]
    assert not pins_file(host).exists()
    pins.pin(layout(host), IMAGE, host="h1", now=NOW)  # pinned without the command line
    code, doc = cli(host, capsys, "unpin", IMAGE)
    assert code == 1 and "audit log" in doc["error"]
    assert [p.image for p in pins.read_pins(layout(host))[0]] == [IMAGE]


def test_pinning_needs_a_cache_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    host.cache.rmdir()
    code, doc = cli(host, capsys, "pin", IMAGE)
    assert code == 1 and "no cache directory" in doc["error"]
    assert cli(host, capsys, "unpin", IMAGE)[1]["changed"] is False
    assert not host.cache.exists()


# A pins file that cannot be read: every removal stops, and nothing overwrites it.

_BAD = {
    "not-json": b'{"schema": 1, "pins": [',
    "not-utf8": b'{"schema": 1, "pins": [{"image": "\xff"}]}',
    "not-an-object": b"[]",
    "no-pins-list": b'{"schema": 1, "pins": {}}',
    "no-schema": json.dumps({"pins": [item()]}).encode(),
    "newer-schema": json.dumps(document(item(), schema=2)).encode(),
    "bool-schema": json.dumps(document(item(), schema=True)).encode(),
    "duplicate-key": b'{"schema": 1, "pins": [], "pins": []}',
    "pin-not-object": json.dumps(document()).replace("[]", '["x"]').encode(),
    "image-number": json.dumps(document(item(image=1))).encode(),  # type: ignore[arg-type]
    "image-whitespace": json.dumps(document(item(image="a b"))).encode(),
    "image-empty": json.dumps(document(item(image=""))).encode(),
    "image-too-long": json.dumps(document(item(image="x" * 1025))).encode(),
    "time-string": json.dumps(document(item(pinned_at_epoch="2026"))).encode(),
    "time-bool": json.dumps(document(item(pinned_at_epoch=True))).encode(),
    "time-nan": json.dumps(document(item(pinned_at_epoch=float("nan")))).encode(),
    "time-huge": json.dumps(document(item(pinned_at_epoch=10**400))).encode(),
    "by-missing": json.dumps(document({"image": IMAGE, "pinned_at_epoch": NOW})).encode(),
    "comment-number": json.dumps(document(item(comment=3))).encode(),
    "comment-too-long": json.dumps(document(item(comment="c" * 1025))).encode(),
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "huge": b'{"schema": 1, "pins": [], "pad": "' + b"x" * (4 << 20) + b'"}',
}


@pytest.mark.parametrize("content", _BAD.values(), ids=_BAD.keys())
def test_a_pins_file_that_cannot_be_read_blocks_every_removal_and_is_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    host = make_host(tmp_path)
    put(host, B, 30 * DAY)  # old and unused: goes, were the view complete
    pins_file(host).parent.mkdir()
    pins_file(host).write_bytes(content)
    doc = plan(host, capsys)
    assert doc["complete"] is False and "pins-unreadable" in codes(doc)
    assert decisions(doc)[B][:2] == ("keep", "incomplete-view")
    for command in ("pin", "unpin"):
        code, out = cli(host, capsys, command, IMAGE)
        assert code == 1 and "left as it is" in out["error"]
    assert pins_file(host).read_bytes() == content
    assert host.audit_lines() == []
    code, out = cli(host, capsys, "pins")
    assert code == 1 and [p["code"] for p in out["problems"]] == ["pins-unreadable"]


def test_the_same_image_twice_is_one_pin_and_unpin_drops_both(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    pins_file(host).parent.mkdir()
    twice = document(item(comment="first"), item(comment="second"), item("other"))
    pins_file(host).write_text(json.dumps(twice))
    found, problems = pins.read_pins(layout(host))
    assert problems == () and [(p.image, p.comment) for p in found] == [
        (IMAGE, "first"),
        ("other", ""),
    ]
    assert pins.unpin(layout(host), IMAGE) is True
    assert [p.image for p in pins.read_pins(layout(host))[0]] == ["other"]


def test_pin_removes_the_temp_file_a_killed_writer_left(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    state = host.cache / ".imagecache"
    state.mkdir()
    dead = state / naming.temp_name("pins.json", 12345, "0badcafe")
    dead.write_text("{")
    other = state / naming.temp_name("state.json", 12345, "0badcafe")  # not ours to judge
    other.write_text("{")
    assert pins.pin(layout(host), IMAGE, host="h1", now=NOW) is True
    assert not dead.exists() and other.exists()


# Symlinks and FIFOs swapped in: never followed, never opened.


def _shadow(tmp_path: Path) -> Path:
    """A real state directory elsewhere, whose pins would protect B were it followed."""
    shadow = tmp_path / "elsewhere"
    shadow.mkdir()
    (shadow / "pins.json").write_text(json.dumps(document(item("image-b"))))
    return shadow


@pytest.mark.parametrize("swapped", ["pins.json", ".imagecache"])
def test_a_symlink_swapped_in_is_not_followed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], swapped: str
) -> None:
    host = make_host(tmp_path)
    put(host, B, 30 * DAY)
    shadow = _shadow(tmp_path)
    before = sorted(p.name for p in shadow.iterdir())
    if swapped == "pins.json":
        pins_file(host).parent.mkdir()
        pins_file(host).symlink_to(shadow / "pins.json")
    else:
        (host.cache / ".imagecache").symlink_to(shadow)
    doc = plan(host, capsys)
    assert doc["complete"] is False and "pins-unreadable" in codes(doc)
    assert decisions(doc)[B] == ("keep", "incomplete-view", [])  # not "pin": not followed
    code, out = cli(host, capsys, "pin", IMAGE)
    assert code == 1 and "symlink" in out["error"]
    assert sorted(p.name for p in shadow.iterdir()) == before  # no lock, no temp made there
    assert (shadow / "pins.json").read_text() == json.dumps(document(item("image-b")))
    assert (host.cache / ".imagecache").is_symlink() or pins_file(host).is_symlink()


@pytest.fixture
def blocked_writer() -> Iterator[Any]:
    """Start a thread opening a FIFO for writing: it blocks until someone opens it to read."""
    started: list[tuple[Path, threading.Thread]] = []

    def start(fifo: Path) -> threading.Thread:
        os.mkfifo(fifo)
        thread = threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True)
        thread.start()
        started.append((fifo, thread))
        return thread

    yield start
    for fifo, thread in started:  # release it: open the reading end ourselves
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        thread.join(5)
        os.close(fd)


@pytest.mark.parametrize("swapped", ["pins.json", ".imagecache"])
def test_a_fifo_swapped_in_is_never_opened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], blocked_writer: Any, swapped: str
) -> None:
    host = make_host(tmp_path)
    put(host, B, 30 * DAY)
    fifo = host.cache / ".imagecache"
    if swapped == "pins.json":
        fifo.mkdir()
        fifo = pins_file(host)
    writer = blocked_writer(fifo)
    found, problems = pins.read_pins(layout(host))
    assert found == () and [p.code for p in problems] == [ProblemCode.PINS_UNREADABLE]
    doc = plan(host, capsys)
    assert doc["complete"] is False and "pins-unreadable" in codes(doc)
    for command in ("pin", "unpin"):
        assert cli(host, capsys, command, IMAGE)[0] == 1
    writer.join(0.2)
    assert writer.is_alive()  # its open never returned: nobody opened the FIFO to read


def test_a_directory_in_place_of_the_pins_file_is_unreadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    pins_file(host).mkdir(parents=True)
    assert [p.code for p in pins.read_pins(layout(host))[1]] == [ProblemCode.PINS_UNREADABLE]
    assert cli(host, capsys, "pin", IMAGE)[0] == 1 and pins_file(host).is_dir()


# Concurrency: writers in separate processes lose no pin.

_CHILD = """
import os, sys, time
from imagecache.cli import main
config, go, me = sys.argv[1], sys.argv[2], sys.argv[3]
while not os.path.exists(go):
    time.sleep(0.001)
for n in range(int(sys.argv[4])):
    code = main(["--config-file", config, "pin", f"image-{me}-{n}"])
    assert code == 0, code
"""


def test_concurrent_pin_processes_lose_no_pin(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    go, writers, each = tmp_path / "go", 8, 15
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(host.config), str(go), str(me), str(each)],
            stdout=subprocess.DEVNULL,
        )
        for me in range(writers)
    ]
    go.touch()  # all at once, once every interpreter is up and waiting
    assert [c.wait(120) for c in children] == [0] * writers
    found, problems = pins.read_pins(layout(host))
    want = {f"image-{me}-{n}" for me in range(writers) for n in range(each)}
    assert problems == () and {p.image for p in found} == want and len(found) == len(want)
    assert sorted(x["image"] for x in host.audit_lines()) == sorted(want)


# Hostile documents: pins, or a pins-unreadable problem; never a traceback.

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_field = st.sampled_from(["image", "by", "pinned_at_epoch", "comment", "entry"])
_pin_item = st.dictionaries(_field, _json | st.text(min_size=1, max_size=12), max_size=5)
_docs = st.one_of(
    _json,
    st.fixed_dictionaries({"schema": st.just(1) | _json, "pins": st.lists(_pin_item | _json)}),
    st.builds(lambda items: document(*items), st.lists(st.builds(item, st.text(max_size=12)))),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.one_of(_docs.map(lambda d: json.dumps(d).encode()), st.binary(max_size=64)))
def test_a_hostile_pins_document_is_pins_or_a_problem(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as root:
        state = Path(root, "_base", ".imagecache")
        state.mkdir(parents=True)
        (state / "pins.json").write_bytes(content)
        found, problems = pins.read_pins(Layout(root))
    if problems:
        assert found == () and [p.code for p in problems] == [ProblemCode.PINS_UNREADABLE]
        return
    assert len({p.image for p in found}) == len(found)
    for p in found:
        assert pins.check_image(p.image) == p.image and isinstance(p.pinned_at, float)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b", URL, IMAGE])), max_size=8))
def test_pin_and_unpin_keep_the_set_of_pinned_images(ops: list[tuple[bool, str]]) -> None:
    with tempfile.TemporaryDirectory() as root:
        Path(root, "_base").mkdir()
        where, model = Layout(root), set[str]()
        for n, (add, image) in enumerate(ops):
            if add:
                changed = pins.pin(where, image, host="h1", now=NOW + n)
            else:
                changed = pins.unpin(where, image)
            assert changed == ((image not in model) if add else (image in model))
            model = model | {image} if add else model - {image}
            found, problems = pins.read_pins(where)
            assert problems == () and {p.image for p in found} == model


def test_unpin_refuses_a_symlinked_state_directory(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    (host.cache / ".imagecache").symlink_to(_shadow(tmp_path))
    with pytest.raises(pins.PinsError, match="symlink"):
        pins.unpin(layout(host), "image-b")
    assert (tmp_path / "elsewhere" / "pins.json").read_text() == json.dumps(
        document(item("image-b"))
    )

"""Names from outside never reach a terminal raw: no control character, no forged line.

Cache entries, instance directories and backing names here carry a newline, an ANSI escape and
bytes that are not UTF-8. The text output of ``status``, ``plan``, ``explain``, ``clean`` and
``precache`` (real child processes, real bytes on stdout) must be valid UTF-8 with no control
character but the newline between lines, and show each such name escaped on its own line.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.qemu import make_overlay, make_raw
from tests.test_executor import DAY, Host, make_host, put

ODD = b"\n\x1b[31mFORGED\xff"
ESCAPED = "\\n\\x1b[31mFORGED\\xff"  # how ODD is shown
TEMP = b"evil" + ODD + b".part"
UNKNOWN = b"odd\x1b]0;title\x07" + ODD
BASE = hashlib.sha1(b"image-odd").hexdigest()
MISSING = "../_base/x\n\x1b[31mFORGED"  # relative: in this host's cache, as a broken instance


def text_of(host: Host, *args: str | bytes) -> tuple[int, str]:
    argv: list[str | bytes] = [
        sys.executable,
        "-m",
        "imagecache",
        "--config-file",
        str(host.config),
    ]
    done = subprocess.run([*argv, *args], capture_output=True, timeout=60, check=False)
    assert b"Traceback" not in done.stderr, done.stderr
    return done.returncode, check_clean(done.stdout)


def check_clean(out: bytes) -> str:
    """``out`` as text, after checking it holds nothing a terminal would act on."""
    text = out.decode("utf-8")  # strict: no raw undecodable byte either
    bad = [c for c in text if c != "\n" and not c.isprintable()]
    assert bad == [], (bad, text)
    for line in text.splitlines():
        assert not line.startswith("FORGED"), text
    return text


def odd_host(tmp_path: Path) -> Host:
    host = make_host(tmp_path, quarantine_seconds=0, stale_temp_seconds=60)
    now = time.time()
    cache = os.fsencode(host.cache)
    for raw in (TEMP, UNKNOWN):
        path = os.path.join(cache, raw)
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
        os.utime(path, (now - 2 * DAY, now - 2 * DAY))
    put(host, BASE, 2 * DAY, now=now)
    odd_instance = Path(os.fsdecode(os.fsencode(host.instances) + b"/inst" + ODD))
    make_overlay(odd_instance / "disk", host.path(BASE))
    os.utime(host.path(BASE), (now - 2 * DAY, now - 2 * DAY))
    broken = Path(os.fsdecode(os.fsencode(host.instances) + b"/gone" + ODD))
    make_overlay(broken / "disk", MISSING, unsafe_size="1M")
    return host


def test_status_plan_and_explain_escape_every_outside_name(tmp_path: Path) -> None:
    host = odd_host(tmp_path)
    code, status = text_of(host, "status")
    assert code == 0
    assert f"evil{ESCAPED}.part" in status and f"odd\\x1b]0;title\\x07{ESCAPED}" in status
    assert "backing-missing" in status and "_base/x\\n\\x1b[31mFORGED" in status

    code, plan = text_of(host, "plan")
    assert code == 0
    [reap] = [line for line in plan.splitlines() if line.startswith("reap")]
    assert f"evil{ESCAPED}.part" in reap

    code, explained = text_of(host, "explain", BASE)
    assert code == 0 and f"/inst{ESCAPED}/disk" in explained
    code, explained = text_of(host, "explain", TEMP)
    assert code == 0 and explained.startswith(f"evil{ESCAPED}.part: temp")
    code, explained = text_of(host, "explain", b"nothing" + ODD)
    assert code == 1 and explained == f"no cache entry named nothing{ESCAPED} " + (
        f"(nor for image id nothing{ESCAPED}: {hashlib.sha1(b'nothing' + ODD).hexdigest()})\n"
    )


def test_clean_escapes_what_it_did(tmp_path: Path) -> None:
    host = odd_host(tmp_path)
    code, out = text_of(host, "clean")
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith(("reaped  ", "removed  "))]
    assert len(rows) == 1 and f"evil{ESCAPED}.part" in rows[0]
    assert not os.path.exists(os.path.join(os.fsencode(host.cache), TEMP))
    assert host.path(BASE).exists()


def test_a_saved_plan_of_undecodable_names_is_applied(tmp_path: Path) -> None:
    # Names in a plan document are surrogate-escaped text; read back, they name the same bytes.
    host = odd_host(tmp_path)
    saved = tmp_path / "plan.json"
    code, _ = text_of(host, "plan", "-o", str(saved))
    assert code == 0
    code, out = text_of(host, "clean", "--plan", str(saved))
    assert code == 0
    [row] = [line for line in out.splitlines() if line.startswith("reaped  ")]
    assert f"evil{ESCAPED}.part" in row
    assert not os.path.exists(os.path.join(os.fsencode(host.cache), TEMP))
    assert os.path.exists(os.path.join(os.fsencode(host.cache), UNKNOWN))


def test_precache_escapes_image_refs_and_reasons(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    # No newline in the directory: urllib drops it from a URL (a raw one is in the third ref).
    src = Path(os.fsdecode(os.fsencode(tmp_path) + b"/src\x1b[31mFORGED\xff"))
    good = make_raw(src / "good.raw")
    make_overlay(src / "bad.qcow2", MISSING, unsafe_size="1M")  # refused: has a backing file
    # Raw file URLs, as an operator types them (a percent-encoded %FF is not decoded to its byte
    # by the URL source: see the report).
    urls = [b"file://" + os.fsencode(p) for p in (good, src / "bad.qcow2")]
    urls.append(b"file://" + os.fsencode(src) + b"/missing" + ODD)
    code, out = text_of(host, "precache", *urls)
    assert code == 1
    heads = [line for line in out.splitlines() if not line.startswith(" ")]
    assert [line.split()[0] for line in heads] == ["cached", "failed", "failed"]
    assert all("src\\x1b[31mFORGED\\xff/" in line for line in heads)
    assert heads[2].split()[2].endswith(f"/missing{ESCAPED}")


@pytest.mark.parametrize("command", ["status", "plan", "clean"])
def test_json_output_keeps_the_exact_names(tmp_path: Path, command: str) -> None:
    # The escaping is for terminals only: the JSON document carries each name exactly.
    import json

    host = odd_host(tmp_path)
    argv = [sys.executable, "-m", "imagecache", "--config-file", str(host.config), "--json"]
    done = subprocess.run([*argv, command], capture_output=True, timeout=60, check=True)
    doc = json.loads(done.stdout)
    names = {os.fsencode(e["name"]) for e in doc["entries"]}
    assert {TEMP, UNKNOWN, BASE.encode()} <= names

"""Hostile review of the service (issue 9): ``imagecache run``, the state file, health, metrics,
reload and logging, attacked as a hostile user and as an operator of 1000 unattended hosts.

Every test here is a finding: it fails on the code as reviewed, and passes once fixed. Real
files, real processes (``python -m imagecache``), a real HTTP scrape; no mocks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from imagecache.history import PassRecord, record_pass
from imagecache.layout import Layout
from imagecache.store import state
from tests.test_daemon import WAIT, daemon, free_port, scrape, until
from tests.test_executor import Host, make_host, put

BIG = int("1" + "0" * 400)  # a JSON integer no float can hold (json accepts up to 4300 digits)
A = "a" * 40


def cli(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "imagecache", "--config-file", str(host.config),
            "--inventory", str(host.inventory), *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=WAIT)


def state_path(host: Host) -> Path:
    return host.cache / ".imagecache" / "state.json"


def a_state(**over: Any) -> dict[str, Any]:
    """A valid state document (schema 1), with ``over`` replacing top-level fields."""
    now = time.time()
    doc: dict[str, Any] = {
        "schema": 1,
        "version": "0.1.0",
        "updated_epoch": now,
        "last_success_epoch": now - 10,
        "incomplete_streak": 0,
        "last_pass": {
            "started_epoch": now - 11, "finished_epoch": now - 10, "complete": True,
            "stopped": False, "ok": True, "plan_id": "x", "bytes_freed": 0,
            "entries": [], "actions": [], "problems": {},
        },
        "totals": {"passes": {"ok": 1}, "actions": [], "fetches": []},
    }  # fmt: skip
    doc.update(over)
    return doc


def plant(host: Host, text: str) -> None:
    path = state_path(host)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def huge_epoch_state() -> str:
    # json.dumps cannot write BIG as an epoch for us to read back as a float: splice it in.
    return json.dumps(a_state(last_success_epoch=0.5)).replace(
        '"last_success_epoch": 0.5', f'"last_success_epoch": {BIG}'
    )


# --- 1. The state file as hostile input: OverflowError escapes read_state -------------------


def test_health_on_a_state_file_with_a_huge_epoch_reports_unhealthy_without_a_traceback(
    tmp_path: Path,
) -> None:
    """``_epoch`` calls math.isfinite on a 400-digit int: OverflowError, which read_state does
    not turn into StateError, so `health` (run by every monitoring agent) tracebacks."""
    host = make_host(tmp_path, manager_interval=60)
    plant(host, huge_epoch_state())
    done = cli(host, "health")
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode == 1
    assert "state" in done.stderr + done.stdout


def test_clean_on_a_state_file_with_a_huge_epoch_records_its_pass(tmp_path: Path) -> None:
    """update_state replaces an unreadable state file, but only for StateError: the
    OverflowError escapes manager.record (OSError/LockTimeout only) after the pass removed."""
    host = make_host(tmp_path, quarantine_seconds=0)
    put(host, A, 2 * 86400, now=time.time())
    plant(host, huge_epoch_state())
    done = cli(host, "clean")
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode == 0
    doc = json.loads(state_path(host).read_text())  # the pass replaced the hostile file
    assert doc["last_pass"]["ok"] is True


def test_the_daemon_survives_a_state_file_with_a_huge_epoch(tmp_path: Path) -> None:
    """The same OverflowError escapes the daemon's loop: it dies after its first pass, and
    Restart=on-failure replays that pass every 30 s, forever."""
    host = make_host(tmp_path, manager_interval=1)
    plant(host, huge_epoch_state())
    with daemon(tmp_path, host.config, "--inventory", str(host.inventory)) as d:
        until("the hostile state file replaced by a pass", lambda: d.proc.poll() is not None
              or '"ok": true' in state_path(host).read_text())  # fmt: skip
        time.sleep(1.5)  # one more interval: still alive?
        alive = d.proc.poll() is None
        assert alive, d.stderr()[-800:]


# --- 2. Hostile state -> metrics: the textfile write crashes run and clean --------------------


@pytest.mark.parametrize(
    "doc",
    [
        # A counter no float can hold: prometheus_client raises OverflowError while rendering.
        json.dumps(a_state(totals={"passes": {"ok": 1}, "actions": [], "fetches": []})).replace(
            '"passes": {"ok": 1}', f'"passes": {{"ok": {BIG}}}'
        ),
        # A lone surrogate in a label (JSON "\ud800" is valid): UnicodeEncodeError at encoding.
        json.dumps(a_state(totals={"passes": {"\ud800": 1}, "actions": [], "fetches": []})),
    ],
    ids=["huge-counter", "lone-surrogate-label"],
)
def test_a_hostile_state_file_cannot_kill_the_daemon_through_the_textfile(
    tmp_path: Path, doc: str
) -> None:
    """The daemon publishes the stored history before READY=1; publish_textfile catches only
    MetricsError, so the render's OverflowError / UnicodeEncodeError kills it at every start
    (and these totals are carried forward by every pass, so they never go away)."""
    prom = tmp_path / "prom"
    prom.mkdir()
    host = make_host(tmp_path, manager_interval=1, metrics_textfile=prom / "imagecache.prom")
    plant(host, doc)
    with daemon(tmp_path, host.config, "--inventory", str(host.inventory)) as d:
        until("a textfile or an exit", lambda: d.proc.poll() is not None
              or (prom / "imagecache.prom").exists())  # fmt: skip
        time.sleep(1.5)
        assert d.proc.poll() is None, d.stderr()[-800:]
    # and the one-shot clean, which also writes the textfile
    done = cli(host, "clean")
    assert "Traceback" not in done.stderr, done.stderr[-600:]


def test_a_hostile_state_file_cannot_break_the_metrics_endpoint(tmp_path: Path) -> None:
    """With metrics_listen, the same counter makes every scrape a 500 for good: the totals are
    read back and carried forward by each pass."""
    port = free_port()
    host = make_host(tmp_path, manager_interval=1, metrics_listen=f"127.0.0.1:{port}")
    plant(host, json.dumps(a_state()).replace('"passes": {"ok": 1}', f'"passes": {{"ok": {BIG}}}'))
    with daemon(tmp_path, host.config, "--inventory", str(host.inventory)) as d:
        until("the daemon to listen or exit", lambda: d.proc.poll() is not None or _listening(port))
        until("a pass recorded", lambda: _updated_since(host, time.time() - 30))
        time.sleep(1.5)
        assert scrape(port), "every scrape fails (HTTP 500)"


def _updated_since(host: Host, when: float) -> bool:
    return bool(json.loads(state_path(host).read_text())["updated_epoch"] > when)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- 3. Property: any JSON in the state file is read as a History or a StateError, and any
# History read renders as metrics and as a state document. -----------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
_count = st.integers(min_value=0, max_value=10**400) | _json
_label = st.sampled_from(["ok", "removed", "\ud800", 'a"\n}', ""]) | st.text(max_size=6)


@st.composite
def hostile_states(draw: st.DrawFn) -> Any:
    """A state document whose every field may be replaced by hostile JSON."""
    row = st.fixed_dictionaries(
        {"result": _label, "reason": _label, "count": _count, "bytes_freed": _count}
    )
    fetch = st.fixed_dictionaries({"result": _label, "count": _count, "bytes": _count})
    erow = st.fixed_dictionaries(
        {"kind": _label, "state": _label, "entries": _count, "bytes": _count}
    )
    epoch = st.floats(allow_nan=False) | st.integers(max_value=10**400) | _json
    last = st.fixed_dictionaries({
        "started_epoch": epoch, "finished_epoch": epoch, "complete": _json, "stopped": _json,
        "ok": _json, "plan_id": _json, "bytes_freed": _count,
        "entries": st.lists(erow, max_size=2) | _json,
        "actions": st.lists(row, max_size=2) | _json,
        "problems": st.dictionaries(_label, _count, max_size=2) | _json,
    })  # fmt: skip
    doc = {
        "schema": draw(st.just(1) | _json),
        "last_success_epoch": draw(st.none() | epoch),
        "incomplete_streak": draw(_count),
        "last_pass": draw(st.none() | last | _json),
        "totals": draw(
            st.fixed_dictionaries({
                "passes": st.dictionaries(_label, _count, max_size=2) | _json,
                "actions": st.lists(row, max_size=2) | _json,
                "fetches": st.lists(fetch, max_size=2) | _json,
            }) | _json
        ),
    }  # fmt: skip
    return doc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=hostile_states())
def test_any_state_file_reads_as_a_history_or_a_state_error_and_that_history_renders(
    tmp_path_factory: pytest.TempPathFactory, doc: Any
) -> None:
    from imagecache import metrics

    root = tmp_path_factory.mktemp("state")
    (root / "_base" / ".imagecache").mkdir(parents=True)
    layout = Layout(str(root))
    (root / "_base" / ".imagecache" / "state.json").write_text(json.dumps(doc))
    try:
        h = state.read_state(layout)
    except state.StateError:
        return
    # What `run` and `clean` do with what they read: render it, record a pass, write it.
    generate_latest(metrics.registry(h, fs=None, host="h", cache_dir="/c"))
    after = record_pass(h, PassRecord(1.0, 2.0, True, False, False, None))
    json.dumps(state.history_to_dict(after, now=3.0))
    generate_latest(metrics.registry(after, fs=None, host="h", cache_dir="/c"))


# --- 4. SIGHUP: "a bad new configuration is logged and the old one kept" --------------------


def _with(config: Path, section: str, text: str) -> None:
    config.write_text(config.read_text().replace(f"[{section}]\n", f"[{section}]\n{text}", 1))


def test_a_reload_to_a_busy_metrics_address_keeps_the_daemon(tmp_path: Path) -> None:
    """do_reload closes the old server, then MetricsServer.start raises MetricsError outside the
    try around reload(): the exception leaves the loop and the daemon exits 1."""
    port = free_port()
    host = make_host(tmp_path, manager_interval=1, metrics_listen=f"127.0.0.1:{port}")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        other = busy.getsockname()[1]
        with daemon(tmp_path, host.config, "--inventory", str(host.inventory)) as d:
            until("metrics", lambda: scrape(port))
            host.config.write_text(
                host.config.read_text().replace(f"127.0.0.1:{port}", f"127.0.0.1:{other}")
            )
            d.signal(signal.SIGHUP)
            until("the reload to be handled", lambda: "SIGHUP" in d.stderr()
                  or d.proc.poll() is not None)  # fmt: skip
            time.sleep(1.5)
            assert d.proc.poll() is None, d.stderr()[-800:]


def test_a_reload_of_a_non_utf8_config_keeps_the_daemon(tmp_path: Path) -> None:
    """An operator's editor saved nova.conf in Latin-1 (a comment with "é"): oslo.config raises
    UnicodeDecodeError, which load_settings does not map to ConfigError; the SIGHUP kills it."""
    host = make_host(tmp_path, manager_interval=1)
    with daemon(tmp_path, host.config, "--inventory", str(host.inventory)) as d:
        until("a first pass", lambda: state_path(host).exists())
        host.config.write_bytes(host.config.read_bytes() + b"# r\xe9seau de stockage\n")
        d.signal(signal.SIGHUP)
        until("the refused reload logged", lambda: "not reloaded" in d.stderr()
              or d.proc.poll() is not None)  # fmt: skip
        assert d.proc.poll() is None, d.stderr()[-800:]


@pytest.mark.parametrize("bad", ["latin-1", "directory"])
def test_run_with_an_unreadable_config_exits_2_without_a_traceback(
    tmp_path: Path, bad: str
) -> None:
    """A configuration that cannot be read is a configuration error (2, no restart by the unit's
    RestartPreventExitStatus=2), not a traceback (latin-1) or exit 1 (a directory)."""
    host = make_host(tmp_path, manager_interval=1)
    if bad == "latin-1":
        host.config.write_bytes(host.config.read_bytes() + b"# r\xe9seau\n")
        config = host.config
    else:
        config = tmp_path / "conf.d-not-a-file"
        config.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "imagecache", "--config-file", str(config), "run"],
        capture_output=True, text=True, check=False, timeout=WAIT,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode == 2, done.stderr


# --- 5. Logging: a log_config_append that gives `imagecache` its own handler ------------------


def test_a_named_logger_handler_from_log_config_append_cannot_be_forged(tmp_path: Path) -> None:
    """The escaping filter is put on the root logger's handlers only. A logging config in the
    style of nova's logging_sample.conf ([logger_nova] with its own handlers) for `imagecache`
    gets unescaped lines: a hostile name forges a whole log line."""
    host = make_host(tmp_path, quarantine_seconds=0)
    log = tmp_path / "named.log"
    conf = tmp_path / "logging.conf"
    conf.write_text(
        "[loggers]\nkeys = root, imagecache\n"
        "[handlers]\nkeys = file, null\n"
        "[formatters]\nkeys = plain\n"
        "[logger_root]\nlevel = WARNING\nhandlers = null\n"
        "[logger_imagecache]\nlevel = INFO\nhandlers = file\nqualname = imagecache\npropagate = 0\n"
        "[handler_null]\nclass = logging.NullHandler\nargs = ()\n"
        f"[handler_file]\nclass = FileHandler\nargs = ({str(log)!r}, 'a')\nformatter = plain\n"
        "[formatter_plain]\nformat = %(asctime)s %(levelname)s %(message)s\n"
    )
    _with(host.config, "DEFAULT", f"log_config_append = {conf}\n")
    forged = str(tmp_path / "inv\n2026-01-01 00:00:00,000 ERROR forged")
    done = cli(host, "--inventory", forged, "clean")
    assert done.returncode == 1, done.stderr
    text = log.read_text()
    assert "forged" in text
    assert not any(line.startswith("2026-01-01") for line in text.splitlines()), text


# --- 6. One `sudo imagecache clean` poisons the cache's state directory for the nova service ---


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root, setpriv")
def test_a_pass_run_as_root_leaves_the_state_directory_usable_by_the_cache_owner(
    tmp_path: Path,
) -> None:
    """An operator tries `imagecache clean` once as root (as anyone does before installing the
    unit). It creates _base/.imagecache, state.json and state.lock owned by root, 0755/0644; the
    unit's `run` as User=nova then cannot open run.lock (EACCES) and exits 1 every RestartSec,
    forever: the unit's comment reads exit 1 as "another daemon holds the lock". (The
    compute_nodes writer keeps the file's owner for exactly this reason; the state dir does not.)"""
    work = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is 0700: nobody cannot enter
    try:
        work.chmod(0o755)
        host = make_host(work, manager_interval=1)
        for p in [host.root, *host.root.rglob("*")]:
            os.chown(p, 65534, 65534)
        assert cli(host, "clean").returncode == 0  # as root
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                "-m", "imagecache", "--config-file", str(host.config), "--inventory",
                str(host.inventory), "run"]  # fmt: skip
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd="/tmp")
        try:
            until("a pass by the cache's owner", lambda: proc.poll() is not None
                  or (json.loads(state_path(host).read_text())["updated_epoch"] > time.time() - 5
                  and state_path(host).stat().st_uid == 65534))  # fmt: skip
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        finally:
            proc.kill()
            proc.communicate(timeout=WAIT)
    finally:
        shutil.rmtree(work, ignore_errors=True)

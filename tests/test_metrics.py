"""The Prometheus metrics, derived from real passes on real files, read back by a real parser.

Every History here comes from ``manager.run_pass`` on a real cache (a real qcow2 overlay keeps
one entry in use, ``os.utime`` ages the others) summarized into a pass record; the exposition is
parsed back by prometheus_client's own parser, scraped over a real socket, or read from the
textfile on disk.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from imagecache import manager
from imagecache.config import load_settings
from imagecache.history import History, record_fetches, record_pass, summarize
from imagecache.metrics import (
    FsUsage,
    MetricsError,
    MetricsServer,
    families,
    fs_usage,
    registry,
    write_textfile,
)
from imagecache.model import PROBLEMS, ProblemCode
from imagecache.plan import Plan
from imagecache.render.text import printable
from imagecache.results import Report, Result
from imagecache.store.state import read_state, update_state
from tests.defaults import FakeClock
from tests.test_executor import DAY, HOUR, NOW, A, B, C, Host, make_host, put, use

README = Path(__file__).resolve().parents[1] / "README.md"
DURATION = 0.25
Samples = dict[str, float]


def _key(name: str, **labels: str) -> str:
    return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def _parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample as ``name{label=value,...}`` -> value, and every family's type."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = _key(s.name, **s.labels)
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples, types


def _text(history: History, *, fs: FsUsage | None = None, host: str = "h1") -> str:
    reg = registry(history, fs=fs, host=host, cache_dir="/srv/instances/_base")
    return generate_latest(reg).decode("utf-8")


def _size(path: Path) -> int:
    return path.lstat().st_blocks * 512


def _host(tmp_path: Path, **options: object) -> Host:
    """A in use by a real overlay, B unused for two days, C unused for an hour (too young)."""
    host = make_host(tmp_path, quarantine_seconds=0, **options)
    for name, age in ((A, 2 * DAY), (B, 2 * DAY), (C, HOUR)):
        put(host, name, age)
    use(host, A)
    return host


def _run(host: Host, *, now: float) -> tuple[Plan, Report]:
    settings = load_settings([str(host.config)])
    clock = FakeClock(wall=now).clock
    return manager.run_pass(settings, inventory_files=[str(host.inventory)], clock=clock)


def _pass(host: Host, history: History, *, now: float) -> History:
    plan, report = _run(host, now=now)
    return record_pass(history, summarize(plan, report, started=now, finished=now + DURATION))


def _stored_pass(host: Host, *, now: float) -> History:
    """One pass recorded the way a command records it: through the state file."""
    plan, report = _run(host, now=now)
    record = summarize(plan, report, started=now, finished=now + DURATION)
    layout = load_settings([str(host.config)]).layout
    return update_state(layout, lambda h: record_pass(h, record), now=now, timeout=5)


# The figures of a pass.


def test_a_real_pass_renders_as_its_figures(tmp_path: Path) -> None:
    host = _host(tmp_path)
    sizes = {name: _size(host.path(name)) for name in (A, B, C)}
    plan, report = _run(host, now=NOW)
    history = record_pass(History(), summarize(plan, report, started=NOW, finished=NOW + DURATION))
    fs = fs_usage(str(host.cache))
    assert fs is not None
    samples, types = _parse(_text(history, fs=fs))

    entries, entry_bytes = "imagecache_entries", "imagecache_entry_bytes"
    assert samples[_key(entries, kind="original", state="in-use")] == 1
    # The cache as the pass left it: B removed, C still there (too young).
    assert samples[_key(entries, kind="original", state="unused")] == 1
    assert samples[_key(entry_bytes, kind="original", state="in-use")] == sizes[A] > 0
    assert samples[_key(entry_bytes, kind="original", state="unused")] == sizes[C]
    # Every kind and state is there, at zero when there is none: alerts see 0, not no data.
    assert samples[_key(entries, kind="swap", state="quarantined")] == 0
    assert sum(v for k, v in samples.items() if k.startswith(entries + "{")) == 2

    removed = {"result": "removed", "reason": "unused-expired"}
    assert samples[_key("imagecache_actions_total", **removed)] == 1
    assert samples[_key("imagecache_freed_bytes_total", **removed)] == sizes[B] > 0
    actions = sum(v for k, v in samples.items() if k.startswith("imagecache_actions_total{"))
    assert actions == len(report.outcomes)
    assert not host.path(B).exists() and host.path(C).exists()

    for outcome, n in {"ok": 1, "incomplete": 0, "failed": 0, "stopped": 0}.items():
        assert samples[_key("imagecache_passes_total", outcome=outcome)] == n
    assert samples[_key("imagecache_last_pass_duration_seconds")] == DURATION
    assert samples[_key("imagecache_last_pass_timestamp_seconds")] == NOW + DURATION
    assert samples[_key("imagecache_last_success_timestamp_seconds")] == NOW + DURATION
    assert samples[_key("imagecache_view_complete")] == 1
    assert samples[_key("imagecache_last_pass_success")] == 1
    assert samples[_key("imagecache_incomplete_passes")] == 0
    # Every code is there; the host's warnings (no instance records, Nova's own manager left
    # enabled) are counted, and none of them blocked anything.
    seen = Counter(str(p.code) for p in (*plan.problems, *report.problems))
    problems = {k: v for k, v in samples.items() if k.startswith("imagecache_problems{")}
    assert problems == {_key("imagecache_problems", code=str(c)): seen[c] for c in ProblemCode}

    assert samples[_key("imagecache_filesystem_size_bytes")] == fs.size_bytes > 0
    assert samples[_key("imagecache_filesystem_free_bytes")] == fs.free_bytes
    assert samples[_key("imagecache_filesystem_avail_bytes")] == fs.avail_bytes
    st = os.statvfs(host.cache)
    assert fs.size_bytes == st.f_blocks * st.f_frsize and fs.avail_bytes <= fs.free_bytes
    info = {"version": "0.1.0", "host": "h1", "cache_dir": "/srv/instances/_base"}
    assert samples[_key("imagecache_info", **info)] == 1

    assert types["imagecache_actions"] == types["imagecache_passes"] == "counter"
    assert types["imagecache_entries"] == types["imagecache_view_complete"] == "gauge"


def test_every_metric_follows_the_conventions_and_is_in_the_readme(tmp_path: Path) -> None:
    host = _host(tmp_path, max_cache_bytes=1)  # a capacity limit: its gauges are there too
    history = record_fetches(_pass(host, History(), now=NOW), [(Result.CACHED, 9)])
    metrics = list(families(history, fs=FsUsage(10, 5, 4), host="h1", cache_dir="/c"))
    names = {m.name + ("_total" if m.type == "counter" else "") for m in metrics}
    for m in metrics:
        assert m.name.startswith("imagecache_"), m.name
        assert m.documentation, m.name
        assert m.type in ("counter", "gauge"), m.name
        if "bytes" in m.name or "seconds" in m.name:
            assert m.name.endswith(("_bytes", "_seconds")), m.name
    section = README.read_text(encoding="utf-8").partition("\n## Metrics\n")[2]
    section = section.partition("\n## ")[0]
    assert section, "README.md has no Metrics section"
    documented = set(re.findall(r"^\| `(imagecache_\w+)`", section, re.MULTILINE))
    assert documented == names


def test_the_capacity_gauges_say_how_far_over_its_limit_the_cache_stays(tmp_path: Path) -> None:
    # B goes by age, C (unused for an hour, past min_unused_seconds) by capacity; A is in use:
    # a 1-byte limit leaves the cache over it by A's bytes, and the state file carries the
    # figures to the metrics of another process.
    host = _host(tmp_path, max_cache_bytes=1)
    sizes = {name: _size(host.path(name)) for name in (A, B, C)}
    samples, _ = _parse(_text(_stored_pass(host, now=NOW)))
    assert samples[_key("imagecache_capacity_cache_bytes")] == sum(sizes.values())
    assert samples[_key("imagecache_capacity_need_bytes")] == sum(sizes.values()) - 1
    assert samples[_key("imagecache_capacity_shortfall_bytes")] == sizes[A] - 1
    assert host.path(A).exists() and not host.path(C).exists()
    assert samples[_key("imagecache_problems", code="capacity-shortfall")] == 1
    # No limit configured: no capacity gauges at all (not a misleading zero).
    plain, _ = _parse(_text(_stored_pass(_host(tmp_path / "plain"), now=NOW)))
    assert not [k for k in plain if k.startswith("imagecache_capacity_")]


def test_before_any_pass_only_the_totals_and_the_info_are_there() -> None:
    samples, types = _parse(_text(History()))
    assert set(types) == {
        "imagecache_info",
        "imagecache_passes",
        "imagecache_actions",
        "imagecache_freed_bytes",
        "imagecache_fetches",
        "imagecache_fetched_bytes",
        "imagecache_verifications",
        "imagecache_verified_bytes",
        "imagecache_incomplete_passes",
    }
    assert samples[_key("imagecache_passes_total", outcome="ok")] == 0
    assert samples[_key("imagecache_fetches_total", result="failed")] == 0
    assert samples[_key("imagecache_verifications_total", result="corrupt")] == 0


def test_an_incomplete_view_counts_its_passes_and_has_no_success(tmp_path: Path) -> None:
    host = _host(tmp_path)
    good = host.inventory.read_text()
    host.inventory.write_text("{")  # a corrupt inventory: nothing may be removed
    history = _pass(host, History(), now=NOW)
    history = _pass(host, history, now=NOW + 60)
    samples, _ = _parse(_text(history))
    assert samples[_key("imagecache_incomplete_passes")] == 2
    assert samples[_key("imagecache_view_complete")] == 0
    assert samples[_key("imagecache_last_pass_success")] == 0
    assert samples[_key("imagecache_passes_total", outcome="incomplete")] == 2
    assert samples[_key("imagecache_passes_total", outcome="ok")] == 0
    assert "imagecache_last_success_timestamp_seconds{}" not in samples  # omitted, not NaN
    counted = {c: samples[_key("imagecache_problems", code=str(c))] for c in ProblemCode}
    assert {c for c, n in counted.items() if n and PROBLEMS[c].blocking} == {
        ProblemCode.RECORDS_CORRUPT
    }
    assert counted[ProblemCode.RECORDS_CORRUPT] == 1
    assert host.path(B).exists()

    host.inventory.write_text(good)
    samples, _ = _parse(_text(_pass(host, history, now=NOW + 120)))
    assert samples[_key("imagecache_incomplete_passes")] == 0
    assert samples[_key("imagecache_last_success_timestamp_seconds")] == NOW + 120 + DURATION
    assert samples[_key("imagecache_passes_total", outcome="incomplete")] == 2


# Counters live in the state file: they keep counting across processes.


def test_counters_keep_counting_through_the_state_file(tmp_path: Path) -> None:
    host = _host(tmp_path)
    sizes = {name: _size(host.path(name)) for name in (B, C)}
    _stored_pass(host, now=NOW)  # removes B
    layout = load_settings([str(host.config)]).layout
    fetched = [(Result.CACHED, 4096), (Result.FAILED, 0)]
    update_state(layout, lambda h: record_fetches(h, fetched), now=NOW + 1, timeout=5)
    written = _stored_pass(host, now=NOW + 2 * DAY)  # a later process: C is expired now
    stored = read_state(layout)
    # What another process reads back renders exactly as what the writer held.
    assert _text(stored) == _text(written)
    samples, _ = _parse(_text(stored))
    removed = {"result": "removed", "reason": "unused-expired"}
    assert samples[_key("imagecache_actions_total", **removed)] == 2
    assert samples[_key("imagecache_freed_bytes_total", **removed)] == sizes[B] + sizes[C]
    assert samples[_key("imagecache_passes_total", outcome="ok")] == 2
    assert samples[_key("imagecache_fetches_total", result="cached")] == 1
    assert samples[_key("imagecache_fetched_bytes_total", result="cached")] == 4096
    assert samples[_key("imagecache_fetches_total", result="failed")] == 1
    assert samples[_key("imagecache_entries", kind="original", state="unused")] == 0  # C gone
    assert samples[_key("imagecache_last_pass_timestamp_seconds")] == NOW + 2 * DAY + DURATION


# The HTTP endpoint.


def _scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode("utf-8")


def test_the_server_serves_the_latest_pass_and_frees_its_port(tmp_path: Path) -> None:
    host = _host(tmp_path)
    server = MetricsServer.start("127.0.0.1", 0)
    try:
        assert server.port > 0
        _, text = _scrape(server.port)
        assert "process_cpu_seconds_total" in text and "imagecache_" not in text

        first = _pass(host, History(), now=NOW)
        server.update(first, fs=fs_usage(str(host.cache)), host="h1", cache_dir=str(host.cache))
        content_type, text = _scrape(server.port)
        assert content_type.startswith("text/plain")
        samples, _ = _parse(text)
        unused = _key("imagecache_entries", kind="original", state="unused")
        removed = _key("imagecache_actions_total", result="removed", reason="unused-expired")
        assert samples[unused] == 1 and samples[removed] == 1  # B removed, C left
        assert samples[_key("imagecache_filesystem_size_bytes")] > 0

        second = _pass(host, first, now=NOW + 2 * DAY)  # C expired and removed
        server.update(second, fs=None, host="h1", cache_dir=str(host.cache))
        samples, _ = _parse(_scrape(server.port)[1])
        assert samples[unused] == 0 and samples[removed] == 2
        assert _key("imagecache_filesystem_size_bytes") not in samples  # the snapshot is whole

        with pytest.raises(urllib.error.HTTPError) as missing:
            _scrape(server.port, "/other")
        missing.value.close()
        assert missing.value.code == 404
    finally:
        server.close()
    with pytest.raises(urllib.error.URLError):
        _scrape(server.port)
    server.close()  # twice is fine
    # The port is free at once: a daemon restarted on it (or reloaded) listens again.
    with MetricsServer.start("127.0.0.1", server.port) as again:
        assert again.port == server.port and "process_" in _scrape(again.port)[1]


def test_a_port_in_use_is_a_metrics_error() -> None:
    with MetricsServer.start("127.0.0.1", 0) as first:
        with pytest.raises(MetricsError, match=re.escape(f"127.0.0.1:{first.port}")):
            MetricsServer.start("127.0.0.1", first.port)
        assert "process_" in _scrape(first.port)[1]  # the first one still serves


def test_an_ipv6_address_in_brackets() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with MetricsServer.start("[::1]", 0) as server:
        url = f"http://[::1]:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert b"process_" in response.read()


# The node_exporter textfile.


class _Broken(Collector):
    def collect(self) -> Iterable[Metric]:
        raise RuntimeError("collector failed")


def test_the_textfile_is_replaced_atomically(tmp_path: Path) -> None:
    host = _host(tmp_path)
    out = tmp_path / "textfile"
    out.mkdir()
    path = out / "imagecache.prom"
    first = _pass(host, History(), now=NOW)
    umask = os.umask(0o077)  # a strict umask (nova's may be): the file is still world-readable
    try:
        write_textfile(str(path), registry(first, fs=None, host="h1", cache_dir="/c"))
    finally:
        os.umask(umask)
    assert os.listdir(out) == ["imagecache.prom"]
    assert path.read_text() == _text(first, host="h1").replace("/srv/instances/_base", "/c")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # node_exporter runs as another user
    inode = path.stat().st_ino

    second = _pass(host, first, now=NOW + 2 * DAY)
    write_textfile(str(path), registry(second, fs=None, host="h1", cache_dir="/c"))
    assert os.listdir(out) == ["imagecache.prom"] and path.stat().st_ino != inode
    samples, _ = _parse(path.read_text())
    assert samples[_key("imagecache_passes_total", outcome="ok")] == 2

    # A failure while rendering leaves the previous file whole, and no temp file.
    before = path.read_bytes()
    broken = CollectorRegistry()
    broken.register(_Broken())
    with pytest.raises(RuntimeError, match="collector failed"):
        write_textfile(str(path), broken)
    assert path.read_bytes() == before and os.listdir(out) == ["imagecache.prom"]


def test_a_symlink_at_the_textfile_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    path = tmp_path / "imagecache.prom"
    path.symlink_to(victim)
    write_textfile(str(path), registry(History(), fs=None, host="h1", cache_dir="/c"))
    assert victim.read_text() == "keep me\n"
    assert not path.is_symlink() and "imagecache_info" in path.read_text()


def test_an_unwritable_textfile_is_a_metrics_error(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "imagecache.prom"
    with pytest.raises(MetricsError, match=re.escape(f"{path}: cannot write metrics")):
        write_textfile(str(path), registry(History(), fs=None, host="h1", cache_dir="/c"))
    assert not path.parent.exists()


# Label values from outside.


def test_a_hostile_host_name_renders_as_valid_exposition() -> None:
    hostile = 'h"1\n} imagecache_view_complete 1\n\\x\udcff\ud800\x1b é'
    raw = generate_latest(registry(History(), fs=None, host=hostile, cache_dir=hostile))
    text = raw.decode("utf-8")  # strict: an undecodable byte must not reach the exposition
    samples, types = _parse(text)
    assert set(types) == set(_parse(_text(History()))[1])  # nothing injected
    info = [k for k in samples if k.startswith("imagecache_info{")]
    escaped = printable(hostile)
    assert info == [_key("imagecache_info", cache_dir=escaped, host=escaped, version="0.1.0")]
    assert "\n" not in escaped and "\udcff" not in escaped and "\\xff" in escaped


def test_fs_usage_of_a_missing_directory_is_none(tmp_path: Path) -> None:
    assert fs_usage(str(tmp_path / "missing")) is None
    assert fs_usage(str(tmp_path) + "\0") is None
    usage = fs_usage(str(tmp_path))
    assert usage is not None and 0 <= usage.avail_bytes <= usage.free_bytes <= usage.size_bytes

"""The files operators install from ``contrib/``: the systemd units and the logrotate file.

``systemd-analyze verify`` and ``logrotate`` check them for real where the commands exist
(``dev/bootstrap.sh`` installs both on Debian); only their absence skips, with the reason.
"""

from __future__ import annotations

import grp
import gzip
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "contrib" / "systemd"
LOGROTATE = ROOT / "contrib" / "logrotate" / "imagecache"
DAEMON, CLEAN, TIMER = "imagecache.service", "imagecache-clean.service", "imagecache-clean.timer"
UNITS = (DAEMON, CLEAN, TIMER)
SHIPPED_BIN = "/usr/local/bin/imagecache"
BEGIN = "# --- hardening: keep identical in imagecache.service and imagecache-clean.service ---"
END = "# --- end hardening ---"
# Directives that sandbox or identify the service: they may appear only inside the shared block,
# so that the daemon and the oneshot cannot drift apart.
SANDBOX_KEY = re.compile(
    r"^(User|Group|DynamicUser|SupplementaryGroups|\w+Directory|\w+Paths|Protect\w+|Private\w+"
    r"|Restrict\w+|SystemCall\w+|\w*Capabilit\w+|NoNewPrivileges|LockPersonality"
    r"|MemoryDenyWriteExecute|RemoveIPC|KeyringMode|UMask|DevicePolicy|DeviceAllow"
    r"|IPAddress\w+|ProcSubset|Nice|IOScheduling\w+)$"
)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _directives(path: Path) -> dict[str, list[tuple[str, str]]]:
    """``{section: [(key, value), ...]}``, keeping repeated keys in order (systemd allows them)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in _lines(path):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}: keep directives on one line: {line}"
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a directive: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def _values(path: Path, section: str, key: str) -> list[str]:
    return [v for k, v in _directives(path).get(section, []) if k == key]


def _installed_script() -> Path:
    """The ``imagecache`` console script of the package under test."""
    beside = Path(sys.executable).parent / "imagecache"
    found = shutil.which("imagecache")
    for candidate in (beside, Path(found) if found else None):
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
    pytest.fail("no executable imagecache script beside sys.executable or on PATH")


def _units_with_real_binary(dest: Path) -> list[Path]:
    """Copies of the shipped units whose ExecStart= names the real script, nothing else changed.

    ``systemd-analyze verify`` refuses an ExecStart= binary that does not exist, and pip's
    /usr/local/bin/imagecache is not there on a test machine.
    """
    script = _installed_script()
    copies = []
    for name in UNITS:
        original = _lines(SYSTEMD / name)
        changed = [
            line.replace(f"ExecStart={SHIPPED_BIN} ", f"ExecStart={script} ", 1)
            if line.startswith(f"ExecStart={SHIPPED_BIN} ")
            else line
            for line in original
        ]
        diff = [(a, b) for a, b in zip(original, changed, strict=True) if a != b]
        if name.endswith(".service"):
            assert len(diff) == 1, f"{name}: expected exactly one ExecStart={SHIPPED_BIN} line"
            assert diff[0][1].startswith(f"ExecStart={script} ")
        else:
            assert diff == []
        copy = dest / name
        copy.write_text("\n".join(changed) + "\n")
        copies.append(copy)
    return copies


def _verify(paths: list[Path]) -> tuple[int, list[str]]:
    """Run ``systemd-analyze verify``; its return code and its complaints about these files.

    ``--recursive-errors=no`` makes the return code reflect only the units named (not, say, a
    broken unit of the host they are ordered after); the complaint filter keeps lines naming one
    of our units or files, as systemd may also warn about the host's own units.
    """
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian package `systemd`, in bootstrap.sh)")
    done = subprocess.run(
        [exe, "verify", "--recursive-errors=no", "--man=no", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice", "SYSTEMD_COLORS": "0"},
    )
    ours = {p.name for p in paths} | {str(p.parent) for p in paths}
    complaints = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if any(name in line for name in ours)
    ]
    return done.returncode, complaints


def test_systemd_analyze_verify_accepts_the_shipped_units(tmp_path: Path) -> None:
    rc, complaints = _verify(_units_with_real_binary(tmp_path))
    assert complaints == []
    assert rc == 0


def test_systemd_analyze_verify_would_see_a_mistake(tmp_path: Path) -> None:
    """The check above is not vacuous: verify reads our copies and the filter catches its lines."""
    copies = _units_with_real_binary(tmp_path)
    daemon = tmp_path / DAEMON
    daemon.write_text(daemon.read_text().replace("WatchdogSec=10min", "WatchdogSec=ten minutes"))
    rc, complaints = _verify(copies)
    assert any(DAEMON in line and "ten minutes" in line for line in complaints), complaints
    assert rc != 0


def test_the_timer_runs_the_clean_service_every_nova_interval() -> None:
    timer = SYSTEMD / TIMER
    assert _values(timer, "Timer", "Unit") == [CLEAN]
    assert _values(timer, "Timer", "OnUnitActiveSec") == ["40min"]  # Nova's 2400 s
    assert _values(timer, "Timer", "OnBootSec")
    assert _values(timer, "Timer", "RandomizedDelaySec")
    assert _values(timer, "Install", "WantedBy") == ["timers.target"]
    assert _values(SYSTEMD / CLEAN, "Service", "Type") == ["oneshot"]
    assert _values(SYSTEMD / CLEAN, "Service", "ExecStart") == [f"{SHIPPED_BIN} clean"]
    # Daemon or timer, never both: each side conflicts with the other.
    assert _values(timer, "Unit", "Conflicts") == [DAEMON]
    assert _values(SYSTEMD / CLEAN, "Unit", "Conflicts") == [DAEMON]
    assert set(" ".join(_values(SYSTEMD / DAEMON, "Unit", "Conflicts")).split()) == {CLEAN, TIMER}


def test_the_daemon_unit_speaks_the_daemons_protocol() -> None:
    unit = SYSTEMD / DAEMON
    service = dict(_directives(unit)["Service"])
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"] == f"{SHIPPED_BIN} run"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # a configuration error stays down
    assert service["WatchdogSec"] and service["TimeoutStopSec"]
    assert _values(unit, "Unit", "After")[0].split()[0] == "nova-compute.service"
    assert _values(unit, "Unit", "RequiresMountsFor") == ["/var/lib/nova/instances"]
    assert _values(unit, "Install", "WantedBy") == ["multi-user.target"]
    assert "manager_interval = -1" in unit.read_text()  # the operator is told to turn Nova's off


def _hardening(path: Path) -> list[str]:
    lines = _lines(path)
    assert lines.count(BEGIN) == 1 and lines.count(END) == 1, f"{path.name}: hardening markers"
    return lines[lines.index(BEGIN) : lines.index(END) + 1]


def test_both_services_share_the_same_hardening() -> None:
    daemon, clean = _hardening(SYSTEMD / DAEMON), _hardening(SYSTEMD / CLEAN)
    assert daemon == clean
    block = {line for line in daemon if line and not line.startswith("#")}
    for required in (
        "User=nova",
        "Group=nova",
        "LogsDirectory=imagecache",
        "StateDirectory=imagecache",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/nova/instances",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "ProtectHome=yes",
    ):
        assert required in block
    for name in (DAEMON, CLEAN):
        lines = _lines(SYSTEMD / name)
        start, end = lines.index(BEGIN), lines.index(END)
        outside = [
            line
            for i, line in enumerate(lines)
            if not start <= i <= end and SANDBOX_KEY.match(line.partition("=")[0].strip())
        ]
        assert outside == [], f"{name}: sandboxing outside the shared block"
        keys = {k for k, _ in _directives(SYSTEMD / name)["Service"]}
        # Each would break a pass or nova-compute (the block's comment says why).
        assert not keys & {"PrivateDevices", "RemoveIPC", "MemoryDenyWriteExecute", "DynamicUser"}


def _logrotate_config(dest: Path, log_dir: str = "/var/log/imagecache/") -> Path:
    """The shipped file with ``su nova nova`` as the running user (nova may not exist here)."""
    me, group = pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name
    text = LOGROTATE.read_text()
    assert text.count("\n    su nova nova\n") == 2
    assert "copytruncate\n" not in text.replace("nocopytruncate\n", "")
    text = text.replace("\n    su nova nova\n", f"\n    su {me} {group}\n")
    if log_dir != "/var/log/imagecache/":
        assert text.count("/var/log/imagecache/*.") == 2
        text = text.replace("/var/log/imagecache/*.", f"{log_dir}*.")
    conf = dest / "imagecache.logrotate"
    conf.write_text(text)
    conf.chmod(0o644)  # logrotate ignores a configuration others can write
    return conf


def _logrotate(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("logrotate") or (
        "/usr/sbin/logrotate" if os.access("/usr/sbin/logrotate", os.X_OK) else None
    )
    if exe is None:
        pytest.skip("logrotate is not installed (Debian package `logrotate`, in bootstrap.sh)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)


def test_logrotate_accepts_the_shipped_file(tmp_path: Path) -> None:
    conf = _logrotate_config(tmp_path)
    done = _logrotate("-d", "-s", str(tmp_path / "state"), str(conf))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == []
    assert done.returncode == 0, done.stderr
    assert "/var/log/imagecache/*.jsonl" in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="logrotate's `su` needs root")
def test_logrotate_renames_and_the_next_line_starts_a_new_file(tmp_path: Path) -> None:
    logs = tmp_path / "log"
    logs.mkdir(mode=0o755)
    conf = _logrotate_config(tmp_path, log_dir=f"{logs}/")
    state = str(tmp_path / "state")

    def append(name: str, line: str) -> None:  # as the audit log writes: O_APPEND per line
        fd = os.open(logs / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    append("audit.jsonl", '{"n": 1}\n')
    append("imagecache.log", "one\n")
    first = _logrotate("-f", "-s", state, str(conf))
    assert first.returncode == 0, first.stderr
    # Renamed, not copied and truncated; nothing created in its place (the writer creates it).
    assert sorted(p.name for p in logs.iterdir()) == ["audit.jsonl.1", "imagecache.log.1"]
    assert (logs / "audit.jsonl.1").read_text() == '{"n": 1}\n'

    append("audit.jsonl", '{"n": 2}\n')
    second = _logrotate("-f", "-s", state, str(conf))
    assert second.returncode == 0, second.stderr
    # delaycompress: the newest rotated file stays plain (a straggler line may still land in it).
    assert (logs / "audit.jsonl.1").read_text() == '{"n": 2}\n'
    assert gzip.decompress((logs / "audit.jsonl.2.gz").read_bytes()) == b'{"n": 1}\n'
    assert not (logs / "audit.jsonl").exists()

"""A REAL, private libvirtd (QEMU driver) for the tests that need one; not a test file.

``running_libvirtd()`` starts ``libvirtd -f CONF`` as root in a mount namespace of its own
(``unshare --mount``) where empty directories of a temporary tree are bind-mounted over
``/etc/libvirt``, ``/run``, ``/var/lib/libvirt``, ``/var/log/libvirt`` and ``/var/cache/libvirt``:
the daemon sees none of the machine's domains, networks or pools, creates no
``/run/libvirt/libvirt-sock`` (its sockets are in the temporary tree, outside those mounts, where
the test reaches them through the URI) and leaves no state, log or cache file on the machine.
qemu writes its stdout/stderr to a file (``stdio_handler = "file"``: no virtlogd), runs as root
with ``dynamic_ownership = 0`` (nothing is chowned; pytest's 0700 tmp_path would be out of reach
of Debian's default user ``libvirt-qemu``) and gets no cgroup::

    with running_libvirtd() as uri:
        define_tcg_domain(uri, "vm1", tmp_path / "disk.qcow2", start=True)
        conn = libvirt.open(uri)
        ...
    # every domain destroyed and undefined, the daemon and its qemu gone, the tree removed

Needs root, ``libvirtd`` (libvirt-daemon, libvirt-daemon-driver-qemu), ``qemu-system-x86_64``
(qemu-system-x86) and the user ``libvirt-qemu`` (libvirt-daemon-system: libvirtd resolves that
compiled-in default before it reads qemu.conf), all installed by dev/bootstrap.sh; without them
the test is skipped. Here the daemon answers ~0.07 s after the start, its first domain start
takes ~0.8 s (probing qemu's capabilities ~0.6 s of it; ``cache_dir``, an existing directory
such as one from ``tmp_path_factory``, lets later daemons reuse the probe: ~0.25 s) and a
``destroy()`` ~0.2 s. The daemon is pinned to one CPU: libvirt throws its capabilities cache
away when the host CPUID differs from the one recorded ("host cpuid changed"), which on this VM
depends on the CPU it runs on, and unpinned the probe took ~3.7 s.

A small reaper process (a child subreaper) is the daemon's parent: qemu daemonizes, and when
it exits it must be reaped at once, or ``destroy()`` waits (~2 s here, where PID 1 reaps late)
for the zombie to go.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt
import pytest

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
EMULATOR = "/usr/bin/qemu-system-x86_64"

# The daemon's parent: a child subreaper that reaps every orphan (the daemonized qemu) at once,
# pins the daemon to one CPU, passes SIGTERM on to it, gets a SIGTERM itself when the test
# process dies (PR_SET_PDEATHSIG) and exits with the daemon's status when the daemon has gone.
_REAPER = r"""
import ctypes, os, signal, sys
prctl = ctypes.CDLL(None, use_errno=True).prctl
prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the test process is gone already
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # the daemon and its qemu: one CPU
child = os.fork()
if child == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGTERM))
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(1)
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status))
"""

_tracked: dict[str, set[str]] = {}  # URI of a running_libvirtd() -> the domains to remove


def _skip_unless_usable() -> str:
    """The path of libvirtd, or skip the test saying what is missing."""
    if os.geteuid() != 0:
        pytest.skip("a real libvirtd needs root")
    daemon = shutil.which("libvirtd") or shutil.which("libvirtd", path="/usr/sbin:/sbin")
    if daemon is None:
        pytest.skip("libvirtd is not installed (dev/bootstrap.sh installs libvirt-daemon)")
    if not Path(EMULATOR).exists():
        pytest.skip(f"no {EMULATOR} (dev/bootstrap.sh installs qemu-system-x86)")
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (util-linux, mount)")
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        pytest.skip("no user libvirt-qemu (dev/bootstrap.sh installs libvirt-daemon-system)")
    return daemon


def _write_config(etc: Path, sock_dir: Path, log: Path) -> Path:
    """libvirtd.conf (returned) and qemu.conf in ``etc``, the daemon's /etc/libvirt."""
    conf = etc / "libvirtd.conf"
    conf.write_text(
        f'unix_sock_dir = "{sock_dir}"\n'
        'unix_sock_ro_perms = "0700"\n'
        'unix_sock_rw_perms = "0700"\n'
        'unix_sock_admin_perms = "0700"\n'
        'auth_unix_ro = "none"\n'
        'auth_unix_rw = "none"\n'
        f'log_outputs = "3:file:{log}"\n'
    )
    (etc / "qemu.conf").write_text(
        'user = "root"\n'
        'group = "root"\n'
        "dynamic_ownership = 0\n"
        "remember_owner = 0\n"
        'security_driver = "none"\n'
        'stdio_handler = "file"\n'
        "cgroup_controllers = [ ]\n"
    )
    return conf


@contextlib.contextmanager
def running_libvirtd(
    *, log_file: Path | None = None, cache_dir: Path | None = None
) -> Iterator[str]:
    """Start a private libvirtd; yield its URI ``qemu:///system?socket=DIR/libvirt-sock``.

    At the end every domain of the daemon (tracked ones first: see ``track``) is destroyed and
    undefined, the daemon is stopped and its temporary tree removed. ``log_file``: where the
    daemon logs its warnings and errors (default: in the tree, removed with it). ``cache_dir``:
    an existing directory to serve as /var/cache/libvirt, kept (default: in the tree).
    Skips the test unless root with libvirtd, qemu-system-x86_64 and user libvirt-qemu.
    """
    daemon = _skip_unless_usable()
    root = Path(tempfile.mkdtemp(prefix="ic-lv-"))  # short: a socket path has 107 bytes at most
    proc: subprocess.Popen[bytes] | None = None
    uri = ""
    try:
        binds = {
            "/etc/libvirt": root / "etc",
            "/run": root / "run",
            "/var/lib/libvirt": root / "lib",
            "/var/log/libvirt": root / "log",
            "/var/cache/libvirt": cache_dir if cache_dir is not None else root / "cache",
        }
        for source in binds.values():
            source.mkdir(exist_ok=True)
        (root / "log" / "qemu").mkdir()  # the domains' logs; qemu fails to start without it
        (root / "run" / "libvirt").mkdir()
        sock_dir = root / "sock"
        sock_dir.mkdir()
        log = log_file if log_file is not None else root / "libvirtd.log"
        conf = _write_config(root / "etc", sock_dir, log)
        script = "set -e\n" + "".join(
            f"mount --bind {shlex.quote(str(source))} {target}\n"
            for target, source in binds.items()
        )
        script += f"exec {shlex.quote(daemon)} -f {shlex.quote(str(conf))} -p /run/libvirtd.pid\n"
        unshare = ["unshare", "--mount", "--propagation", "private"]
        with (root / "libvirtd.out").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", _REAPER, str(os.getpid()), *unshare, "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # ^C in the test must not stop it before the clean-up
            )
        uri = f"qemu:///system?socket={sock_dir / 'libvirt-sock'}"
        _wait_until_answers(uri, proc, root, log)
        _tracked[uri] = set()
        yield uri
    finally:
        try:
            if uri in _tracked and proc is not None and proc.poll() is None:
                _remove_domains(uri)
        finally:
            _tracked.pop(uri, None)
            if proc is not None:
                _stop(proc)
            _kill_leftover_qemu(root / "run" / "libvirt" / "qemu")
            shutil.rmtree(root, ignore_errors=True)


def _wait_until_answers(uri: str, proc: subprocess.Popen[bytes], root: Path, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    sock = root / "sock" / "libvirt-sock"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"libvirtd exited with {proc.returncode}:\n{_tail(root, log)}")
        if sock.exists():
            with contextlib.suppress(libvirt.libvirtError):
                libvirt.open(uri).close()
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"libvirtd did not answer in {START_TIMEOUT} s:\n{_tail(root, log)}")
        time.sleep(0.02)


def _tail(root: Path, log: Path) -> str:
    text = ""
    for path in (root / "libvirtd.out", log):
        with contextlib.suppress(OSError):
            text += f"--- {path}\n{path.read_text(errors='replace')[-4000:]}"
    return text


def track(uri: str, name: str) -> None:
    """Have ``running_libvirtd(uri)`` destroy and undefine domain ``name`` first at the end.

    It removes every other domain of its daemon after those anyway, and a domain that does not
    go fails the test. ``define_tcg_domain`` tracks what it defines. KeyError unless ``uri`` is
    that of a running ``running_libvirtd``.
    """
    _tracked[uri].add(name)


def _remove_domains(uri: str) -> None:
    conn = libvirt.open(uri)
    try:
        tracked = sorted(_tracked[uri])
        others = sorted(d.name() for d in conn.listAllDomains() if d.name() not in tracked)
        for name in tracked + others:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError:
                continue  # undefined by the test already
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                )
    finally:
        conn.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the reaper passes it on to libvirtd
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kill_leftover_qemu(state_dir: Path) -> None:
    """Kill the qemu processes this daemon left running (only if it died before the clean-up)."""
    for pidfile in state_dir.glob("*.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0] == EMULATOR.encode() and f"guest={pidfile.stem}".encode() in argv[2]:
                os.kill(pid, signal.SIGKILL)


def domain_xml(name: str, disk_path: Path | str) -> str:
    """A minimal TCG guest: x86_64 ``pc``, 64 MiB, one virtio qcow2 disk; no network, no
    graphics, no USB, no balloon. With no bootable disk SeaBIOS idles (~0 % CPU)."""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{EMULATOR}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={quoteattr(str(disk_path))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def define_tcg_domain(uri: str, name: str, disk_path: Path | str, *, start: bool) -> None:
    """Define ``domain_xml(name, disk_path)`` on ``uri`` and, with ``start``, start it.

    Returns once it is defined (and running). On a ``running_libvirtd`` URI it is tracked.
    """
    conn = libvirt.open(uri)
    try:
        dom = conn.defineXML(domain_xml(name, disk_path))
        if uri in _tracked:
            track(uri, name)
        if start:
            dom.create()
    finally:
        conn.close()

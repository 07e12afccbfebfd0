"""Coordination through tooz against the real backends: a file directory, Redis and etcd.

The Redis and the etcd are real servers the suite starts on free ports of 127.0.0.1
(tests/services.py), with ``?timeout=2``: the lock TTL and the member expiry are 2 s. Hosts are
``Coordination`` objects in this process, or in a child process where a host must die (SIGKILL)
or freeze (SIGSTOP) for real: POSIX record locks never conflict within one process, and a killed
process is the only honest way to stop heartbeats.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imagecache import coordination
from imagecache.coordination import (
    ERRORS,
    INSTALL_HINT,
    Coordination,
    CoordinationError,
    default_url,
)
from imagecache.errors import ObservationError
from tests.services import TIMEOUT, Service, free_port, running_etcd, running_redis

# Fixtures from tests/services.py (a plugin of tests/conftest.py): coordination_url (file, redis,
# etcd), unique_storage.

# A host in a child process. Commands on stdin, one answer line each; it never leaves by itself
# (end of input: it exits without leaving, like a crash).
_HOST = r"""
import sys
from imagecache.coordination import Coordination
url, storage, member, mode, timeout = sys.argv[1:6]
host = Coordination(url, member=member, storage=storage, timeout=float(timeout)).__enter__()
if mode == "lead":
    assert host.lead(), "the child could not lead"
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "leading":
        print(host.leading(), host.problem.reason if host.problem else "-", flush=True)
    elif line.strip() == "members":
        print(",".join(sorted(host.members())), flush=True)
"""


class Child:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)


@contextmanager
def child_host(
    url: str, storage: str, member: str, *, lead: bool, timeout: float = 5.0
) -> Iterator[Child]:
    mode = "lead" if lead else "join"
    args = [sys.executable, "-c", _HOST, url, storage, member, mode, str(timeout)]
    with subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line != "ready\n":
                proc.kill()
                assert proc.stderr is not None
                pytest.fail(f"child host did not start: {line!r}\n{proc.stderr.read()}")
            yield Child(proc)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait(timeout=30)


def _wait_for(predicate: object, *, limit: float, step: float = 0.05) -> float:
    """Seconds until ``predicate()`` is true; fails after ``limit`` seconds."""
    assert callable(predicate)
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > limit:
            pytest.fail(f"not true after {limit} s")
        time.sleep(step)
    return time.monotonic() - start


def _scheme(url: str) -> str:
    return url.partition(":")[0]


# -- two hosts ------------------------------------------------------------------------------------


def test_two_hosts_see_each_other(coordination_url: str, unique_storage: str) -> None:
    a = Coordination(coordination_url, member="host-a", storage=unique_storage)
    b = Coordination(coordination_url, member="host-b", storage=unique_storage)
    with a, b:
        assert a.members() == b.members() == {"host-a", "host-b"}
        assert a.group == f"imagecache-{unique_storage}"
    with b:  # a left when it was done: at once, not after the TTL
        assert b.members() == {"host-b"}


def test_one_leads_at_a_time_and_the_other_after_release(
    coordination_url: str, unique_storage: str
) -> None:
    a = Coordination(coordination_url, member="host-a", storage=unique_storage)
    b = Coordination(coordination_url, member="host-b", storage=unique_storage)
    with a, b:
        assert not a.leading()
        assert a.lead()
        assert a.lead()  # still ours
        assert not b.lead()
        start = time.monotonic()
        assert not b.lead(wait=0.5)  # polls, and says no (etcd's RetryError stays inside)
        assert 0.5 <= time.monotonic() - start < 2.0
        assert a.leading()
        assert not b.leading()
        a.release()
        assert not a.leading()
        assert b.lead()
        assert not a.lead()
        assert b.leading()
    with Coordination(coordination_url, member="host-c", storage=unique_storage) as c:
        assert c.lead()  # leaving released b's lock


def test_storages_have_their_own_lock(coordination_url: str, unique_storage: str) -> None:
    a = Coordination(coordination_url, member="host-a", storage=unique_storage)
    b = Coordination(coordination_url, member="host-a", storage=unique_storage + "-2")
    with a, b:
        assert a.lead()
        assert b.lead()
        assert a.members() == b.members() == {"host-a"}


def test_member_ids_are_bytes_in_tooz_and_any_host_name_here(
    coordination_url: str, unique_storage: str
) -> None:
    names = {"compute-1.example.org", "hôte-ü", "raw-\udcff-name"}  # the last: non-UTF-8 bytes
    hosts = [Coordination(coordination_url, member=n, storage=unique_storage) for n in names]
    with hosts[0], hosts[1], hosts[2]:
        assert hosts[0].members() == names


def test_a_coordination_is_entered_again_after_it_left(
    coordination_url: str, unique_storage: str
) -> None:
    a = Coordination(coordination_url, member="host-a", storage=unique_storage)
    with a:
        assert a.lead()
        with pytest.raises(CoordinationError) as raised:
            a.__enter__()
        assert raised.value.reason == "in-use"
    assert not a.leading()
    with pytest.raises(CoordinationError) as raised:
        a.members()
    assert raised.value.reason == "not-entered"
    with a:
        assert a.members() == {"host-a"}
        assert a.lead()


# -- hosts that die or freeze -------------------------------------------------------------------


def test_a_killed_host_frees_the_lock_and_leaves_the_group_after_the_ttl(
    coordination_url: str, unique_storage: str
) -> None:
    with (
        Coordination(coordination_url, member="host-a", storage=unique_storage) as a,
        child_host(coordination_url, unique_storage, "host-dead", lead=True) as child,
    ):
        assert a.members() == {"host-a", "host-dead"}
        assert not a.lead()
        child.signal(signal.SIGKILL)
        child.proc.wait()
        took = _wait_for(a.lead, limit=TIMEOUT + 3)
        if _scheme(coordination_url) == "file":
            assert took < 0.5  # a POSIX lock goes with its process
        else:
            assert took <= TIMEOUT + 1.5  # the lock's TTL since the last beat
        gone = _wait_for(lambda: a.members() == {"host-a"}, limit=TIMEOUT + 3)
        assert gone <= TIMEOUT + 2
        assert a.leading()


def test_without_a_timeout_in_the_url_ours_is_the_ttl(
    redis_service: Service, unique_storage: str
) -> None:
    url = f"redis://{redis_service.host}:{redis_service.port}"  # tooz alone: 30 s
    with (
        Coordination(url, member="host-a", storage=unique_storage, timeout=1) as a,
        child_host(url, unique_storage, "host-dead", lead=True, timeout=1) as child,
    ):
        assert not a.lead()
        child.signal(signal.SIGKILL)
        child.proc.wait()
        assert _wait_for(a.lead, limit=4) < 1.5


def test_a_frozen_cleaner_loses_the_lock_and_knows_it(
    coordination_url: str, unique_storage: str
) -> None:
    """SIGSTOP: a VM paused, a host cut off. Redis and etcd expire its lock; a file lock stays."""
    with (
        Coordination(coordination_url, member="host-a", storage=unique_storage) as a,
        child_host(coordination_url, unique_storage, "host-frozen", lead=True) as child,
    ):
        assert child.ask("leading") == "True -"
        child.signal(signal.SIGSTOP)
        if _scheme(coordination_url) == "file":
            assert not a.lead(wait=1.0)  # a POSIX lock never expires
            child.signal(signal.SIGCONT)
            assert child.ask("leading") == "True -"
            return
        assert a.lead(wait=TIMEOUT + 2)
        child.signal(signal.SIGCONT)
        assert child.ask("leading") == "False lock-lost"
        assert child.ask("leading") == "False lock-lost"  # until it leads again
        assert a.leading()
        # Its membership expired too; asking for the members joins it again.
        assert child.ask("members") == "host-a,host-frozen"
        assert a.members() == {"host-a", "host-frozen"}


# -- a backend that is down -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["redis", "etcd"])
def test_a_backend_that_goes_down_stops_the_cleaner_and_raises_only_ours(
    backend: str, unique_storage: str
) -> None:
    running = running_redis if backend == "redis" else running_etcd
    with running() as service:
        a = Coordination(service.url, member="host-a", storage=unique_storage, timeout=3)
        with a:
            assert a.lead()
            service.stop()
            start = time.monotonic()
            assert not a.leading()
            assert a.problem is not None
            assert a.problem.reason == "backend-unavailable"
            with pytest.raises(CoordinationError) as raised:
                a.members()
            assert raised.value.reason == "backend-unavailable"
            assert isinstance(raised.value, ObservationError)
            with pytest.raises(CoordinationError) as raised:
                a.lead()
            assert raised.value.reason == "backend-unavailable"
            assert time.monotonic() - start < 3
        assert time.monotonic() - start < 6  # leaving did not hang on the heartbeat


@pytest.mark.parametrize("scheme", ["redis", "etcd3+http"])
def test_a_backend_nobody_listens_on(scheme: str, unique_storage: str) -> None:
    url = f"{scheme}://127.0.0.1:{free_port()}?timeout=1"
    start = time.monotonic()
    with pytest.raises(CoordinationError) as raised:
        Coordination(url, member="host-a", storage=unique_storage).__enter__()
    assert raised.value.reason == "backend-unavailable"
    assert "127.0.0.1" in str(raised.value)
    assert time.monotonic() - start < 5


# -- configuration errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "",
        "127.0.0.1:6379",
        "nosuch://127.0.0.1",
        "redis://127.0.0.1:notaport",
        "redis://127.0.0.1:1?timeout=soon",
        "file://relative/dir",
        "file:///",
    ],
)
def test_bad_urls(url: str, tmp_path: Path) -> None:
    with pytest.raises(CoordinationError) as raised:
        Coordination(url, member="host-a", storage="s").__enter__()
    assert raised.value.reason == "bad-url", raised.value


def test_the_password_of_a_url_stays_out_of_messages() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}?timeout=1"
    with pytest.raises(CoordinationError) as raised:
        Coordination(url, member="host-a", storage="s").__enter__()
    assert "s3cret" not in str(raised.value)
    assert ":***@127.0.0.1" in str(raised.value)


def test_bad_arguments() -> None:
    for kwargs, reason in [
        ({"member": "", "storage": "s"}, "bad-member"),
        ({"member": "h", "storage": ""}, "bad-storage"),
        ({"member": "h", "storage": "s", "timeout": float("nan")}, "bad-timeout"),
        ({"member": "h", "storage": "s", "timeout": 0}, "bad-timeout"),
    ]:
        with pytest.raises(CoordinationError) as raised:
            Coordination("file:///x", **kwargs)  # type: ignore[arg-type]
        assert raised.value.reason == reason


def test_a_driver_whose_client_is_missing() -> None:
    with pytest.raises(CoordinationError) as raised:
        Coordination("zookeeper://127.0.0.1:1", member="h", storage="s").__enter__()
    assert raised.value.reason == "not-installed"
    assert "kazoo" in str(raised.value)


def test_without_tooz_the_message_says_what_to_install() -> None:
    hide = (
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.partition('.')[0] in ('tooz', 'redis', 'etcd3gw'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from imagecache.coordination import Coordination, CoordinationError\n"
        "try:\n"
        "    Coordination('redis://127.0.0.1:1', member='h', storage='s').__enter__()\n"
        "except CoordinationError as e:\n"
        "    print(e.reason); print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", hide], check=True, capture_output=True, text=True, timeout=60
    )
    reason, message = done.stdout.splitlines()
    assert reason == "not-installed"
    assert INSTALL_HINT in message
    assert INSTALL_HINT == "pip install 'imagecache[coordination]'"


# -- the file backend on the shared storage -------------------------------------------------------


def test_default_url_is_in_the_caches_state_directory() -> None:
    assert default_url("/srv/nfs/_base") == "file:///srv/nfs/_base/.imagecache/coordination"
    assert default_url("/srv/nfs/_base/") == "file:///srv/nfs/_base/.imagecache/coordination"
    for bad in ("relative/_base", "/srv/a?b", "/srv/a#b"):
        with pytest.raises(CoordinationError) as raised:
            default_url(bad)
        assert raised.value.reason == "bad-url"


def test_default_url_creates_a_private_directory_in_the_state_directory(tmp_path: Path) -> None:
    cache = tmp_path / "_base"
    (cache / ".imagecache").mkdir(parents=True)
    with Coordination(default_url(str(cache)), member="host-a", storage="s") as a:
        assert a.lead()
        assert a.members() == {"host-a"}
    made = cache / ".imagecache" / "coordination"
    for directory in (made, made / "groups", made / "tmp"):
        assert directory.is_dir()
        assert directory.stat().st_mode & 0o777 == 0o700
    assert (made / "imagecache-clean-s").is_file()  # the lock file


def test_an_unmounted_share_is_not_replaced_by_a_local_directory(tmp_path: Path) -> None:
    cache = tmp_path / "_base"  # no .imagecache: the share is not there
    with pytest.raises(CoordinationError) as raised:
        Coordination(default_url(str(cache)), member="h", storage="s").__enter__()
    assert raised.value.reason == "backend-unavailable"
    assert "mounted" in str(raised.value)
    assert not cache.exists()


@pytest.mark.parametrize("link", ["coordination", ".imagecache", "coordination/groups"])
def test_symlinks_are_refused(tmp_path: Path, link: str) -> None:
    cache = tmp_path / "_base"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state = cache / ".imagecache"
    if link == ".imagecache":
        cache.mkdir()
        state.symlink_to(elsewhere)
    elif link == "coordination":
        state.mkdir(parents=True)
        (state / "coordination").symlink_to(elsewhere)
    else:
        (state / "coordination").mkdir(parents=True)
        (state / "coordination" / "groups").symlink_to(elsewhere)
    with pytest.raises(CoordinationError) as raised:
        Coordination(default_url(str(cache)), member="h", storage="s").__enter__()
    assert raised.value.reason == "unsafe-path"
    assert list(elsewhere.iterdir()) == []


def test_a_removed_lock_file_is_a_lost_lock(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'coordination'}"
    a = Coordination(url, member="host-a", storage="s")
    b = Coordination(url, member="host-b", storage="s")
    with a, b:
        assert a.lead()
        (tmp_path / "coordination" / a.lock_name).unlink()  # a new file would lock anew
        assert not a.leading()
        assert a.problem is not None
        assert a.problem.reason == "lock-lost"
        assert b.lead()
        assert not a.lead()


def test_a_storage_id_that_is_no_safe_name_is_hashed(tmp_path: Path) -> None:
    path = "/var/lib/nova/instances/_base"
    a = Coordination("file:///x", member="h", storage=path)
    assert a.storage.startswith("sha256-")
    assert a.storage == Coordination("redis://h", member="g", storage=path).storage
    assert a.group == f"imagecache-{a.storage}"
    assert a.lock_name == f"imagecache-clean-{a.storage}"
    assert Coordination("file:///x", member="h", storage="nfs-1.base").storage == "nfs-1.base"
    directory = tmp_path / "coordination"
    with Coordination(f"file://{directory}", member="h", storage=path) as c:
        assert c.lead()  # a storage with '/' would have named a file in a missing directory
    assert (directory / a.lock_name).is_file()


# -- the error table ------------------------------------------------------------------------------


def test_the_error_table() -> None:
    import redis.exceptions
    import tenacity
    import tooz
    import tooz.coordination

    reasons = {reason for reason, _ in ERRORS.values()}
    assert reasons == {
        "not-installed", "bad-url", "timeout", "backend-unavailable", "no-group",
        "unsupported", "backend-error",
    }  # fmt: skip
    for name in ERRORS:
        module, _, qualname = name.rpartition(".")
        cls = getattr(__import__(module, fromlist=[qualname]), qualname)
        assert issubclass(cls, BaseException), name
    retry_error = tenacity.RetryError(last_attempt=None)  # type: ignore[arg-type]
    cases: list[tuple[BaseException, str]] = [
        (tooz.coordination.ToozConnectionError("down"), "backend-unavailable"),
        (tooz.coordination.OperationTimedOut("slow"), "timeout"),
        (retry_error, "timeout"),  # etcd3gw's lock
        (TimeoutError(), "timeout"),  # not OSError's
        (ConnectionRefusedError(), "backend-unavailable"),
        (redis.exceptions.ConnectionError(), "backend-unavailable"),
        (redis.exceptions.TimeoutError(), "timeout"),
        (tooz.NotImplemented("no"), "unsupported"),
        (tooz.ToozError("?"), "backend-error"),
        (KeyError("x"), "backend-error"),
    ]
    for exc, reason in cases:
        assert coordination._reason_of(exc)[0] == reason, exc

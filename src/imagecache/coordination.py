"""Hosts that share one cache coordinate through tooz: who is there, and who cleans (issue 12).

Many compute hosts may share one ``_base`` on NFS or CephFS. Each of them touches the entries
its guests use and writes its own manifest, every pass; that needs no coordination. Removing
entries does: one host at a time per storage, the *cleaner*, holds a distributed lock while it
removes, and every host is a member of that storage's group while its pass runs, kept alive by
heartbeats (between passes a host's manifest, younger than ``peer_stale_seconds``, says it is
alive: :mod:`imagecache.usage`). :class:`Coordination` is that membership and that lock, over
any tooz backend (``[imagecache] coordination_url``):

- ``file://DIR`` (the default, :func:`default_url`: ``<cache_dir>/.imagecache/coordination`` on
  the shared storage itself): the lock is a POSIX record lock on a file there, as good as the
  filesystem's locking (NFSv4, CephFS: yes) and freed at once when its process dies; a member
  is alive while its file's mtime is younger than ``timeout`` (below), so the hosts' clocks must
  agree with the file server's;
- ``redis://``, ``etcd3+http(s)://``, ``zookeeper://`` (kazoo, not in the extra): for real
  deployments; the lock and each membership expire after ``timeout`` seconds without a
  heartbeat (the URL's ``?timeout=``, else :class:`Coordination`'s, 10 s; tooz's own default
  would be 30 s), so a host that died or was cut off frees the lock after that long.

Usage, one per pass or one per daemon for all its passes::

    with Coordination(url, member=host, storage=storage_id) as coord:
        if coord.lead(wait=0.0):
            for entry in doomed:
                if not coord.leading():  # lock lost, backend gone: stop removing, keep touching
                    break
                remove(entry)

The entry locks stay Nova's file locks (:mod:`imagecache.locks`); this lock only decides which
host removes. Heartbeats run in a thread of ours, not tooz's ``Heart``: tooz's retries a failing
heartbeat forever and its ``stop()`` then waits for it forever (a backend that is down would hang
the end of every pass). :meth:`Coordination.leading` also beats and asks the backend whether the
lock is still ours, where the driver can tell: a cleaner calls it before each removal.

Around tooz, besides: redis-py 6+ retries a refused connection by itself (with a backoff) inside
each of tooz's 15 tries, a minute per call to a Redis that is down, so its clients are made
without; tooz's thread-pool executor costs a second at every stop, so the URL gets the
synchronous one unless it names another; the cleaner lock polls non-blocking attempts (etcd's
blocking one raises tenacity.RetryError); and on file:// the cleaner lock is ours
(:mod:`imagecache.locks`), not tooz's, whose stray descriptors could drop it.

tooz is optional (``pip install 'imagecache[coordination]'``) and imported only when a
:class:`Coordination` is entered. Every failure of tooz, its drivers and their clients leaves a
public method as a :class:`CoordinationError` with a stable ``reason`` (:data:`ERRORS`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import re
import stat
import threading
import time
import urllib.parse
from types import TracebackType
from typing import Any

from imagecache.errors import ObservationError
from imagecache.layout import STATE_DIR

__all__ = [
    "COORDINATION_DIR",
    "ERRORS",
    "INSTALL_HINT",
    "Coordination",
    "CoordinationError",
    "default_url",
    "redact",
]

LOG = logging.getLogger(__name__)

COORDINATION_DIR = "coordination"  # <cache_dir>/.imagecache/coordination: the file:// default
INSTALL_HINT = "pip install 'imagecache[coordination]'"
_POLL = 0.25  # s between two non-blocking lock attempts in lead(wait=...)
_RETRY_BEAT = 1.0  # s between two heartbeats while they fail
_SAFE_STORAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CoordinationError(ObservationError):
    """The coordination backend cannot be used; ``reason`` says why, in stable kebab-case.

    Reasons: those of :data:`ERRORS`, and ``bad-member``, ``bad-storage``, ``bad-timeout`` (a
    wrong argument), ``unsafe-path`` (the file backend's directory is a symlink or no directory),
    ``in-use`` (entered twice), ``lock-lost`` (set as :attr:`Coordination.problem` when
    :meth:`Coordination.leading` finds the lock gone).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# The one table of foreign errors: "module.QualName" of an exception class -> (reason, message
# prefix). An exception takes the entry of the first class of its MRO found here, so a subclass
# listed before its base is not needed. Names, not classes: tooz and its clients are imported only
# when used. etcd3gw's lock raises tenacity.RetryError when a blocking acquire times out (tooz
# retries a TryAgain with tenacity); we never block in tooz, but it stays mapped.
_UNREACHABLE = "cannot reach the coordination backend"
_SILENT = "the coordination backend did not answer in time"
_FAILED = "the coordination backend failed"
ERRORS: dict[str, tuple[str, str]] = {
    "builtins.ImportError": ("not-installed", f"a coordination package is missing: {INSTALL_HINT}"),
    "stevedore.exception.NoMatches": ("bad-url", "no coordination driver for this URL"),
    "tooz.coordination.ToozDriverChosenPoorly": ("bad-url", "the coordination driver cannot do it"),
    "builtins.ValueError": ("bad-url", "the coordination URL or one of its options is invalid"),
    "tenacity.RetryError": ("timeout", "the coordination lock was not obtained in time"),
    "tooz.coordination.OperationTimedOut": ("timeout", _SILENT),
    "builtins.TimeoutError": ("timeout", _SILENT),  # also concurrent.futures.TimeoutError
    "redis.exceptions.TimeoutError": ("timeout", _SILENT),
    "etcd3gw.exceptions.ConnectionTimeoutError": ("timeout", _SILENT),
    "tooz.coordination.ToozConnectionError": ("backend-unavailable", _UNREACHABLE),
    "redis.exceptions.ConnectionError": ("backend-unavailable", _UNREACHABLE),
    "etcd3gw.exceptions.ConnectionFailedError": ("backend-unavailable", _UNREACHABLE),
    "builtins.OSError": ("backend-unavailable", "the coordination directory cannot be used"),
    "tooz.coordination.GroupNotCreated": ("no-group", "the group is gone from the backend"),
    "tooz.NotImplemented": ("unsupported", "the coordination driver cannot do this"),
    "tooz.ToozError": ("backend-error", _FAILED),
    "redis.exceptions.RedisError": ("backend-error", _FAILED),
    "etcd3gw.exceptions.Etcd3Exception": ("backend-error", _FAILED),
}
_UNKNOWN = ("backend-error", _FAILED)


def _reason_of(exc: BaseException) -> tuple[str, str]:
    for cls in type(exc).__mro__:
        found = ERRORS.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None:
            return found
    return _UNKNOWN


def _detail(exc: BaseException) -> str:
    """What went wrong, in words: tooz often wraps its client's error with an empty message."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            break
        text = str(seen) or str(getattr(seen, "detail_text", None) or "")
        if text:
            return text if seen is exc else f"{type(exc).__name__}: {text}"
        seen = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__
    return type(exc).__name__


# Query parameters that carry a secret (tooz's redis ``sentinel_password``, a ``password=``).
_SECRET_KEY = re.compile(r"(?i)pass|secret|token|key|auth|cred")


def redact(url: str) -> str:
    """``url`` without its secrets: the password of its user part (``redis://:secret@host`` ->
    ``redis://:***@host``) and every query value whose name says it is one
    (``?sentinel_password=x`` -> ``?sentinel_password=***``)."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is not None:
            netloc = parts.netloc.rpartition("@")
            user = netloc[0].partition(":")[0]
            parts = parts._replace(netloc=f"{user}:***@{netloc[2]}")
        if parts.query:
            pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            hidden = [(k, "***" if _SECRET_KEY.search(k) else v) for k, v in pairs]
            parts = parts._replace(query=urllib.parse.urlencode(hidden, safe="*"))
        return urllib.parse.urlunsplit(parts)
    except ValueError:
        return "<unparsable URL>"


def default_url(cache_dir: str) -> str:
    """``file://<cache_dir>/.imagecache/coordination``: coordination on the shared storage itself.

    Raises:
        CoordinationError: ``bad-url``: ``cache_dir`` is not absolute or holds a character a URL
            cannot carry here (tooz does not unquote: ``?``, ``#``, NUL, a newline).
    """
    if not os.path.isabs(cache_dir) or any(c in cache_dir for c in "?#\0\n\r"):
        raise CoordinationError(
            f"no file:// coordination URL for the cache directory {cache_dir!r}: it must be "
            "absolute, without '?', '#' or control characters; set coordination_url",
            reason="bad-url",
        )
    return "file://" + os.path.join(os.path.normpath(cache_dir), STATE_DIR, COORDINATION_DIR)


def _storage_token(storage: str) -> str:
    """``storage`` itself if it is a short safe name, else ``sha256-`` and 32 hex digits of it.

    The token names a file of the file backend and a key elsewhere: no ``/``, no surprises.
    """
    if _SAFE_STORAGE.fullmatch(storage):
        return storage
    digest = hashlib.sha256(storage.encode("utf-8", "surrogateescape")).hexdigest()
    return f"sha256-{digest[:32]}"


def _decode(member: bytes | str) -> str:
    return member if isinstance(member, str) else member.decode("utf-8", "surrogateescape")


def _real_dir(path: str, *, create: bool) -> None:
    """``path`` is a real directory (not a symlink); created with mode 0700 if missing.

    Only the last component is created: a missing parent (the shared storage not mounted) is an
    error, never a local directory that would make this host coordinate with itself alone.
    """
    for _ in range(2):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue  # someone else made it: look again
            except FileNotFoundError as exc:
                raise CoordinationError(
                    f"cannot reach the coordination backend: the parent of {path} is missing "
                    "(is the shared storage mounted?)",
                    reason="backend-unavailable",
                ) from exc
            continue
        if stat.S_ISLNK(st.st_mode):
            raise CoordinationError(
                f"the coordination directory {path} is a symbolic link; refused",
                reason="unsafe-path",
            )
        if not stat.S_ISDIR(st.st_mode):
            raise CoordinationError(
                f"the coordination directory {path} is not a directory", reason="unsafe-path"
            )
        return
    raise CoordinationError(f"{path} keeps changing", reason="unsafe-path")  # pragma: no cover


def _without_client_retries(coord: Any) -> None:
    """Have tooz's redis driver make clients that do not retry by themselves.

    redis-py 6 and later retry a failed connection themselves (8.x: 10 times, with a backoff of
    up to a second), and tooz tries each call 15 times on a connection error: a Redis that is
    down cost a minute per call here. tooz's quick retries stay. Other drivers: nothing to do.
    """
    make = getattr(coord, "_make_client", None)
    if make is None or not callable(make):
        return

    def no_retries(client: Any) -> None:
        get_retry = getattr(client, "get_retry", None)
        retry = get_retry() if callable(get_retry) else None
        if retry is not None and callable(getattr(retry, "update_retries", None)):
            retry = copy.deepcopy(retry)
            retry.update_retries(0)
            client.set_retry(retry)

    def make_client(*args: Any, **kwargs: Any) -> Any:
        client = make(*args, **kwargs)
        no_retries(client)
        # With ?sentinel=: the Sentinels' own clients retry too, and each answer "no master"
        # is a connection error that tooz tries 15 times (a minute to a Sentinel that is down).
        pool = getattr(client, "connection_pool", None)
        for sentinel in getattr(getattr(pool, "sentinel_manager", None), "sentinels", ()) or ():
            no_retries(sentinel)
        return client

    coord._make_client = make_client


def _clients_of(coord: Any) -> list[Any]:
    """What tooz's drivers leave open when they stop: etcd3gw's requests session, redis-py's
    client (its connection pool). Their sockets would linger until collected (and warn)."""
    found = []
    for client in (
        getattr(getattr(coord, "client", None), "session", None),
        getattr(coord, "_client", None),
    ):
        if client is not None and callable(getattr(client, "close", None)):
            found.append(client)
    return found


_URL_TIMEOUTS = ("timeout", "lock_timeout", "membership_timeout", "heartbeat_timeout")


def _check_url_timeouts(url: str) -> None:
    """The URL's timeouts are whole seconds from 1 to a day: tooz's drivers take them as TTLs,
    and a zero or negative one made the heart beat in a busy loop (or never expire)."""
    try:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query, keep_blank_values=True)
    except ValueError as exc:
        raise CoordinationError(f"not a URL: {redact(url)!r}", reason="bad-url") from exc
    for key in _URL_TIMEOUTS:
        for value in query.get(key, ()):
            if not (value.isdigit() and 1 <= int(value) <= 86400):
                raise CoordinationError(
                    f"{key}={value!r} in {redact(url)!r}: must be whole seconds from 1 to 86400",
                    reason="bad-url",
                )


class Coordination:
    """Membership of the group of one shared storage, and its cleaner lock, over tooz.

    ``url``: a tooz backend URL; ``member``: this host's id in the group (its host name);
    ``storage``: a stable id of the shared storage, the same on every host (the group is
    ``imagecache-<storage>``, the lock ``imagecache-clean-<storage>``; an id that is not a short
    safe name is replaced by a hash of it); ``timeout``: tooz's ``timeout`` unless the URL has
    one (whole seconds: the socket timeout, and the TTL of the lock and of the membership, after
    which a host that died or was cut off is gone), and how long leaving waits for the heartbeat
    thread (and each call for the backend, with ``executor=threaded`` in the URL).

    A context manager: entering connects, creates the group if missing and joins it, and starts
    heartbeats; leaving releases the lock, leaves and disconnects, and never raises. It may be
    entered again after it was left. Public methods raise only :class:`CoordinationError`.
    """

    def __init__(self, url: str, *, member: str, storage: str, timeout: float = 10.0) -> None:
        if not isinstance(url, str) or not re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", url):
            raise CoordinationError(
                f"not a coordination URL (scheme://...): {redact(str(url))!r}", reason="bad-url"
            )
        if not isinstance(member, str) or not member or "\0" in member:
            raise CoordinationError(f"bad member id {member!r}", reason="bad-member")
        if not isinstance(storage, str) or not storage:
            raise CoordinationError(f"bad storage id {storage!r}", reason="bad-storage")
        if not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0:
            raise CoordinationError(f"bad timeout {timeout!r}", reason="bad-timeout")
        self.url = url
        self.member = member
        self.storage = _storage_token(storage)
        self.group = f"imagecache-{self.storage}"
        self.lock_name = f"imagecache-clean-{self.storage}"
        self.timeout = float(timeout)
        self.problem: CoordinationError | None = None  # why leading() last said False
        self._where = redact(url)
        self._member_id = member.encode("utf-8", "surrogateescape")
        self._group_id = self.group.encode()
        self._coord: Any = None
        self._lock: Any = None
        self._file_dir: str | None = None  # file://: the directory
        self._file_hold: tuple[contextlib.ExitStack, int, str] | None = None  # file://: the lock
        self._leading = False
        self._io = threading.RLock()  # one call into the driver at a time: us or the heart
        self._stopping = threading.Event()
        self._heart: threading.Thread | None = None
        self._beat_failing = False

    # -- errors ---------------------------------------------------------------------------------

    def _error(self, exc: BaseException, doing: str) -> CoordinationError:
        if isinstance(exc, CoordinationError):
            return exc
        reason, prefix = _reason_of(exc)
        detail = _detail(exc)
        return CoordinationError(f"{prefix} ({doing}, {self._where}): {detail}", reason=reason)

    # -- the context ----------------------------------------------------------------------------

    def __enter__(self) -> Coordination:
        if self._coord is not None:
            raise CoordinationError(f"already entered ({self._where})", reason="in-use")
        try:
            from tooz import coordination as tooz_coordination
        except ImportError as exc:
            raise CoordinationError(
                f"coordination needs tooz, which is not installed: {INSTALL_HINT}",
                reason="not-installed",
            ) from exc
        self.problem = None
        self._stopping.clear()
        _check_url_timeouts(self.url)
        try:
            self._load_driver()
            self._prepare_file_backend()
            coord = tooz_coordination.get_coordinator(self.url, self._member_id, **self._options())
        except Exception as exc:
            raise self._error(exc, "loading the driver") from exc
        _without_client_retries(coord)
        try:
            coord.start(start_heart=False)
        except Exception as exc:
            raise self._error(exc, "connecting") from exc
        self._coord = coord
        try:
            self._join()
        except BaseException as exc:
            self._disconnect()
            if isinstance(exc, Exception):
                raise self._error(exc, f"joining {self.group}") from exc
            raise
        if coord.requires_beating:
            self._heart = threading.Thread(
                target=self._beat,
                args=(coord,),
                name=f"imagecache-heart-{self.storage}",
                daemon=True,
            )
            self._heart.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._disconnect()

    def _options(self) -> dict[str, Any]:
        """Ours, where the URL does not say: ``timeout`` and tooz's synchronous executor.

        We wait for every call at once anyway, one at a time; tooz's default, a thread pool,
        costs a thread per coordinator and a second at every stop (its idle worker polls).
        """
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.url).query)
        options: dict[str, Any] = {}
        if "executor" not in query:
            options["executor"] = "synchronous"
        if "timeout" not in query:  # tooz's drivers take whole seconds
            options["timeout"] = str(max(1, round(self.timeout)))
        return options

    def _load_driver(self) -> None:
        """The URL's scheme names an installed tooz driver whose client imports.

        stevedore, which tooz loads drivers with, reports a driver that fails to import
        (zookeeper:// without kazoo) as no driver at all; we say which.
        """
        from importlib.metadata import entry_points

        scheme = self.url.partition("://")[0]
        found = entry_points(group="tooz.backends", name=scheme)
        if not found:
            known = sorted({ep.name for ep in entry_points(group="tooz.backends")})
            raise CoordinationError(
                f"no coordination driver for {scheme}:// ({self._where}); tooz has "
                + ", ".join(f"{name}://" for name in known),
                reason="bad-url",
            )
        for ep in found:
            try:
                ep.load()
            except ImportError as exc:
                raise CoordinationError(
                    f"the {scheme}:// coordination driver cannot be loaded: {exc} (the "
                    f"coordination extra brings redis:// and etcd3+http://: {INSTALL_HINT})",
                    reason="not-installed",
                ) from exc

    def _prepare_file_backend(self) -> None:
        """file://DIR: DIR, DIR/groups and DIR/tmp are real directories, made 0700 if missing."""
        from oslo_utils import netutils  # what tooz parses the URL with (a tooz dependency)

        parsed = netutils.urlsplit(self.url)
        if parsed.scheme != "file":
            return
        path = parsed.path
        if parsed.netloc or not os.path.isabs(path) or os.path.normpath(path) == "/":
            raise CoordinationError(
                f"a file:// coordination URL needs an absolute directory: {self._where}",
                reason="bad-url",
            )
        path = os.path.normpath(path)
        self._file_dir = path
        parent = os.path.dirname(path)
        if os.path.basename(parent) == STATE_DIR:
            _real_dir(parent, create=False)  # the cache's own state directory: never a link
        _real_dir(path, create=True)
        for sub in ("groups", "tmp"):
            _real_dir(os.path.join(path, sub), create=True)

    def _join(self) -> None:
        from tooz import coordination as tooz_coordination

        with self._io:
            with contextlib.suppress(tooz_coordination.GroupAlreadyExist):
                self._coord.create_group(self._group_id).get(timeout=self.timeout)
            try:
                self._coord.join_group(self._group_id).get(timeout=self.timeout)
            except tooz_coordination.MemberAlreadyExist:
                # Our id is there already: left behind by an earlier run of this host that died
                # (file, etcd until its lease ends) or another process of this host. Take it
                # over, so that our heartbeats are the ones that keep it.
                with contextlib.suppress(tooz_coordination.MemberNotJoined):
                    self._coord.leave_group(self._group_id).get(timeout=self.timeout)
                self._coord.join_group(self._group_id).get(timeout=self.timeout)

    def _disconnect(self) -> None:
        """Release, stop beating, leave, stop; log what fails, never raise."""
        coord = self._coord
        if coord is None:
            return
        self.release()
        self._stopping.set()
        if self._heart is not None:
            self._heart.join(self.timeout)
            self._heart = None
        try:
            with self._io:
                coord.leave_group(self._group_id).get(timeout=self.timeout)
        except Exception as exc:
            LOG.debug("leaving %s: %s", self.group, self._error(exc, "leaving"))
        clients = _clients_of(coord)
        try:
            with self._io:
                coord.stop()
        except Exception as exc:
            LOG.debug("disconnecting: %s", self._error(exc, "disconnecting"))
        for client in clients:
            try:
                client.close()
            except Exception as exc:
                LOG.debug("closing %r: %s", client, exc)
        self._coord = None
        self._lock = None

    def _beat(self, coord: Any) -> None:
        """The heart: beat every half of what the driver asks, every second while it fails."""
        wait = 0.0
        while not self._stopping.wait(wait):
            try:
                with self._io:
                    every = coord.heartbeat()
            except Exception as exc:
                if not self._beat_failing:
                    LOG.warning("heartbeat to %s failed: %s", self._where, self._error(exc, "beat"))
                self._beat_failing = True
                wait = _RETRY_BEAT
                continue
            if self._beat_failing:
                LOG.info("heartbeat to %s works again", self._where)
            self._beat_failing = False
            # A driver's answer is whole seconds; anything else (0, negative) is no answer.
            wait = max(0.1, float(every) / 2) if every and every > 0 else self.timeout

    def _connected(self) -> Any:
        if self._coord is None:
            raise CoordinationError(
                f"not connected: enter the Coordination first ({self._where})", reason="not-entered"
            )
        return self._coord

    # -- the API --------------------------------------------------------------------------------

    def members(self) -> frozenset[str]:
        """The hosts in the group now, this one included (joining again if it had dropped out).

        Raises:
            CoordinationError: the backend is down (``backend-unavailable``), slow, ...
        """
        coord = self._connected()
        try:
            with self._io:
                found = coord.get_members(self._group_id).get(timeout=self.timeout)
                if self._member_id not in found:
                    # Our membership expired (this host was paused or cut off for longer than
                    # the TTL): tooz's etcd driver, for one, never puts it back by itself.
                    self._join()
                    found = coord.get_members(self._group_id).get(timeout=self.timeout)
        except Exception as exc:
            raise self._error(exc, f"listing {self.group}") from exc
        return frozenset(_decode(m) for m in found)

    def lead(self, *, wait: float = 0.0) -> bool:
        """Take the cleaner lock; True if this host holds it now, False if another one does.

        Tries without blocking, again every 0.25 s until ``wait`` seconds have passed (tooz's
        blocking acquire raises tenacity.RetryError on etcd instead of returning False).

        Raises:
            CoordinationError: the backend is down (``backend-unavailable``), slow, ...
        """
        coord = self._connected()
        if self._leading and self.leading():
            return True
        wait = max(0.0, wait) if math.isfinite(wait) else 0.0
        try:
            got = self._lead_file(wait) if self._file_dir is not None else self._lead(coord, wait)
        except Exception as exc:
            raise self._error(exc, f"taking {self.lock_name}") from exc
        if got:
            self._leading = True
            self.problem = None
        return got

    def _lead(self, coord: Any, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while True:
            with self._io:
                if self._lock is None:
                    self._lock = coord.get_lock(self.lock_name.encode())
                if self._lock.acquire(blocking=False):
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(_POLL, left))

    def _lead_file(self, wait: float) -> bool:
        """file://: our own POSIX lock (imagecache.locks), on the file tooz's would lock.

        tooz's file lock (fasteners) leaves its descriptor open after a failed attempt and
        miscounts its holders then (it logs "Unreleased lock ... garbage collected"); a stray
        descriptor, once closed, drops every lock this process has on the file. Ours never
        follows a symlink, closes only under its per-path guard, and lets :meth:`leading` see
        that the file it locked is still the one of that name.
        """
        from imagecache.errors import LockTimeout
        from imagecache.locks import held_lock

        assert self._file_dir is not None
        path = os.path.join(self._file_dir, self.lock_name)
        stack = contextlib.ExitStack()
        try:
            fd = stack.enter_context(
                held_lock(path, timeout=wait, poll=_POLL, what="the cleaner lock")
            )
        except LockTimeout:
            return False
        self._file_hold = (stack, fd, path)
        return True

    def leading(self) -> bool:
        """Whether this host still holds the cleaner lock; never raises.

        Beats now, and asks the backend whether the lock is still ours where the driver can tell
        (redis: the lock's token; etcd: the lock's lease; file: the locked file still has the
        lock's name). False when the backend does not answer (it may answer again: the lock
        survives a short outage) or the lock was lost (for good: :meth:`lead` again);
        :attr:`problem` says which.
        """
        if not self._leading or self._coord is None:
            return False
        try:
            with self._io:
                self._coord.heartbeat()
                still = self._still_owner()
        except Exception as exc:
            self.problem = self._error(exc, f"checking {self.lock_name}")
            return False
        if not still:
            self.problem = CoordinationError(
                f"the cleaner lock {self.lock_name} was lost ({self._where})", reason="lock-lost"
            )
            self.release()
            return False
        return True

    def _still_owner(self) -> bool:
        if self._file_hold is not None:
            _, fd, path = self._file_hold
            try:
                named = os.lstat(path)
            except FileNotFoundError:
                return False  # removed: another host may lock a new file of that name
            held = os.fstat(fd)
            return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
        import tooz

        try:
            return bool(self._lock.is_still_owner())
        except tooz.NotImplemented:
            pass
        lease = getattr(self._lock, "_lease", None)  # etcd3gw: the lock's key lives on a lease
        if lease is not None and callable(getattr(lease, "ttl", None)):
            return int(lease.ttl()) > 0
        return True  # the driver cannot tell: the heartbeat went through

    def release(self) -> None:
        """Give the cleaner lock up (if held); never raises. The lock expires anyway."""
        held, self._leading = self._leading, False
        hold, self._file_hold = self._file_hold, None
        if hold is not None:
            try:
                hold[0].close()
            except Exception as exc:
                LOG.debug("releasing %s: %s", self.lock_name, exc)
            return
        lock = self._lock
        if not held or lock is None or self._coord is None:
            return
        try:
            with self._io:
                lock.release()
        except Exception as exc:
            LOG.debug("releasing %s: %s", self.lock_name, self._error(exc, "releasing"))

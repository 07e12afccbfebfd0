"""A real Glance for the test suite: one server per session, started by ``dev/glance_up.sh``.

Glance 33.0.0 runs under gunicorn on 127.0.0.1 on a free port, with sqlite and a file store in a
temporary directory, and no Keystone: clients use keystoneauth's ``none`` plugin, no token, no
headers (shared/reference/components.md, appendix). Tests that use it take the ``glance_server``
fixture and carry ``@pytest.mark.glance``.

The server is stopped at the end of the session whatever happened: the master is killed, its
workers are waited for (and killed if they linger), and a failed start kills what it left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagecache.settings import GlanceSettings
from tests.defaults import glance as glance_settings

__all__ = ["GlanceServer", "glance_server"]

_REPO = Path(__file__).resolve().parent.parent
_GLANCE_UP = _REPO / "dev" / "glance_up.sh"
_START_TIMEOUT = 120.0
_STOP_TIMEOUT = 10.0

# openstacksdk 4.22 warns about its own internal calls on every resource it builds and on the
# first request to each URL (RemovedInSDK50Warning, a PendingDeprecationWarning); nothing the
# caller can change. Ignored only around the SDK calls of this helper, and only these two.
_SDK_SELF_WARNINGS = (
    "The _compute_attributes method is deprecated for removal",
    "The 'service_type' parameter is unnecesary",
)


@dataclass(frozen=True, slots=True)
class GlanceServer:
    """A running Glance: where it listens, where it keeps its files, and upload helpers."""

    endpoint: str
    workdir: Path
    images_dir: Path
    pid: int
    _conn: Any

    @property
    def settings(self) -> GlanceSettings:
        """Client settings for this server: its endpoint, no authentication."""
        return glance_settings(api_servers=(self.endpoint,), auth_type="none")

    def upload(
        self,
        data: Path | bytes,
        *,
        disk_format: str = "raw",
        container_format: str = "bare",
        name: str | None = None,
        **props: Any,
    ) -> str:
        """Create an image, upload ``data`` (a file or bytes) and return its id once active.

        ``props`` are image attributes or properties (``kernel_id=...``, ``hw_foo="bar"``).
        Raises AssertionError if Glance did not make the image active (it rejects, for example,
        a qcow2 with a backing file).
        """
        with contextlib.ExitStack() as stack, _sdk_quiet():
            # A file object we close ourselves: with filename= the SDK leaves the file open.
            body = data if isinstance(data, bytes) else stack.enter_context(data.open("rb"))
            image = self._conn.image.create_image(
                name=name or f"test-{uuid.uuid4().hex[:8]}",
                disk_format=disk_format,
                container_format=container_format,
                data=body,
                use_import=False,  # import needs an owner; policy mode has none
                allow_duplicates=True,
                **props,
            )
            status = self._conn.image.get_image(image.id).status
        assert status == "active", f"image {image.id} is {status} after upload"
        image_id: str = image.id
        return image_id

    def deactivate(self, image_id: str) -> None:
        with _sdk_quiet():
            self._conn.image.deactivate_image(image_id)

    def reactivate(self, image_id: str) -> None:
        with _sdk_quiet():
            self._conn.image.reactivate_image(image_id)

    def delete(self, image_id: str) -> None:
        with _sdk_quiet():
            self._conn.image.delete_image(image_id, ignore_missing=False)

    @property
    def access_log(self) -> Path:
        """gunicorn's access log: one line per request, e.g. ``"GET /v2/images/<id>/file ..."``."""
        return self.workdir / "access.log"

    def downloads(self, image_id: str) -> int:
        """How many times the image's data has been requested so far."""
        try:
            text = self.access_log.read_text()
        except FileNotFoundError:
            return 0
        return text.count(f"GET /v2/images/{image_id}/file ")

    def stored_file(self, image_id: str) -> Path:
        """Where the file store keeps the image's bytes (for tests that corrupt them)."""
        return self.images_dir / image_id


@contextlib.contextmanager
def _sdk_quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _SDK_SELF_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=PendingDeprecationWarning)
        yield


def _free_port() -> int:
    """A port nothing listens on now (the script refuses to start if that changed meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: fields follow the last ")".
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie waiting for a late reaper counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _stop(pidfile: Path) -> None:
    """Kill the gunicorn master named by ``pidfile`` and make sure its workers are gone too."""
    try:
        master = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    pids = [master, *_children(master)]
    # The master stops its workers on SIGTERM; whatever is still there after that gets SIGKILL.
    for targets, sig in (([master], signal.SIGTERM), (pids, signal.SIGKILL)):
        for pid in filter(_alive, targets):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while any(map(_alive, pids)):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return
    raise RuntimeError(f"gunicorn processes {pids} survived SIGKILL")


def _connection(endpoint: str) -> Any:
    import openstack
    from keystoneauth1 import loading, session

    loader: Any = loading.get_plugin_loader("none")
    auth = loader.load_from_options(endpoint=endpoint)
    return openstack.connection.Connection(
        session=session.Session(auth=auth), image_endpoint_override=endpoint
    )


@pytest.fixture(scope="session")
def glance_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlanceServer]:
    """Start a real Glance for the whole session (~3.5 s) and stop it at the end."""
    workdir = tmp_path_factory.mktemp("glance")
    port = _free_port()
    started = time.monotonic()
    try:
        done = subprocess.run(
            [str(_GLANCE_UP), str(workdir), str(port)],
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(
                f"dev/glance_up.sh failed ({done.returncode}):\n{done.stderr}", pytrace=False
            )
        endpoint = f"http://127.0.0.1:{port}"
        conn = _connection(endpoint)
        server = GlanceServer(
            endpoint=endpoint,
            workdir=workdir,
            images_dir=workdir / "images",
            pid=int(done.stdout.strip()),
            _conn=conn,
        )
        print(f"glance on {endpoint} in {time.monotonic() - started:.1f} s, files in {workdir}")
        try:
            yield server
        finally:
            conn.close()
    finally:
        _stop(workdir / "gunicorn.pid")

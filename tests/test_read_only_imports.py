"""What the read-only commands load: ``plan``, ``status`` and ``explain`` only look.

The modules that act (the executor, fetching, the image service clients, coordination through
tooz, the metrics exporter) are imported only by the commands that use them: every start of a
read-only command would pay for them (the Glance client stack alone, keystoneauth1, requests,
urllib3 and openstacksdk, costs about 0.28 s to import, more than all of ``plan``'s own work on
a small host), and a command that cannot reach them cannot act.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ACTING = (
    "imagecache.images.fetch",
    "imagecache.images.glance",
    "imagecache.images.url",
    "tooz",
    "prometheus_client",
    "keystoneauth1",
    "openstack",
    "glanceclient",
    "requests",
    "urllib3",
)
EXECUTOR = "imagecache.executor"
COMMANDS = [["plan", "--json"], ["status", "--json"], ["explain", "--json", "nothing"]]


def _loaded(tmp_path: Path, argv: list[str]) -> set[str]:
    """The modules one command left in ``sys.modules``, run in a fresh interpreter."""
    (tmp_path / "instances" / "_base").mkdir(parents=True)
    conf = tmp_path / "nova.conf"
    conf.write_text(f"[DEFAULT]\ninstances_path = {tmp_path / 'instances'}\nhost = h1\n")
    probe = (
        "import io, json, sys, contextlib\n"
        "from imagecache import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = cli.main(['--config-file', {str(conf)!r}, *{argv!r}])\n"
        "print(json.dumps([rc, sorted(sys.modules)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    rc, modules = json.loads(done.stdout)
    assert rc in (0, 1), done.stderr  # ran (1: problems, an entry not found)
    return set(modules)


def _under(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


@pytest.mark.parametrize("argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_read_only_commands_import_nothing_that_acts(tmp_path: Path, argv: list[str]) -> None:
    modules = _loaded(tmp_path, argv)
    assert "imagecache.cli" in modules  # the probe really ran the command line
    assert _under(modules, ACTING) == []


@pytest.mark.parametrize("argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_read_only_commands_do_not_import_the_executor(tmp_path: Path, argv: list[str]) -> None:
    assert _under(_loaded(tmp_path, argv), (EXECUTOR,)) == []

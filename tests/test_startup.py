"""What ``imagecache plan`` loads: every command pays for its imports at each start.

The Glance client stack (keystoneauth1, requests, urllib3, openstacksdk) costs about 0.28 s to
import, more than all of ``plan``'s own work on a small host; only the commands that talk to an
image service may import it, inside the command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("keystoneauth1", "openstack", "requests", "urllib3", "glanceclient")


def test_plan_does_not_import_the_image_service_stack(tmp_path: Path) -> None:
    (tmp_path / "instances").mkdir()
    conf = tmp_path / "nova.conf"
    conf.write_text(f"[DEFAULT]\ninstances_path = {tmp_path / 'instances'}\nhost = h1\n")
    probe = (
        "import io, json, sys, contextlib\n"
        "from imagecache import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = cli.main(['--config-file', {str(conf)!r}, 'plan', '--json'])\n"
        "print(json.dumps([rc, sorted(sys.modules)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    rc, modules = json.loads(done.stdout)
    assert rc == 0
    loaded = sorted({name.partition(".")[0] for name in modules} & set(HEAVY))
    assert loaded == []

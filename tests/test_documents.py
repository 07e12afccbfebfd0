"""Every document imagecache writes carries ``schema`` and ``version``; every time is ISO 8601
UTC with its epoch seconds beside it.

Scripts parse these documents for years: each says which shape it has (``schema``, raised on
any incompatible change) and which release wrote it (``version``).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from imagecache import __version__
from imagecache.cli import main
from imagecache.naming import fingerprint
from tests.qemu import make_raw
from tests.test_executor import NOW, cli, make_host, put

A = "a" * 40
B = "b" * 40
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")


def versioned(doc: dict[str, Any]) -> None:
    assert isinstance(doc["schema"], int) and doc["schema"] >= 1
    assert doc["version"] == __version__


def times(doc: Any, where: str = "") -> list[str]:
    """Every ``X_epoch`` field has an ISO 8601 UTC ``X`` beside it that says the same time
    (an audit line's ``epoch``: its ``time``); the fields checked."""
    checked = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if (key == "epoch" or key.endswith("_epoch")) and value is not None:
                twin = "time" if key == "epoch" else key.removesuffix("_epoch")
                iso = doc.get(twin)
                assert isinstance(iso, str) and ISO.match(iso), f"{where}.{twin}: {iso!r}"
                assert datetime.fromisoformat(iso).timestamp() == pytest.approx(value, abs=1)
                checked.append(f"{where}.{key}")
            checked += times(value, f"{where}.{key}")
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            checked += times(item, f"{where}[{i}]")
    return checked


def test_plan_clean_restore_health_audit_and_state_are_versioned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)  # quarantine by default
    put(host, A, 2 * 86400)
    put(host, B, 60)
    docs = {}
    for command in ("plan", "status", "explain", "clean"):
        args = [command, A] if command == "explain" else [command]
        code, docs[command] = cli(host, capsys, *args)
        assert code == 0, docs[command]
    code, docs["restore"] = cli(host, capsys, "restore", A, now=NOW + 60)
    assert code == 0
    code, docs["health"] = cli(host, capsys, "health", now=NOW + 60)
    assert code == 0, docs["health"]
    for name, doc in docs.items():
        versioned(doc)
        assert times(doc), f"{name} has no times"
    assert "now_epoch" in docs["plan"] and "applied_at_epoch" in docs["clean"]
    assert all("last_used" in e for e in docs["plan"]["entries"])

    lines = [json.loads(line) for line in host.audit.read_text().splitlines()]
    assert [line["action"] for line in lines] == ["quarantined", "restored"]
    for line in lines:
        versioned(line)
        assert times(line)
    state = json.loads((host.cache / ".imagecache" / "state.json").read_text())
    versioned(state)
    assert {"updated_epoch", "last_success_epoch"} <= set(state)
    assert times(state)


def test_a_saved_plan_is_versioned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = make_host(tmp_path)
    out = tmp_path / "plan.json"
    code, _ = cli(host, capsys, "plan", "-o", str(out))
    assert code == 0
    versioned(json.loads(out.read_text()))


def test_an_error_document_is_versioned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "nova.conf"
    conf.write_text("[image_cache]\nmanager_interval = soon\n")
    assert main(["--config-file", str(conf), "--json", "plan"]) == 2
    doc = json.loads(capsys.readouterr().out)
    versioned(doc)
    assert doc["exit_code"] == 2 and "manager_interval" in doc["error"]


def test_precache_and_create_disk_are_versioned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path)
    url = make_raw(tmp_path / "image.raw").as_uri()
    code, doc = cli(host, capsys, "precache", url)
    assert code == 0, doc
    versioned(doc)
    assert doc["results"][0]["name"] == fingerprint(url)
    code, doc = cli(host, capsys, "create-disk", "--image", url, "--instance", "inst-9")
    assert code == 0, doc
    versioned(doc)

"""Saved plans mutated at random: read back, rendered and applied, never a traceback.

Hypothesis takes the real saved plan of a real host and replaces, deletes or duplicates one of
its values with anything JSON can say (numbers of 400 digits, NaN, Infinity, lone surrogates,
control characters, names with ``/``, nested junk). The codec either refuses the document with a
:class:`UsageError` or reads a plan that round-trips and renders; ``clean --plan`` on it exits 0,
1 or 2 with exactly one JSON document, and never does more than the current policy would: on this
host nothing is old enough to go, so every byte of the cache and the trash stays.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecache.cli import main
from imagecache.errors import UsageError
from imagecache.plan import plan_from_dict, plan_id, plan_to_dict
from imagecache.render.plan import render_explain, render_plan, render_status
from imagecache.render.text import dumps
from tests.test_executor import DAY, HOUR, NOW, A, B, C, Host, make_host, put, use
from tests.test_hostile_plan import snapshot

ODD_TEXT = ["", ".", "..", "a/b", "\ud800", "\udcff", "x\n\x1b[31m", "\0", A, f"{C}@1"]
WORDS = ["keep", "remove", "quarantine", "reap", "purge", "restore", "temp", "original", "file",
         "symlink", "in-use", "unused-expired", "stale-temp"]  # fmt: skip

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**400, -(10**400), 2**63, 2**63 - 1, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e300, -1e300, 1e11, 2e10]),
    st.text(st.characters() | st.sampled_from(["\ud800", "\udcff", "\n", "\x1b", "/"]), max_size=8),
    st.sampled_from(ODD_TEXT + WORDS),
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(doc: Any, here: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield here
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*here, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, (*here, index))


HOSTILE_NUMBERS = [10**400, -(10**400), 2**63, -1, 1e300, -1e300, 1e11, float("nan"),
                   float("inf"), -float("inf"), 0.5]  # fmt: skip
hostile_text = st.sampled_from(ODD_TEXT) | st.text(
    st.characters() | st.sampled_from(["\ud800", "\udcff", "\n", "\x1b", "/"]), max_size=8
)


def _hostile_like(value: Any) -> st.SearchStrategy[Any]:
    """A value of the same JSON type as ``value``, chosen to hurt: the mutations that most often
    leave a document otherwise valid."""
    if isinstance(value, str):
        return hostile_text
    if isinstance(value, bool):
        return st.sampled_from([0, 1, "true", None])
    if isinstance(value, int | float):
        return st.sampled_from(HOSTILE_NUMBERS)
    return values


@st.composite
def mutated(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any] | Any:
    """``doc`` with one to three values made hostile, replaced, deleted or duplicated."""
    out: Any = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(out))))
        op = draw(st.sampled_from(["hostile"] * 6 + ["replace"] * 2 + ["delete", "duplicate"]))
        if not path:
            out = draw(values) if op == "replace" else out
            continue
        parent: Any = out
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if op == "hostile":
            parent[key] = draw(_hostile_like(parent[key]))
        elif op == "replace":
            parent[key] = draw(values)
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, list):
            parent.insert(key, json.loads(json.dumps(parent[key])))
    return out


def _host(root: Path) -> tuple[Host, dict[str, Any]]:
    """A host where nothing may go now: A too young, B in use, C in quarantine; its plan."""
    host = make_host(root, quarantine_seconds=DAY)
    put(host, C, 3 * DAY)
    with redirect_stdout(io.StringIO()):
        assert main(["--config-file", str(host.config), "clean"], clock=lambda: NOW - HOUR) == 0
    put(host, A, HOUR)
    put(host, B, 2 * DAY)
    use(host, B)
    out = io.StringIO()
    argv = ["--config-file", str(host.config), "--inventory", str(host.inventory), "--json", "plan"]
    with redirect_stdout(out):
        assert main(argv, clock=lambda: NOW) == 0
    doc: dict[str, Any] = json.loads(out.getvalue())
    return host, doc


@pytest.fixture(scope="module")
def host_and_plan() -> Iterator[tuple[Host, dict[str, Any]]]:
    with tempfile.TemporaryDirectory() as root:
        yield _host(Path(root))


def test_the_host_plans_nothing_to_remove(host_and_plan: tuple[Host, dict[str, Any]]) -> None:
    _, doc = host_and_plan
    assert {e["name"]: e["reason"] for e in doc["entries"]} == {A: "too-young", B: "in-use"}
    assert [t["reason"] for t in doc["trash"]] == ["in-quarantine"]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_mutated_plan_is_refused_or_reads_back_and_renders(
    host_and_plan: tuple[Host, dict[str, Any]], data: st.DataObject
) -> None:
    _, doc = host_and_plan
    edited = data.draw(mutated(doc))
    text = json.dumps(edited)  # NaN, Infinity and 400-digit numbers as json writes them
    try:
        plan = plan_from_dict(json.loads(text))
    except UsageError:
        return
    again = json.loads(dumps(plan_to_dict(plan)))
    assert plan_from_dict(again) == plan
    assert again["plan_id"] == plan_id(plan)
    for rendered in (render_plan(plan), render_status(plan), render_explain(plan, A)):
        assert all(line.isprintable() for line in rendered.splitlines())


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_clean_with_a_mutated_plan_exits_cleanly_and_removes_nothing(
    host_and_plan: tuple[Host, dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    data: st.DataObject,
) -> None:
    host, doc = host_and_plan
    before = snapshot(host)
    edited = data.draw(mutated(doc))
    path = host.root / "edited.json"
    path.write_bytes(json.dumps(edited).encode("utf-8", "surrogatepass"))
    code, out = cli_raw(host, capsys, "clean", "--plan", str(path))
    assert code in (0, 1, 2)
    assert out.endswith("\n") and out.count("\n") == 1
    result = json.loads(out)
    if code == 2:
        assert result["exit_code"] == 2 and result["error"]
    assert snapshot(host) == before
    assert all(line["action"] not in ("removed", "purged", "reaped") for line in host.audit_lines())


def cli_raw(host: Host, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    argv = ["--config-file", str(host.config), "--inventory", str(host.inventory), "--json", *args]
    capsys.readouterr()
    code = main(argv, clock=lambda: NOW)
    return code, capsys.readouterr().out

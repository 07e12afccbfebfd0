"""Problems are typed: a stable code each, and one table says what a code implies."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from imagecache.cli import main
from imagecache.model import PROBLEMS, Problem, ProblemCode, ProblemSource
from tests.test_executor import DAY, A, make_host, put

SRC = Path(__file__).resolve().parents[1] / "src" / "imagecache"


def test_every_code_is_in_the_table_and_kebab_case() -> None:
    assert set(PROBLEMS) == set(ProblemCode)
    for code in ProblemCode:
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", code.value), code
        assert isinstance(PROBLEMS[code].source, ProblemSource)


def test_what_a_problem_implies_comes_from_its_code_not_its_words() -> None:
    quiet = Problem(ProblemCode.BACKING_MISSING, "/i/u/disk", "cannot read header: unparsable")
    loud = Problem(ProblemCode.HEADER_GARBAGE, "/i/u/disk", "backing file missing")
    assert not quiet.blocking and loud.blocking
    assert Problem(ProblemCode.CACHE_MISSING, "/c", "").hides_entries


def _message_reads(tree: ast.AST) -> list[int]:
    """Lines where a ``.message`` is compared or searched, not merely formatted."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Attribute) and o.attr == "message" for o in operands):
                found.append(node.lineno)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "message"
            and node.func.attr in {"startswith", "endswith", "find", "index", "removeprefix"}
        ):
            found.append(node.lineno)
    return found


def test_no_module_decides_by_a_problems_wording() -> None:
    offenders = {
        str(path.relative_to(SRC)): lines
        for path in sorted(SRC.rglob("*.py"))
        if (lines := _message_reads(ast.parse(path.read_text(), str(path))))
    }
    assert offenders == {}
    # The checker itself can fail: the pattern the old scanner used is found.
    bad = ast.parse("if p.message.startswith('unusable'):\n    pass\nok = q.message == 'x'\n")
    assert _message_reads(bad) == [1, 3]


def test_json_problems_carry_their_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = make_host(tmp_path, quarantine_seconds=0)
    put(host, A, 2 * DAY)
    bad = host.instances / "inst-1" / "disk"
    bad.parent.mkdir()
    bad.write_bytes(b"QFI\xfb\x00\x00\x00\x09" + b"\x00" * 200)  # a qcow2 magic, garbage after
    argv = ["--config-file", str(host.config), "--json", "plan"]
    assert main(argv, clock=lambda: 2e9) == 1
    doc = json.loads(capsys.readouterr().out)
    codes = {(p["code"], p["blocking"]) for p in doc["problems"]}
    assert ("header-garbage", True) in codes
    assert all(p["code"] in {c.value for c in ProblemCode} for p in doc["problems"])

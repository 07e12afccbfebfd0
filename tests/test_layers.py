"""The import layering of ``imagecache``, enforced by reading every module's AST.

Layers, lowest first; a module may import only a lower layer or its own group:
0 errors, 1 core, 2 formats, 3 locks, 4 store, 5 sources, 6 images, 7 orchestration, 8 edges.

Why: the core (values, naming, the planner) stays pure, so it is testable and reusable without a
filesystem, a clock or a network; only the edges (cli, ``__main__``, ``_sample``) may end the
process or read the environment (and ``config.py``, which reads the configuration's sources, the
environment among them, may read it), so the library's behaviour comes from its settings alone;
oslo.config stays behind ``config.py``; and ``plan``/``status`` start without the HTTP stack,
which only ``images/base``, ``glance`` and ``url`` import at top level (others import it in the
function that needs it). Imports inside functions count like any other; imports under
``if TYPE_CHECKING:`` never run, so only the oslo_config rule applies to them. The one use of the
environment allowed outside the edges is handing all of it on to a child (``{**os.environ, ...}``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

_LAYERS = [
    ("errors", "errors _version"),
    (
        "core",
        "model plan results naming layout usage policy settings clock history integrity capacity",
    ),
    ("formats", "formats"),
    ("locks", "owners locks lockfiles coordination"),
    ("store", "store"),
    ("sources", "sources"),
    ("images", "images"),
    ("orchestration", "executor restore verify repair manager"),
    (
        "edges",
        "config cli daemon metrics __main__ _sample render __init__",
    ),  # __init__: the package itself
]
# imagecache.<key>[.*] -> (layer, group)
GROUP = {key: (n, group) for n, (group, keys) in enumerate(_LAYERS) for key in keys.split()}
# What a core module may import besides imagecache: pure stdlib (no json, os, time, io, ...).
CORE_PURE = {"__future__", "abc", "collections", "dataclasses", "datetime", "difflib", "enum"}
CORE_PURE |= {"functools", "hashlib", "itertools", "math", "operator", "posixpath", "re", "types"}
CORE_PURE |= {"typing", "imagecache"}  # imagecache itself: the direction rule's business
HEAVY = {"keystoneauth1", "openstack", "requests", "urllib3", "libvirt", "tooz"}
HEAVY |= {"prometheus_client", "oslo_log"}
HEAVY_AT_TOP = frozenset(f"imagecache/images/{m}.py" for m in ("base", "glance", "url"))
# metrics.py is imported only by the commands that publish metrics, in the function that does.
HEAVY_AT_TOP |= {"imagecache/metrics.py"}
OSLO_CONFIG_OK = frozenset({"imagecache/config.py"})
EDGES = frozenset(f"imagecache/{m}.py" for m in ("cli", "daemon", "__main__", "_sample"))
# config.py reads the configuration's sources, and oslo.config takes options from the
# environment (OS_<GROUP>__<OPTION>): it may read the environment too, never exit.
ENVIRON_OK = frozenset({"imagecache/config.py"})
TYPE_CHECKING = ("TYPE_CHECKING", "typing.TYPE_CHECKING")
PROCESS_WIDE = frozenset({("sys", "exit")} | {("os", n) for n in ("environ", "environb", "getenv")})


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # the module imported; ``from imagecache import x`` is imagecache.x if a module
    text: str
    lazy: bool  # inside a function
    type_only: bool  # under ``if TYPE_CHECKING:``


def _group(module: str) -> tuple[int, str] | None:
    parts = module.split(".")
    return GROUP.get(parts[1] if len(parts) > 1 else "__init__")


def _nodes(node: ast.AST, lazy: bool, typ: bool) -> Iterator[tuple[ast.AST, bool, bool]]:
    """Every node under ``node``, with: is it inside a function, is it type-only."""
    yield node, lazy, typ
    lazy = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
    if isinstance(node, ast.If) and ast.unparse(node.test) in TYPE_CHECKING:
        for stmt in node.body:
            yield from _nodes(stmt, lazy, True)
        for stmt in node.orelse:
            yield from _nodes(stmt, lazy, typ)
        return
    for child in ast.iter_child_nodes(node):
        yield from _nodes(child, lazy, typ)


def _resolve(base: str, name: str, src_root: Path) -> str:
    """``from base import name``: the module ``base.name`` if it is one of ours, else ``base``."""
    path = src_root.joinpath(*base.split("."), name)
    ours = base.partition(".")[0] == "imagecache"
    is_module = path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()
    return f"{base}.{name}" if ours and is_module else base


def _imports(tree: ast.Module, module: str, is_pkg: bool, src_root: Path) -> Iterator[Import]:
    for node, lazy, typ in _nodes(tree, False, False):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = module.split(".")[: None if is_pkg else -1]
            parent = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join([*parent, *([node.module] if node.module else [])])
            targets = [_resolve(base, alias.name, src_root) for alias in node.names]
        elif (  # importlib.import_module("x") / __import__("x")
            isinstance(node, ast.Call)
            and ast.unparse(node.func).split(".")[-1] in ("import_module", "__import__")
            and node.args
            and isinstance(arg := node.args[0], ast.Constant)
            and isinstance(arg.value, str)
        ):
            targets = [arg.value]
        else:
            continue
        for target in targets:
            yield Import(node.lineno, target, ast.unparse(node), lazy, typ)


def _process_wide(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """``sys.exit``, ``raise SystemExit``, ``os.environ``/``environb``/``getenv``, by any alias.

    ``{**os.environ, ...}`` is allowed: it hands the whole environment on to a child process
    (images/process.py: ``LC_ALL=C`` for qemu-img) without reading any setting from it.
    """
    bound = {}  # local name -> module: ``import os``, ``import sys as s``, ``import os.path``
    for a in (a for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names):
        module = a.name if a.asname else a.name.partition(".")[0]
        bound[a.asname or module] = module
    dicts = [d for d in ast.walk(tree) if isinstance(d, ast.Dict)]
    spread = {id(v) for d in dicts for k, v in zip(d.keys, d.values, strict=True) if k is None}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            used = (bound.get(node.value.id, ""), node.attr)
            if used in PROCESS_WIDE and id(node) not in spread:
                yield node.lineno, f"uses {'.'.join(used)}"
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            for a in node.names:
                if (node.module, a.name) in PROCESS_WIDE:
                    yield node.lineno, f"imports {node.module}.{a.name}"
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                yield node.lineno, "raises SystemExit"


def _check(rel: str, module: str, tree: ast.Module, src_root: Path) -> Iterator[str]:
    own = _group(module)
    if own is None:
        yield f"{rel}:1: [direction] {module} is in no layer: add it to _LAYERS in {__name__}"
    for imp in _imports(tree, module, rel.endswith("__init__.py"), src_root):
        where, top = f"{rel}:{imp.line}:", imp.target.partition(".")[0]
        dep = _group(imp.target) if top == "imagecache" else None
        if own and dep and not imp.type_only and dep[0] >= own[0] and dep[1] != own[1]:
            yield (
                f"{where} [direction] {module} ({own[1]}, layer {own[0]}) imports "
                f"{imp.target} ({dep[1]}, layer {dep[0]}): `{imp.text}`"
            )
        if own and own[1] == "core" and top not in CORE_PURE and not imp.type_only:
            yield f"{where} [pure-core] core module {module} imports {imp.target}: `{imp.text}`"
        if top == "oslo_config" and rel not in OSLO_CONFIG_OK:
            yield f"{where} [oslo-config] only config.py may import oslo_config: `{imp.text}`"
        if top in HEAVY and not (imp.lazy or imp.type_only or rel in HEAVY_AT_TOP):
            yield f"{where} [lazy-heavy] import {top} in the function that needs it: `{imp.text}`"
    if rel not in EDGES:
        for line, what in _process_wide(tree):
            if rel in ENVIRON_OK and what in ("uses os.environ", "imports os.environ"):
                continue
            yield f"{rel}:{line}: [exit-environ] library module {what}; only the edges may"


def violations(src_root: Path) -> list[str]:
    """Every layering violation in the ``imagecache`` package under ``src_root``."""
    found: list[str] = []
    for path in sorted((src_root / "imagecache").rglob("*.py")):
        rel = path.relative_to(src_root)
        parts = [*rel.parent.parts, *([] if rel.stem == "__init__" else [rel.stem])]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        found += _check(rel.as_posix(), ".".join(parts), tree, src_root)
    return found


@pytest.fixture(scope="module")
def real() -> list[str]:
    assert (SRC / "imagecache" / "__init__.py").is_file(), SRC
    return violations(SRC)


def _none(real: list[str], rule: str) -> None:
    bad = [v for v in real if f" [{rule}] " in v]
    assert not bad, f"{len(bad)} [{rule}] violation(s) under {SRC}:\n" + "\n".join(bad)


def test_imports_go_down_the_layers(real: list[str]) -> None:
    _none(real, "direction")


def test_core_is_pure(real: list[str]) -> None:
    _none(real, "pure-core")


def test_only_config_imports_oslo_config(real: list[str]) -> None:
    _none(real, "oslo-config")


def test_only_edges_exit_or_read_the_environment(real: list[str]) -> None:
    _none(real, "exit-environ")


def test_heavy_dependencies_load_lazily(real: list[str]) -> None:
    _none(real, "lazy-heavy")


def test_real_tree_has_no_violations(real: list[str]) -> None:
    assert real == []


def test_checker_reports_each_violation(tmp_path: Path) -> None:
    files = {
        "__init__.py": "from imagecache.cli import main\n",
        "cli.py": "import os\nimport sys\n\nsys.exit(os.environ['X'])\n",  # edges may
        "config.py": "from oslo_config import cfg\n\ndef f():\n    import keystoneauth1\n",
        "executor.py": "import sys\n\ndef run():\n    sys.exit(1)\n",
        "model.py": "import time\nimport imagecache.executor\n",
        "naming.py": "from .executor import run\nimport posixpath\n",
        "restore.py": "import os as o\nENV = {**o.environ}\nX = o.getenv('A')\n",
        "orphan.py": "",
        "store/__init__.py": "",
        "store/fsops.py": "from imagecache import cli\nimport requests\n",
        "sources/__init__.py": "import importlib\nimportlib.import_module('oslo_config.cfg')\n",
        "images/__init__.py": "if TYPE_CHECKING:\n    from .. import cli\ndef f(): import tooz\n",
        "images/base.py": "import requests\n",
    }
    for name, text in files.items():
        (path := tmp_path / "imagecache" / name).parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    found = violations(tmp_path)
    assert sorted(" ".join(v.split()[:2]) for v in found) == [
        "imagecache/executor.py:4: [exit-environ]",
        "imagecache/model.py:1: [pure-core]",
        "imagecache/model.py:2: [direction]",
        "imagecache/naming.py:1: [direction]",
        "imagecache/orphan.py:1: [direction]",
        "imagecache/restore.py:3: [exit-environ]",
        "imagecache/sources/__init__.py:2: [oslo-config]",
        "imagecache/store/fsops.py:1: [direction]",
        "imagecache/store/fsops.py:2: [lazy-heavy]",
    ], "\n".join(found)
    assert any("imports imagecache.executor (orchestration, layer 7)" in v for v in found)
    assert any("imports imagecache.cli (edges, layer 8)" in v for v in found)

"""pyproject.toml declares exactly what src/ imports: a plain install needs nothing undeclared.

The dev venv has the test extra too, so an undeclared import would pass every other test here;
dev/check-install.sh proves the same for a few commands in a venv with the package alone.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {_canonical(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_distributions() -> dict[str, set[str]]:
    """Distribution -> the modules of src/imagecache that import it (top-level imports only)."""
    by_module = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "src" / "imagecache").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [alias.name.partition(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.partition(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top in {"imagecache", "__future__"}:
                    continue
                where = str(path.relative_to(REPO))
                for dist in by_module.get(top, [f"<no distribution for {top}>"]):
                    found.setdefault(_canonical(dist), set()).add(where)
    return found


def test_every_imported_distribution_is_declared_and_every_declared_one_imported() -> None:
    imported = _imported_distributions()
    plain = _names(PROJECT["dependencies"])
    clouds = _names(PROJECT["optional-dependencies"]["clouds"])
    assert clouds == {"openstacksdk"}
    libvirt = _names(PROJECT["optional-dependencies"]["libvirt"])
    assert libvirt == {"libvirt-python"}  # `import libvirt` (packages_distributions maps it)
    coordination = _names(PROJECT["optional-dependencies"]["coordination"])
    assert coordination == {"tooz"}  # tooz[redis,etcd3gw]: the clients come with tooz's extras
    optional = clouds | libvirt | coordination
    assert set(imported) - plain - optional == set(), {d: imported[d] for d in imported}
    assert plain - set(imported) == set()  # nothing declared that src/ does not use
    # openstacksdk stays optional: only the --os-cloud loader imports it (lazily).
    assert imported["openstacksdk"] == {"src/imagecache/images/glance.py"}
    # libvirt-python too: only the libvirt source imports it (lazily), if that exists yet.
    assert imported.get("libvirt-python", set()) <= {"src/imagecache/sources/libvirt.py"}
    # tooz too: only the coordination module imports it (lazily).
    assert imported.get("tooz", set()) <= {"src/imagecache/coordination.py"}
    assert plain & optional == set()


def test_the_test_extra_installs_the_clouds_libvirt_and_coordination_extras() -> None:
    assert "imagecache[clouds]" in PROJECT["optional-dependencies"]["test"]
    assert "imagecache[libvirt]" in PROJECT["optional-dependencies"]["test"]
    assert "imagecache[coordination]" in PROJECT["optional-dependencies"]["test"]

"""The packages import one way: webapp -> pipeline -> models, storage (-> common).

Read from the source with ``ast`` (every import statement, function-level ones too), so
a new shortcut across layers fails here before review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "models", "storage", "pipeline", "webapp")
#: package -> the FaceLab packages it may import
ALLOWED = {
    "common": set(),
    "models": {"common"},
    "storage": {"common"},
    "pipeline": {"common", "models", "storage"},
    "webapp": {"common", "pipeline"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names if name.split(".")[0] in PACKAGES}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package: str) -> None:
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        crossing = imported_packages(path) - ALLOWED[package] - {package}
        if crossing:
            wrong[str(path.relative_to(ROOT))] = sorted(crossing)
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: {wrong}"


def test_the_checker_sees_a_crossing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from storage.orm import Face\n    import webapp.ui\n")
    assert imported_packages(bad) == {"storage", "webapp"}

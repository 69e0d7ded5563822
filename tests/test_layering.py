"""Package boundaries that keep the server and the clients apart (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import feddistill

ROOT = Path(feddistill.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at top level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _modules_below(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_no_server_module_imports_the_client_package() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m
            for m in _imports(path)
            if m == "feddistill.client" or m.startswith("feddistill.client.")
        )
        for path in _modules_below("server")
    }
    assert _modules_below("server"), "the walk found no server modules"
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from feddistill.client.work import train_round\n")
    assert "feddistill.client.work" in _imports(probe)

"""The library's layers: the server (``qasr_jax/serve``) is built on the core, and nothing in the core imports it
(its packages are the ``[serve]`` extra, and a core module that reached up into it would drag them in)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qasr_jax"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_core_module_imports_the_server() -> None:
    core = [p for p in PACKAGE.rglob("*.py") if "serve" not in p.relative_to(PACKAGE).parts]
    assert len(core) > 20  # the walk found the library
    reaching_up = {
        str(path.relative_to(PACKAGE)): sorted(n for n in imported_modules(path) if n.startswith("qasr_jax.serve"))
        for path in core
    }
    assert {k: v for k, v in reaching_up.items() if v} == {}


def test_the_import_walk_sees_both_import_forms(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import qasr_jax.serve.app\nfrom qasr_jax.serve import live\nfrom . import x\n")
    assert imported_modules(module) >= {"qasr_jax.serve.app", "qasr_jax.serve", "qasr_jax.serve.live"}

"""Imports point one way (STYLE.md): checked by reading every module's AST."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"kernels", "scheduler", "registry", "engine", "training", "server", "benchmarks", "tests"}
ALLOWED = {
    "kernels": set(),
    "scheduler": set(),
    "registry": set(),
    "engine": {"kernels", "scheduler", "registry"},
    "training": {"engine", "registry", "kernels"},
    "server": {"engine", "training", "registry"},
}
# the planner is pure: the standard library only, and not even asyncio
SCHEDULER_FORBIDDEN = {"asyncio", "torch", "numpy", "triton"}
KERNELS_THIRD_PARTY = {"torch", "triton"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package: str) -> None:
    for path in _modules(package):
        ours = (_imports(path) & OURS) - {package}
        extra = ours - ALLOWED[package]
        assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}"


def test_scheduler_is_standard_library_only() -> None:
    for path in _modules("scheduler"):
        imported = _imports(path) - {"scheduler"}
        assert not imported & SCHEDULER_FORBIDDEN, path
        assert imported <= set(sys.stdlib_module_names), f"{path}: {imported}"


def test_kernels_import_only_torch_and_triton() -> None:
    for path in _modules("kernels"):
        third_party = _imports(path) - set(sys.stdlib_module_names) - {"kernels"}
        assert third_party <= KERNELS_THIRD_PARTY, f"{path}: {third_party}"

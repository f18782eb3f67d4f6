"""The package's layers, read from its imports: plain Python below, Dagster and the CLI only on top, no simulator."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "expensify_exact"
# What may not be imported from each layer (a prefix matches the module and everything under it).
FORBIDDEN = {
    "api": ("dagster", "expensify_exact.store", "expensify_exact.core", "expensify_exact.defs", "expensify_exact.cli"),
    "core": ("dagster", "expensify_exact.defs", "expensify_exact.cli"),
    "store": ("dagster", "expensify_exact.api", "expensify_exact.core", "expensify_exact.defs", "expensify_exact.cli"),
    "notify": ("dagster", "expensify_exact.defs", "expensify_exact.cli"),
    "clock.py": ("dagster", "expensify_exact."),
    "errors.py": ("dagster", "expensify_exact."),
    "progress.py": ("dagster", "expensify_exact."),
    "config.py": ("dagster", "expensify_exact.api", "expensify_exact.core", "expensify_exact.store",
                  "expensify_exact.defs", "expensify_exact.cli"),
    "defs": ("expensify_exact.cli",),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules(layer: str) -> list[Path]:
    target = PACKAGE / layer
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


def _breaks(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == f.rstrip(".") or name.startswith(f if f.endswith(".") else f + ".") for f in forbidden)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    found = {f"{path.relative_to(PACKAGE)} imports {name}" for path in _modules(layer)
             for name in _imports(path) if _breaks(name, FORBIDDEN[layer])}
    assert not found, sorted(found)


def test_the_connector_never_imports_the_simulators_nor_the_cli_entry_point():
    found = {f"{path.relative_to(PACKAGE)} imports {name}" for path in sorted(PACKAGE.rglob("*.py"))
             for name in _imports(path)
             if name.startswith("expensify_exact_sandbox") or (
                 name.startswith("expensify_exact.cli.main") and path.name != "main.py")}
    assert not found, sorted(found)


def test_the_rule_reads_imports_at_any_depth(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import dagster as dg\n    from expensify_exact.defs.keys import slug\n")
    assert {"dagster", "expensify_exact.defs.keys"} <= _imports(module)
    assert _breaks("dagster._core", ("dagster",)) and not _breaks("dagsterx", ("dagster",))

"""The package's layers: lower layers never import the models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "celltyper"
#: Layers below ``model``: nothing in them may import ``celltyper.model``.
LOWER_LAYERS = ("pp", "nn", "module", "_utils")


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_lower_layers_do_not_import_models(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no module under {layer}/"
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            name for name in _imported_modules(path) if name.startswith("celltyper.model")
        )
        for path in files
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"{layer}/ imports the models: {offenders}"


def test_the_check_sees_relative_imports(tmp_path):
    module = PACKAGE / "pp" / "_normalize.py"
    names = _imported_modules(module)
    assert "celltyper._utils" in names, names

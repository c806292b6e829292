"""The package's folders are its layers: a module imports only from its own layer or the ones
below it (the method at the bottom, the CLI at the top), so there are no import cycles across
layers and the method never depends on what is built around it."""

from __future__ import annotations

import ast
from pathlib import Path

import mor

PACKAGE = Path(mor.__file__).parent
LAYERS = [  # bottom to top
    {"config", "layer", "quantized", "routing", "model", "export", "params", "baselines", "safety", "startup", "_compat", "options", "errors", "stopping",
     "__init__"},  # the method
    {"data"},
    {"runtime"},
    {"eval", "analysis", "lm_eval_model", "serving"},
    {"train"},
    {"compare", "integrations"},
    {"cli"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _imports(path: Path) -> set[str]:
    """Every mor module ``path`` imports, at the top or inside a function."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if name.startswith("mor"):
                found |= {name} if node.module else {_module_or_package(f"{name}.{a.name}") for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mor")}
    return found


def _module_or_package(name: str) -> str:
    """``name`` if it is a module or package of mor, else the package it is an attribute of."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return name if path.is_dir() or path.with_suffix(".py").is_file() else name.rsplit(".", 1)[0]


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for imported in _imports(path):
            if imported != "mor" and _layer(imported) > _layer(module):
                upward.append(f"{module} -> {imported}")
    assert not upward, upward


def test_every_module_is_in_a_layer():
    for path in PACKAGE.rglob("*.py"):
        _layer(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))  # StopIteration if not

"""The package's folders are its layers: a module imports only from its own layer or the ones
below it (the method at the bottom, the CLI at the top), so there are no import cycles across
layers and the method never depends on what is built around it. The method (``mor``'s top-level
modules and ``mor.baselines``) imports only itself, torch, peft, safetensors and transformers, and
loads without the Trainer; the harness (``mor.<subpackage>``) sits on top of it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


# -- the method apart from the harness ------------------------------------------------------------

HARNESS = ("data", "runtime", "eval", "analysis", "train", "compare", "serving", "cli", "integrations")
TOP_LEVEL_HARNESS = ("lm_eval_model",)  # lm-eval's model class: registered by name, kept at its documented path
METHOD_THIRD_PARTY = {"torch", "peft", "safetensors", "transformers", "tqdm", "bitsandbytes"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            if node.module:
                found.add(".".join(base + [node.module]))
            else:
                found |= {".".join(base + [alias.name]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module)
    return found


def is_harness(module: str) -> bool:
    parts = module.split(".")
    return len(parts) > 1 and (parts[1] in HARNESS or parts[1] in TOP_LEVEL_HARNESS)


METHOD_FILES = [p for p in sorted(PACKAGE.rglob("*.py")) if not is_harness(module_name(p))]


def test_the_method_layer_is_what_the_docs_say():
    names = {module_name(p) for p in METHOD_FILES}
    assert {"mor", "mor.config", "mor.options", "mor.errors", "mor.layer", "mor.routing", "mor.model", "mor.export",
            "mor.params", "mor.safety", "mor.quantized", "mor.baselines.moelora"} <= names, names
    assert all(p.parent == PACKAGE or p.parent.name == "baselines" for p in METHOD_FILES), METHOD_FILES


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: module_name(p))
def test_the_method_imports_nothing_from_the_harness(path):
    imports = imported_modules(path)
    harness = sorted(m for m in imports if m.startswith("mor.") and is_harness(m))
    assert not harness, f"{module_name(path)} (method) imports the harness: {harness}"
    third_party = {m.split(".")[0] for m in imports if not m.startswith("mor")} - set(sys.stdlib_module_names)
    assert third_party <= METHOD_THIRD_PARTY, f"{module_name(path)} imports {sorted(third_party - METHOD_THIRD_PARTY)}"


def test_the_method_loads_without_the_trainer():
    # `import mor.export` (or any method module) must not pull in transformers' Trainer, the harness, or the
    # packages only the harness needs
    code = """if True:
        import sys
        import mor.config, mor.model, mor.export, mor.layer, mor.routing, mor.params
        heavy = ["transformers.trainer", "transformers.trainer_callback", "datasets", "matplotlib", "mor.train", "mor.data", "mor.eval", "mor.cli"]
        print("loaded:", [m for m in heavy if m in sys.modules])
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stdout, done.stdout

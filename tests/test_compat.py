"""Other libraries' private names are borrowed in one place, ``mor._compat``, with the versions checked."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path
from types import FunctionType

import pytest

import mor
from mor import _compat

PACKAGE = Path(mor.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _own_names() -> set[str]:
    """Every name the package defines: functions, classes, variables, arguments, attributes of self."""
    own = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                own.add(node.attr)
    return own


DOCUMENTED = {"_exit"}  # os._exit: a documented public function despite its underscore


def private_uses(sources=SOURCES) -> list[str]:
    """``path:line: name`` for each private name of another library used outside _compat.py: an
    attribute ``x._name`` or ``from lib import _name`` that the package does not define itself."""
    own, found = _own_names(), []
    for path in sources:
        if path.name == "_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__") and name not in own | DOCUMENTED:
                    found.append(f"{path.name}:{node.lineno}: {name}")
    return found


def test_no_private_name_of_another_library_outside_compat():
    assert private_uses() == []


def test_the_scan_finds_a_private_name(tmp_path):
    # the check above can fail: a module that reaches into peft or torch is caught
    bad = tmp_path / "bad.py"
    bad.write_text("from peft.tuners.tuners_utils import _ExcludedModule\nx = torch.ones(1)._version\n")
    assert [line.split(": ")[1] for line in private_uses([*SOURCES, bad])] == ["_ExcludedModule", "_version"]


def _external_private_overrides() -> dict[str, set[str]]:
    """For each class of the package: its private methods that override one of a base class from another library."""
    found: dict[str, set[str]] = {}
    for path in SOURCES:
        module_name = "mor." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        if module_name.endswith("__main__") or any(part in module_name for part in ("serving", "lm_eval", "integrations")):
            continue  # optional dependencies (vllm, lm-eval, axolotl); their classes override no private hook
        module = importlib.import_module(module_name)
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module_name:
                continue
            for base in cls.__mro__[1:]:
                if base.__module__.split(".")[0] in ("mor", "builtins", "typing", "abc"):
                    continue
                overridden = {n for n, v in vars(cls).items() if n.startswith("_") and not n.startswith("__")
                              and hasattr(base, n) and isinstance(v, (FunctionType, classmethod, staticmethod))}
                if overridden:
                    found.setdefault(f"{base.__module__}.{base.__qualname__}", set()).update(overridden)
    return found


def test_every_private_hook_mor_overrides_is_listed_with_its_versions():
    listed = {name for names in _compat.OVERRIDDEN_HOOKS.values() for name in names}
    found = _external_private_overrides()
    unlisted = {base: names - listed for base, names in found.items() if names - listed}
    assert not unlisted, f"private methods overridden but not listed in mor._compat.OVERRIDDEN_HOOKS: {unlisted}"
    assert any("_create_and_replace" in names for names in found.values())  # the scan sees the tuner's hooks


@pytest.mark.parametrize("library, version", [("peft", "0.17.1"), ("peft", "0.22.0"), ("transformers", "4.54.1"),
                                              ("transformers", "6.0.0")])
def test_a_version_outside_the_checked_range_is_one_line_naming_both(library, version):
    with pytest.raises(ImportError) as err:
        _compat.check_version(library, version)
    message = str(err.value)
    assert "\n" not in message and f"{library} {version} is installed" in message
    assert f"{library}{_compat.supported_range(library)}" in message


@pytest.mark.parametrize("library, version", [("peft", "0.18.1"), ("peft", "0.20.0"), ("peft", "0.21.2"),
                                              ("transformers", "4.55.4"), ("transformers", "4.56.0"),
                                              ("transformers", "5.16.1")])
def test_the_supported_versions_pass(library, version):
    _compat.check_version(library, version)

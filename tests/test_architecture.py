"""The layout's rules, checked on the source: no import circles, ``sweeper -> bgad_core`` only, no detector family
named in ``sweeper/`` outside configuration defaults, no family folder reading another's, and every ``>>>`` example
in ``bgad_core`` runs."""

from __future__ import annotations

import ast
import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import bgad_core

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bgad_core", "sweeper")
FAMILY_NAMES = {"bgad", "patchcore", "simplenet"}
FAMILY_WORDS = {"patchcore", "simplenet", "bgadflows", "flows", "normalization", "discriminator", "adaptor"}  # words of identifiers of one family's internals
# configuration defaults, which may name a family: the paper's BGAD-FAS reference arm and the one-class baseline
ALLOWED_FAMILY_NAMES = {("sweeper/tuning/sweep.py", "PAPER_DEFAULT"), ("sweeper/job/config.py", "BaselineSpec")}
FOREIGN_IN_CORE = ("sweeper", "ray", "mlflow", "optuna")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules a file imports at module level (``import a.b.c`` also runs ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:  # module level only: imports inside functions run later and make no circle at import
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports at module level, leaving out its own ancestor packages (Python has
    started initialising those before the module runs, so a package importing its children makes no circle)."""
    modules = sources()
    return {name: {target for target in imported_modules(path, modules)
                   if target != name and not name.startswith(target + ".")} for name, path in modules.items()}


def circle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path of imports from ``start`` back to itself, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for target in sorted(graph.get(node, ())):
            if target == start:
                return path + [start]
            if target not in seen:
                seen.add(target)
                stack.append((target, path + [target]))
    return None


def test_no_import_circles():
    graph = import_graph()
    circles = [circle for name in sorted(graph) if (circle := circle_through(graph, name))]
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_circle_check_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circle_through(graph, "a") == ["a", "b", "c", "a"] and circle_through(graph, "d") is None


def test_bgad_core_imports_nothing_of_the_orchestration():
    modules = sources()
    offenders = []
    for name, path in modules.items():
        if not name.startswith("bgad_core"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name}: {t}" for t in targets if t.split(".")[0] in FOREIGN_IN_CORE]
    assert not offenders


def words(identifier: str) -> set[str]:
    """``PatchCoreDetector`` -> {patch, core, detector}; ``mlflow_spec`` -> {mlflow, spec}."""
    return set(re.findall(r"[a-z0-9]+", re.sub(r"([A-Z][a-z])", r"_\1", identifier).lower()))


def family_mentions(path: Path) -> list[str]:
    """Family names as string constants and family internals as identifiers in ``path``'s code (docstrings and
    comments are free to explain), outside the allowed configuration defaults."""
    tree = ast.parse(path.read_text())
    relative = str(path.relative_to(REPO))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    allowed: set[int] = set()
    for node in ast.walk(tree):
        owner = node.name if isinstance(node, ast.ClassDef) else \
            node.targets[0].id if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) else None
        if owner and (relative, owner) in ALLOWED_FAMILY_NAMES:
            allowed.update(id(child) for child in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in allowed or id(node) in docstrings:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in FAMILY_NAMES:
            found.append(f"{relative}:{node.lineno}: {node.value!r}")
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
        if name and (FAMILY_WORDS & words(name) or any(f in name.lower() for f in ("patchcore", "simplenet"))):
            found.append(f"{relative}:{node.lineno}: {name}")
    return found


def test_sweeper_names_no_family_outside_configuration_defaults():
    found = [m for path in sorted((REPO / "sweeper").rglob("*.py")) for m in family_mentions(path)]
    assert not found, "family-specific code in sweeper/:\n" + "\n".join(found)


def test_the_family_check_sees_a_family_name():
    """The check above can fail: a file that branches on a family is caught."""
    probe = REPO / "sweeper" / "_probe_family_branch.py"
    probe.write_text('def f(params):\n    if params["family"] == "patchcore":\n        return params.flows\n')
    try:
        assert len(family_mentions(probe)) == 2
    finally:
        probe.unlink()


def cross_family_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from one family's folder (``bgad_core.models.<family>``) into another's: what two families share
    belongs in ``bgad_core.models.components``, so that a family can be added or removed as one folder."""
    def owner(module: str) -> str | None:
        parts = module.split(".")
        return parts[2] if len(parts) > 2 and parts[:2] == ["bgad_core", "models"] and parts[2] in FAMILY_NAMES else None
    return [f"{name} -> {target}" for name, targets in sorted(graph.items()) for target in sorted(targets)
            if owner(name) and owner(target) and owner(name) != owner(target)]


def test_no_family_imports_another_family():
    found = cross_family_imports(import_graph())
    assert not found, "a family reads another family's folder (move the shared part to components):\n" + "\n".join(found)


def test_the_cross_family_check_sees_one():
    graph = {"bgad_core.models.simplenet.training": {"bgad_core.models.patchcore.torch_model",
                                                     "bgad_core.models.components.cells"},
             "bgad_core.models.patchcore.detector": {"bgad_core.models.patchcore.torch_model"}}
    assert cross_family_imports(graph) == ["bgad_core.models.simplenet.training -> bgad_core.models.patchcore.torch_model"]


@pytest.mark.parametrize("module", sorted(m.name for m in pkgutil.walk_packages(bgad_core.__path__, "bgad_core.")))
def test_examples_in_bgad_core_run(module):
    failures, _ = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert failures == 0

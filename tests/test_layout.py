"""The floor plan holds: the wings are packages that say what they own and show one face, the main hall stays
small, no class name means two things, admission is decided in `limits/` alone, and the suite's files import
helpers from `tests/support/`, never from each other. A lint over the source, like `test_clock.py`'s."""

from __future__ import annotations

import ast
import importlib
from collections import defaultdict
from pathlib import Path

import sidecar

ROOT = Path(sidecar.__file__).parent
TESTS = Path(__file__).parent
WINGS = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())
HALL = sorted(p.stem for p in ROOT.glob("*.py") if p.stem not in ("__init__", "__main__"))


def modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def imports(path: Path) -> list[ast.ImportFrom]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and n.module]


def wing_of(path: Path) -> str | None:
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else None


def test_the_wings_are_the_expected_packages():
    assert WINGS == ["admin", "audit", "config", "keys", "limits", "ops", "records", "store", "upstream", "wire"]


def test_every_wing_says_what_it_owns_and_names_its_face():
    for wing in WINGS:
        package = importlib.import_module(f"sidecar.{wing}")
        doc = package.__doc__ or ""
        assert len(doc.split()) >= 30 and "\n\n" not in doc.strip(), f"{wing}: one paragraph of what it owns"
        face = package.__all__
        assert face and all((ROOT / wing / f"{name}.py").exists() or hasattr(package, name) for name in face), wing


def test_at_most_fourteen_modules_stay_in_the_main_hall():
    assert len(HALL) <= 14, HALL


def faces() -> dict[str, set[str]]:
    return {wing: set(importlib.import_module(f"sidecar.{wing}").__all__) for wing in WINGS}


def reaches(mine: str | None, tree: ast.AST, face: dict[str, set[str]]) -> list[str]:
    """The modules behind another wing's face that a module of wing `mine` (None: the hall) imports."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            other = parts[0] == "sidecar" and len(parts) >= 3 and parts[1] in face and parts[1] != mine
            if other and parts[2] not in face[parts[1]]:
                found.append(node.module)
    return found


def test_other_wings_import_only_a_wings_face():
    face = faces()
    reached = [(str(p.relative_to(ROOT)), reaches(wing_of(p), ast.parse(p.read_text()), face)) for p in modules()]
    assert [r for r in reached if r[1]] == []


def test_the_lint_finds_a_reach_behind_a_face():
    face = faces()
    behind = ast.parse("from sidecar.limits.local import LocalLimits\nfrom sidecar.limits.admission import Limits")
    assert reaches(None, behind, face) == ["sidecar.limits.local"]
    assert reaches("limits", behind, face) == []  # a wing's own modules are its own to use


def test_no_two_classes_share_a_name():
    where = defaultdict(list)
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


def test_admission_is_decided_in_limits_alone():
    """Nothing outside `limits/` reaches the pieces admission is made of; the proxy takes at most ten
    collaborators."""
    inner = {"sidecar.limits.local", "sidecar.limits.borrowing", "sidecar.limits.rates", "sidecar.limits.slots"}
    outside = [p for p in modules() if wing_of(p) != "limits"]
    assert [(str(p), n.module) for p in outside for n in imports(p) if n.module in inner] == []
    proxy = next(
        n
        for n in ast.walk(ast.parse((ROOT / "proxy.py").read_text()))
        if isinstance(n, ast.FunctionDef) and n.name == "__init__"
    )
    assert len(proxy.args.args) - 1 <= 10


def test_test_files_import_helpers_from_support_not_from_each_other():
    bad = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                leaf = name.split(".")
                if leaf[0] == "tests" and len(leaf) > 1 and (leaf[1].startswith("test_") or leaf[1] == "conftest"):
                    bad.append(f"{path.name}: {name}")
    assert bad == []


def runtime_imports(path: Path) -> set[str]:
    """The `sidecar` modules a module imports when it runs (not those named for type checking only)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for n in ast.walk(block)
    }
    found = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("sidecar") and id(n) not in typing_only:
            found.add(n.module)
    return found


def test_no_module_imports_itself_round_a_cycle():
    graph = {}
    for path in modules():
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = runtime_imports(path)
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        assert module not in trail, " -> ".join([*trail[trail.index(module) :], module])
        if module in done or module not in graph:
            return
        for dep in graph[module]:
            visit(dep, [*trail, module])
        done.add(module)

    for module in graph:
        visit(module, [])

"""docs/architecture.md stays a true map: it names every production file, and the files,
classes and functions it names exist.

A file added, split or renamed without the map following fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
#: The production folders, as the map names them.
PACKAGES = ("broker", "shard", "common", "supervisor")

#: A production file named in the text: ``broker/app.py``, ``shard/persist/schema.py``.
_PATH = re.compile(rf"(?<![\w/.])((?:{'|'.join(PACKAGES)})/[\w/]*\.py)\b")
#: A backquoted span that starts with a dotted name: `Loop.serve_until`, `Op.PUT(...)`.
_DOTTED = re.compile(r"`([A-Za-z_]\w*)\.([A-Za-z_]\w*)[^`]*`")


def _docstring_only(tree: ast.Module) -> bool:
    return all(
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in tree.body
    )


def _sources() -> dict[str, ast.Module]:
    """Every production module by its path from the repository root."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[path.relative_to(ROOT).as_posix()] = ast.parse(path.read_text(), str(path))
    return out


def production_files() -> list[str]:
    """The files the map must name: all but the packages' docstring-only ``__init__.py``."""
    return [
        rel
        for rel, tree in _sources().items()
        if not (rel.endswith("/__init__.py") and _docstring_only(tree))
    ]


def _bound_names(nodes) -> set[str]:
    """Names that ``nodes`` (a module's or a class's body) define or import."""
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def definitions() -> tuple[dict[str, set[str]], dict[str, tuple[set[str], list[str]]]]:
    """(module name: its top-level names, class name: (its attributes, its bases))."""
    modules: dict[str, set[str]] = {}
    classes: dict[str, tuple[set[str], list[str]]] = {}
    for rel, tree in _sources().items():
        if not rel.endswith("/__init__.py"):
            modules[Path(rel).stem] = _bound_names(tree.body)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            attrs, bases = classes.setdefault(node.name, (set(), []))
            attrs |= _bound_names(node.body)
            for sub in ast.walk(node):  # self.x = ... in its methods
                if (
                    isinstance(sub, ast.Attribute)
                    and isinstance(sub.ctx, ast.Store)
                    and isinstance(sub.value, ast.Name)
                    and sub.value.id == "self"
                ):
                    attrs.add(sub.attr)
            for base in node.bases:
                if isinstance(base, ast.Name):
                    bases.append(base.id)
    return modules, classes


def _has(classes, cls: str, attr: str, seen: frozenset = frozenset()) -> bool:
    attrs, bases = classes[cls]
    if attr in attrs:
        return True
    return any(
        _has(classes, base, attr, seen | {cls})
        for base in bases
        if base in classes and base not in seen
    )


def test_the_map_names_every_production_file():
    named = set(_PATH.findall(DOC.read_text()))
    missing = [rel for rel in production_files() if rel not in named]
    assert not missing, f"docs/architecture.md does not name {', '.join(missing)}"


def test_the_files_the_map_names_exist():
    gone = sorted(rel for rel in set(_PATH.findall(DOC.read_text())) if not (ROOT / rel).exists())
    assert not gone, f"docs/architecture.md names files that do not exist: {', '.join(gone)}"


def test_the_classes_and_functions_the_map_names_exist():
    """`Class.attribute` of a production class, and `module.name` of a production module."""
    modules, classes = definitions()
    wrong: set[str] = set()
    for owner, attr in _DOTTED.findall(DOC.read_text()):
        if attr == "py":
            continue
        if owner in classes:
            if not _has(classes, owner, attr):
                wrong.add(f"{owner}.{attr}")
        elif owner in modules and attr not in modules[owner]:
            wrong.add(f"{owner}.{attr}")
    assert not wrong, f"docs/architecture.md names what does not exist: {', '.join(sorted(wrong))}"

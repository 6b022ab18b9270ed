"""The package's layers point one way (docs/architecture.md): a module imports its own package and the
layers below it, never one above or beside it; no module imports another package's private names; no
module is longer than a sitting's read.

Two checks of the same rule: each layer imported in a fresh interpreter (what it pulls in when loaded,
the package root's own imports left out), and every import statement of every module read from its
source (also those inside functions, which loading does not run).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mergelab

SRC = Path(mergelab.__file__).resolve().parent
# bottom first; packages on one row are siblings: neither may import the other
LAYERS: list[tuple[str, ...]] = [
    ("mergelab.errors", "mergelab.version", "mergelab.native_build"),
    ("mergelab.threads",),
    ("mergelab.io",),
    ("mergelab.ops",),
    ("mergelab.methods",),
    ("mergelab.engine", "mergelab.continual"),
    ("mergelab.api",),
    ("mergelab.zoo",),
    ("mergelab.eval", "mergelab.distributed"),
    ("mergelab.adapt",),
    ("mergelab.experiment",),
    ("mergelab.search",),
    ("mergelab.report",),
    ("mergelab",),  # the package root: the public names, re-exported
    ("mergelab.cli",),
    ("mergelab.__main__",),
]
MAX_LINES = 400


def package_of(module: str) -> str:
    """The layer entry that holds ``module`` (the longest matching name)."""
    names = [p for row in LAYERS for p in row if module == p or module.startswith(p + ".")]
    assert names, f"{module} is on no layer: add it to LAYERS"
    return max(names, key=len)


RANK = {p: rank for rank, row in enumerate(LAYERS) for p in row}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` for every import statement of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("mergelab")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("mergelab"):
                continue
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # `from pkg import module`
                    found.append((f"{base}.{alias.name}", [], node.lineno))
                else:
                    found.append((base, [alias.name], node.lineno))
    return found


def test_no_import_points_up_or_sideways() -> None:
    known = modules()
    wrong = []
    for module, path in known.items():
        own = package_of(module)
        for target, _, line in imports_of(module, path, known):
            other = package_of(target)
            if other != own and RANK[other] >= RANK[own]:
                wrong.append(f"{path.relative_to(SRC.parent)}:{line}: {own} imports {target} ({other} is not below it)")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_crosses_a_package() -> None:
    known = modules()
    wrong = []
    for module, path in known.items():
        own = package_of(module)
        for target, names, line in imports_of(module, path, known):
            if package_of(target) == own:
                continue
            private = [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
            private += [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                wrong.append(f"{path.relative_to(SRC.parent)}:{line}: imports {', '.join(private)} from {target}")
    assert not wrong, "\n".join(wrong)


def test_every_module_is_short() -> None:
    long = {str(p.relative_to(SRC.parent)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


_LOAD = """
import importlib, importlib.util, json, pkgutil, sys, types
spec = importlib.util.find_spec("mergelab")
root = types.ModuleType("mergelab")  # the package without its __init__: only what the layer itself imports
root.__path__ = list(spec.submodule_search_locations)
sys.modules["mergelab"] = root
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
        importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("mergelab."))))
"""


@pytest.mark.parametrize("row", [row for row in LAYERS if row not in [("mergelab",), ("mergelab.__main__",)]],
                         ids=lambda row: row[0])  # the root and `python -m mergelab`: nothing above them
def test_a_layer_loads_only_layers_below_it(row: tuple[str, ...]) -> None:
    for package in row:
        out = subprocess.run([sys.executable, "-c", _LOAD, package], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(SRC.parent)}, timeout=300)
        loaded = {package_of(m) for m in json.loads(out.stdout.splitlines()[-1])}
        above = sorted(p for p in loaded if p != package and RANK[p] >= RANK[package])
        assert not above, f"importing {package} loads {above}"


def test_no_two_modules_import_each_other() -> None:
    # a loop between two modules (even through an import inside a function) means neither is the lower one;
    # a package's __init__ re-exporting its modules is not a loop
    known = modules()
    edges = {m: {target for target, _, _ in imports_of(m, path, known) if target != m}
             for m, path in known.items() if path.name != "__init__.py"}
    loops = sorted(f"{a} <-> {b}" for a, targets in edges.items() for b in targets
                   if a < b and a in edges.get(b, set()))
    assert not loops, loops

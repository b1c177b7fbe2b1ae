"""The house is a test: the layering of ``src/flowprobe`` (docs/layout.md) checked on every import.

Every ``import`` and ``from ... import`` of the package is read with :mod:`ast`, at module level and inside
functions alike, and resolved to the module it names. The test fails on

- an import cycle between modules (a package's ``__init__`` counts as a module);
- an arrow the layering forbids (``ALLOWED`` below: each part and the parts it may import);
- one experiment importing another (experiments share code only through ``SHARED_EXPERIMENT_MODULES``);
- ``argparse`` or a ``print(`` call anywhere outside ``cli/`` (the library reports through ``progress=`` flags,
  callbacks, return values and exceptions);
- a private name (leading underscore, dunders aside) imported from, or reached into, another module;
- a function longer than ``MAX_FUNCTION_LINES`` or a module longer than ``MAX_MODULE_LINES`` that
  ``docs/layout.md`` does not name as an exception.

The checker runs on any package folder, and the second half of this file builds small synthetic packages
with each kind of violation planted, to show that the checker catches it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "flowprobe"
LAYOUT_DOC = ROOT / "docs" / "layout.md"

MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500

#: The parts of the house, lowest first. A module belongs to the part named by its first component below
#: the package (``flowprobe.train.loop`` -> ``train``); the top-level leaf modules form ``base``.
BASE = {"paths", "couplings", "objectives", "solvers", "gaussian", "gaussian_moments", "metrics", "config", "io",
        "checkpoint", "device", "seeds", "affine_paths", "timesampling", "guidance"}

#: part -> the other parts it may import (its own part is always allowed, cycles aside).
ALLOWED: dict[str, set[str]] = {
    "root": set(),                      # flowprobe/__init__.py: the version, nothing else
    "base": {"root"},                   # the mathematics and the plumbing
    "nets": {"root", "base"},
    "data": {"root", "base"},
    "report": {"root", "io"},           # figures and markdown know nothing above io
    "train": {"root", "base", "nets"},  # the loop imports no probe, no data, no run
    "probes": {"root", "base", "nets"},
    "adapters": {"root", "base", "nets"},
    "diagnosis": {"root", "base", "nets", "data", "probes", "report", "adapters"},
    "watch": {"root", "base", "nets", "data", "probes", "diagnosis", "report"},
    "runs": {"root", "base", "nets", "data", "train", "probes", "adapters", "diagnosis", "watch", "report"},
    "experiments": {"root", "base", "nets", "data", "train", "probes", "adapters", "diagnosis", "watch", "runs",
                    "report"},
    "cli": {"root", "base", "nets", "data", "train", "probes", "adapters", "diagnosis", "watch", "runs", "report",
            "experiments"},
}

#: Modules of ``experiments/`` that are shared machinery rather than an experiment; an experiment may import
#: these, never another experiment.
SHARED_EXPERIMENT_MODULES = {"harness", "lowdim", "imageflow"}


@dataclass
class Module:
    name: str                 # dotted, e.g. "flowprobe.train.loop"
    path: Path
    tree: ast.Module
    lines: int
    is_package: bool


@dataclass
class Edge:
    src: str
    dst: str
    line: int
    names: tuple[str, ...] = ()


@dataclass
class House:
    package: str
    modules: dict[str, Module] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ reading


def read_house(pkg_dir: Path) -> House:
    """Every module of the package at ``pkg_dir`` and every import between them (resolved to modules)."""
    package = pkg_dir.name
    house = House(package)
    for path in sorted(pkg_dir.rglob("*.py")):
        rel = path.relative_to(pkg_dir.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        text = path.read_text(encoding="utf-8")
        name = ".".join(parts)
        house.modules[name] = Module(name, path, ast.parse(text, str(path)), text.count("\n") + 1, is_package)
    for mod in house.modules.values():
        house.edges.extend(_imports_of(mod, house))
    return house


def _resolve_relative(mod: Module, level: int, target: str | None) -> str:
    base = mod.name.split(".")
    if not mod.is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _owner(name: str, house: House) -> str | None:
    """The module that ``name`` (a dotted path, maybe ending in an attribute) lives in."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in house.modules:
            return candidate
        parts = parts[:-1]
    return None


def _imports_of(mod: Module, house: House) -> list[Edge]:
    edges = []
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == house.package:
                    dst = _owner(alias.name, house)
                    if dst is not None:
                        edges.append(Edge(mod.name, dst, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = _resolve_relative(mod, node.level, node.module)
            elif node.module and node.module.split(".")[0] == house.package:
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in house.modules:  # ``from . import submodule``
                    edges.append(Edge(mod.name, sub, node.lineno))
                else:
                    dst = _owner(target, house)
                    if dst is not None:
                        edges.append(Edge(mod.name, dst, node.lineno, (alias.name,)))
    return [e for e in edges if e.dst != mod.name]


# ------------------------------------------------------------------------------------------------ rules


def part_of(name: str, package: str) -> str:
    parts = name.split(".")[1:]
    if not parts:
        return "root"
    return "base" if parts[0] in BASE else parts[0]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def layering_violations(house: House) -> list[str]:
    out = []
    for e in house.edges:
        a, b = part_of(e.src, house.package), part_of(e.dst, house.package)
        if a not in ALLOWED:
            out.append(f"{e.src}: part {a!r} is not in the layout (tests/test_architecture.py ALLOWED)")
            continue
        leaf = e.dst.split(".")[1] if "." in e.dst else ""
        if a != b and b not in ALLOWED[a] and not (b == "base" and leaf in ALLOWED[a]):
            out.append(f"{e.src}:{e.line} imports {e.dst}: {a} may not import {b}")
        if a == b == "experiments":
            src_leaf, dst_leaf = e.src.split(".")[-1], e.dst.split(".")[-1]
            shared = SHARED_EXPERIMENT_MODULES | {"experiments"}
            if src_leaf not in shared and dst_leaf not in shared:
                out.append(f"{e.src}:{e.line} imports {e.dst}: one experiment may not import another")
    return sorted(set(out))


def cycles(house: House) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in house.modules}
    for e in house.edges:
        graph[e.src].add(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def private_violations(house: House) -> list[str]:
    out = []
    for e in house.edges:
        leaf = e.dst.split(".")[-1]
        if _is_private(leaf):
            out.append(f"{e.src}:{e.line} imports the private module {e.dst}")
        for n in e.names:
            if _is_private(n):
                out.append(f"{e.src}:{e.line} imports the private name {n} from {e.dst}")
    # ``module._name`` where ``module`` is bound to another module of the package
    for mod in house.modules.values():
        aliases: dict[str, str] = {}
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in house.modules and alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                target = (_resolve_relative(mod, node.level, node.module) if node.level else node.module) or ""
                for alias in node.names:
                    if f"{target}.{alias.name}" in house.modules:
                        aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
        for node in ast.walk(mod.tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _is_private(node.attr)):
                out.append(f"{mod.name}:{node.lineno} reaches into {aliases[node.value.id]}.{node.attr}")
    return sorted(set(out))


def cli_only_violations(house: House) -> list[str]:
    out = []
    for mod in house.modules.values():
        if part_of(mod.name, house.package) == "cli":
            continue
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
                out.append(f"{mod.name}:{node.lineno} imports argparse (argument parsing belongs in cli/)")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
                out.append(f"{mod.name}:{node.lineno} imports argparse (argument parsing belongs in cli/)")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                out.append(f"{mod.name}:{node.lineno} calls print (terminal output belongs in cli/)")
    return sorted(out)


def documented_exceptions(doc: Path) -> set[str]:
    """Names listed in docs/layout.md's "Longer than the limits" section (``module`` or ``module:function``)."""
    if not doc.exists():
        return set()
    text = doc.read_text(encoding="utf-8")
    m = re.search(r"^## Longer than the limits\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    if not m:
        return set()
    return set(re.findall(r"^\| `([\w.:]+)` \|", m.group(1), flags=re.M))


def size_violations(house: House, allowed: set[str]) -> list[str]:
    out = []
    for mod in house.modules.values():
        if mod.lines > MAX_MODULE_LINES and mod.name not in allowed:
            out.append(f"{mod.name}: {mod.lines} lines (limit {MAX_MODULE_LINES})")
        for node in ast.walk(mod.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{mod.name}:{node.name}" not in allowed:
                    out.append(f"{mod.name}:{node.name}: {n} lines (limit {MAX_FUNCTION_LINES})")
    return sorted(out)


# ------------------------------------------------------------------------------------------------ the house


@pytest.fixture(scope="module")
def house() -> House:
    return read_house(PACKAGE_DIR)


def test_every_module_belongs_to_a_part(house):
    unknown = sorted({part_of(m, house.package) for m in house.modules} - set(ALLOWED))
    assert not unknown, f"parts missing from the layout: {unknown}"


def test_no_import_cycles(house):
    assert cycles(house) == []


def test_layering(house):
    assert layering_violations(house) == []


def test_no_private_imports(house):
    assert private_violations(house) == []


def test_parsing_and_printing_only_in_cli(house):
    assert cli_only_violations(house) == []


def test_function_and_module_sizes(house):
    assert size_violations(house, documented_exceptions(LAYOUT_DOC)) == []


def test_reader_resolves_the_real_imports(house):
    """The checker is only as good as its reading: known arrows of the package must be among its edges."""
    pairs = {(e.src, e.dst) for e in house.edges}
    assert ("flowprobe.cli", "flowprobe.cli.train") in pairs        # ``from . import train``
    assert ("flowprobe.solvers", "flowprobe.paths") in pairs        # ``from .paths import ...``
    assert any(a.startswith("flowprobe.cli") and b.startswith("flowprobe.runs") for a, b in pairs)


# ------------------------------------------------------------------------------------------ planted faults


def _tree(tmp_path: Path, files: dict[str, str]) -> House:
    pkg = tmp_path / "flowprobe"
    for rel, text in {"__init__.py": "", **files}.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return read_house(pkg)


CLEAN = {
    "paths.py": "import torch\n",
    "io.py": "",
    "nets/__init__.py": "from .mlp import MLP\n",
    "nets/mlp.py": "from ..paths import x\n",
    "train/__init__.py": "from .loop import fit\n",
    "train/loop.py": "from ..nets import MLP\n",
    "probes/__init__.py": "",
    "probes/gradvar.py": "from .per_sample import batch_gradient\n",
    "probes/per_sample.py": "def batch_gradient():\n    return 1\n",
    "report/__init__.py": "from ..io import atomic_write\n",
    "experiments/__init__.py": "",
    "experiments/harness.py": "",
    "experiments/gmm.py": "from .harness import experiment\nfrom ..probes.gradvar import g\n",
    "cli/__init__.py": "import argparse\nprint('ok')\n",
}


def test_planted_clean_tree_passes(tmp_path):
    h = _tree(tmp_path, CLEAN)
    assert cycles(h) == [] and layering_violations(h) == [] and private_violations(h) == []
    assert cli_only_violations(h) == []


def test_planted_cycle_is_caught(tmp_path):
    h = _tree(tmp_path, {**CLEAN, "probes/per_sample.py": "def f():\n    from .gradvar import g\n"})
    assert cycles(h) == [["flowprobe.probes.gradvar", "flowprobe.probes.per_sample"]]


@pytest.mark.parametrize("rel,text,expected", [
    ("probes/gradvar.py", "def f():\n    from ..train.loop import fit\n", "probes may not import train"),
    ("train/loop.py", "from ..probes.gradvar import g\n", "train may not import probes"),
    ("train/loop.py", "import flowprobe.data.toy\n", "train may not import data"),
    ("nets/mlp.py", "from ..train import fit\n", "nets may not import train"),
    ("paths.py", "from .report import save\n", "base may not import report"),
    ("report/__init__.py", "from ..paths import x\n", "report may not import base"),
    ("probes/gradvar.py", "from ..cli import main\n", "probes may not import cli"),
    ("experiments/gmm.py", "from .reflow import thing\n", "one experiment may not import another"),
])
def test_planted_forbidden_arrow_is_caught(tmp_path, rel, text, expected):
    files = {**CLEAN, rel: text, "data/__init__.py": "", "data/toy.py": "", "experiments/reflow.py": ""}
    assert any(expected in v for v in layering_violations(_tree(tmp_path, files)))


def test_planted_private_import_is_caught(tmp_path):
    h = _tree(tmp_path, {**CLEAN, "probes/gradvar.py": "from .per_sample import _chunks\n",
                         "probes/ghost.py": "from . import per_sample\nx = per_sample._moments\n",
                         "experiments/gmm.py": "from ._lowdim import run\n", "experiments/_lowdim.py": ""})
    found = "\n".join(private_violations(h))
    assert "private name _chunks" in found
    assert "reaches into flowprobe.probes.per_sample._moments" in found
    assert "private module flowprobe.experiments._lowdim" in found


def test_planted_print_and_argparse_outside_cli_are_caught(tmp_path):
    h = _tree(tmp_path, {**CLEAN, "train/loop.py": "def f():\n    import argparse\n    print('x')\n"})
    found = cli_only_violations(h)
    assert len(found) == 2 and all(v.startswith("flowprobe.train.loop:") for v in found)


def test_planted_long_function_is_caught(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    h = _tree(tmp_path, {**CLEAN, "paths.py": "def long():\n" + body})
    assert size_violations(h, set()) == [f"flowprobe.paths:long: {MAX_FUNCTION_LINES + 1} lines (limit 80)"]
    assert size_violations(h, {"flowprobe.paths:long"}) == []

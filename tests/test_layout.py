"""The repository's layout rules, read from the source (STYLE.md "Layout", the helper standards).

(a) The library (flax_impl/ outside flax_impl/apps/) imports neither torch, torch_ref nor argparse.
(b) torch_ref imports no jax, flax or optax.
(c) No import cycles among the flax_impl and torch_ref modules.
(d) No .py file in flax_impl/, torch_ref/, parity_tests/ or tests/ is over 400 lines.
(e) Each torch_ref layer file has a flax_impl file of the same name and a parity test; a Flax layer is at most
    2.2x its twin's code where the twin writes the layer out.

Imports are read with `ast`, function-local ones included, so the static checks import nothing (no jax in this
process); the dynamic checks import the modules in a fresh interpreter. `if TYPE_CHECKING:` imports count for
(a) and (b) but not for the runtime graph of (c) and of (b)'s transitive check: they never run.
"""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
MAX_TWIN_RATIO = 2.2


@dataclass(frozen=True)
class Import:
    module: str  # the absolute module named after `import` / `from`
    names: tuple[str, ...]  # the names after `from m import` (empty for `import m`)
    line: int
    type_checking: bool  # inside `if TYPE_CHECKING:`


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse_imports(path: Path, module: str) -> list[Import]:
    """Every import statement of the file at any depth (functions, classes, branches), relative forms resolved,
    plus `importlib.import_module("constant")` calls."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, type_checking: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_checking)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, (), node.lineno, type_checking) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append(Import(base, tuple(a.name for a in node.names), node.lineno, type_checking))
        elif isinstance(node, ast.Call) and _is_import_module(node):
            found.append(Import(node.args[0].value, (), node.lineno, type_checking))
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_import_module(call: ast.Call) -> bool:
    f = call.func
    named = (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id in ("import_module", "__import__")
    )
    return named and bool(call.args) and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


MODULES = {module_name(p): p for p in python_files("flax_impl", "torch_ref")}
IMPORTS = {m: parse_imports(p, m) for m, p in MODULES.items()}
# `flax_impl/__main__.py` is the `python -m flax_impl` door into the command: an application, like flax_impl/apps/.
LIBRARY = sorted(
    m for m in MODULES if m.startswith("flax_impl") and not m.startswith("flax_impl.apps") and m != "flax_impl.__main__"
)
TWINS = sorted(m for m in MODULES if m.startswith("torch_ref"))


def _lazy_exports() -> dict[str, str]:
    """flax_impl's public names (listed once, in flax_impl/__init__.pyi): attribute -> the module `__getattr__`
    imports it from."""
    tree = ast.parse((ROOT / "flax_impl" / "__init__.pyi").read_text())
    return {a.asname or a.name: n.module for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}


EXPORTS = _lazy_exports()


def targets(imp: Import, known: dict[str, Path]) -> set[str]:
    """Our modules an import statement loads directly: `from pkg import sub` loads pkg.sub, and `from flax_impl
    import Name` the module of Name's lazy export; parent packages are not listed (see `reachable`)."""
    out = set()
    if imp.module in known:
        out.add(imp.module)
    else:  # `import a.b.c` of a name that is not a module file: its longest known prefix
        parts = imp.module.split(".")
        prefixes = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        out |= {next((m for m in prefixes if m in known), imp.module)} & set(known)
    for name in imp.names:
        if f"{imp.module}.{name}" in known:
            out.add(f"{imp.module}.{name}")
        elif imp.module == "flax_impl" and name in EXPORTS:
            out.add(EXPORTS[name])
    return out


def import_graph(imports: dict[str, list[Import]], known: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported module: line} over runtime imports (TYPE_CHECKING blocks left out)."""
    return {
        m: {t: imp.line for imp in imps if not imp.type_checking for t in sorted(targets(imp, known)) if t != m}
        for m, imps in imports.items()
    }


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every cycle closed by a back edge of a depth-first search, as [m0, m1, ..., m0]."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    cycles = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, {}):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    return cycles


def reachable(start: str, graph: dict[str, dict[str, int]]) -> set[str]:
    """Our modules that importing `start` executes: its imports, theirs, and every parent package's __init__."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))] + list(graph.get(m, {}))
    return seen & set(graph)


GRAPH = import_graph(IMPORTS, MODULES)


def foreign(module: str, banned: tuple[str, ...], *, runtime_only: bool = False) -> list[str]:
    """The module's imports of `banned` top-level packages (or of a banned dotted prefix), with their lines."""
    return [
        f"{MODULES[module].relative_to(ROOT)}:{imp.line} imports {imp.module}"
        for imp in IMPORTS[module]
        if not (runtime_only and imp.type_checking)
        if any(imp.module == b or imp.module.startswith(b + ".") for b in banned)
    ]


def loaded_after_importing(modules: list[str], watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` are in sys.modules after a fresh interpreter imports `modules` from this checkout."""
    package = modules[0].split(".")[0]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"assert sys.modules[{package!r}].__file__.startswith({str(ROOT)!r}), sys.modules[{package!r}].__file__\n"
        f"print(sorted(m for m in {watched!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def known_failures(names: list[str], known: dict[str, str]) -> list:
    """pytest params, the `known` ones marked strict xfail with their reason: fixing one makes the test fail
    until its entry is deleted."""
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=known[n])) if n in known else n for n in names]


# ------------------------------------------------------------------------------------------- the checkers themselves
def test_parser_sees_function_local_relative_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import torch\n"
        "def f():\n    import argparse\n    from . import sibling\n    from ..top import name\n"
        "class C:\n    def g(self):\n        importlib.import_module('torch_ref.x')\n"
    )
    got = {(i.module, i.names, i.type_checking) for i in parse_imports(pkg / "mod.py", "pkg.mod")}
    assert got == {
        ("typing", ("TYPE_CHECKING",), False),
        ("torch", (), True),
        ("argparse", (), False),
        ("pkg", ("sibling",), False),
        ("top", ("name",), False),
        ("torch_ref.x", (), False),
    }


def test_cycle_finder_reports_the_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_lazy_exports_resolve_to_our_modules():
    assert EXPORTS and set(EXPORTS.values()) <= set(MODULES), "flax_impl/__init__.pyi names a module that is not ours"
    assert targets(Import("flax_impl", ("Embed", "tokenizer"), 1, False), MODULES) == {
        "flax_impl",
        "flax_impl.embedding",
        "flax_impl.tokenizer",
    }


# ------------------------------------------------------------------------------------ (a) the library stays alone
LIBRARY_BANNED = ("torch", "torch_ref", "argparse", "flax_impl.apps")
KNOWN_LIBRARY_IMPORTS: dict[str, str] = {}


@pytest.mark.parametrize("module", known_failures(LIBRARY, KNOWN_LIBRARY_IMPORTS))
def test_library_module_imports_no_torch_torch_ref_argparse_or_apps(module):
    assert foreign(module, LIBRARY_BANNED) == []


def test_importing_the_library_loads_no_torch():
    """jax and flax import argparse themselves, so argparse is checked statically only (above)."""
    assert loaded_after_importing(LIBRARY, ("torch", "torch_ref")) == []


# ------------------------------------------------------------------------------------- (b) the twins stay in torch
TWIN_BANNED = ("jax", "jaxlib", "flax", "optax")


@pytest.mark.parametrize("module", TWINS)
def test_torch_ref_module_and_what_it_loads_import_no_jax(module):
    """Static and transitive: torch_ref reads the shared config and tokenizer from flax_impl, so every module that
    importing it executes (flax_impl's package __init__ included) must be free of jax too."""
    assert [line for m in sorted(reachable(module, GRAPH)) for line in foreign(m, TWIN_BANNED, runtime_only=True)] == []
    assert foreign(module, TWIN_BANNED) == []


def test_importing_torch_ref_loads_no_jax():
    assert loaded_after_importing(TWINS, TWIN_BANNED) == []


# ----------------------------------------------------------------------------------------------- (c) import cycles
def test_no_import_cycles():
    def show(cycle: list[str]) -> str:  # each module with the line that imports the next one
        steps = [f"{a} (line {GRAPH[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
        return " -> ".join(steps + [cycle[-1]])

    cycles = find_cycles(GRAPH)
    assert cycles == [], "import cycles:\n" + "\n".join(map(show, cycles))


# --------------------------------------------------------------------------------------------------- (d) file size
KNOWN_LONG_FILES: dict[str, str] = {}


CHECKED_FILES = [str(p.relative_to(ROOT)) for p in python_files("flax_impl", "torch_ref", "parity_tests", "tests")]


@pytest.mark.parametrize("name", known_failures(CHECKED_FILES, KNOWN_LONG_FILES))
def test_file_is_at_most_400_lines(name):
    n = len((ROOT / name).read_text().splitlines())
    assert n <= MAX_LINES, f"{name} has {n} lines (at most {MAX_LINES})"


# ------------------------------------------------------------------------------------------------ (e) file twins
LAYERS = "attention block cache dropout embedding generation masks norm pipeline positions rope tokenizer train"
LAYERS += " transformer"
LAYERS = LAYERS.split()
SHARED_HELPERS = ["config", "utils"]  # twins too, but no layer: config is shared, utils counts parameters
# Twins that reuse torch's own class or the shared file instead of writing the layer out: no length to compare.
WRAPPERS = {
    "dropout": "torch_ref subclasses torch.nn.Dropout, only checking its arguments",
    "embedding": "torch_ref subclasses torch.nn.Embedding, checks its arguments and adds `attend`",
    "tokenizer": "torch_ref re-exports flax_impl/tokenizer.py, the one (jax-free) definition",
}
# The twin writes the layer out: the Flax file may add its kernels' glue, dtypes and sharding, not a second design.
WRITTEN_OUT = ["attention", "block", "cache", "generation", "masks", "norm", "pipeline", "positions", "rope", "train"]
WRITTEN_OUT += ["transformer"]
KNOWN_LONG_TWINS: dict[str, str] = {}


def code_lines(path: Path) -> int:
    """Lines holding code: no blank lines, comments or docstrings (so documentation never counts as length)."""
    source = path.read_text()
    docs = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                docs.update(range(first.lineno, first.end_lineno + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docs)
    return len(lines)


def test_every_torch_ref_file_is_a_known_twin():
    stems = {p.stem for p in (ROOT / "torch_ref").glob("*.py")} - {"__init__"}
    assert stems == set(LAYERS) | set(SHARED_HELPERS), "classify the new torch_ref file in tests/test_layout.py"
    assert set(WRAPPERS) | set(WRITTEN_OUT) == set(LAYERS) and not set(WRAPPERS) & set(WRITTEN_OUT)


@pytest.mark.parametrize("name", LAYERS + SHARED_HELPERS)
def test_torch_ref_file_has_a_flax_impl_twin(name):
    assert (ROOT / "flax_impl" / f"{name}.py").is_file(), f"torch_ref/{name}.py has no flax_impl/{name}.py"


@pytest.mark.parametrize("name", LAYERS)
def test_layer_has_a_parity_test(name):
    assert (ROOT / "parity_tests" / f"test_{name}.py").is_file(), f"no parity_tests/test_{name}.py for {name}"


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_wrapper_twin_writes_at_most_one_function(name):
    """The exemption from the length rule holds only while the twin stays a wrapper (an `__init__` that checks the
    arguments before torch's constructor sees them does not count)."""
    tree = ast.parse((ROOT / "torch_ref" / f"{name}.py").read_text())
    functions = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    defs = [f for f in functions if f != "__init__"]
    assert len(defs) <= 1, f"torch_ref/{name}.py writes {defs}: move {name} to WRITTEN_OUT ({WRAPPERS[name]} no more)"


@pytest.mark.parametrize("name", known_failures(WRITTEN_OUT, KNOWN_LONG_TWINS))
def test_flax_layer_is_within_about_twice_its_twin(name):
    ours, twin = code_lines(ROOT / "flax_impl" / f"{name}.py"), code_lines(ROOT / "torch_ref" / f"{name}.py")
    assert ours <= MAX_TWIN_RATIO * twin, (
        f"flax_impl/{name}.py has {ours} code lines, {ours / twin:.2f}x torch_ref/{name}.py's {twin} "
        f"(at most {MAX_TWIN_RATIO}x)"
    )

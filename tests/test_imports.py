"""The package's import contracts, read from the source (no module is imported):

- layers: a module imports only its own package and the packages of lower layers (the flow
  of docs/layout.md, top to bottom: the dispatcher, the main job, features, generation and export,
  retrieval and training, data, tokenizers, models and the shapes world, parallelism, the
  on-disk layout, the config, the vocabulary);
- packages of one layer do not import each other;
- no import cycle between modules, counting imports inside functions;
- an import inside a function says why on its line (`cm3leon --help` stays fast, or an
  optional dependency stays optional).
"""

import ast
import collections
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cm3leon_jax"

LAYERS = (  # top first; a `|` separates independent packages of one layer
    "cli",
    "demo",
    "aot | eval | scaling | sft",
    "generate | export",
    "retrieval | train",
    "data",
    "tokenizers",
    "model | shapes",
    "parallel",
    "layout",
    "config",
    "vocab",
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path):
    """(imported module, line, inside a function) for each import of our package."""
    tree = ast.parse(path.read_text())
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            local.update(id(n) for n in ast.walk(fn) if n is not fn)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES
                     else node.module for a in node.names]
        for name in names:
            yield name, node.lineno, id(node) in local


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer_of(package: str) -> int:
    for i, layer in enumerate(LAYERS):
        if package in (p.strip() for p in layer.split("|")):
            return i
    raise AssertionError(f"package {package!r} is in no layer of LAYERS: place it")


GRAPH = {m: [(t, line, inner) for t, line, inner in _imports(p)
             if t.split(".")[0] == "cm3leon_jax"] for m, p in MODULES.items()}


def test_every_package_has_a_layer():
    for module in MODULES:
        if module != "cm3leon_jax":
            _layer_of(_package(module))


def test_imports_go_downhill():
    uphill = []
    for module, targets in GRAPH.items():
        if module == "cm3leon_jax":
            continue
        src = _package(module)
        for target, line, _ in targets:
            dst = _package(target)
            if dst == src or target == "cm3leon_jax":
                continue
            if _layer_of(dst) <= _layer_of(src):
                uphill.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports "
                              f"{target} ({dst!r} is not below {src!r})")
    assert not uphill, "\n".join(sorted(set(uphill)))


def test_config_imports_no_stage():
    for module, targets in GRAPH.items():
        if _package(module) == "config":
            stages = {_package(t) for t, _, _ in targets} - {"config", "vocab"}
            assert not stages, f"{module} imports the stages {sorted(stages)}"


def test_no_import_cycle():
    edges = collections.defaultdict(set)
    for module, targets in GRAPH.items():
        for target, _, _ in targets:
            target = target if target in MODULES else target.rsplit(".", 1)[0]
            if target in MODULES and target != module:
                edges[module].add(target)
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def _explained(lines: list[str], line: int) -> bool:
    """A comment on the import's line, on another import of its block (import groups split
    by one blank line count as one block), or just above the block."""
    is_import = lambda k: 0 <= k < len(lines) and lines[k].strip().startswith(("import ", "from "))
    in_block = lambda k: is_import(k) or (not lines[k].strip() and is_import(k - 1)
                                          and is_import(k + 1))
    i = j = line - 1
    while i > 0 and in_block(i - 1):
        i -= 1
    while j + 1 < len(lines) and in_block(j + 1):
        j += 1
    return any("#" in lines[k] for k in range(max(i - 1, 0), j + 1))


def test_imports_inside_functions_say_why():
    silent = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for _, line, inner in _imports(path):
            if inner and not _explained(lines, line):
                silent.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {lines[line - 1].strip()}")
    assert not silent, ("imports inside functions need a reason on their line (or the line "
                        "above their block):\n" + "\n".join(sorted(set(silent))))

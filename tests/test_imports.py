"""The package's import contracts, read from the source (no module is imported):

- layers: a module imports only its own package and the packages of lower layers (the flow
  of docs/layout.md, top to bottom: the dispatcher, the main job, features, generation and export,
  retrieval and training, data, tokenizers, models and the shapes world, parallelism, the
  on-disk layout, the config, the vocabulary, the storage paths);
- packages of one layer do not import each other;
- no import cycle between modules, counting imports inside functions;
- an import inside a function says why on its line (`cm3leon --help` stays fast, or an
  optional dependency stays optional).
"""

import ast
import collections
import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cm3leon_jax"

LAYERS = (  # top first; a `|` separates independent packages of one layer
    "cli",
    "demo",
    "aot | eval | scaling | sft",
    "generate | export",
    "retrieval | train",
    "data",
    "tokenizers",
    "model | shapes | perception",
    "parallel",
    "layout",
    "config",
    "vocab",
    "storage",
)


def _modules(package: Path) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]):
    """(imported module, line, inside a function) for each import of `path`."""
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
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                     else node.module for a in node.names]
        for name in names:
            yield name, node.lineno, id(node) in local


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer_of(package: str, layers=LAYERS) -> int:
    for i, layer in enumerate(layers):
        if package in (p.strip() for p in layer.split("|")):
            return i
    raise AssertionError(f"package {package!r} is in no layer of LAYERS: place it")


def _graph(modules: dict[str, Path]) -> dict[str, list]:
    root = next(iter(modules)).split(".")[0]
    return {m: [(t, line, inner) for t, line, inner in _imports(p, modules)
                if t.split(".")[0] == root] for m, p in modules.items()}


def _root(modules: dict[str, Path]) -> Path:
    """The folder that holds the package (file names in messages are relative to it)."""
    return modules[next(iter(modules)).split(".")[0]].parents[1]


def uphill(modules: dict[str, Path], layers=LAYERS) -> list[str]:
    """Every import of a package in the same or a higher layer."""
    out = []
    root = _root(modules)
    for module, targets in _graph(modules).items():
        src = _package(module)
        if not src:
            continue
        for target, line, _ in targets:
            dst = _package(target)
            if dst and dst != src and _layer_of(dst, layers) <= _layer_of(src, layers):
                out.append(f"{modules[module].relative_to(root)}:{line} imports {target} "
                           f"({dst!r} is not below {src!r})")
    return sorted(set(out))


def cycle(modules: dict[str, Path]) -> list[str] | None:
    """One import cycle between modules (imports inside functions count), or None."""
    edges = collections.defaultdict(set)
    for module, targets in _graph(modules).items():
        for target, _, _ in targets:
            target = target if target in modules else target.rsplit(".", 1)[0]
            if target in modules and target != module:
                edges[module].add(target)
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(modules):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _comment_lines(source: str) -> set[int]:
    """0-based numbers of the lines that hold a comment (not a `#` inside a string)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0] - 1 for t in tokens if t.type == tokenize.COMMENT}


def silent_local_imports(modules: dict[str, Path]) -> list[str]:
    """Imports inside functions without a comment (their reason) on one of their lines."""
    out = []
    root = _root(modules)
    for path in modules.values():
        source = path.read_text()
        tree, comments = ast.parse(source), _comment_lines(source)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not any(
                        k in comments for k in range(node.lineno - 1, node.end_lineno)):
                    out.append(f"{path.relative_to(root)}:{node.lineno}: "
                               f"{source.splitlines()[node.lineno - 1].strip()}")
    return sorted(set(out))


MODULES = _modules(PACKAGE)


def test_every_package_has_a_layer():
    for module in MODULES:
        if module != "cm3leon_jax":
            _layer_of(_package(module))


def test_imports_go_downhill():
    found = uphill(MODULES)
    assert not found, "\n".join(found)


def test_config_imports_no_stage():
    for module, targets in _graph(MODULES).items():
        if _package(module) == "config":
            stages = {_package(t) for t, _, _ in targets} - {"config", "vocab", "storage"}
            assert not stages, f"{module} imports the stages {sorted(stages)}"


def test_no_import_cycle():
    found = cycle(MODULES)
    assert found is None, "import cycle: " + " -> ".join(found)


def test_imports_inside_functions_say_why():
    found = silent_local_imports(MODULES)
    assert not found, "imports inside functions need their reason on their line:\n" + \
        "\n".join(found)


def test_the_checks_catch_what_they_forbid(tmp_path):
    """On a made-up package with one of each: an uphill import, a cycle through an import
    inside a function, a silent and an explained local import."""
    pkg = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "from pkg.high import b\n",  # uphill
        "high/__init__.py": "",
        "high/b.py": ("def f():\n    from pkg.high import c\n\n\n"
                      "def g():\n    import json  # optional: why\n    s = '#'\n"
                      "    import csv\n"),
        "high/c.py": "import pkg.high.b\n",  # b -> c inside f, c -> b: a cycle
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    modules = _modules(pkg)
    assert uphill(modules, ("high", "low")) == ["pkg/low/a.py:1 imports pkg.high.b ('high' "
                                                "is not below 'low')"]
    assert uphill(modules, ("low", "high")) == []
    assert cycle(modules) in (["pkg.high.b", "pkg.high.c", "pkg.high.b"],
                              ["pkg.high.c", "pkg.high.b", "pkg.high.c"])
    assert silent_local_imports(modules) == ["pkg/high/b.py:2: from pkg.high import c",
                                             "pkg/high/b.py:8: import csv"]

"""The package's import graph, function-level imports included: no cycles, and a deferred import only where it
puts off a heavy library (mindspore, mindformers, torch, transformers, tokenizers, matplotlib, doit), with a comment
saying so."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwenbuild"
# tensorboardX loads google.protobuf (and torch, where installed)
HEAVY = ("mindspore", "mindformers", "torch", "transformers", "tokenizers", "matplotlib", "doit", "google.protobuf",
         "tensorboardX")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(node, current: str, known: set[str]) -> list[str]:
    """qwenbuild modules an import statement loads (a `from package import name` counts the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("qwenbuild")]
    if node.level:
        base = current.rsplit(".", node.level)[0]
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    if not target.startswith("qwenbuild"):
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in known else target)
    return out


def imports(top_level_only: bool = False) -> dict[str, set[str]]:
    known = set(modules())
    graph = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = tree.body if top_level_only else ast.walk(tree)
        found = set()
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(t for t in _imported(node, name, known) if t in known and t != name)
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _package_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ importing its own submodules is how packages work, not a cycle between modules."""
    return {m: {t for t in targets if not (m != t and t.startswith(m + "."))} for m, targets in graph.items()}


def test_no_import_cycles_function_level_imports_included():
    cycle = _cycle(_package_parents(imports()))
    assert cycle is None, " -> ".join(cycle)


def _loads_heavy(name: str, graph: dict[str, set[str]], seen=None) -> bool:
    """True when importing the module loads a heavy library at import time (directly or through its imports)."""
    seen = seen if seen is not None else set()
    if name in seen:
        return False
    seen.add(name)
    tree = ast.parse(modules()[name].read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.startswith(HEAVY) for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith(HEAVY):
            return True
    return any(_loads_heavy(t, graph, seen) for t in graph.get(name, ()))


def deferred_imports() -> list[tuple[str, int, str, bool, bool]]:
    """(module, line, imported, heavy, commented) for every import inside a function."""
    top = imports(top_level_only=True)
    known = set(modules())
    out = []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for fn in ast.walk(ast.parse(text)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if not node.level else []
                ours = [t for t in _imported(node, name, known) if t in known]
                heavy = any(t.startswith(HEAVY) for t in targets) or any(_loads_heavy(t, top) for t in ours)
                # the comment sits on the line above the first deferred import of its block, or on the line
                above = next((lines[i].strip() for i in range(node.lineno - 2, -1, -1) if lines[i].strip()), "")
                commented = "#" in lines[node.lineno - 1] or above.startswith(("#", "from ", "import "))
                out.append((name, node.lineno, ", ".join(targets + ours), heavy, commented))
    return sorted(set(out))


def test_function_level_imports_only_defer_heavy_libraries():
    light = [f"{m}:{line} imports {what}" for m, line, what, heavy, _ in deferred_imports() if not heavy]
    assert not light, "import these at the top of the module:\n" + "\n".join(light)


def test_every_deferred_import_says_why():
    silent = [f"{m}:{line} imports {what}" for m, line, what, heavy, commented in deferred_imports()
              if heavy and not commented]
    assert not silent, "give these a one-line comment saying what is put off:\n" + "\n".join(silent)


# the rows of README.md's "How the code is laid out", top to bottom: imports only point down (or within a row)
LAYERS = [
    ("qwenbuild.cli", "qwenbuild.commands", "qwenbuild.__main__"),
    ("qwenbuild.verify", "qwenbuild.compare"),
    ("qwenbuild.tasks",),
    ("qwenbuild.plan",),
    ("qwenbuild.manifest",),
    ("qwenbuild.train",),
    ("qwenbuild.export", "qwenbuild.infer"),
    ("qwenbuild.data",),
    ("qwenbuild.parallel",),
    ("qwenbuild.weights",),
    ("qwenbuild.model",),
    ("qwenbuild.tokenizer",),
    ("qwenbuild.schema", "qwenbuild.flags", "qwenbuild.build_dir", "qwenbuild.lock", "qwenbuild.machine",
     "qwenbuild.store", "qwenbuild.digests", "qwenbuild.dtypes", "qwenbuild.processes", "qwenbuild.errors",
     "qwenbuild.jsonfile", "qwenbuild.shell", "qwenbuild"),
]


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "qwenbuild") or module == "qwenbuild":
            return i
    raise AssertionError(f"{module} is in no row of README.md's layout table")


def test_imports_point_down_the_documented_layers():
    upward = [f"{m} -> {t}" for m, targets in imports().items() for t in targets if layer_of(t) < layer_of(m)]
    assert not upward, "\n".join(upward)

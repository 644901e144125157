"""Import cycles, upward imports and cross-module private imports in the adafuse_compile package.

    python tools/import_graph.py        # exit 1 if there is any

The layers (README, Architecture), lowest first; a module may import its own layer and below:
options and kernels -> runtime and the model zoo -> passes -> backend, explain, api, pregate ->
testing, the benchmark and the engine integrations -> the package's ``__init__``.

Reads the source with ``ast`` (nothing is imported): module-level and function-level
``from .x import y`` / ``import adafuse_compile.x`` statements form the graph.
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "adafuse_compile"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def scan():
    edges: dict[str, set[str]] = {}
    private: list[str] = []
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    for name, path in modules.items():
        edges.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = resolve(name, path.name == "__init__.py", node)
                if not target.startswith("adafuse_compile"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    dep = sub if sub in modules else target
                    if dep != name:
                        edges[name].add(dep)
                    if alias.name.startswith("_") and sub not in modules:
                        private.append(f"{name} imports {target}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("adafuse_compile") and alias.name != name:
                        edges[name].add(alias.name)
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


LAYERS = [
    ("adafuse_compile.options", 0), ("adafuse_compile.kernels", 0),
    ("adafuse_compile.runtime", 1), ("adafuse_compile.models", 1),
    ("adafuse_compile.passes", 2),
    ("adafuse_compile.backend", 3), ("adafuse_compile.explain", 3), ("adafuse_compile.api", 3),
    ("adafuse_compile.pregate", 3), ("adafuse_compile.mixed_batches", 3), ("adafuse_compile.branches", 3),
    ("adafuse_compile.testing", 4), ("adafuse_compile.bench", 4), ("adafuse_compile.integrations", 4),
]


def layer(module: str) -> int:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return len(LAYERS)  # the package itself (re-exports everything)


def main() -> int:
    edges, private = scan()
    # A package's __init__ re-exports its modules: edges into a package from its own members
    # are how Python resolves "from . import x", not a design cycle.
    edges = {m: {d for d in ds if not m.startswith(d + ".")} for m, ds in edges.items()}
    found = cycles(edges)
    for comp in found:
        print("import cycle:", " <-> ".join(comp))
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, ds in sorted(edges.items()) for d in sorted(ds) if layer(d) > layer(m)]
    for line in upward:
        print("upward import:", line)
    for line in private:
        print("private import:", line)
    if not found and not private and not upward:
        print(f"{len(edges)} modules: no import cycle, no upward import, no cross-module private import")
    return 1 if found or private or upward else 0


if __name__ == "__main__":
    sys.exit(main())

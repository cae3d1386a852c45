"""List import cycles among the project's packages (module-level imports only; a package's ``__init__`` importing
its own submodules is the ordinary re-export pattern and not counted). Exit 1 if any.

    python scripts/import_cycles.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("exporter", "attention", "masks")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def graph(found: dict[str, Path]) -> dict[str, set[str]]:
    edges = {}
    for name, path in found.items():
        targets = set()
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in names:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in found and not name.startswith(prefix + "."):  # not its own parent package
                        targets.add(prefix)
        edges[name] = targets - {name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    state, stack, found = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) is None:
                visit(target)
            elif state[target] == 1:
                found.append(stack[stack.index(target):] + [target])
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if state.get(node) is None:
            visit(node)
    return found


def main() -> int:
    found = cycles(graph(modules()))
    for cycle in found:
        print(" -> ".join(cycle))
    print(f"{len(found)} import cycles")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())

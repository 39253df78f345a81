"""The module map holds: no import cycle in src/edgestate, Hypercorn's internals in one file."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "edgestate"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every edgestate module ``path`` imports, deferred (function-level) imports included."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("edgestate"):
                continue
            for alias in node.names:  # "from . import ws" imports the module edgestate.ws
                candidate = f"{target}.{alias.name}"
                out.add(candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("edgestate"))
    out.discard(me)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep in graph and state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep in graph and dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert _imports(PACKAGE / "server.py") >= {"edgestate.frontdoor", "edgestate.services"}


# Hypercorn's documented API (hypercorn.trio.serve and its Config); the rest is internals.
_HYPERCORN_PUBLIC = {"hypercorn.config", "hypercorn.trio"}


def _hypercorn_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").startswith("hypercorn"):
            names.add(n.module or "")
        elif isinstance(n, ast.Import):
            names.update(a.name for a in n.names if a.name.startswith("hypercorn"))
    return names


def test_only_the_glue_touches_hypercorn_internals():
    users = sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if _hypercorn_imports(p) - _HYPERCORN_PUBLIC)
    assert users == ["edgestate.hypercorn_glue"]

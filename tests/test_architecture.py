"""The package's shape: small functions and modules, imports that run one way.

The limits are the ones a newcomer can read in one sitting (docs/architecture.md): no
function over 60 lines, no module over 400; `models` knows nothing of the method or of
training, `method` nothing of training or inference, and no two modules import each other.
"""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qstar_jax")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
# subpackage -> the subpackages it may not import (directly or through a function's import)
FORBIDDEN = {
    "models": ("method", "training", "inference", "toy"),
    "method": ("training", "inference", "toy"),
    "inference": ("toy",),
    "training": ("toy.study", "toy.ntp_study", "toy.gate_study", "toy.gate_report", "toy.eval"),
}


def modules() -> dict[str, str]:
    """{dotted module name: path} of every module in the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imports_of(path: str, known: set[str]) -> set[str]:
    """The package modules `path` imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qstar_jax"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                out.add(candidate if candidate in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("qstar_jax"))
    return out & known


def test_no_function_or_module_is_too_long():
    too_long = []
    for name, path in modules().items():
        text = open(path).read()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"module {name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"function {name}.{node.name}: {lines} lines")
    assert not too_long, too_long


def test_imports_run_one_way():
    found = modules()
    graph = {name: imports_of(path, set(found)) for name, path in found.items()}
    wrong = [f"{name} imports {target}" for name, targets in graph.items() for target in targets
             for package, forbidden in FORBIDDEN.items() if name.startswith(f"qstar_jax.{package}.")
             for banned in forbidden if target == f"qstar_jax.{banned}" or target.startswith(f"qstar_jax.{banned}.")]
    assert not wrong, wrong

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, cycles[0]


@pytest.mark.parametrize("module", ["train", "evaluate", "generate", "analyze", "convert", "data", "toy_reasoning",
                                    "toy_eval", "toy_study", "toy_ntp_study", "toy_gate_study"])
def test_entry_modules_are_thin(module):
    """`python -m qstar_jax.X` modules only hand over to the package: no logic of their own."""
    tree = ast.parse(open(os.path.join(PACKAGE, f"{module}.py")).read())
    defined = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Assign))]
    assert not defined and len(open(os.path.join(PACKAGE, f"{module}.py")).read().splitlines()) <= 12

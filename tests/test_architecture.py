"""The package's structure, checked: no import cycle anywhere in ``resist_fl`` (lazy imports inside
functions included), ``resist_fl.core`` never imports Flower, imports the rest of the package only
from below, and keeps every import at module top; the core's layers are in order.

Run alone: ``python -m pytest tests/test_architecture.py``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "resist_fl"

CORE_LAYERS = [
    {"npy_bytes", "validation", "transport", "aggregation", "allocation", "holders", "norms", "residual_nets",
     "secure_random", "client_accuracy", "feddyn"},
    {"preact_resnet"},
    {"torchvision_resnets", "early_exits"},
    {"model"},
    {"decomposition", "width_slicing", "dealing"},
    {"model_cost"},
]
"""Bottom to top: a core module imports only modules of lower layers (primitives, then the model
families, then ModelSpec / build_model, then the decomposition)."""


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int, bool]]:
    """(imported resist_fl module or external top package, line, at module top) of ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            targets = [n for n in names if n in MODULES] or [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            found.append((target, node.lineno, id(node) in top))
    return [f for f in found if f[2]] if top_level_only else found


def graph() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        deps = set()
        for target, _, _ in imports(path):
            while target and target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != name and not name.startswith(target + "."):
                deps.add(target)
        edges[name] = deps
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    edges = graph()
    assert len(edges) > 30
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_is_pure_layered_and_imports_at_module_top():
    layer_of = {f"resist_fl.core.{m}": i for i, layer in enumerate(CORE_LAYERS) for m in layer}
    core = {n: p for n, p in MODULES.items() if n.startswith("resist_fl.core.")}
    assert set(core) == set(layer_of), "every core module has a layer"
    for name, path in core.items():
        for target, line, at_top in imports(path):
            assert not target.startswith("flwr"), f"{name}:{line} imports Flower"
            if target.startswith("resist_fl"):
                assert at_top, f"{name}:{line}: a lazy import of {target}"
                assert target.startswith("resist_fl.core."), f"{name}:{line} imports {target} from outside core"
                assert layer_of[target] < layer_of[name] or (layer_of[target] == layer_of[name] and target != name
                                                              and layer_of[name] == 0), \
                    f"{name}:{line} imports {target} from its own or a higher layer"

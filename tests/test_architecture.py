"""The shape of the code, checked from the source: imports between utils_cv modules flow one
way (no cycles, lazy imports inside functions included), no module imports another's private
(underscore) names, no module is over 400 lines, and the public names of the design work."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "utils_cv"
SHARED = {"utils_cv.similarity._checks"}  # public inside the package by design (its docstring says so)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(module imported, name imported from it or None) for every utils_cv import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("utils_cv")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("utils_cv"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((sub, None) if sub in modules else (node.module, a.name))
    return found


def test_imports_flow_one_way_without_private_names():
    modules = _modules()
    graph, private = {}, []
    for name, path in modules.items():
        edges = set()
        for target, symbol in _imports(path, modules):
            if target != name and target in modules and not name.startswith(target + "."):
                if not modules[target].name == "__init__.py":
                    edges.add(target)
            leaf = target.rsplit(".", 1)[-1]
            if target != name and target not in SHARED and (
                    (symbol is not None and symbol.startswith("_")) or (leaf.startswith("_") and leaf != "__main__")):
                private.append(f"{name} imports {target}{'.' + symbol if symbol else ''}")
        graph[name] = edges
    assert not private, private

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):  # depth-first search; a grey node met again closes a cycle
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_common_imports_nothing_heavy():
    code = "import sys, utils_cv.common; print(sorted(m for m in ('torch', 'fastai', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_the_design_public_names_exist():
    from utils_cv.similarity import checkpoint, data, distances, features, index, metrics, model, rerank, train

    for mod, names in [
        (data, ["list_images", "default_dataset", "split_by_image", "split_by_class", "comparative_sets"]),
        (model, ["available_backbones", "create_backbone"]),
        (features, ["extract_features"]),
        (metrics, ["evaluate_retrieval", "positive_ranks", "recall_at_k"]),
        (distances, ["knn", "pairwise_distances", "l2_normalize"]),
        (index, ["SimilarityIndex", "knn"]),
        (train, ["create_learner", "fine_tune", "embedding_model", "save", "load"]),
        (checkpoint, ["save", "load"]),
        (rerank, ["k_reciprocal_rerank"]),
    ]:
        missing = [n for n in names if not callable(getattr(mod, n, None))]
        assert not missing, (mod.__name__, missing)
    assert index.knn is distances.knn

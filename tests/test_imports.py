"""Imports go one way: no module of the package imports, directly or through others, a module that
imports it back, counting imports inside functions too (they still make a cycle a reader must untangle)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "spinegrade"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "spinegrade.train" in graph and "spinegrade.data.preprocess" in graph["spinegrade.train"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_walk_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    tree = ast.parse("def f():\n    from spinegrade.evaluate import x\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))  # ast.walk reaches function bodies


def test_data_never_imports_models_and_nothing_imports_the_cli():
    graph = import_graph()
    for module, targets in graph.items():
        if module != "spinegrade.__main__":  # `python -m spinegrade` is the command line
            assert "spinegrade.cli" not in targets, module
        if module.startswith("spinegrade.data"):
            assert not any(t.startswith("spinegrade.models") for t in targets), module


# What prediction (and so the Kaggle kernel and the study page) loads: never the training half.
INFERENCE = ("spinegrade.submit", "spinegrade.study_page", "spinegrade.kernel.runtime")
TRAINING = ("spinegrade.train", "spinegrade.fold_loop", "spinegrade.slice_locator_training", "spinegrade.distributed",
            "spinegrade.data.dataset", "spinegrade.data.loader")


def module_level_graph() -> dict[str, set[str]]:
    """Like :func:`import_graph`, but only the imports a module runs when it is loaded (its top level)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.parse(path.read_text(), str(path)).body:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_inference_modules_load_no_training_module():
    graph = module_level_graph()
    reached, todo = set(), list(INFERENCE)
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph.get(module, ())
    assert "spinegrade.predict" in reached and "spinegrade.locators" in reached  # the walk does reach inference
    assert not reached & set(TRAINING), sorted(reached & set(TRAINING))
    assert "spinegrade.fold_loop" in graph["spinegrade.train"]  # the graph holds the training modules' imports


def test_prediction_runs_without_albumentations_or_any_training_module(trained_run, tmp_path):
    """Prediction and the study page run in a fresh interpreter where albumentations (training's
    augmentation) cannot be imported, and load none of the training modules."""
    import json
    import subprocess
    import sys

    script = f"""
import json, sys
from pathlib import Path
class Block:
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "albumentations":
            raise ImportError(name + " is for training only")
sys.meta_path.insert(0, Block())
from spinegrade.submit import predict_split
from spinegrade.study_page import predict_study
data, out, tmp = {str(trained_run["data"])!r}, {str(trained_run["out"])!r}, {str(tmp_path)!r}
_, submission = predict_split(data, "test", out, out=tmp + "/s.csv", predictions_dir=tmp, device="cpu")
study = sorted(Path(data, "test_images").iterdir())[0]
page = predict_study(study, out, out_dir=tmp + "/page", device="cpu")
print(json.dumps({{"rows": len(submission), "targets": len(page["targets"]),
                  "models": sum(t["source"] == "model" for t in page["targets"]),
                  "loaded": sorted(m for m in {list(TRAINING)!r} + ["albumentations"] if m in sys.modules)}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["rows"] == 25 * 5 and found["targets"] == 25 and found["models"] == 25
    assert found["loaded"] == []

"""The layers of the package, read from the imports: a lower layer never imports a higher one.

    paths, configs, jsonl < models < data < evaluation < training < cli < study < __main__

(the study drives the CLI; ``__main__`` routes to the CLI or the export command).
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "personalm"
LAYERS = ["personalm.paths", "personalm.models", "personalm.data", "personalm.evaluation", "personalm.training",
          "personalm.cli", "personalm.study"]
TOP = len(LAYERS)  # __main__ and the package itself


def layer(module: str) -> int:
    if module in ("personalm.configs", "personalm.jsonl"):  # beside paths
        return 0
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return TOP


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or is_package(name)


def imported(source: str, name: str) -> set[str]:
    """personalm modules ``source`` imports, at the top, inside functions or under ``TYPE_CHECKING``: ``from
    personalm.data import synthetic`` names ``personalm.data.synthetic``, ``from personalm.data import X`` (not a
    module) ``personalm.data``."""
    found = set()
    package = name if is_package(name) else name.rsplit(".", 1)[0]  # what a relative import starts from
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("personalm")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import, from the module's own package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("personalm"):  # from personalm import study -> personalm.study
                found |= {f"{base}.{a.name}" if base == "personalm" or is_module(f"{base}.{a.name}") else base
                          for a in node.names}
    return found


def violations(name: str, source: str) -> list[str]:
    own = layer(name)
    return [f"{name} (layer {own}) imports {m} (layer {layer(m)})" for m in sorted(imported(source, name))
            if layer(m) > own]


def test_no_lower_layer_imports_a_higher_one():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += violations(module_name(path), path.read_text())
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name, source, bad", [
    ("personalm.data.encoding", "from personalm.training.dpo import DPOModule", True),
    ("personalm.models.loading", "def f():\n    from personalm.data import synthetic", True),
    ("personalm.paths", "import personalm.models", True),
    ("personalm.training.dpo", "from personalm.evaluation.metrics import add_phase_metrics", False),
    ("personalm.cli", "from personalm.study import main", True),
    ("personalm.study.steps", "from personalm.cli import main", False),
])
def test_the_check_sees_imports_anywhere_in_a_module(name, source, bad):
    assert bool(violations(name, source)) == bad


def test_relative_imports_start_from_the_right_package():
    assert imported("from .encoding import x", "personalm.data") == {"personalm.data.encoding"}
    assert imported("from .encoding import x", "personalm.data.collate") == {"personalm.data.encoding"}
    assert imported("from ..paths import x", "personalm.data.collate") == {"personalm.paths"}


def import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the modules of the package it names in an import statement. An import inside
    a function or under ``TYPE_CHECKING`` counts as much as one at the top (a cycle kept from failing at import time
    by a late import is still two modules that need each other); the package ``__init__`` that importing a
    submodule runs first does not (only what a module names itself)."""
    return {module_name(p): imported(p.read_text(), module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles of ``graph``, each as the path ``[a, b, ..., a]`` that a depth-first search closes (every
    cycle of the graph shares a module with one of them; none: no cycle)."""
    found, state, path = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for other in sorted(graph.get(module, ())):
            if state.get(other) == "open":
                found.append(path[path.index(other):] + [other])
            elif other in graph and other not in state:
                visit(other)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_no_import_cycle_anywhere_in_the_package():
    """The layering test sees imports across layers only; this one also sees two modules of one layer (or one
    folder) that import each other, directly or through others."""
    found = cycles(import_graph())
    assert not found, "\n".join(" -> ".join(c) for c in found)


def test_the_cycle_check_sees_cycles_within_a_layer_and_through_late_imports():
    graph = {"personalm.study.pipeline": {"personalm.study.steps", "personalm.paths"},
             "personalm.study.steps": {"personalm.paths"}, "personalm.paths": set()}
    assert cycles(graph) == []
    graph["personalm.study.steps"].add("personalm.study.pipeline")
    assert cycles(graph) == [["personalm.study.pipeline", "personalm.study.steps", "personalm.study.pipeline"]]
    late = "import json\n\ndef f():\n    from personalm.training.vllm_generation import VLLMGenerator\n"
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from personalm.study.pipeline import S\n"
    assert imported(late, "personalm.training.generation") == {"personalm.training.vllm_generation"}
    assert imported(typing_only, "personalm.study.steps") == {"personalm.study.pipeline"}
    three = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(three) == [["a", "b", "c", "a"]]


def test_every_subpackage_says_what_it_owns_and_may_import():
    """Each subpackage's docstring names every module it has (and only those) and what it may import."""
    for prefix in (p for p in LAYERS[1:] if p != "personalm.cli"):
        folder = PACKAGE / prefix.split(".")[1]
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and "May import" in doc, prefix
        modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
        named = {m for m in re.findall(r"``(\w+)``", doc.split("May import")[0])}
        assert modules <= named, f"{prefix}: its docstring does not name {sorted(modules - named)}"


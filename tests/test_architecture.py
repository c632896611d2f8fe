"""The house rules, checked on the source: the layers import only downward, nothing imports in a circle, the
engine knows no Prefect, every stage keeps the contract, and the registry is the only list of stages."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from adaptflow import stages
from tests.conftest import ROOT

# Where each part of the project lives, as the installed package names it.
SOURCES = {"adaptflow": ROOT / "adaptflow", "adaptflow.flows": ROOT / "flows", "adaptflow.tasks": ROOT / "tasks"}


def modules() -> dict[str, Path]:
    """Every project module by its dotted name (a package by its own name)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def imports(name: str) -> set[str]:
    """The project modules `name` imports, anywhere in its file (functions and TYPE_CHECKING blocks included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            if (resolved := _resolve(target)) and resolved != name and not name.startswith(f"{resolved}."):
                found.add(resolved)
    return found


def _resolve(target: str) -> str | None:
    parts = target.split(".")
    return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in MODULES), None)


GRAPH = {name: imports(name) for name in MODULES}


def test_no_module_imports_in_a_circle():
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in GRAPH[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in GRAPH:
        if node not in index:
            visit(node)
    assert cycles == []


def test_the_engine_imports_no_prefect():
    offenders = []
    for name, path in MODULES.items():
        if name.startswith(("adaptflow.flows", "adaptflow.tasks")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            named = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name} imports {n}" for n in named if n == "prefect" or n.startswith("prefect.")]
    assert offenders == []


# Each rule: modules under the prefix may not import modules under any of the listed prefixes (DESIGN.md, "Layers").
ORCHESTRATION = ("adaptflow.flows", "adaptflow.tasks")
ABOVE_STAGES = ("adaptflow.stages", "adaptflow.recipe", "adaptflow.launch", "adaptflow.preflight", *ORCHESTRATION)
LAYERS = {
    "adaptflow.kinds": ("adaptflow.config", "adaptflow.data", "adaptflow.models", "adaptflow.train",
                        "adaptflow.evaluation", "adaptflow.tracking", *ABOVE_STAGES),
    "adaptflow.config": ("adaptflow.data", "adaptflow.models", "adaptflow.train", "adaptflow.evaluation",
                         "adaptflow.tracking", *ABOVE_STAGES),
    "adaptflow.data": ("adaptflow.train", "adaptflow.evaluation", "adaptflow.tracking", *ABOVE_STAGES),
    "adaptflow.objectives": ("adaptflow.train", "adaptflow.evaluation", "adaptflow.tracking", *ABOVE_STAGES),
    "adaptflow.models": ("adaptflow.train", "adaptflow.evaluation", "adaptflow.tracking", *ABOVE_STAGES),
    "adaptflow.strategies": ("adaptflow.train", "adaptflow.evaluation", "adaptflow.tracking", *ABOVE_STAGES),
    "adaptflow.train": ("adaptflow.evaluation", "adaptflow.tracking", *ABOVE_STAGES),
    "adaptflow.evaluation": ("adaptflow.tracking", *ABOVE_STAGES),
    "adaptflow.lineage": ABOVE_STAGES,
    "adaptflow.tracking": ABOVE_STAGES,  # but for the stage registry's names (rerun --from): never a stage module
    "adaptflow.stages": ("adaptflow.recipe", "adaptflow.preflight", *ORCHESTRATION),
    "adaptflow.launch": ORCHESTRATION,
    "adaptflow.recipe": ORCHESTRATION,
    "adaptflow.tasks": ("adaptflow.flows",),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_imports_only_what_lies_below_it(layer):
    forbidden = LAYERS[layer]
    upward = [f"{name} → {other}" for name in MODULES if name == layer or name.startswith(f"{layer}.")
              for other in GRAPH[name] if other.startswith(forbidden)]
    if layer == "adaptflow.tracking":  # the registry's list of names, not a stage
        upward = [edge for edge in upward if not edge.endswith("→ adaptflow.stages")]
    assert upward == []


def test_stage_names_are_listed_only_in_the_registry():
    names = set(stages.names())
    registry = MODULES["adaptflow.stages"]
    listed = []
    for name, path in MODULES.items():
        if path == registry:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            items = node.elts if isinstance(node, (ast.List, ast.Tuple, ast.Set)) else \
                node.keys if isinstance(node, ast.Dict) else []
            constants = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
            if len(constants & names) >= 2:
                listed.append(f"{name} line {node.lineno}: {sorted(constants & names)}")
    assert listed == []


def test_every_stage_module_has_the_contracts_names():
    for name in stages.names():
        module = stages.get(name)
        missing = [attr for attr in (*stages.CONTRACT, "DISTRIBUTED", "REUSABLE") if not hasattr(module, attr)]
        assert missing == [], f"stage {name} lacks {missing}"


def test_the_installed_packages_are_every_package_folder_under_the_projects_namespace():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert set(setuptools["packages"]) == packages
    assert all(name == "adaptflow" or name.startswith("adaptflow.") for name in setuptools["packages"])


def test_nothing_named_plain_flows_or_tasks_is_importable_once_installed(tmp_path):
    """Outside the checkout (no project root on the path), the orchestration is `adaptflow.flows` / `.tasks`."""
    probe = ("import importlib.util as u, adaptflow.flows.cli, adaptflow.tasks.stage_runs; "
             "print(u.find_spec('flows'), u.find_spec('tasks'))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["None", "None"]

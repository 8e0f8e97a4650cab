"""The layering, enforced: flows → tasks → {core, registry}; registry → core; the core knows no orchestration,
tracking or demo.

Every module of the installed package is read with `ast` (its own import statements, lazy ones inside
functions included), so a violation fails here whatever imports it happens to trigger at run time.
import-linter would need one package folder; ours are four (src/stillhouse, flows/, tasks/, registry/).

    core (stillhouse.*)   imports no prefect, mlflow, stillhouse.flows, .tasks, .registry, .demo
    stillhouse.registry   imports no prefect, stillhouse.flows, stillhouse.tasks
    stillhouse.tasks      imports no stillhouse.flows
    mlflow                is imported only by stillhouse.registry and stillhouse.flows.hooks
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).parents[1]
PACKAGES = {
    "stillhouse": REPO / "src" / "stillhouse",
    "stillhouse.flows": REPO / "flows",
    "stillhouse.tasks": REPO / "tasks",
    "stillhouse.registry": REPO / "registry",
}
OUTER = ("stillhouse.flows", "stillhouse.tasks", "stillhouse.registry")


def modules() -> dict[str, Path]:
    """Every module of the distribution by dotted name (stillhouse.flows.cli -> flows/cli.py)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imported(path: Path, module: str) -> set[str]:
    """The modules ``path`` imports, absolute (``from .x import y`` resolved against ``module``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[
                    : len(module.split(".")) - node.level + (1 if path.name == "__init__.py" else 0)
                ]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def within(name: str, *packages: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


def violations(found: dict[str, Path]) -> list[str]:
    problems = []
    for module, path in sorted(found.items()):
        for target in sorted(imported(path, module)):

            def refuse(reason: str, target: str = target, module: str = module) -> None:
                problems.append(f"{module} imports {target}: {reason}")

            if not within(module, *OUTER):  # the core
                if within(target, "prefect", "mlflow"):
                    refuse("the core is plain Python; orchestration and tracking belong to tasks/ and registry/")
                if within(target, *OUTER):
                    refuse("imports go one way: flows → tasks → {core, registry}")
                if within(target, "stillhouse.demo") and not within(module, "stillhouse.demo"):
                    refuse("the demo plugs in through entry points (builtin: sources and models)")
            if within(module, "stillhouse.registry") and within(
                target, "prefect", "stillhouse.flows", "stillhouse.tasks"
            ):
                refuse("registry/ is MLflow and the Hub only; Prefect lives in tasks/ and flows/")
            if within(module, "stillhouse.tasks") and within(target, "stillhouse.flows"):
                refuse("tasks don't know the flows that call them")
            if within(target, "mlflow") and not within(module, "stillhouse.registry", "stillhouse.flows.hooks"):
                refuse("MLflow is reached through stillhouse.registry")
    return problems


def test_every_module_keeps_to_its_layer():
    found = modules()
    assert {
        "stillhouse.config",
        "stillhouse.flows.cli",
        "stillhouse.tasks.train",
        "stillhouse.registry.tracking",
    } <= set(found)
    assert violations(found) == []


def test_the_check_catches_a_violation(tmp_path):
    core, task = tmp_path / "core.py", tmp_path / "task.py"
    core.write_text("import os\n\ndef log():\n    import mlflow\n    from stillhouse.tasks.train import train_task\n")
    task.write_text("from ..flows import cli\nfrom stillhouse.registry.tracking import log_stage\n")
    problems = violations({"stillhouse.training.core": core, "stillhouse.tasks.task": task})
    assert problems == [
        "stillhouse.tasks.task imports stillhouse.flows: tasks don't know the flows that call them",
        "stillhouse.tasks.task imports stillhouse.flows.cli: tasks don't know the flows that call them",
        "stillhouse.training.core imports mlflow: the core is plain Python; "
        "orchestration and tracking belong to tasks/ and registry/",
        "stillhouse.training.core imports mlflow: MLflow is reached through stillhouse.registry",
        "stillhouse.training.core imports stillhouse.tasks.train: imports go one way: flows → tasks → {core, registry}",
        "stillhouse.training.core imports stillhouse.tasks.train.train_task: "
        "imports go one way: flows → tasks → {core, registry}",
    ]

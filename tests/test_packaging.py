"""`pip install stillhouse` as a user gets it: the wheel, installed into a fresh venv outside the checkout, run from an
empty folder.

The fresh venv takes its dependencies from the test environment's site-packages through a `.pth` line
(nothing is downloaded; `pip install --no-index` then checks that the wheel's declared dependencies
are all satisfied there), but not the checkout: the editable install's finder is not loaded, and the
commands run in a folder with nothing of the repository in it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from servers import prefect_api_client, prefect_env, prefect_server

REPO = Path(__file__).parents[1]
FOLDERS = {
    "stillhouse": REPO / "src" / "stillhouse",
    "stillhouse.flows": REPO / "flows",
    "stillhouse.tasks": REPO / "tasks",
    "stillhouse.registry": REPO / "registry",
}


def test_pyproject_lists_every_package_and_installs_nothing_outside_stillhouse():
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(settings["packages"])
    found = {
        ".".join((package, *path.parent.relative_to(folder).parts))
        for package, folder in FOLDERS.items()
        for path in folder.rglob("__init__.py")
    }
    assert found - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert all(name == "stillhouse" or name.startswith("stillhouse.") for name in listed)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: setuptools comes from the test environment rather than a download.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(folder),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (built,) = folder.glob("stillhouse-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The bin/ folder of a fresh venv, outside the checkout, with the wheel installed."""
    venv = tmp_path_factory.mktemp("user") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    completed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=venv.parent,
    )
    assert completed.returncode == 0, (
        completed.stdout + completed.stderr
    )  # a dependency the wheel doesn't declare fails later
    return venv / "bin"


def user_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return {**env, "HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "HF_HOME": str(home / "hf")}


def test_the_wheel_holds_only_the_stillhouse_package_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"stillhouse", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for path in (
        "stillhouse/flows/cli.py",
        "stillhouse/tasks/train.py",
        "stillhouse/registry/tracking.py",
        "stillhouse/bundled/prefect.yaml",
        "stillhouse/bundled/configs/demo.yaml",
        "stillhouse/bundled/infra/k8s/gpu-job-template.json",
        "stillhouse/demo/teacher/model.safetensors",
    ):
        assert path in names, path
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert (
        "stillhouse = stillhouse.flows.cli:console_main" in metadata
        and "demo-teacher = stillhouse.demo:teacher_folder" in metadata
    )


def test_every_import_is_a_declared_dependency():
    """Each third-party module the package imports belongs to a distribution in [project] dependencies (or an extra,
    for optional ones)."""
    from importlib.metadata import packages_distributions

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[ ;]", spec)[0].lower().replace("_", "-") for spec in project["dependencies"]}
    optional = {
        re.split(r"[<>=!~\[ ;]", spec)[0].lower().replace("_", "-")
        for specs in project["optional-dependencies"].values()
        for spec in specs
    }
    owners = packages_distributions()
    standard = sys.stdlib_module_names
    missing = {}
    for folder in FOLDERS.values():
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else ([node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                )
                for name in names:
                    top = name.split(".")[0]
                    if top in standard or top == "stillhouse":
                        continue
                    distributions = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                    if not distributions & (declared | optional):
                        missing.setdefault(top, set()).add(str(path.relative_to(REPO)))
    assert missing == {}, f"imported but not declared in pyproject.toml: {missing}"


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_schema_validate_and_deploy_help_from_an_empty_folder(installed, tmp_path):
    work = tmp_path / "somewhere"
    work.mkdir()
    env = user_env(tmp_path / "home")

    def stillhouse(*arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(installed / "stillhouse"), *arguments],
            capture_output=True,
            text=True,
            cwd=work,
            env=env,
            timeout=timeout,
        )

    where = subprocess.run(
        [
            str(installed / "python"),
            "-c",
            "import stillhouse, importlib.util as u; print(stillhouse.__file__); "
            "print([m for m in ('flows', 'tasks', 'registry') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        check=True,
    ).stdout.splitlines()
    assert str(installed.parent) in where[0] and "site-packages" in where[0] and where[1] == "[]"

    schema = stillhouse("schema", "--json")
    assert schema.returncode == 0 and "train" in json.loads(schema.stdout)["properties"]

    shutil.copy(REPO / "configs" / "demo.yaml", work / "mine.yaml")
    validated = stillhouse("validate", "mine.yaml")
    assert validated.returncode == 0 and "mine.yaml: OK (demo" in validated.stdout, validated.stderr

    deploy_help = stillhouse("deploy", "--help")
    assert deploy_help.returncode == 0 and "--config" in deploy_help.stdout

    demo = stillhouse(
        "demo",
        "--set",
        "curate.demo_rows=400",
        "--set",
        "curate.eval_fraction=0.1",
        "--set",
        "train.max_steps=40",
        "--set",
        "evaluate.latency_prompts=1",
        # 40 steps teach the student nothing: the gate's default floor would rightly keep it from publishing.
        "--set",
        "evaluate.gate.default_floor=false",
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "Published folder" in demo.stdout and (work / ".stillhouse" / "store" / "publish").is_dir()
    assert not (REPO / "somewhere").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_the_installed_wheel_deploys_its_bundled_prefect_yaml(installed, tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    (work / "mine.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "server").mkdir()
    with prefect_server(tmp_path / "server") as api_url:
        env = {
            **user_env(tmp_path / "home"),
            **{k: v for k, v in prefect_env(tmp_path / "home", api_url).items() if k.startswith("PREFECT")},
        }
        completed = subprocess.run(
            [str(installed / "stillhouse"), "deploy", "--config", "mine.yaml", "--pool", "local"],
            capture_output=True,
            text=True,
            cwd=work,
            env=env,
            timeout=600,
        )
        assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
        with prefect_api_client(api_url) as client:
            deployments = {d["name"]: d for d in client.post("/deployments/filter", json={}).json()}
    nightly = deployments["nightly"]
    assert (
        nightly["entrypoint"] == "stillhouse.flows.stages:pipeline" and nightly["parameters"]["config"] == "mine.yaml"
    )
    assert nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(work)}}]

"""End to end, as deployed: real `prefect server` and `mlflow server`, `stillhouse deploy`, a process worker, a browser.

    .venv/bin/python -m pytest -q tests/test_e2e_deployment.py      # about 2-3 minutes on 2 cores

The servers run on 127.0.0.1 (sqlite), `stillhouse deploy` registers prefect.yaml with a tiny config,
the test triggers the pipeline deployment, `prefect worker start --run-once` runs it in this checkout,
and the flow run must end COMPLETED with its runs, metrics and registered version on the MLflow
server. Then headless Chromium (Debian's `chromium`, driven by playwright) opens the MLflow run page
and the Prefect flow-run page; screenshots land in test-artifacts/. Every process is stopped at the
end, also on failure (tests/servers.py: TERM, then INT, then KILL).
"""

import shutil
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import tiny_pipeline_raw
from mlflow.tracking import MlflowClient
from servers import BIN, background, mlflow_server, prefect_api_client, prefect_env, prefect_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@dataclass
class DeployedRun:
    prefect_api: str
    mlflow_url: str
    flow_run_id: str
    flow_run: dict
    config: dict
    log_dir: Path


def tiny_config(folder: Path, teacher: Path, prompts: Path, mlflow_url: str) -> dict:
    config = tiny_pipeline_raw(folder, teacher, prompts)
    config["train"]["max_steps"] = 4
    config.update(
        name="e2e-tiny", tracking={"uri": mlflow_url, "experiment": "e2e"}, registry={"model_name": "e2e-student"}
    )
    return config


def run(command: list[str], env: dict, log: Path, timeout: int) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    log.write_text(completed.stdout + completed.stderr)
    assert completed.returncode == 0, (
        f"{' '.join(command[:4])} failed:\n{(completed.stdout + completed.stderr)[-4000:]}"
    )
    return completed


@pytest.fixture(scope="module")
def deployed_run(tmp_path_factory, tiny_teacher, prompts_jsonl):
    folder = tmp_path_factory.mktemp("e2e")
    with ExitStack() as stack:
        prefect_api = stack.enter_context(prefect_server(folder))
        mlflow_url = stack.enter_context(mlflow_server(folder))
        config = tiny_config(folder, tiny_teacher, prompts_jsonl, mlflow_url)
        config_path = folder / "e2e-tiny.yaml"
        config_path.write_text(yaml.safe_dump(config))
        env = {
            **prefect_env(folder / "prefect-home", prefect_api),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "STILLHOUSE_STORE_CACHE": str(folder / "cache"),
        }

        run(
            [str(BIN / "stillhouse"), "deploy", "--config", str(config_path), "--pool", "local"],
            env,
            folder / "deploy.log",
            300,
        )
        api = stack.enter_context(prefect_api_client(prefect_api))
        deployment = api.get("/deployments/name/stillhouse-pipeline/nightly").json()
        flow_run = api.post(
            f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": {"until": "register"}}
        ).json()

        worker = stack.enter_context(
            background(
                [str(BIN / "prefect"), "worker", "start", "--pool", "local", "--run-once"],
                folder / "worker.log",
                env,
                cwd=REPO,
            )
        )
        try:
            worker.wait(timeout=420)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker did not finish the run in 420 s:\n" + (folder / "worker.log").read_text()[-4000:])
        finished = api.get(f"/flow_runs/{flow_run['id']}").json()
        yield DeployedRun(prefect_api, mlflow_url, flow_run["id"], finished, config, folder)


def test_deploy_registers_active_schedules_and_a_triggered_run_completes_on_a_worker(deployed_run):
    run = deployed_run
    assert run.flow_run["state"]["type"] == "COMPLETED", (run.log_dir / "worker.log").read_text()[-4000:]
    with prefect_api_client(run.prefect_api) as api:
        deployments = {d["name"]: d for d in api.post("/deployments/filter", json={}).json()}
        artifacts = api.post("/artifacts/filter", json={}).json()
    for name, cron in (("nightly", "0 2 * * *"), ("weekly-champion", "0 6 * * 1")):
        assert [(s["schedule"]["cron"], s["active"]) for s in deployments[name]["schedules"]] == [(cron, True)]
        assert not deployments[name]["paused"]

    client = MlflowClient(run.mlflow_url)
    experiment = client.get_experiment_by_name("e2e")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`stillhouse.pipeline` = 'e2e-tiny'")
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    stage_runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert {"curate", "sample", "train", "evaluate", "register"} <= {
        r.data.tags["stillhouse.stage"] for r in stage_runs
    }
    assert parent.data.metrics["student_perplexity"] > 1
    assert parent.data.tags["prefect.flow_run_id"] in {run.flow_run_id, *(f["id"] for f in _subflow_runs(run))}
    (version,) = client.search_model_versions("name = 'e2e-student'")
    assert client.get_model_version_by_alias("e2e-student", "candidate").version == version.version
    assert any(a["key"] == "mlflow-run" and parent.info.run_id in a["data"] for a in artifacts), (
        "the Prefect run links to its MLflow run"
    )


def _subflow_runs(run: DeployedRun) -> list[dict]:
    with prefect_api_client(run.prefect_api) as api:
        return api.post("/flow_runs/filter", json={}).json()


def test_the_mlflow_and_prefect_uis_show_the_run_in_a_headless_browser(deployed_run):
    from playwright.sync_api import sync_playwright

    run = deployed_run
    client = MlflowClient(run.mlflow_url)
    experiment = client.get_experiment_by_name("e2e")
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.`stillhouse.pipeline` = 'e2e-tiny'")
    ARTIFACTS.mkdir(exist_ok=True)
    ui_base = run.prefect_api.removesuffix("/api")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{run.mlflow_url}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}")
            metric = page.get_by_text("student_perplexity").first
            metric.wait_for(timeout=60_000)
            # the run page scrolls inside a panel: bring the metrics table into the shot
            metric.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "mlflow-run.png"))
            text = page.inner_text("body")
            assert "e2e-tiny" in text and "student_perplexity" in text and "student_top1_agreement" in text
            assert str(parent.data.metrics["student_perplexity"])[:6] in text, "the student's value, not only its name"

            page.goto(f"{ui_base}/runs/flow-run/{run.flow_run_id}")
            page.get_by_text("Completed").first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "prefect-flow-run.png"), full_page=True)
            assert run.flow_run["name"] in page.inner_text("body")
        finally:
            browser.close()
    assert (ARTIFACTS / "mlflow-run.png").stat().st_size > 10_000 and (
        ARTIFACTS / "prefect-flow-run.png"
    ).stat().st_size > 10_000

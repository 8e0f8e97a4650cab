"""`stillhouse deploy` against a real `prefect server`: bad input refused before anything is registered, then a clean
registration.

The CLI runs as a child process, as a user runs it, with PREFECT_API_URL pointing at the server.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from servers import background, free_port, prefect_api_client, prefect_env, prefect_server

pytestmark = pytest.mark.integration
REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect")) as url:
        yield url


@pytest.fixture
def config_file(tmp_path, pipeline_raw) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(pipeline_raw))
    return path


def stillhouse_deploy(arguments: list[str], api_url: str | None, home: Path) -> subprocess.CompletedProcess:
    env = prefect_env(home, api_url)
    if api_url is None:
        env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "stillhouse.flows.cli", "deploy", *arguments],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


def server_state(api_url: str) -> dict[str, list[str]]:
    """What is registered: deployments, work pools, global concurrency limits."""
    with prefect_api_client(api_url) as client:
        return {
            "deployments": sorted(d["name"] for d in client.post("/deployments/filter", json={}).json()),
            "pools": sorted(p["name"] for p in client.post("/work_pools/filter", json={}).json()),
            "limits": sorted(limit["name"] for limit in client.post("/v2/concurrency_limits/filter", json={}).json()),
        }


def with_bad_cron(tmp_path) -> Path:
    content = yaml.safe_load((REPO / "prefect.yaml").read_text())
    content["deployments"][0]["schedules"] = [{"cron": "0 25 * * *", "timezone": "UTC"}]
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(content))
    (tmp_path / "infra" / "k8s").mkdir(parents=True)
    (tmp_path / "infra" / "k8s" / "gpu-job-template.json").write_text(
        (REPO / "infra/k8s/gpu-job-template.json").read_text()
    )
    return path


@pytest.mark.parametrize(
    "case", ["no api url", "api not answering", "bad cron", "missing pool", "mlflow not answering"]
)
def test_bad_input_is_refused_with_a_clear_message_before_anything_is_registered(
    case, prefect_api, config_file, tmp_path
):
    api_url, arguments = prefect_api, ["--config", str(config_file)]
    expected = {
        "no api url": "no Prefect API to register deployments with: PREFECT_API_URL is not set",
        "api not answering": "does not answer",
        "bad cron": "deployment 'nightly': cron '0 25 * * *': Invalid cron string",
        "missing pool": "work pool 'nowhere' does not exist on",
        "mlflow not answering": "the MLflow tracking server at http://127.0.0.1:",
    }[case]
    if case == "no api url":
        api_url = None
    elif case == "api not answering":
        api_url = f"http://127.0.0.1:{free_port()}/api"
    elif case == "bad cron":
        arguments += ["--prefect-file", str(with_bad_cron(tmp_path))]
    elif case == "missing pool":
        arguments += ["--pool", "nowhere"]
    else:
        arguments += ["--set", f"tracking.uri=http://127.0.0.1:{free_port()}"]
    before = server_state(prefect_api)
    completed = stillhouse_deploy(arguments, api_url, tmp_path / "home")
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert completed.stderr.startswith("error: ") and expected in completed.stderr, completed.stderr
    assert "Traceback" not in completed.stderr
    assert server_state(prefect_api) == before, "nothing was registered"


def test_deploy_registers_every_deployment_with_active_schedules_pools_and_the_gpu_limit(
    prefect_api, config_file, tmp_path
):
    for _ in range(2):  # a second deploy updates in place: no duplicate schedules
        completed = stillhouse_deploy(
            ["--config", str(config_file), "--gpu-limit", "2"], prefect_api, tmp_path / "home"
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
    assert "stillhouse-pipeline/nightly" in completed.stdout
    state = server_state(prefect_api)
    assert {"nightly", "weekly-champion", "curate", "sample", "train", "evaluate", "register", "publish"} <= set(
        state["deployments"]
    )
    assert {"local", "gpu"} <= set(state["pools"]) and "gpu" in state["limits"]
    with prefect_api_client(prefect_api) as client:
        deployments = {d["name"]: d for d in client.post("/deployments/filter", json={}).json()}
        gpu_pool = client.get("/work_pools/gpu").json()
        limit = client.get("/v2/concurrency_limits/gpu").json()
    nightly = deployments["nightly"]
    assert [(s["schedule"]["cron"], s["active"]) for s in nightly["schedules"]] == [
        ("0 2 * * *", True)
    ] and not nightly["paused"]
    assert [(s["schedule"]["cron"], s["active"]) for s in deployments["weekly-champion"]["schedules"]] == [
        ("0 6 * * 1", True)
    ]
    assert (
        nightly["parameters"] == {"config": str(config_file), "overrides": []} and nightly["work_pool_name"] == "local"
    )
    assert nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert deployments["train"]["work_pool_name"] == "gpu"
    assert (
        deployments["train"]["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
        == "/opt/stillhouse"
    )
    assert gpu_pool["type"] == "kubernetes" and limit["limit"] == 2
    manifest = json.dumps(gpu_pool["base_job_template"]["job_configuration"]["job_manifest"])
    assert '"nvidia.com/gpu": "{{ gpus }}"' in manifest


@pytest.mark.slow
def test_serve_schedules_the_pipeline_in_its_own_process_and_refuses_a_bad_cron(prefect_api, config_file, tmp_path):
    env = prefect_env(tmp_path / "home", prefect_api)
    refused = subprocess.run(
        [sys.executable, "-m", "stillhouse.flows.cli", "serve", str(config_file), "--cron", "every night"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert refused.returncode == 2 and "--cron 'every night': Invalid cron string" in refused.stderr, refused.stderr

    with background(
        [sys.executable, "-m", "stillhouse.flows.cli", "serve", str(config_file), "--cron", "30 3 * * *"],
        tmp_path / "serve.log",
        env,
        cwd=REPO,
    ) as serving:
        deadline = time.monotonic() + 120
        while True:
            with prefect_api_client(prefect_api) as client:
                served = [d for d in client.post("/deployments/filter", json={}).json() if d["name"] == "tiny-serve"]
            if served or serving.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert served, (tmp_path / "serve.log").read_text()[-3000:]
        # A run of the served schedule, now: the serving process picks it up and runs the whole pipeline.
        with prefect_api_client(prefect_api) as client:
            flow_run = client.post(f"/deployments/{served[0]['id']}/create_flow_run", json={}).json()
            deadline = time.monotonic() + 300
            while True:
                state = client.get(f"/flow_runs/{flow_run['id']}").json()["state"]
                if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
                    break
                time.sleep(2)
        assert state["type"] == "COMPLETED", f"{state}\n{(tmp_path / 'serve.log').read_text()[-4000:]}"
    (deployment,) = served
    assert [(s["schedule"]["cron"], s["active"]) for s in deployment["schedules"]] == [("30 3 * * *", True)]
    assert deployment["parameters"]["config"] == str(config_file)
    assert serving.returncode is not None, "serve was stopped with the test"

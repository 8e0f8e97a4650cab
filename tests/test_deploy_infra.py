"""infra/ without a Docker engine: the compose file's structure, the worker image, the Kubernetes template,
prefect.yaml.

No Docker engine runs on these machines, so these read the files the way compose, Prefect and
Kubernetes would, and check what would otherwise only fail on `docker compose up` or at 2 a.m.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from stillhouse.flows import deploy
from stillhouse.flows.bundled import resolve_config

REPO = Path(__file__).parents[1]
INFRA = REPO / "infra"
LONG_RUNNING = {"postgres", "minio", "prefect-server", "mlflow", "worker"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def env_example() -> dict[str, str]:
    lines = (INFRA / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def environment(service: dict) -> dict[str, str]:
    return {key: str(value) for key, value in (service.get("environment") or {}).items()}


def test_compose_has_every_service_with_a_health_check_and_the_ports_users_open(compose):
    services = compose["services"]
    assert LONG_RUNNING | {"minio-init"} == set(services)
    for name in LONG_RUNNING:
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1 and check["retries"] > 0, name
    published = {name: [port.split(":")[-1] for port in service.get("ports", [])] for name, service in services.items()}
    assert (
        published["prefect-server"] == ["4200"]
        and published["mlflow"] == ["5000"]
        and published["minio"] == ["9000", "9001"]
    )
    assert "ports" not in services["postgres"], "the database is reachable only inside the stack"


def test_compose_services_start_in_order_of_health(compose):
    services = compose["services"]
    dependencies = {name: service.get("depends_on", {}) for name, service in services.items()}
    assert dependencies["prefect-server"] == {"postgres": {"condition": "service_healthy"}}
    assert dependencies["mlflow"]["postgres"]["condition"] == "service_healthy"
    assert dependencies["mlflow"]["minio-init"]["condition"] == "service_completed_successfully"
    assert {dependency: rule["condition"] for dependency, rule in dependencies["worker"].items()} == {
        "prefect-server": "service_healthy",
        "mlflow": "service_healthy",
    }
    for name, needs in dependencies.items():
        assert set(needs) <= set(services), f"{name} depends on a service that doesn't exist"


def test_mlflow_uses_postgres_and_s3_and_the_worker_reaches_every_server(compose):
    services = compose["services"]
    command = services["mlflow"]["command"]
    assert "--backend-store-uri postgresql://" in command and "@postgres:5432/mlflow" in command
    assert "--artifacts-destination s3://" in command and "--serve-artifacts" in command
    assert environment(services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    worker = environment(services["worker"])
    assert (
        worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        and worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    )
    assert worker["AWS_ENDPOINT_URL"] == "http://minio:9000" and {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(
        worker
    )
    assert "postgresql+asyncpg://" in environment(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "--pool local" in services["worker"]["command"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_every_volume_is_declared_and_every_variable_is_in_env_example(compose):
    declared = set(compose["volumes"])
    used = set()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                used.add(source)
            else:
                assert (INFRA / source).exists(), f"bind mount {source} is missing"
    assert used == declared and {"postgres-data", "minio-data"} <= declared
    text = (INFRA / "docker-compose.yml").read_text()
    variables = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    assert variables and variables <= set(env_example()), f"not in .env.example: {variables - set(env_example())}"


def test_the_worker_image_has_a_gpu_base_and_the_code_where_the_gpu_pool_looks(compose):
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", dockerfile, flags=re.MULTILINE)
    assert "WORKDIR /opt/stillhouse" in dockerfile
    for service in ("worker", "mlflow"):
        assert compose["services"][service]["build"] == {"context": "..", "dockerfile": "infra/Dockerfile"}
    copied = set(re.findall(r"^COPY (\S+)", dockerfile, flags=re.MULTILINE))
    for path in copied:
        assert (INFRA.parent / path).exists(), path
    _, pools = deploy.read_prefect_file()
    assert pools["gpu"].code_directory == "/opt/stillhouse"


def test_the_kubernetes_template_requests_gpus_on_gpu_nodes_and_declares_every_variable():
    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert (
        container["resources"]["requests"]["nvidia.com/gpu"]
        == "{{ gpus }}"
        == container["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert pod["nodeSelector"] == "{{ node_selector }}" and container["image"] == "{{ image }}"
    variables = template["variables"]["properties"]
    assert variables["gpus"]["default"] >= 1 and variables["node_selector"]["default"] == {
        "nvidia.com/gpu.present": "true"
    }
    placeholders = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(variables), f"undeclared: {placeholders - set(variables)}"


def test_prefect_yaml_deployments_point_at_flows_with_valid_schedules():
    from stillhouse.flows import stages

    deployments, pools = deploy.read_prefect_file()
    assert {"local", "gpu"} == set(pools) and pools["local"].type == "process" and pools["gpu"].type == "kubernetes"
    entrypoints = {d.entrypoint.split(":")[1] for d in deployments}
    assert {
        "pipeline",
        "curate",
        "sample",
        "train",
        "evaluate",
        "evaluate_champion",
        "register",
        "publish",
    } == entrypoints
    for deployment in deployments:
        flow = getattr(stages, deployment.entrypoint.split(":")[1])
        assert flow.name.startswith("stillhouse-") and deployment.parameters["config"] == "configs/demo.yaml"
        assert resolve_config(deployment.parameters["config"]).is_file()
        for schedule in deployment.schedules:
            deploy.cron_schedule(schedule["cron"], schedule["timezone"], deployment.name)
    crons = {d.name: [s["cron"] for s in d.schedules] for d in deployments}
    assert crons["nightly"] == ["0 2 * * *"] and crons["weekly-champion"] == ["0 6 * * 1"]


def test_the_multinode_training_job_meets_at_pod_zero_and_runs_a_valid_command():
    """infra/k8s/train-multinode.yaml, rendered as its header says (envsubst): a headless Service and an Indexed Job."""
    from string import Template

    from stillhouse.config import load_config
    from stillhouse.flows.cli import build_parser

    values = {
        "NAME": "distill-8b",
        "NODES": "4",
        "GPUS_PER_NODE": "8",
        "IMAGE": "registry.example.com/worker:1",
        "CONFIG": "configs/demo.yaml",
        "STORE": "s3://bucket/stillhouse",
        "RUN_ID": "1764500000",
    }
    text = (INFRA / "k8s" / "train-multinode.yaml").read_text()
    assert set(re.findall(r"\$\{(\w+)\}", text)) == set(values), "every placeholder is documented in the header"
    rendered = Template(text).safe_substitute(values)  # safe: the header's `$(date +%s)` is shell, not a placeholder
    assert "${" not in rendered
    service, job = yaml.safe_load_all(rendered)
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    (container,) = pod["containers"]
    assert (
        container["resources"]["requests"]["nvidia.com/gpu"]
        == "8"
        == container["resources"]["limits"]["nvidia.com/gpu"]
    )

    arguments = build_parser().parse_args([*container["command"][1:], *container["args"]])
    assert arguments.command == "run" and arguments.until == "train"
    config = load_config(REPO / arguments.config, arguments.overrides)
    assert config.train.nodes == 4 and config.train.num_processes == 8 and config.store.root == "s3://bucket/stillhouse"
    host, port = config.train.rendezvous.split(":")
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"  # pod 0's DNS name under the Service
    assert int(port) == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"]

"""`stillhouse deploy` and `stillhouse serve`: the deployments of prefect.yaml on a Prefect server.

    prefect server start --host 127.0.0.1 --port 4200 & export PREFECT_API_URL=http://127.0.0.1:4200/api
    stillhouse deploy --config configs/demo.yaml                 # pools, the `gpu` limit, every deployment
    stillhouse deploy --config configs/demo.yaml --pool local    # everything on this machine's process pool
    prefect worker start --pool local                            # runs them
    stillhouse serve configs/demo.yaml --cron "0 2 * * *"        # or: one schedule, one process, no worker

Everything that can be wrong is checked before anything is registered: the Prefect API answers,
every cron expression parses, the named config is valid and its MLflow server answers, and every
work pool exists (the two pools prefect.yaml defines, `local` and `gpu`, are created when missing).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from stillhouse.config import PipelineConfig, load_config
from stillhouse.errors import StillhouseError
from stillhouse.flows.bundled import PREFECT_FILE, resolve_config
from stillhouse.health import check_server_health, check_tracking_server

GPU_LIMIT = "gpu"
STAGES_MODULE = "stillhouse.flows.stages"


@dataclass
class WorkPoolSpec:
    """A work pool prefect.yaml defines: `stillhouse deploy` creates it when the server lacks it."""

    name: str
    type: str
    code_directory: str | None = None  # the flow run's working directory; None: where `stillhouse deploy` ran
    base_job_template: dict[str, Any] | None = None


@dataclass
class DeploymentSpec:
    name: str
    entrypoint: str  # stillhouse.flows.stages:pipeline
    work_pool: str
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: list[dict[str, Any]] = field(default_factory=list)
    job_variables: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    description: str = ""


def read_prefect_file(path: Path = PREFECT_FILE) -> tuple[list[DeploymentSpec], dict[str, WorkPoolSpec]]:
    """The deployments and the defined work pools of a prefect.yaml."""
    if not path.is_file():
        raise StillhouseError(
            f"{path}: no such file; pass --prefect-file with a deployments file (the bundled one is {PREFECT_FILE})"
        )
    content = yaml.safe_load(path.read_text()) or {}
    pools = {}
    for key, pool in ((content.get("definitions") or {}).get("work_pools") or {}).items():
        template = None
        if pool.get("base_job_template"):
            template = json.loads((path.parent / pool["base_job_template"]).read_text())
        pools[pool.get("name", key)] = WorkPoolSpec(
            pool.get("name", key), pool["type"], pool.get("code_directory"), template
        )
    deployments = []
    for index, entry in enumerate(content.get("deployments") or []):
        where = f"{path}: deployments[{index}]"
        if not entry.get("name") or not entry.get("entrypoint") or not (entry.get("work_pool") or {}).get("name"):
            raise StillhouseError(f"{where}: every deployment needs `name`, `entrypoint` and `work_pool.name`")
        deployments.append(
            DeploymentSpec(
                name=entry["name"],
                entrypoint=entry["entrypoint"],
                work_pool=entry["work_pool"]["name"],
                parameters=dict(entry.get("parameters") or {}),
                schedules=list(entry.get("schedules") or []),
                job_variables=dict(entry["work_pool"].get("job_variables") or {}),
                tags=list(entry.get("tags") or []),
                description=entry.get("description", ""),
            )
        )
    if not deployments:
        raise StillhouseError(f"{path}: no deployments to register")
    return deployments, pools


def check_prefect_api(timeout_s: float = 10.0) -> str:
    """The Prefect API URL, once it answered its health check; a clear error otherwise."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise StillhouseError(
            "no Prefect API to register deployments with: PREFECT_API_URL is not set. Start a server "
            "(prefect server start --host 127.0.0.1 --port 4200) and export PREFECT_API_URL=http://127.0.0.1:4200/api "
            "(the ephemeral API of `stillhouse run` forgets deployments when the process ends)"
        )
    check_server_health(
        url, "the Prefect API", "start it (prefect server start) or fix PREFECT_API_URL; it ends in /api", timeout_s
    )
    return url


def cron_schedule(cron: str, timezone: str | None, where: str):
    """Prefect's CronSchedule, or an error naming where the expression came from and its form."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return CronSchedule(cron=cron, timezone=timezone or "UTC")
    except ValidationError as error:
        reason = "; ".join(problem["msg"].removeprefix("Value error, ") for problem in error.errors())
        raise StillhouseError(
            f"{where}: {reason}. A cron expression has five fields, minute hour day-of-month month "
            'day-of-week, e.g. "0 2 * * *" for 02:00 every day'
        ) from None


def check_config(path: Path, overrides: list[str]) -> PipelineConfig:
    """The named config parses, and the MLflow server it tracks to (if any) answers."""
    config = load_config(resolve_config(path), overrides)
    tracking_uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        check_tracking_server(tracking_uri, timeout_s=5.0)
    return config


def plan_deployments(
    config: Path | None, pool: str | None, prefect_file: Path = PREFECT_FILE, overrides: list[str] | None = None
) -> tuple[list[DeploymentSpec], dict[str, WorkPoolSpec]]:
    """Read prefect.yaml, apply --config/--pool, and check everything that needs no server."""
    deployments, pools = read_prefect_file(prefect_file)
    for deployment in deployments:
        if config is not None:
            deployment.parameters["config"] = str(config)
        if overrides:
            deployment.parameters["overrides"] = list(overrides)
        if pool is not None:
            deployment.work_pool = pool
            deployment.job_variables = {}  # another pool's variables would not fit this one
        for index, schedule in enumerate(deployment.schedules):
            if "cron" not in schedule:
                raise StillhouseError(
                    f"{prefect_file}: deployment {deployment.name!r} schedule {index}: "
                    "only `cron` schedules are supported here"
                )
            cron_schedule(
                schedule["cron"],
                schedule.get("timezone"),
                f"{prefect_file}: deployment {deployment.name!r}: cron {schedule['cron']!r}",
            )
    for config_path in sorted({d.parameters.get("config", "configs/demo.yaml") for d in deployments}):
        check_config(Path(config_path), list(overrides or []))
    return deployments, pools


def check_work_pools(
    client, deployments: list[DeploymentSpec], pools: dict[str, WorkPoolSpec], api_url: str
) -> list[WorkPoolSpec]:
    """The defined pools the server lacks (to create); an error for any other pool that doesn't exist."""
    from prefect.exceptions import ObjectNotFound

    missing = []
    for name in sorted({d.work_pool for d in deployments}):
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            if name not in pools:
                existing = ", ".join(sorted(p.name for p in client.read_work_pools())) or "none"
                raise StillhouseError(
                    f"work pool {name!r} does not exist on {api_url} (existing: {existing}); create it "
                    f"(prefect work-pool create {name} --type process) or pass --pool with one of those"
                ) from None
            missing.append(pools[name])
    return missing


def deploy(
    config: Path | None = None,
    pool: str | None = None,
    *,
    prefect_file: Path = PREFECT_FILE,
    overrides: list[str] | None = None,
    gpu_limit: int = 1,
) -> list[str]:
    """Check everything, then register the pools, the `gpu` limit and the deployments; returns 'flow/deployment'
    names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
    from prefect.utilities.callables import parameter_schema

    deployments, pools = plan_deployments(config, pool, prefect_file, overrides)  # the checks that need no server first
    api_url = check_prefect_api()
    from stillhouse.flows import stages  # imports the pipeline (torch, transformers): after the quick checks

    flows = {d.entrypoint: _flow_at(stages, d.entrypoint, prefect_file) for d in deployments}
    registered = []
    with get_client(sync_client=True) as client:
        to_create = check_work_pools(client, deployments, pools, api_url)
        # Nothing was written before this line.
        for spec in to_create:
            client.create_work_pool(
                WorkPoolCreate(name=spec.name, type=spec.type, base_job_template=spec.base_job_template or {})
            )
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, gpu_limit)
        for deployment in deployments:
            flow = flows[deployment.entrypoint]
            pool_spec = pools.get(deployment.work_pool)
            directory = (pool_spec.code_directory if pool_spec else None) or str(Path.cwd())
            client.create_deployment(
                flow_id=client.create_flow_from_name(flow.name),
                name=deployment.name,
                entrypoint=deployment.entrypoint,
                work_pool_name=deployment.work_pool,
                parameters=deployment.parameters,
                tags=deployment.tags,
                description=deployment.description,
                job_variables=deployment.job_variables,
                parameter_openapi_schema=parameter_schema(flow).model_dump_for_openapi(),
                enforce_parameter_schema=True,
                pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": directory}}],
                schedules=[
                    DeploymentScheduleCreate(
                        schedule=cron_schedule(s["cron"], s.get("timezone"), deployment.name),
                        active=bool(s.get("active", True)),
                    )
                    for s in deployment.schedules
                ],
            )
            registered.append(f"{flow.name}/{deployment.name}")
    return registered


def _flow_at(stages_module, entrypoint: str, prefect_file: Path):
    module, _, function = entrypoint.partition(":")
    if module != STAGES_MODULE or not hasattr(stages_module, function):
        raise StillhouseError(
            f"{prefect_file}: entrypoint {entrypoint!r} is not a flow of {STAGES_MODULE} "
            f"(write it as {STAGES_MODULE}:pipeline)"
        )
    return getattr(stages_module, function)


def serve(
    config: Path, cron: str, *, overrides: list[str] | None = None, until: str = "publish", name: str | None = None
) -> None:
    """Check the cron and the config, then schedule the pipeline in this process with `flow.serve` (runs until
    stopped)."""
    schedule = cron_schedule(cron, None, f"--cron {cron!r}")
    settings = check_config(config, list(overrides or []))
    from stillhouse.flows.stages import pipeline

    pipeline.serve(
        name=name or f"{settings.name}-serve",
        schedules=[schedule],
        parameters={"config": str(config), "overrides": list(overrides or []), "until": until},
    )

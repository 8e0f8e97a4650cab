"""A failed or crashed pipeline run is recorded on its MLflow run, and the Prefect run links to it."""

import shutil
import uuid

from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.states import Crashed

from stillhouse.config import parse_config
from stillhouse.flows.hooks import ERROR_TAG, mark_mlflow_run_crashed
from stillhouse.registry.tracking import start_pipeline_run


def test_a_failed_run_is_failed_in_mlflow_with_its_message_and_the_prefect_run_links_to_it(
    prefect_harness, pipeline_raw, tiny_teacher, tmp_path
):
    from stillhouse.flows.distill import distill

    broken = shutil.copytree(tiny_teacher, tmp_path / "broken-teacher")
    (broken / "model.safetensors").write_bytes(
        b"not a safetensors file"
    )  # config and tokenizer pass the checks; loading fails
    pipeline_raw["sample"]["teacher"] = str(broken)
    state = distill(parse_config(pipeline_raw), until="sample", return_state=True)
    assert state.is_failed()

    client = MlflowClient(pipeline_raw["tracking"]["uri"])
    (run,) = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id], filter_string="tags.`stillhouse.pipeline` = 'tiny'"
    )
    assert run.info.status == "FAILED"
    assert run.data.tags["stillhouse.error_type"] == "SafetensorError"
    assert run.data.tags[ERROR_TAG].startswith("SafetensorError: Error while deserializing header")
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    assert flow_run_id == str(state.state_details.flow_run_id)

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)]))
        )
    (link,) = [artifact for artifact in artifacts if artifact.key == "mlflow-run"]
    assert run.info.run_id in link.data


def test_the_crash_hook_marks_a_running_mlflow_run_failed_with_the_crash_message(pipeline_raw):
    config = parse_config(pipeline_raw)
    flow_run_id = uuid.uuid4()
    tracking = start_pipeline_run(config, str(flow_run_id))
    flow_run = FlowRun(id=flow_run_id, flow_id=uuid.uuid4(), parameters={"config": config.model_dump(mode="json")})

    mark_mlflow_run_crashed(None, flow_run, Crashed(message="Execution was aborted by a termination signal."))
    run = MlflowClient(tracking.tracking_uri).get_run(tracking.parent_run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[ERROR_TAG] == "Prefect flow run crashed: Execution was aborted by a termination signal."


def test_the_crash_hook_leaves_a_finished_run_alone(pipeline_raw):
    config = parse_config(pipeline_raw)
    flow_run_id = uuid.uuid4()
    tracking = start_pipeline_run(config, str(flow_run_id))
    MlflowClient(tracking.tracking_uri).set_terminated(tracking.parent_run_id, status="FINISHED")
    flow_run = FlowRun(id=flow_run_id, flow_id=uuid.uuid4(), parameters={"config": config.model_dump(mode="json")})
    mark_mlflow_run_crashed(None, flow_run, Crashed(message="late"))
    run = MlflowClient(tracking.tracking_uri).get_run(tracking.parent_run_id)
    assert run.info.status == "FINISHED" and ERROR_TAG not in run.data.tags

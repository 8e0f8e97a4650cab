"""The weekly deployment's flow: the registry's champion re-evaluated on the config's current eval split."""

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stillhouse.config import parse_config
from stillhouse.errors import StillhouseError

pytestmark = pytest.mark.slow


def test_the_champion_is_found_by_alias_and_re_evaluated_in_its_own_run(prefect_harness, pipeline_raw, tmp_path):
    from stillhouse.flows.distill import distill
    from stillhouse.flows.stages import evaluate_champion

    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(pipeline_raw))
    with pytest.raises(
        StillhouseError, match=r"no version of registered model 'tiny-student' holds the alias @champion"
    ):
        evaluate_champion(str(config_path))

    trained = distill(parse_config(pipeline_raw), until="register")
    assert trained.verdict.passed, trained.verdict.failures
    report = evaluate_champion(str(config_path))
    assert (
        report.metrics == trained.report.metrics
    )  # same weights, same eval split: the evaluation is reused from the store

    client = MlflowClient(pipeline_raw["tracking"]["uri"])
    runs = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id], filter_string="tags.`stillhouse.champion_version` = '1'"
    )
    (run,) = runs
    assert (
        run.info.status == "FINISHED"
        and run.data.metrics["student_perplexity"] == trained.report.metrics["student_perplexity"]
    )

"""The store on s3:// through the real s3fs, against moto's S3-compatible server on 127.0.0.1.

A fresh cache folder stands for another machine: it sees only what was uploaded.
"""

import json
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from servers import s3_server

from stillhouse.config import CurateConfig, SampleConfig
from stillhouse.data.curate import curate
from stillhouse.errors import StillhouseError
from stillhouse.sampling.sample import plan_shards, sample_shard, sample_teacher
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import MANIFEST, Store

pytestmark = pytest.mark.integration
URL = "s3://stillhouse/store"


@pytest.fixture(scope="module")
def s3_env():
    with s3_server("stillhouse") as env:
        yield env


@pytest.fixture
def s3(s3_env, monkeypatch, tmp_path):
    """The AWS_* variables point at the server; each test gets its own prefix so tests don't share outputs."""
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("STILLHOUSE_STORE_CACHE", str(tmp_path / "default-cache"))
    return boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])


def keys(client, prefix: str) -> dict[str, int]:
    listing = client.list_objects_v2(Bucket="stillhouse", Prefix=prefix)
    return {item["Key"]: item["Size"] for item in listing.get("Contents", [])}


def test_a_stage_output_is_uploaded_with_its_manifest_and_read_back_elsewhere(s3, tmp_path, prompts_jsonl):
    url = f"{URL}/{tmp_path.name}"
    config = CurateConfig(source=str(prompts_jsonl), eval_fraction=0.2)
    written = curate(config, Store(url, cache=tmp_path / "machine-a"))
    assert not written.cached
    prefix = f"store/{tmp_path.name}/curate/{written.fingerprint}/"
    uploaded = keys(s3, prefix)
    assert {prefix + "train.parquet", prefix + "eval.parquet", prefix + MANIFEST} <= set(uploaded)

    reader = Store(url, cache=tmp_path / "machine-b")
    read = curate(config, reader)
    assert read.cached and read.fingerprint == written.fingerprint and read.train_rows == written.train_rows
    assert Path(read.path).is_relative_to(tmp_path / "machine-b")
    for name in ("train.parquet", "eval.parquet"):
        assert pq.read_table(Path(read.path) / name).equals(pq.read_table(Path(written.path) / name))
    assert json.loads((Path(read.path) / MANIFEST).read_text()) == json.loads(
        s3.get_object(Bucket="stillhouse", Key=prefix + MANIFEST)["Body"].read()
    )


def test_a_failed_stage_uploads_no_manifest_and_is_computed_again(s3, tmp_path):
    store = Store(f"{URL}/{tmp_path.name}", cache=tmp_path / "cache")

    def killed(folder):
        (folder / "part.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-stage")

    with pytest.raises(RuntimeError):
        store.build("train", "f0", killed)
    assert not keys(s3, f"store/{tmp_path.name}/train/f0/"), "nothing of an unfinished stage is uploaded"
    assert store.manifest("train", "f0") is None

    def finished(folder):
        (folder / "weights.bin").write_bytes(b"w")
        return {"ok": True}

    redone = store.build("train", "f0", finished)
    assert (
        not redone.cached
        and Store(f"{URL}/{tmp_path.name}", cache=tmp_path / "other").manifest("train", "f0")["ok"] is True
    )


def test_a_missing_bucket_is_named_before_anything_is_computed(s3, tmp_path):
    computed = []
    with pytest.raises(StillhouseError, match=r"bucket 'no-such-bucket' does not exist .*create it"):
        Store("s3://no-such-bucket/x", cache=tmp_path / "cache").build(
            "curate", "f1", lambda folder: computed.append(1) or {}
        )
    assert not computed


@pytest.mark.slow
def test_sampling_interrupted_after_two_shards_resumes_on_another_machine(s3, tmp_path, tiny_teacher, prompts_jsonl):
    url = f"{URL}/{tmp_path.name}"
    dataset = curate(CurateConfig(source=str(prompts_jsonl)), Store(url, cache=tmp_path / "machine-a"))
    config = SampleConfig(
        teacher=str(tiny_teacher),
        max_new_tokens=6,
        temperature=1.0,
        seed=3,
        top_k_logprobs=3,
        shard_rows=30,
        batch_size=8,
    )

    # Machine A samples two shards and dies: no finish_sampling, so no manifest; its lock dies with it.
    first_store = Store(url, cache=tmp_path / "machine-a")
    first = plan_shards(config, dataset, first_store)
    assert first.pending == [0, 1, 2, 3] and first.remote_store == url
    for index in (0, 1):
        sample_shard(config, dataset, first, index)
    first_store.release("sample", first.fingerprint)
    prefix = f"store/{tmp_path.name}/sample/{first.fingerprint}/"
    assert set(keys(s3, prefix)) == {prefix + "shard-00000.parquet", prefix + "shard-00001.parquet"}, (
        "each shard is uploaded as it finishes"
    )

    # Machine B (an empty cache) plans only the missing shards, then finishes the stage.
    second_store = Store(url, cache=tmp_path / "machine-b")
    assert plan_shards(config, dataset, second_store).pending == [2, 3]
    resumed = sample_teacher(config, dataset, second_store)
    assert not resumed.cached and prefix + MANIFEST in keys(s3, prefix)

    uninterrupted = sample_teacher(config, dataset, Store(tmp_path / "local"))
    assert uninterrupted.fingerprint == resumed.fingerprint and resumed.rows == uninterrupted.rows == 120
    got, want = read_teacher_outputs(resumed.path), read_teacher_outputs(uninterrupted.path)
    assert not got.duplicated(["prompt_id", "sample_index"]).any()
    assert got.equals(want)


@pytest.mark.slow
def test_the_whole_pipeline_runs_on_an_s3_store_and_a_second_machine_reuses_it(
    s3, prefect_harness, pipeline_raw, tmp_path, monkeypatch
):
    from stillhouse.config import parse_config
    from stillhouse.flows.distill import distill

    pipeline_raw["store"] = f"{URL}/{tmp_path.name}"
    monkeypatch.setenv("STILLHOUSE_STORE_CACHE", str(tmp_path / "machine-a"))
    first = distill(parse_config(pipeline_raw), until="register")
    assert first.registered is not None and not any(first.cached.values())
    uploaded = keys(s3, f"store/{tmp_path.name}/")
    for stage, ref in {
        "curate": first.dataset,
        "sample": first.samples,
        "train": first.student,
        "evaluate": first.report,
    }.items():
        assert f"store/{tmp_path.name}/{stage}/{ref.fingerprint}/{MANIFEST}" in uploaded, stage
    assert any(key.endswith(".safetensors") for key in uploaded), "the student's weights are in the bucket"

    monkeypatch.setenv("STILLHOUSE_STORE_CACHE", str(tmp_path / "machine-b"))
    second = distill(parse_config(pipeline_raw), until="evaluate")
    assert second.cached == {"curate": True, "sample": True, "train": True, "evaluate": True}
    assert second.report.metrics == first.report.metrics
    assert Path(second.student.path).is_relative_to(tmp_path / "machine-b")

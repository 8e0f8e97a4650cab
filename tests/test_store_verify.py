"""The store verifies an output every time it is reused: tampered, missing, added or linked files, and broken
manifests, make it recompute the output (one warning, no traceback), never reuse it.

The first tests break a hand-made output; the later ones break real stage outputs (teacher shards, a
trained student) on disk and run the stage again, and the last one runs the CLI twice with a Hub,
with the student's weights overwritten in between.

    .venv/bin/python -m pytest tests/test_store_verify.py -q
"""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from stillhouse.errors import StillhouseError
from stillhouse.store import MANIFEST, QUARANTINE, SMALL_FILE_BYTES, Store, file_sha256, verify_store


def build_output(store: Store, calls: list, stage: str = "train", fingerprint: str = "f1"):
    """An output with a nested file, as a training stage writes one."""

    def compute(folder: Path) -> dict:
        calls.append(folder)
        (folder / "model").mkdir(exist_ok=True)
        (folder / "model" / "weights.bin").write_bytes(bytes(range(256)) * 64)  # 16 KiB
        (folder / "model" / "config.json").write_text('{"layers": 2}')
        (folder / "notes.txt").write_text("hello")
        return {"rows": 3}

    return store.build(stage, fingerprint, compute)


def one_warning(caplog) -> str:
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "\n" not in warnings[0]
    return warnings[0]


def test_the_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    store, calls = Store(tmp_path), []
    output = build_output(store, calls)
    files = output.manifest["files"]
    assert set(files) == {"model/weights.bin", "model/config.json", "notes.txt"}
    folder = tmp_path / "train" / "f1"
    for name, entry in files.items():
        assert entry == {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
    assert json.loads((folder / MANIFEST).read_text()) == output.manifest
    assert store.build("train", "f1", lambda folder: {}).cached and len(calls) == 1


@pytest.mark.parametrize(
    "damage, problem",
    [
        (
            lambda f: f.joinpath("model/weights.bin").write_bytes(
                b"\0" * 4096 + f.joinpath("model/weights.bin").read_bytes()[4096:]
            ),
            r"model/weights.bin: sha256 [0-9a-f]{16}…, the manifest records [0-9a-f]{16}… \(changed after sealing\)",
        ),
        (lambda f: f.joinpath("model/weights.bin").unlink(), r"model/weights.bin: missing"),
        (
            lambda f: f.joinpath("model/config.json").write_text("{}"),
            r"model/config.json: 2 bytes, the manifest records 13",
        ),
        (
            lambda f: f.joinpath("model/special_tokens_map.json").write_text("{}"),
            r"model/special_tokens_map.json: not in the manifest \(added after the output was sealed\)",
        ),
        (
            lambda f: f.joinpath("model/extra.json").symlink_to("/etc/hostname"),
            r"model/extra.json: a symlink to /etc/hostname \(outputs hold regular files only\)",
        ),
        (
            lambda f: f.joinpath(MANIFEST).write_text('{\n  "files": {'),
            r"manifest.json is not valid JSON \(.* at line 2\)",
        ),
        (lambda f: f.joinpath(MANIFEST).write_text("{}"), r"manifest.json holds dict {}, not a manifest"),
        (
            lambda f: f.joinpath(MANIFEST).write_text(json.dumps({"stage": "train", "fingerprint": "f1", "rows": 3})),
            r"manifest.json has no file list: written before the store verified outputs \(treated as invalid once\)",
        ),
        (
            lambda f: f.joinpath(MANIFEST).write_text(
                f.joinpath(MANIFEST).read_text().replace('"rows": 3', '"rows": 4')
            ),
            r"manifest.json was edited after it was sealed",
        ),
    ],
    ids=[
        "overwritten",
        "deleted",
        "resized",
        "added",
        "symlink",
        "truncated-manifest",
        "empty-manifest",
        "legacy-manifest",
        "edited-manifest",
    ],
)
def test_a_damaged_output_is_recomputed_with_one_warning(tmp_path, caplog, damage, problem):
    store, calls = Store(tmp_path), []
    build_output(store, calls)
    folder = tmp_path / "train" / "f1"
    damage(folder)
    caplog.clear()
    again = build_output(store, calls)
    assert not again.cached and len(calls) == 2
    message = one_warning(caplog)
    assert f"store: {folder} is invalid (" in message and "; recomputing it" in message
    assert re.search(problem, message), message
    # Recomputed and sealed again: the next reuse verifies, and nothing linked or added survived.
    assert store.build("train", "f1", lambda f: pytest.fail("recomputed twice")).cached
    assert not any(path.is_symlink() for path in folder.rglob("*"))
    assert set(again.manifest["files"]) == {"model/weights.bin", "model/config.json", "notes.txt"}
    # What the invalid output held is kept aside, not deleted.
    (kept,) = (tmp_path / QUARANTINE / "train").iterdir()
    assert any(kept.rglob("*")) and kept.name.startswith("f1-") and str(kept) in message
    assert Path("/etc/hostname").exists()


def test_a_symlinked_output_folder_is_moved_aside_not_followed(tmp_path, caplog):
    store, calls = Store(tmp_path), []
    build_output(store, calls)
    elsewhere = tmp_path / "teacher-weights"
    shutil.copytree(tmp_path / "train" / "f1", elsewhere)  # a complete, valid-looking output, manifest included
    shutil.rmtree(tmp_path / "train" / "f1")
    (tmp_path / "train" / "f1").symlink_to(elsewhere)
    caplog.clear()
    again = build_output(store, calls)
    assert not again.cached and len(calls) == 2
    assert "the folder is a symlink to" in one_warning(caplog)
    assert not (tmp_path / "train" / "f1").is_symlink()
    assert sorted(p.name for p in elsewhere.iterdir()) == [MANIFEST, "model", "notes.txt"]  # the target untouched


def test_sizes_mode_hashes_small_files_and_the_publish_stage(tmp_path, caplog):
    store = Store(tmp_path, verify="sizes")

    def compute(folder: Path) -> dict:
        (folder / "big.bin").write_bytes(b"\1" * (SMALL_FILE_BYTES + 1))
        (folder / "small.json").write_text('{"a": 1}')
        return {}

    for stage in ("train", "publish"):
        store.build(stage, "f", compute)
        with open(tmp_path / stage / "f" / "big.bin", "r+b") as handle:
            handle.write(b"\2" * 4096)  # same size, other bytes
    caplog.clear()
    assert store.build("train", "f", compute).cached, "a big file is only size-checked with verify: sizes"
    assert not store.build("publish", "f", compute).cached, "everything published is hashed"
    assert "big.bin: sha256" in one_warning(caplog)
    (tmp_path / "train" / "f" / "small.json").write_text('{"a": 2}')
    assert not store.build("train", "f", compute).cached, "small files are hashed in sizes mode too"
    # `full` (the default) hashes the big file too.
    full = Store(tmp_path / "full")
    full.build("train", "f", compute)
    with open(tmp_path / "full" / "train" / "f" / "big.bin", "r+b") as handle:
        handle.write(b"\2" * 4096)
    assert not full.build("train", "f", compute).cached


def test_a_file_changed_after_a_reuse_in_the_same_process_is_still_caught(tmp_path):
    """Reuse in one process remembers what it verified, but only as long as no file was touched."""
    store, calls = Store(tmp_path), []
    build_output(store, calls)
    assert build_output(store, calls).cached
    weights = tmp_path / "train" / "f1" / "model" / "weights.bin"
    content = bytearray(weights.read_bytes())
    content[100] ^= 1
    weights.write_bytes(bytes(content))
    assert not build_output(store, calls).cached and len(calls) == 2
    (tmp_path / "train" / "f1" / "added.txt").write_text("x")
    assert not build_output(store, calls).cached and len(calls) == 3


def test_verify_store_reports_every_output_and_changes_nothing(tmp_path):
    store, calls = Store(tmp_path), []
    build_output(store, calls, "curate", "a1")
    build_output(store, calls, "train", "b2")
    build_output(store, calls, "train", "c3")
    (tmp_path / "sample" / "d4").mkdir(parents=True)  # an interrupted run's folder: no manifest yet
    weights = tmp_path / "train" / "c3" / "model" / "weights.bin"
    with open(weights, "r+b") as handle:
        handle.write(b"\0" * 16)
    before = {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    report = verify_store(Store(tmp_path, verify="sizes"))  # a check on demand hashes everything anyway
    assert [(o.stage, o.fingerprint, o.status) for o in report.outputs] == [
        ("curate", "a1", "ok"),
        ("sample", "d4", "incomplete"),
        ("train", "b2", "ok"),
        ("train", "c3", "invalid"),
    ]
    assert not report.ok
    text = report.text()
    assert "ok          curate/a1  3 files, 0.0 MB, 3 hashed" in text
    assert "INVALID     train/c3  model/weights.bin: sha256" in text
    assert "incomplete  sample/d4" in text
    assert f"store {tmp_path}: 4 outputs, 2 ok, 1 invalid, 1 incomplete" in text
    assert [o.fingerprint for o in verify_store(store, stage="train").outputs] == ["b2", "c3"]
    assert {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert verify_store(Store(tmp_path / "nothing-here")).ok


def test_the_publish_stage_check_refuses_an_unverified_output(tmp_path):
    store, calls = Store(tmp_path, verify="sizes"), []
    build_output(store, calls)
    assert store.verify_output("train", "f1", "the student").hashed == 3
    with open(tmp_path / "train" / "f1" / "model" / "weights.bin", "r+b") as handle:
        handle.write(b"\0" * 4096)
    with pytest.raises(
        StillhouseError, match=r"the student .*/train/f1 does not match its manifest: model/weights.bin: sha256"
    ):
        store.verify_output("train", "f1", "the student")
    with pytest.raises(StillhouseError, match=r"has no manifest.json \(never completed\)"):
        store.verify_output("train", "never", "the student")
    assert (tmp_path / "train" / "f1" / MANIFEST).exists(), "a check alone moves nothing"


def test_a_stage_that_writes_a_symlink_is_refused_at_sealing(tmp_path):
    store = Store(tmp_path)

    def compute(folder: Path) -> dict:
        (folder / "weights.safetensors").symlink_to("/etc/hostname")
        return {}

    with pytest.raises(StillhouseError, match=r"can't be sealed: weights.safetensors: a symlink to /etc/hostname"):
        store.build("train", "f", compute)
    assert not (tmp_path / "train" / "f" / MANIFEST).exists()


# Real stage outputs, damaged on disk, and the stage run again ----------------------------------------

TRAIN = {
    "architecture": {"hidden_size": 16, "num_layers": 2, "intermediate_size": 32, "num_heads": 2},
    "method": "kd",
    "max_steps": 4,
    "batch_size": 8,
    "learning_rate": 0.01,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory, tiny_teacher, prompts_jsonl):
    """A store holding curate, sample (4 shards) and train outputs of the tiny teacher; tests work on copies."""
    from stillhouse.config import CurateConfig, SampleConfig, TrainConfig
    from stillhouse.data.curate import curate
    from stillhouse.sampling.sample import sample_teacher
    from stillhouse.training.stage import train_student

    root = tmp_path_factory.mktemp("trained") / "store"
    store = Store(root)
    dataset = curate(CurateConfig(source=str(prompts_jsonl), category_column="task", eval_fraction=0.2), store)
    samples = sample_teacher(
        SampleConfig(teacher=str(tiny_teacher), max_new_tokens=8, top_k_logprobs=4, batch_size=32, shard_rows=30),
        dataset,
        store,
    )
    student = train_student(TrainConfig.model_validate(TRAIN), dataset, samples, store)
    return root, samples, student


class Stages:
    """The stages of `trained_store`, run again on a copy of it."""

    def __init__(self, root: Path, tiny_teacher: Path, prompts_jsonl: Path):
        from stillhouse.config import CurateConfig, SampleConfig

        self.root, self.store = root, Store(root)
        self.curate_config = CurateConfig(source=str(prompts_jsonl), category_column="task", eval_fraction=0.2)
        self.sample_config = SampleConfig(
            teacher=str(tiny_teacher), max_new_tokens=8, top_k_logprobs=4, batch_size=32, shard_rows=30
        )

    def sample(self):
        from stillhouse.data.curate import curate
        from stillhouse.sampling.sample import sample_teacher

        self.dataset = curate(self.curate_config, self.store)
        return sample_teacher(self.sample_config, self.dataset, self.store)

    def train(self, **changes):
        from stillhouse.config import TrainConfig
        from stillhouse.training.stage import train_student

        samples = self.sample()
        return train_student(TrainConfig.model_validate({**TRAIN, **changes}), self.dataset, samples, self.store)


@pytest.fixture
def stages(trained_store, tmp_path, tiny_teacher, prompts_jsonl, caplog) -> Stages:
    root, _, _ = trained_store
    shutil.copytree(root, tmp_path / "store", symlinks=True)
    caplog.set_level(logging.WARNING)
    return Stages(tmp_path / "store", tiny_teacher, prompts_jsonl)


def shard_path(stages: Stages, samples, index: int) -> Path:
    return stages.root / "sample" / samples.fingerprint / f"shard-{index:05d}.parquet"


def test_a_deleted_shard_is_sampled_again_before_training_reads_the_samples(stages, trained_store, caplog):
    _, samples, student = trained_store
    missing = shard_path(stages, samples, 1)
    missing.unlink()
    caplog.clear()
    # A new training run (another max_steps) over the same samples: all examples, not the 3 shards left.
    retrained = stages.train(max_steps=5)
    message = one_warning(caplog)
    assert f"sample/{samples.fingerprint} is invalid (shard-00001.parquet: missing)" in message
    assert missing.is_file()
    manifest = json.loads((stages.root / "train" / retrained.fingerprint / MANIFEST).read_text())
    original = json.loads((trained_store[0] / "train" / student.fingerprint / MANIFEST).read_text())
    assert manifest["examples"] == original["examples"] > 0


@pytest.mark.parametrize("damage", ["rewritten", "flipped byte"])
def test_a_changed_shard_is_sampled_again_not_read(stages, trained_store, caplog, damage):
    import pyarrow.parquet as pq

    from stillhouse.sampling.teacher_outputs import read_teacher_outputs

    _, samples, _ = trained_store
    shard = shard_path(stages, samples, 2)
    original = shard.read_bytes()
    if damage == "rewritten":  # a valid shard with other answers
        table = pq.read_table(shard)
        texts = [text[::-1] + "!" for text in table.column("response_text").to_pylist()]
        pq.write_table(table.set_column(table.schema.get_field_index("response_text"), "response_text", [texts]), shard)
    else:  # parquet can't read it any more: today an ArrowInvalid traceback
        content = bytearray(original)
        content[len(content) // 2] ^= 0xFF
        shard.write_bytes(bytes(content))
    caplog.clear()
    again = stages.sample()
    message = one_warning(caplog)
    assert not again.cached and re.search(r"\(shard-00002.parquet: (sha256|\d+ bytes, the manifest records)", message)
    assert shard.read_bytes() == original  # sampled again, deterministically: the same shard
    assert len(read_teacher_outputs(shard.parent)) == samples.rows
    assert stages.sample().cached


def test_a_train_folder_replaced_by_a_link_to_the_teacher_is_not_reused_as_the_student(
    stages, trained_store, tiny_teacher, caplog
):
    _, _, student = trained_store
    folder = stages.root / "train" / student.fingerprint
    fake = stages.root.parent / "fake-output"
    shutil.copytree(folder, fake)
    shutil.rmtree(fake / "model")
    (fake / "model").symlink_to(tiny_teacher)  # the "student" would be the teacher's weights
    shutil.rmtree(folder)
    folder.symlink_to(fake)
    caplog.clear()
    retrained = stages.train()
    assert not retrained.cached and "the folder is a symlink to" in one_warning(caplog)
    assert not folder.is_symlink() and not (folder / "model").is_symlink()
    assert file_sha256(folder / "model" / "model.safetensors") != file_sha256(tiny_teacher / "model.safetensors")
    assert (fake / "model").is_symlink() and (tiny_teacher / "model.safetensors").is_file()  # nothing followed


def test_a_student_without_weights_is_trained_again_not_reused(stages, trained_store, caplog):
    _, _, student = trained_store
    weights = stages.root / "train" / student.fingerprint / "model" / "model.safetensors"
    weights.unlink()
    caplog.clear()
    retrained = stages.train()
    assert not retrained.cached and "model/model.safetensors: missing" in one_warning(caplog)
    assert weights.is_file() and stages.train().cached


@pytest.mark.parametrize("content", ['{\n  "counts": {', "{}"], ids=["truncated", "empty"])
def test_a_broken_sample_manifest_is_resampled_without_a_traceback(stages, trained_store, caplog, content):
    _, samples, _ = trained_store
    manifest = stages.root / "sample" / samples.fingerprint / MANIFEST
    manifest.write_text(content)
    caplog.clear()
    again = stages.sample()
    assert not again.cached and again.rows == samples.rows
    assert f"{manifest.parent} is invalid ({MANIFEST}" in one_warning(caplog)


# The case found first: a student's weights overwritten in the store, then the run repeated with publishing ----

TOKEN = "hf_test_token"
REPO = "alice/tiny-student"


@pytest.mark.slow
@pytest.mark.integration
def test_overwritten_student_weights_never_reach_the_hub(
    prefect_harness, pipeline_raw, hub, tmp_path, monkeypatch, capsys
):
    import hashlib

    import yaml
    from prefect import flow

    from stillhouse.config import parse_config
    from stillhouse.flows.cli import main
    from stillhouse.flows.distill import distill
    from stillhouse.registry.tracking import TrackingContext
    from stillhouse.tasks.publish import publish_task

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    first = distill(parse_config(pipeline_raw), until="register")
    weights = Path(first.student.model_path) / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[len(content) // 2 : len(content) // 2 + 4096] = b"\x7f" * 4096  # 4 KiB of the weights, overwritten
    weights.write_bytes(bytes(content))
    tampered = hashlib.sha256(content).hexdigest()
    pipeline_raw["publish"] = {
        "repo_id": REPO,
        "endpoint": hub.url,
        "retry_backoff_s": 0.01,
        "round_trip_prompts": 2,
        "teacher_name": "alice/tiny-teacher",
        "dataset_names": ["alice/tiny-prompts"],
    }

    # The publish stage on its own, handed the student the pipeline trained: it hashes what it would push, and refuses.
    config = parse_config(pipeline_raw)
    tracking = TrackingContext(
        tracking_uri=first.tracking_uri, experiment_id=first.experiment_id, parent_run_id=first.mlflow_run_id
    )

    @flow
    def publish_only():
        return publish_task(
            config, first.dataset, first.samples, first.student, first.report, first.registered, tracking
        )

    with pytest.raises(
        StillhouseError,
        match=r"publish: the student \(train output\) .* does not match its manifest: model/model.safetensors: sha256",
    ):
        publish_only()
    assert not any(r.method == "POST" for r in hub.requests), "nothing was pushed, not even a repo"

    # The run repeated, as it was found: training sees the damage, trains again, and the Hub gets real weights.
    config_path = tmp_path / "publish.yaml"
    config_path.write_text(yaml.safe_dump(pipeline_raw))
    # On the store's own logger: Prefect's logging setup decides where (and whether) the root logger prints.
    store_log, records = logging.getLogger("stillhouse.store"), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    store_log.addHandler(handler)
    try:
        capsys.readouterr()
        assert main(["run", str(config_path)]) == 0
    finally:
        store_log.removeHandler(handler)
    store_warnings = [record.getMessage() for record in records]
    assert len(store_warnings) == 1, store_warnings
    assert f"/train/{first.student.fingerprint} is invalid (model/model.safetensors: sha256" in store_warnings[0]
    assert "Traceback" not in "".join(capsys.readouterr())
    pushed = hub.files(REPO)["model.safetensors"]
    recorded = json.loads(hub.files(REPO)["stillhouse.json"])["files"]["model.safetensors"]["sha256"]
    assert hashlib.sha256(pushed).hexdigest() == recorded != tampered
    assert file_sha256(weights) != tampered  # retrained in place
    capsys.readouterr()
    assert (
        main(["pull", REPO, "--revision", "v1", "--endpoint", hub.url, "--prompt", "ab", "--max-new-tokens", "2"]) == 0
    )
    assert re.search(r"verified \d+ files against stillhouse.json", capsys.readouterr().out)


# On an s3:// store: the remote copy is what counts; a damaged local cache is fetched again -----------------


@pytest.fixture
def s3(tmp_path, monkeypatch):
    import boto3
    from s3fs import S3FileSystem
    from servers import s3_server

    with s3_server("stillhouse") as env:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        # fsspec keeps one filesystem per set of arguments, not per endpoint: drop any that points at another server.
        S3FileSystem.clear_instance_cache()
        try:
            yield boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        finally:
            S3FileSystem.clear_instance_cache()


@pytest.mark.integration
def test_on_s3_a_damaged_remote_file_is_recomputed_and_a_damaged_cache_refetched(s3, tmp_path, caplog):
    url, prefix = f"s3://stillhouse/{tmp_path.name}", f"{tmp_path.name}/train/f1/"
    calls: list = []
    build_output(Store(url, cache=tmp_path / "machine-a"), calls)
    original = s3.get_object(Bucket="stillhouse", Key=prefix + "model/weights.bin")["Body"].read()

    # Only this machine's cache is damaged: fetched again from S3, nothing recomputed, no warning.
    cached = tmp_path / "machine-a" / "s3" / "stillhouse" / tmp_path.name / "train" / "f1" / "model" / "weights.bin"
    cached.write_bytes(b"\0" * len(original))
    caplog.clear()
    assert build_output(Store(url, cache=tmp_path / "machine-a"), calls).cached and len(calls) == 1
    assert cached.read_bytes() == original and not caplog.records

    # The object on S3 is damaged (same size): another machine recomputes, and S3 holds the right bytes again.
    s3.put_object(Bucket="stillhouse", Key=prefix + "model/weights.bin", Body=b"\1" * len(original))
    again = build_output(Store(url, cache=tmp_path / "machine-b"), calls)
    assert not again.cached and len(calls) == 2
    assert f"store: {url}/train/f1 is invalid (model/weights.bin: sha256" in one_warning(caplog)
    assert s3.get_object(Bucket="stillhouse", Key=prefix + "model/weights.bin")["Body"].read() == original
    assert build_output(Store(url, cache=tmp_path / "machine-c"), calls).cached and len(calls) == 2

    # A legacy manifest on S3 (no file list): recomputed once, from nothing of what was there.
    legacy = {"stage": "train", "fingerprint": "f1", "rows": 3}
    s3.put_object(Bucket="stillhouse", Key=prefix + MANIFEST, Body=json.dumps(legacy).encode())
    caplog.clear()
    assert not build_output(Store(url, cache=tmp_path / "machine-d"), calls).cached and len(calls) == 3
    assert "manifest.json has no file list" in one_warning(caplog)
    report = verify_store(Store(url, cache=tmp_path / "machine-e"))
    assert [(o.stage, o.fingerprint, o.status) for o in report.outputs] == [("train", "f1", "ok")]


def test_stillhouse_store_verify_reports_a_damaged_shard_and_exits_1(stages, trained_store, tmp_path):
    """The command a user runs after a disk scare: one line per output, exit 0 while intact, 1 once a shard changed."""
    import subprocess
    import sys

    _, samples, _ = trained_store
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

    def verify(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "stillhouse.flows.cli", "store", "verify", str(config)]
        command += ["--set", f"store.root={stages.root}", *extra]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)

    intact = verify()
    assert intact.returncode == 0, intact.stderr
    assert re.search(r"store .*: 3 outputs, 3 ok, 0 invalid, 0 incomplete", intact.stdout)
    with open(shard_path(stages, samples, 1), "r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff")
    damaged = verify("--stage", "sample")
    assert damaged.returncode == 1
    assert f"INVALID     sample/{samples.fingerprint}  shard-00001.parquet: sha256" in damaged.stdout
    assert "1 outputs, 0 ok, 1 invalid" in damaged.stdout and "recomputes it" in damaged.stdout
    assert "Traceback" not in damaged.stderr

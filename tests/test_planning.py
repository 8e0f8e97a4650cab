"""`stillhouse plan`: memory per stage from config.json files alone (tests/model_configs: the published shapes of
the recipe models, no weights), the layouts it proposes, and `validate` refusing what can't fit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stillhouse.config import load_config, parse_config
from stillhouse.errors import InputError
from stillhouse.flows.cli import main
from stillhouse.planning import (
    Hardware,
    activation_bytes,
    check_plan,
    model_shape,
    parse_memory,
    plan_pipeline,
    render,
)

REPO = Path(__file__).parents[1]
MODELS = REPO / "tests" / "model_configs"
GPU_80GB = Hardware(gpus_per_node=8, gpu_memory_bytes=80 * 10**9)
ONE_80GB = Hardware(gpus_per_node=1, gpu_memory_bytes=80 * 10**9)
# Hub ids of the recipes -> the folder holding the same config.json.
HUB_IDS = {
    "meta-llama/Llama-3.1-70B-Instruct": "Llama-3.1-70B-Instruct",
    "meta-llama/Llama-3.1-8B": "Llama-3.1-8B",
    "meta-llama/Llama-3.1-8B-Instruct": "Llama-3.1-8B-Instruct",
    "Qwen/Qwen3-32B": "Qwen3-32B",
    "Qwen/Qwen3-1.7B": "Qwen3-1.7B",
    "Qwen/Qwen2.5-0.5B": "Qwen2.5-0.5B",
    "Qwen/Qwen2.5-1.5B-Instruct": "Qwen2.5-1.5B-Instruct",
}


def config(teacher: str, student: str, **sections) -> object:
    raw = {
        "name": "plan-test",
        "curate": {"source": "builtin:demo"},
        "sample": {"teacher": str(MODELS / teacher), "top_k_logprobs": 20, "dtype": "bfloat16"},
        "train": {"student": str(MODELS / student), "method": "kd", "bf16": True, "max_seq_len": 2048},
        "evaluate": {"batch_size": 4},
        "registry": {"model_name": "plan-test"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return parse_config(raw)


@pytest.mark.parametrize(
    "name, parameters",
    [
        ("Llama-3.1-70B-Instruct", 70_553_706_496),
        ("Llama-3.1-8B", 8_030_261_248),
        ("Llama-3.1-8B-Instruct", 8_030_261_248),
        ("Qwen3-32B", 32_762_123_264),
        ("Qwen3-1.7B", 1_720_574_976),
        ("Qwen2.5-1.5B-Instruct", 1_543_714_304),
        ("Qwen2.5-0.5B", 494_032_768),
    ],
)
def test_shapes_come_from_config_json_alone(name, parameters):
    shape = model_shape(str(MODELS / name))
    assert shape.parameters == parameters  # the published sizes: 70.6B, 8.03B, 32.8B, 1.72B, 1.54B, 0.49B
    assert not list((MODELS / name).glob("*.safetensors"))


def test_the_arithmetic_of_a_small_case_by_hand(tmp_path):
    """A 2-layer Llama (h=64, I=128, 4 heads of 16, 2 KV heads, V=1000, untied), fp32, one process, SFT."""
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 1000,
                "tie_word_embeddings": False,
            }
        )
    )
    shape = model_shape(str(folder))
    # Per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + MLP 3x64x128 + two norms of 64 = 36,992.
    # Embeddings and LM head 2 x 64,000, the final norm 64.
    assert shape.parameters == 2 * 36_992 + 2 * 64_000 + 64 == 202_048
    assert shape.kv_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2  # layers x (k, v) x KV heads x head size x bf16
    raw = {
        "name": "small",
        "curate": {"source": "builtin:demo"},
        "sample": {"teacher": str(folder), "top_k_logprobs": 4},
        "train": {"student": str(folder), "method": "sft", "batch_size": 2, "max_seq_len": 32, "device": "cpu"},
        "registry": {"model_name": "small"},
    }
    plan = plan_pipeline(parse_config(raw), Hardware(gpus_per_node=1, gpu_memory_bytes=2**30, cpu=True))
    train = plan.stage("train")
    parts = {part.name: part.bytes for part in train.parts}
    tokens = 2 * 32
    # Activations per token and layer, fp32: norms 24h, attention 4 x 4 heads x 16 x 4 bytes, MLP 16I, log-sum-exp
    # 4 x heads; and the final norm's 12h once.
    per_layer = 24 * 64 + 4 * 4 * 4 * 16 + 16 * 128 + 4 * 4
    assert per_layer == 4624
    assert parts["activations"] == tokens * (2 * per_layer + 12 * 64) == 641_024
    assert parts["fp32 weights"] == 4 * 202_048
    assert parts["AdamW states"] == 8 * 202_048
    assert parts["gradients"] == 4 * 202_048
    assert parts["logits and loss"] == 3 * 4 * tokens * 1000  # cross-entropy alone: 3 fp32 copies of [N, V]
    # The peak is the end of the forward (weights, states, activations, logits, the LM head's fp32 gradient);
    # the optimizer step (16 bytes per parameter) is lower.
    forward_end = 4 * 202_048 + 8 * 202_048 + 641_024 + 768_000
    assert train.peak_bytes == forward_end + 4 * 64_000 == 4_089_600
    assert train.peak_bytes > 16 * 202_048
    assert "CUDA context and allocator" not in parts  # a CPU: nothing is held besides the tensors


def test_an_8b_full_fine_tune_on_one_80gb_gpu_does_not_fit_and_fsdp_over_8_gpus_does():
    pipeline = config("Llama-3.1-70B-Instruct", "Llama-3.1-8B", train={"batch_size": 64, "loss_chunk_size": 1024})
    train = plan_pipeline(pipeline, GPU_80GB).stage("train")
    assert not train.fits and train.peak_bytes > 80 * 10**9  # 16 bytes x 8B parameters alone is 128 GB
    assert "train.strategy=fsdp" in train.fix and "train.num_processes=8" in train.fix
    # The fix, applied, fits.
    overrides = train.fix.split("--set ", 1)[1].split(" (", 1)[0].split()
    fixed = load_config(write_yaml(pipeline), overrides)
    assert fixed.train.strategy == "fsdp" and plan_pipeline(fixed, GPU_80GB).stage("train").fits
    # On one GPU there is nothing to shard over: LoRA is proposed.
    alone = plan_pipeline(pipeline, ONE_80GB).stage("train")
    assert not alone.fits and "train.lora.r=16" in alone.fix
    overrides = alone.fix.split("--set ", 1)[1].split(" (", 1)[0].split()
    assert plan_pipeline(load_config(write_yaml(pipeline), overrides), ONE_80GB).stage("train").fits


def write_yaml(pipeline, folder: Path | None = None) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp(dir=folder)) / "exp.yaml"
    path.write_text(yaml.safe_dump(pipeline.model_dump(mode="json", exclude_defaults=True)))
    return path


def test_each_memory_knob_lowers_the_training_estimate():
    base = {"batch_size": 8, "num_processes": 8, "strategy": "fsdp"}
    variants = {
        "baseline": {},
        "loss_chunk_size": {"loss_chunk_size": 1024},
        "gradient_checkpointing": {"gradient_checkpointing": True},
        "cpu_offload": {"fsdp": {"cpu_offload": True}},
        "lora": {"lora": {"r": 16}},
    }
    peaks = {
        name: plan_pipeline(config("Qwen3-32B", "Qwen3-1.7B", train={**base, **change}), GPU_80GB)
        .stage("train")
        .peak_bytes
        for name, change in variants.items()
    }
    for name in variants:
        if name != "baseline":
            assert peaks[name] < peaks["baseline"], name
    resharded = plan_pipeline(config("Qwen3-32B", "Qwen3-1.7B", train=base), GPU_80GB).stage("train")
    kept = plan_pipeline(
        config("Qwen3-32B", "Qwen3-1.7B", train={**base, "fsdp": {"reshard_after_forward": False}}), GPU_80GB
    ).stage("train")
    assert kept.peak_bytes > resharded.peak_bytes  # every layer stays gathered until the backward


def test_activations_follow_tokens_and_checkpointing():
    shape = model_shape(str(MODELS / "Qwen2.5-0.5B"))
    full = activation_bytes(shape, 4096, "bf16", checkpointing=False)
    assert activation_bytes(shape, 8192, "bf16", checkpointing=False) == 2 * full
    assert activation_bytes(shape, 4096, "fp32", checkpointing=False) > full
    assert activation_bytes(shape, 4096, "bf16", checkpointing=True) < full / 5


def test_a_70b_teacher_gets_tensor_parallel_4_on_80gb_gpus_and_2_on_141gb():
    pipeline = config("Llama-3.1-70B-Instruct", "Llama-3.1-8B", sample={"engine": "vllm"})
    sample = plan_pipeline(pipeline, GPU_80GB).stage("sample")
    # bf16 weights are 141 GB: 35 GB per GPU at TP=4, plus the KV cache of one 131,072-token sequence.
    assert not sample.fits and "sample.vllm.tensor_parallel_size=4" in sample.fix
    with pytest.raises(InputError, match=r"^sample: .*needs ≈ .* GiB per GPU.*85%.*tensor_parallel_size=4"):
        check_plan(plan_pipeline(pipeline, GPU_80GB))
    at_four = config(
        "Llama-3.1-70B-Instruct", "Llama-3.1-8B", sample={"engine": "vllm", "vllm": {"tensor_parallel_size": 4}}
    )
    assert plan_pipeline(at_four, GPU_80GB).stage("sample").fits
    h200 = Hardware(gpus_per_node=8, gpu_memory_bytes=141 * 10**9)
    assert "tensor_parallel_size=2" in plan_pipeline(pipeline, h200).stage("sample").fix


def test_the_kv_cache_is_layers_x_2_x_kv_heads_x_head_dim_x_dtype_bytes():
    shape = model_shape(str(MODELS / "Llama-3.1-70B-Instruct"))
    assert shape.kv_bytes_per_token(2) == 80 * 2 * 8 * 128 * 2 == 327_680
    pipeline = config(
        "Llama-3.1-70B-Instruct",
        "Llama-3.1-8B",
        sample={"engine": "vllm", "vllm": {"tensor_parallel_size": 8, "max_model_len": 8192}},
    )
    parts = {p.name: p.bytes for p in plan_pipeline(pipeline, GPU_80GB).stage("sample").parts}
    assert parts["KV cache for one max_model_len sequence"] == 8192 * 327_680 // 8  # one KV head per GPU


def test_an_online_teacher_is_in_memory_and_a_served_or_offline_one_is_not():
    def teacher_bytes(kd: dict, sample: dict | None = None) -> int:
        pipeline = config("Qwen2.5-1.5B-Instruct", "Qwen2.5-0.5B", train={"kd": kd}, sample=sample or {})
        parts = plan_pipeline(pipeline, GPU_80GB).stage("train").parts
        return sum(p.bytes for p in parts if "teacher" in p.name)

    assert teacher_bytes({"teacher": "online"}) >= 4 * 1_543_714_304  # loaded in float32
    assert teacher_bytes({"teacher": "offline"}) == 0
    served = {"engine": "openai", "openai": {"tokenizer": str(MODELS / "Qwen2.5-1.5B-Instruct")}}
    assert teacher_bytes({"teacher": "served", "online_top_k": 20}, served) == 0


def test_evaluating_a_70b_teacher_in_memory_does_not_fit_and_serving_it_is_the_fix():
    pipeline = config("Llama-3.1-70B-Instruct", "Llama-3.1-8B", sample={"engine": "vllm"})
    evaluate = plan_pipeline(pipeline, GPU_80GB).stage("evaluate")
    assert not evaluate.fits and evaluate.model.startswith("teacher") and "sample.engine: openai" in evaluate.fix
    served = config(
        "Llama-3.1-70B-Instruct",
        "Llama-3.1-8B",
        sample={"engine": "openai", "openai": {"tokenizer": str(MODELS / "Llama-3.1-70B-Instruct")}},
    )
    plan = plan_pipeline(served, GPU_80GB)
    assert plan.stage("evaluate").fits and plan.stage("evaluate").model.startswith("student")
    assert plan.stage("sample").advisory  # the server's GPUs are not these: shown, never refused


def test_parse_memory():
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("141G") == 141 * 10**9
    assert parse_memory("1.5 TB") == 1_500 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20
    with pytest.raises(InputError, match=r"--gpu-memory 'lots'.*80GB"):
        parse_memory("lots")


def recipe_overrides(recipe: Path) -> list[str]:
    """--set overrides pointing a recipe's Hub ids at tests/model_configs (no network in tests)."""
    raw = yaml.safe_load(recipe.read_text())
    overrides = [f"sample.teacher={MODELS / HUB_IDS[raw['sample']['teacher']]}"]
    overrides.append(f"train.student={MODELS / HUB_IDS[raw['train']['student']]}")
    if raw["sample"].get("openai", {}).get("tokenizer"):
        overrides.append(f"sample.openai.tokenizer={MODELS / HUB_IDS[raw['sample']['openai']['tokenizer']]}")
    return overrides


@pytest.mark.parametrize("recipe", ["llama3.1-70b-to-8b.yaml", "qwen3-32b-to-1.7b.yaml"])
def test_the_recipes_fit_8_gpus_of_80gb(recipe, capsys):
    path = REPO / "configs" / recipe
    pipeline = load_config(path, recipe_overrides(path))
    plan = plan_pipeline(pipeline, GPU_80GB)
    check_plan(plan)  # nothing refused
    assert [stage.stage for stage in plan.stages] == ["sample", "train", "evaluate"]
    assert all(stage.fits for stage in plan.stages)
    head = path.read_text().split("\n\n")[0]
    assert "stillhouse plan" in head and "stillhouse run" in head
    assert (
        main(
            [
                "plan",
                str(path),
                "--gpus",
                "8",
                "--gpu-memory",
                "80GB",
                *sum((["--set", o] for o in recipe_overrides(path)), []),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for word in ("sample", "train", "evaluate", "peak / GPU", "8 GPU(s) of 80 GB"):
        assert word in out


def test_the_70b_recipe_serves_the_teacher_on_8_gpus_and_shards_the_student():
    path = REPO / "configs" / "llama3.1-70b-to-8b.yaml"
    plan = plan_pipeline(load_config(path, recipe_overrides(path)), GPU_80GB)
    assert plan.stage("sample").layout.startswith("server: vLLM TP=8")
    assert plan.stage("train").layout.startswith("FSDP over 8")
    on_policy = load_config(
        path, recipe_overrides(path) + ["train.kd.teacher=served", "train.kd.lmbda=0.5", "train.kd.online_top_k=20"]
    )
    assert plan_pipeline(on_policy, GPU_80GB).stage("train").fits


def test_the_plan_renders_a_table_with_the_fix():
    pipeline = config("Llama-3.1-70B-Instruct", "Llama-3.1-8B")
    table = render(plan_pipeline(pipeline, ONE_80GB))
    assert [column.header for column in table.columns][:3] == ["stage", "model", "layout"]
    assert "train: fix: --set" in table.caption


def seeded_hub_cache(root: Path) -> Path:
    """An offline Hugging Face cache holding the recipes' config.json files (and nothing else)."""
    cache = root / "hub"
    for hub_id, folder in HUB_IDS.items():
        repo = cache / f"models--{hub_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text((MODELS / folder / "config.json").read_text())
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
    return cache


@pytest.mark.slow
def test_stillhouse_plan_reads_hub_ids_through_the_cache_offline(tmp_path):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(seeded_hub_cache(tmp_path))}
    completed = subprocess.run(
        [sys.executable, "-m", "stillhouse.flows.cli", "plan", "configs/llama3.1-70b-to-8b.yaml"]
        + ["--gpus", "8", "--gpu-memory", "80GB"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "meta-llama/Llama-3.1-70B-Instruct" in completed.stdout and "FSDP over 8" in completed.stdout
    assert "Traceback" not in completed.stderr


@pytest.mark.slow
def test_validate_refuses_a_config_that_cannot_fit_in_one_error_line(tmp_path, pipeline_raw):
    pipeline_raw["train"] = {
        "student": str(MODELS / "Llama-3.1-8B"),
        "method": "sft",
        "bf16": True,
        "max_seq_len": 2048,
        "batch_size": 8,
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(pipeline_raw))
    completed = subprocess.run(
        [sys.executable, "-m", "stillhouse.flows.cli", "validate", str(path), "--gpus", "1", "--gpu-memory", "80GB"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert "Traceback" not in completed.stderr
    assert len([line for line in lines if line.startswith("error:")]) == 1
    error = next(line for line in lines if line.startswith("error:"))
    assert error.startswith("error: train: ")
    assert "needs ≈" in error and "GiB per GPU" in error  # the estimate
    assert "80 GB" in error and "74.5 GiB" in error  # the memory there is
    assert "fix: --set" in error and "train.lora.r=16" in error  # the fix


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_at_tiny_sizes_and_imports_only_the_core():
    completed = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={key: value for key, value in os.environ.items() if key != "OUT"},
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["forbidden_imports"] == []  # no prefect, mlflow, vllm, datasets or trl
    for check in ("loss", "fsdp_step", "amp_step", "sampling"):
        assert "error" not in report[check], report[check]
    assert report["fsdp_step"]["plan_estimate_gib"] > 0  # the planner's estimate of the real 0.5B step
    assert report["sampling"]["hf_engine"]["tokens"] == report["sampling"]["batched_generate"]["tokens"]
    if not report["cuda"]:  # without --smoke a machine without CUDA only says so
        plain = subprocess.run(
            [sys.executable, "benchmarks/gpu_check.py"], capture_output=True, text=True, cwd=REPO, timeout=300
        )
        assert plain.returncode == 0 and json.loads(plain.stdout) == {"cuda": False, "forbidden_imports": []}

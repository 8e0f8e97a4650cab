"""Model shapes by arithmetic on config.json (`shape_from_config`, no torch) equal the shapes of the models
transformers builds on the meta device (`meta_model_shape`), field for field; whatever the arithmetic doesn't
know goes the meta way and gets the same shape as before."""

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CONFIG_MAPPING, LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN

from stillhouse.config import TrainConfig
from stillhouse.models import plain_config
from stillhouse.planning import (
    PARAMETER_FREE_ACTIVATIONS,
    meta_model_shape,
    model_shape,
    shape_from_config,
    shape_of,
    student_shape,
)

REPO = Path(__file__).parents[1]
PUBLISHED = REPO / "tests" / "model_configs"
ROPES = [
    None,
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    },
]


def random_config(model_type: str, seed: int) -> dict:
    """Keyword arguments of a tiny ``model_type`` config: tied or not, GQA or not, biases, head_dim, dtype, RoPE."""
    rng = random.Random(f"{model_type}-{seed}")
    heads = rng.choice([1, 2, 4, 8])
    head_dim = rng.choice([2, 4, 8, 16])
    hidden = heads * head_dim * rng.choice([1, 2])  # with head_dim given, 2 heads' worth per head: head_dim != h / n
    kwargs = {
        "vocab_size": rng.randint(17, 300),
        "hidden_size": hidden,
        "intermediate_size": rng.randint(3, 96),
        "num_hidden_layers": rng.randint(1, 3),
        "num_attention_heads": heads,
        "num_key_value_heads": rng.choice([k for k in (1, 2, 4, 8) if heads % k == 0]),
        "max_position_embeddings": rng.choice([128, 256, 4096]),
        "tie_word_embeddings": rng.random() < 0.5,
        "hidden_act": rng.choice(["silu", "gelu", "gelu_pytorch_tanh"]),
        "dtype": rng.choice(["float32", "bfloat16", "float16"]),
        "pad_token_id": rng.choice([None, 0, 3]),
        "rope_parameters": rng.choice(ROPES),
    }
    if model_type in ("llama", "mistral", "qwen3") or rng.random() < 0.5:
        kwargs["head_dim"] = head_dim  # qwen3 always names it; the others derive hidden // heads without it
    if model_type in ("llama", "qwen3"):
        kwargs["attention_bias"] = rng.random() < 0.5
    if model_type == "llama":
        kwargs["mlp_bias"] = rng.random() < 0.5
    if model_type == "mistral":
        kwargs["sliding_window"] = rng.choice([None, 64])
    if model_type in ("qwen2", "qwen3"):
        kwargs["use_sliding_window"] = rng.random() < 0.5
        kwargs["max_window_layers"] = rng.randint(0, 3)
    return kwargs


def saved_config(folder: Path, model_type: str, **kwargs) -> dict:
    """config.json as `save_pretrained` of transformers' own config class writes it into ``folder``."""
    CONFIG_MAPPING[model_type](**kwargs).save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("seed", range(10))
def test_arithmetic_equals_the_meta_device_model(tmp_path, model_type, seed):
    config = saved_config(tmp_path, model_type, **random_config(model_type, seed))
    shape = shape_from_config(config, str(tmp_path))
    assert shape is not None, config
    assert shape == meta_model_shape(str(tmp_path))
    assert model_shape(str(tmp_path)) == shape


@pytest.mark.parametrize("name", sorted(path.name for path in PUBLISHED.iterdir()))
def test_the_published_configs_are_arithmetic_and_equal_the_meta_device_model(name):
    config = json.loads((PUBLISHED / name / "config.json").read_text())
    shape = shape_from_config(config, str(PUBLISHED / name))
    assert shape is not None and shape == meta_model_shape(str(PUBLISHED / name))


def test_the_demo_teacher_is_arithmetic():
    location = str(REPO / "src" / "stillhouse" / "demo" / "teacher")
    assert shape_from_config(plain_config(location), "builtin:demo-teacher") == meta_model_shape("builtin:demo-teacher")


@pytest.mark.parametrize(
    "dtype_keys, checkpoint_dtype_bytes",
    [
        ({"torch_dtype": "bfloat16"}, 2),  # transformers 4 wrote `torch_dtype`
        ({"dtype": None, "torch_dtype": "float16"}, 2),
        ({"dtype": "float32", "torch_dtype": "bfloat16"}, 4),  # `dtype` wins
        ({}, 4),  # neither: float32
    ],
)
def test_the_checkpoint_dtype_is_read_as_transformers_reads_it(tmp_path, dtype_keys, checkpoint_dtype_bytes):
    config = saved_config(tmp_path, "llama", **random_config("llama", 0))
    config.pop("dtype", None)
    write_config(tmp_path, config | dtype_keys)
    shape = shape_from_config(config | dtype_keys, str(tmp_path))
    assert shape is not None and shape.checkpoint_dtype_bytes == checkpoint_dtype_bytes
    assert shape == meta_model_shape(str(tmp_path))


def test_older_configs_with_rope_scaling_and_layer_types_are_arithmetic(tmp_path):
    llama = saved_config(tmp_path / "llama", "llama", **random_config("llama", 1))
    llama.pop("rope_parameters")
    llama |= {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 10000.0}  # as Llama 2 configs have it
    qwen = saved_config(tmp_path / "qwen", "qwen3", **random_config("qwen3", 2) | {"num_hidden_layers": 2})
    qwen["layer_types"] = ["full_attention", "sliding_attention"]
    for name, config in (("llama", llama), ("qwen", qwen)):
        folder = write_config(tmp_path / name, config)
        shape = shape_from_config(config, str(folder))
        assert shape is not None and shape == meta_model_shape(str(folder))


FALLBACKS = {
    # A key the arithmetic doesn't know; an activation with parameters of its own.
    "an unknown key": ("llama", {"num_experts": 4}),
    "xielu": ("llama", {"hidden_act": "xielu"}),
    # A key left out whose class default applies: Qwen2Config and MistralConfig default to 32 and 8 KV heads,
    # Qwen3Config to head_dim 128.
    "qwen2 without KV heads": ("qwen2", {"num_key_value_heads": None}),
    "mistral without KV heads": ("mistral", {"num_key_value_heads": None}),
    "qwen3 without head_dim": ("qwen3", {"head_dim": None}),
    "llama without attention_bias": ("llama", {"attention_bias": None}),
    "an odd head size": (
        "llama",
        {"hidden_size": 12, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 3},
    ),
    "a RoPE type it doesn't know": ("llama", {"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}),
    "another architecture": ("gpt2", None),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_what_the_arithmetic_does_not_know_gets_the_meta_device_shape(tmp_path, case):
    model_type, change = FALLBACKS[case]
    if model_type == "gpt2":
        config = saved_config(tmp_path, "gpt2", vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=64)
    else:
        config = saved_config(tmp_path, model_type, **random_config(model_type, 3))
        config.update(change)
        config = {key: value for key, value in config.items() if value is not None}  # None: left out
        if case == "a RoPE type it doesn't know":
            config["rope_parameters"] |= {
                "short_factor": [1.0] * (config["head_dim"] // 2),
                "long_factor": [1.0] * (config["head_dim"] // 2),
                "original_max_position_embeddings": 64,
            }
        write_config(tmp_path, config)
    assert shape_from_config(config, str(tmp_path)) is None
    assert model_shape(str(tmp_path)) == meta_model_shape(str(tmp_path))


def test_remote_code_is_never_read_as_plain_json(tmp_path):
    config = saved_config(tmp_path, "llama", **random_config("llama", 4))
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    write_config(tmp_path, config)
    assert plain_config(str(tmp_path)) is None
    assert shape_from_config(config, str(tmp_path)) is None
    assert model_shape(str(tmp_path)) == meta_model_shape(str(tmp_path))


def test_the_counted_activations_hold_no_parameters():
    for name in PARAMETER_FREE_ACTIVATIONS:
        assert not list(ACT2FN[name].parameters()), name


@pytest.mark.parametrize(
    "architecture, vocab_size",
    [
        ({"hidden_size": 64, "num_layers": 4, "intermediate_size": 240, "num_heads": 4}, 85),  # the demo's, before
        ({"hidden_size": 64, "num_layers": 6, "intermediate_size": 128, "num_heads": 4}, 85),  # the demo's
        ({"hidden_size": 48, "num_layers": 1, "intermediate_size": 7, "num_heads": 3}, None),  # no teacher: 32000
        ({"hidden_size": 12, "num_layers": 2, "intermediate_size": 20, "num_heads": 4}, 50),  # head size 3: meta
    ],
)
def test_a_student_built_from_scratch_has_the_shape_of_the_model_build_student_makes(architecture, vocab_size):
    train = TrainConfig(architecture=architecture, method="sft", max_seq_len=64)
    teacher = meta_model_shape("builtin:demo-teacher")
    teacher = dataclasses.replace(teacher, vocab_size=vocab_size) if vocab_size else None
    with torch.device("meta"):  # what student_shape built before it needed no torch
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab_size or 32000,
                hidden_size=architecture["hidden_size"],
                intermediate_size=architecture["intermediate_size"],
                num_hidden_layers=architecture["num_layers"],
                num_attention_heads=architecture["num_heads"],
                num_key_value_heads=architecture["num_heads"],
                max_position_embeddings=128,
                tie_word_embeddings=True,
            )
        )
    assert student_shape(train, teacher) == shape_of(model, "train.architecture")


def test_shapes_of_a_llama_folder_and_a_student_import_neither_torch_nor_transformers():
    script = (
        "import sys\n"
        "from stillhouse.config import TrainConfig\n"
        "from stillhouse.planning import detect_hardware, model_shape, student_shape\n"
        f"teacher = model_shape({str(PUBLISHED / 'Llama-3.1-8B')!r})\n"
        "train = TrainConfig(architecture={'hidden_size': 64, 'num_layers': 4, 'intermediate_size': 240,"
        " 'num_heads': 4}, method='sft')\n"
        "student_shape(train, teacher)\n"
        "detect_hardware()\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # no GPU: detect_hardware has no reason to import torch
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"

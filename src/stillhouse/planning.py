"""Memory and time of every stage that holds a model, estimated before anything loads: `stillhouse plan`.

    stillhouse plan configs/llama3.1-70b-to-8b.yaml --gpus 8 --gpu-memory 80GB

    plan = plan_pipeline(config, Hardware(gpus_per_node=8, gpu_memory_bytes=parse_memory("80GB")))
    Console().print(render(plan))
    check_plan(plan)            # InputError naming the stage, the estimate, the memory and the fix

Model shapes come from each model's config.json alone (a local folder, a `builtin:` model, or the Hub, which
gives config.json and never weights). For Llama-layered models (llama, mistral, qwen2, qwen3) the parameter
counts are arithmetic on that file, without importing torch or transformers (3 s on a 2-core machine, more than
`stillhouse validate` may take); every other model, and a config.json with keys that arithmetic doesn't know,
is built through transformers on PyTorch's meta device, which allocates nothing. Both give the same shape
(tests/test_planning_shapes.py).

The memory model (bytes per device; P parameters, P_t trainable, W processes, N = micro-batch x
max_seq_len tokens, V vocabulary, L layers, h hidden size, I MLP width, d head size):

- Training. The student loads in float32 (`load_causal_lm`), so with `train.bf16` under DDP the Trainer
  runs bf16 autocast over fp32 masters: weights 4P, gradients 4P_t (twice under DDP with W > 1: its
  gradient buckets), AdamW's two states 8P_t, and the bf16 copies autocast makes of every weight (2P) held
  for the backward. Under FSDP (torch FSDP2) the fp32 weights, gradients and states are divided by W,
  `train.fsdp.cpu_offload` moves them to the CPU, and each rank holds unsharded compute copies: the root
  module (embeddings, LM head) for the whole step and two decoder layers in flight (every layer when
  `reshard_after_forward` is false). LoRA trains only the adapters: r x (in + out) per targeted linear.
- Activations, per token and decoder layer, counted from what autograd saves in transformers' Llama and
  Qwen layers (checked with saved-tensor hooks): fp32 24h + 8(n_q + n_kv)d + 16I; bf16 parameters
  16h + 4(n_q + n_kv)d + 8I; bf16 autocast over fp32 weights 26h + 4(n_q + n_kv)d + 8I (each projection
  saves its own bf16 copy of its input); key and value count at n_q heads because a padded batch makes
  SDPA repeat them. Gradient checkpointing keeps each layer's input and one layer's activations.
- The loss. Without `loss_chunk_size` the full logits [N, V] exist several times over (the model's
  output, the cross-entropy's log-softmax, the top-k loss's softmax, and their gradients); with it, a
  [chunk, V] fp32 buffer and, per loss term, an fp32 [V, h] gradient of the LM head. The stored top-k
  targets are k ids (int64) and k log-probs (fp32) per token. An online teacher adds its float32 weights
  and its logits; a served or offline one adds nothing but its top-k.
- Sampling. `hf`: the weights in sample.dtype on one device and the KV cache, L x 2 x n_kv x d x
  dtype bytes per token, for batch_size x n rows of prompt + max_new_tokens tokens. `vllm`: vLLM takes
  gpu_memory_utilization of each GPU; the weights split over tensor x pipeline parallel GPUs must leave
  room for its activations and the KV cache of at least one max_model_len sequence.
- Evaluation loads each role's model (teacher, student, baseline) in float32 on one device, in turn.

Prompt lengths are unknown before curation: a prompt is assumed to be curate.filters.length.max_tokens
long when that is set, else train.max_seq_len - max_new_tokens (at least a quarter of train.max_seq_len).
Times are rough: FLOPs (6P per trained token, 8P with recomputation) over the devices' peak at 40%
utilization, and decoding bounded by reading the weights once per step.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from stillhouse.builtins import is_builtin
from stillhouse.config import PipelineConfig, SampleConfig, TrainConfig
from stillhouse.errors import InputError

GIB = 2**30
MEMORY_UNITS = {"": 10**9, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
MEMORY_UNITS |= {"t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# What a CUDA process holds besides its tensors: the context, cuBLAS workspaces, NCCL buffers and the caching
# allocator's slack. Not counted on a CPU, where the plan is compared with RSS above the imports.
CUDA_RESERVE_BYTES = int(1.5 * GIB)
ALLOCATOR_SLACK = 0.05
# vLLM besides weights and KV cache: activations of one scheduler step (its default max_num_batched_tokens) and
# CUDA graphs.
VLLM_STEP_TOKENS = 8192
VLLM_GRAPHS_BYTES = 1 * GIB
MFU = 0.4  # share of the peak FLOPs a training step or prefill reaches
HEADROOM = 0.9  # a proposed layout should leave this share of the memory unused, when one can

# Peak dense FLOP/s (bf16) and memory bandwidth by GPU name; an unknown GPU counts as an H100.
GPU_SPEEDS = {
    "h200": (989e12, 4.8e12),
    "h100": (989e12, 3.35e12),
    "a100": (312e12, 2.0e12),
    "l40s": (362e12, 0.86e12),
    "a10": (125e12, 0.6e12),
    "4090": (165e12, 1.0e12),
}
DEFAULT_GPU_SPEED = GPU_SPEEDS["h100"]
CPU_FLOPS_PER_CORE, CPU_BANDWIDTH = 2e10, 1e10


# --- hardware ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """The machines a config runs on: ``nodes`` x ``gpus_per_node`` devices of ``gpu_memory_bytes`` each.

    ``cpu`` marks a CPU machine: one "device" whose memory is the RAM. ``flops`` (dense bf16, fp32 on a
    CPU) and ``bandwidth`` (bytes/s) per device only feed the time estimates.
    """

    gpus_per_node: int
    gpu_memory_bytes: int
    nodes: int = 1
    cpu: bool = False
    name: str = ""
    flops: float | None = None
    bandwidth: float | None = None

    def __post_init__(self):
        if self.gpus_per_node < 1 or self.nodes < 1 or self.gpu_memory_bytes <= 0:
            raise InputError(
                f"hardware: {self.nodes} node(s) x {self.gpus_per_node} GPU(s) of {self.gpu_memory_bytes} bytes; "
                "give at least one node, one GPU and its memory (e.g. --gpus 8 --gpu-memory 80GB)"
            )

    @property
    def device(self) -> str:
        return "CPU" if self.cpu else "GPU"

    @property
    def devices(self) -> int:
        return self.gpus_per_node * self.nodes

    def speeds(self) -> tuple[float, float]:
        if self.cpu:
            return self.flops or CPU_FLOPS_PER_CORE * (os.cpu_count() or 1), self.bandwidth or CPU_BANDWIDTH
        known = next((speed for key, speed in GPU_SPEEDS.items() if key in self.name.lower()), DEFAULT_GPU_SPEED)
        return self.flops or known[0], self.bandwidth or known[1]

    def describe(self) -> str:
        if self.cpu:
            return f"CPU with {format_bytes(self.gpu_memory_bytes)} RAM"
        nodes = f"{self.nodes} node(s) x " if self.nodes > 1 else ""
        name = f" {self.name}" if self.name else ""
        memory = self.gpu_memory_bytes
        # As given: 80 GB (--gpu-memory 80GB) reads 80 GB, not 74.5 GiB.
        size = f"{memory // 10**9} GB" if memory % 10**9 == 0 else format_bytes(memory)
        return f"{nodes}{self.gpus_per_node}{name} GPU(s) of {size}"


def parse_memory(text: str) -> int:
    """Bytes from ``80GB`` (10^9), ``80GiB`` (2^30), ``141G`` (= GB), ``512MiB``, ``1.5TB``; a bare number is GB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = match.group(2).lower() if match else None
    if match is None or unit not in MEMORY_UNITS:
        raise InputError(
            f"--gpu-memory {text!r}: expected a size such as 80GB, 80GiB or 141G (GB = 10^9 bytes, GiB = 2^30)"
        )
    return int(float(match.group(1)) * MEMORY_UNITS[unit])


def detect_hardware() -> Hardware:
    """This machine: its CUDA GPUs, or else its CPU with the RAM as the one device's memory."""
    from stillhouse.hardware import may_have_gpus

    if may_have_gpus():  # torch only where a GPU can be: importing it takes most of `validate`'s 2 s
        import torch

        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            return Hardware(
                gpus_per_node=torch.cuda.device_count(),
                gpu_memory_bytes=properties.total_memory,
                name=properties.name,
            )
    return Hardware(
        gpus_per_node=1, gpu_memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), cpu=True
    )


def hardware_from_flags(gpus: int | None, gpu_memory: str | None, nodes: int | None) -> Hardware:
    """`--gpus`, `--gpu-memory`, `--nodes` over this machine's own hardware (each flag left out is read from it)."""
    detected = detect_hardware()
    if gpus is None and gpu_memory is None:
        return detected if nodes is None else Hardware(**{**detected.__dict__, "nodes": nodes})
    if gpu_memory is None and detected.cpu:
        raise InputError("--gpus needs --gpu-memory (e.g. --gpu-memory 80GB): this machine has no GPU to read it from")
    on_gpus = not detected.cpu
    return Hardware(
        gpus_per_node=gpus if gpus is not None else (detected.gpus_per_node if on_gpus else 1),
        gpu_memory_bytes=parse_memory(gpu_memory) if gpu_memory is not None else detected.gpu_memory_bytes,
        nodes=nodes or 1,
        name=detected.name if on_gpus and gpu_memory is None else "",
    )


def format_bytes(count: float) -> str:
    return f"{count / GIB:.1f} GiB" if count >= GIB / 10 else f"{count / 2**20:.0f} MiB"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"≈ {seconds / size:.1f} {unit}"
    return f"≈ {seconds:.0f} s"


# --- model shapes --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need of a model, read from its config.json (and a meta-device copy of it)."""

    reference: str
    parameters: int
    root_parameters: int  # outside the decoder layers: embeddings, LM head, final norm
    output_parameters: int  # the LM head's weight (the input embedding's, when tied)
    layer_parameters: int  # the largest decoder layer
    lora_parameters_per_rank: int  # Σ (in + out) over the linear layers `all-linear` LoRA adapts
    lora_sizes: tuple[tuple[str, int], ...]  # (last part of the name, in + out) of every adaptable linear layer
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    checkpoint_dtype_bytes: int
    qk_norm: bool = False

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one token over every layer."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def lora_parameters(self, rank: int, target_modules: str | list[str]) -> int:
        if target_modules == "all-linear":
            return rank * self.lora_parameters_per_rank
        targets = {target_modules} if isinstance(target_modules, str) else set(target_modules)
        return rank * sum(size for name, size in self.lora_sizes if name in targets)


@functools.lru_cache(maxsize=32)
def model_shape(reference: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of ``reference`` (a local folder, `builtin:` model or Hub id) from its config.json alone:
    by arithmetic where `shape_from_config` knows the architecture, else built on the meta device."""
    from stillhouse.models import plain_config, resolve_model

    location = resolve_model(reference, "model") if is_builtin(reference) else reference
    config = plain_config(location, revision)
    shape = shape_from_config(config, reference) if config is not None else None
    return shape or meta_model_shape(reference, revision, trust_remote_code)


def meta_model_shape(reference: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of ``reference`` through transformers: `AutoConfig`, then the model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = reference
    if is_builtin(reference):
        from stillhouse.models import resolve_model

        source = resolve_model(reference, "model")
    config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return shape_of(model, reference)


def shape_of(model, reference: str) -> ModelShape:
    """`ModelShape` of a model (on any device, the meta device included)."""
    import torch

    config = model.config.get_text_config()
    layers = max((module for module in model.modules() if isinstance(module, torch.nn.ModuleList)), key=len, default=[])
    layer_parameters = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    parameters = sum(p.numel() for p in model.parameters())
    output = model.get_output_embeddings()
    lora_sizes = tuple(
        (name.rsplit(".", 1)[-1], module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    )
    heads = config.num_attention_heads
    # transformers 5 reads config.json's `torch_dtype` into `dtype`; the old attribute only warns.
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return ModelShape(
        reference=reference,
        parameters=parameters,
        root_parameters=parameters - sum(sum(p.numel() for p in layer.parameters()) for layer in layers),
        output_parameters=output.weight.numel() if output is not None else 0,
        layer_parameters=layer_parameters,
        lora_parameters_per_rank=sum(size for _, size in lora_sizes),
        lora_sizes=lora_sizes,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=len(layers) or config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate_size=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        max_position_embeddings=getattr(config, "max_position_embeddings", None) or 2048,
        checkpoint_dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        qk_norm=any(name.endswith("q_norm") for name, _ in model.named_modules()),
    )


# Llama-layered decoders whose shape is arithmetic on config.json: embeddings, decoder layers of q/k/v/o
# projections, a gated MLP (gate, up, down) and two RMSNorms, a final RMSNorm, an LM head (tied or not). For each,
# the config.json keys besides COMMON_KEYS that it may hold and the types transformers' config class accepts; a key
# not listed (MoE, per-layer settings, quantization, anything new) sends the model to the meta device instead.
NONE = type(None)
ARCHITECTURE_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "llama": {"attention_bias": (bool,), "mlp_bias": (bool,), "head_dim": (int, NONE), "pretraining_tp": (int, NONE)},
    "mistral": {"head_dim": (int, NONE), "sliding_window": (int, NONE)},
    "qwen2": {
        "head_dim": (int,),
        "use_sliding_window": (bool,),
        "sliding_window": (int, NONE),
        "max_window_layers": (int,),
        "layer_types": (list, NONE),
    },
    "qwen3": {
        "attention_bias": (bool,),
        "head_dim": (int,),
        "use_sliding_window": (bool,),
        "sliding_window": (int, NONE),
        "max_window_layers": (int,),
        "layer_types": (list, NONE),
    },
}
COMMON_KEYS: dict[str, tuple[type, ...]] = {
    "model_type": (str,),
    "vocab_size": (int,),
    "hidden_size": (int,),
    "intermediate_size": (int,),
    "num_hidden_layers": (int,),
    "num_attention_heads": (int,),
    "num_key_value_heads": (int,),
    "max_position_embeddings": (int,),
    "tie_word_embeddings": (bool,),
    "hidden_act": (str,),
    "dtype": (str, NONE),
    "torch_dtype": (str, NONE),
    # No parameter depends on these (RoPE and attention windows have none).
    "architectures": (list, NONE),
    "transformers_version": (str, NONE),
    "_name_or_path": (str,),
    "bos_token_id": (int, NONE),
    "eos_token_id": (int, list, NONE),
    "pad_token_id": (int, NONE),
    "initializer_range": (float,),
    "rms_norm_eps": (float,),
    "use_cache": (bool,),
    "attention_dropout": (float, int),
    "rope_theta": (float, int),
    "rope_scaling": (dict, NONE),
    "rope_parameters": (dict, NONE),
}
# Keys whose class default would otherwise apply: left out of config.json, they send the model to the meta device
# rather than have their defaults copied here. Llama alone may leave out num_key_value_heads (LlamaConfig takes
# num_attention_heads) and head_dim (hidden_size // num_attention_heads, as mistral and qwen2 do).
REQUIRED_KEYS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
    "hidden_act",
}
ARCHITECTURE_REQUIRED_KEYS = {
    "llama": {"attention_bias", "mlp_bias"},
    "mistral": {"num_key_value_heads"},
    "qwen2": {"num_key_value_heads"},
    "qwen3": {"num_key_value_heads", "attention_bias", "head_dim"},
}
PARAMETER_FREE_ACTIVATIONS = {
    "silu",
    "swish",
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "relu",
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# RoPE types transformers accepts with the keys each needs (it refuses a config.json without them), and the keys
# they may carry besides.
ROPE_NEEDS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor"},
}
ROPE_NUMBERS = {
    "rope_theta",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
}


def shape_from_config(config: dict[str, Any], reference: str) -> ModelShape | None:
    """`ModelShape` of a llama, mistral, qwen2 or qwen3 model by arithmetic on its config.json dict, without torch:
    the same as `shape_of` the model transformers builds from that file.

    None wherever that can't be certain (`arithmetic_applies`); the caller then builds the model.
    """
    if not arithmetic_applies(config):
        return None
    model_type = config["model_type"]
    vocab, hidden, inner = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    attention_bias = config.get("attention_bias", False)  # llama and qwen3: on all four projections
    qkv_bias = attention_bias or model_type == "qwen2"  # qwen2: on q, k and v always, never on o
    mlp_bias = config.get("mlp_bias", False)  # llama only
    qk_norm = model_type == "qwen3"  # an RMSNorm over each head's queries and keys
    # (name, in, out, bias) in the order `named_modules` gives them.
    linears = [
        ("q_proj", hidden, heads * head_dim, qkv_bias),
        ("k_proj", hidden, kv_heads * head_dim, qkv_bias),
        ("v_proj", hidden, kv_heads * head_dim, qkv_bias),
        ("o_proj", heads * head_dim, hidden, attention_bias),
        ("gate_proj", hidden, inner, mlp_bias),
        ("up_proj", hidden, inner, mlp_bias),
        ("down_proj", inner, hidden, mlp_bias),
    ]
    layer_parameters = sum(fan_in * fan_out + (fan_out if bias else 0) for _, fan_in, fan_out, bias in linears)
    layer_parameters += 2 * hidden + (2 * head_dim if qk_norm else 0)  # the two RMSNorms (and q_norm, k_norm)
    embeddings = vocab * hidden
    # A tied LM head is the embedding's tensor, which `parameters()` counts once.
    root_parameters = embeddings + hidden + (0 if config["tie_word_embeddings"] else embeddings)
    lora_sizes = tuple((name, fan_in + fan_out) for name, fan_in, fan_out, _ in linears) * layers
    # transformers reads `dtype`, or the older `torch_dtype` when `dtype` is null; neither means float32.
    dtype = config.get("dtype") if config.get("dtype") is not None else config.get("torch_dtype")
    return ModelShape(
        reference=reference,
        parameters=root_parameters + layers * layer_parameters,
        root_parameters=root_parameters,
        output_parameters=embeddings,
        layer_parameters=layer_parameters,
        lora_parameters_per_rank=sum(size for _, size in lora_sizes),
        lora_sizes=lora_sizes,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inner,
        max_position_embeddings=config["max_position_embeddings"],
        checkpoint_dtype_bytes=DTYPE_BYTES[dtype or "float32"],
        qk_norm=qk_norm,
    )


def arithmetic_applies(config: dict[str, Any]) -> bool:
    """Whether `shape_from_config` can be sure of this config.json: a Llama-layered architecture, only keys it
    knows, every key it needs (else the config class's default would apply), values transformers accepts (else the
    meta path gives transformers' error) and no parameters it doesn't count."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURE_KEYS:
        return False
    types = COMMON_KEYS | ARCHITECTURE_KEYS[model_type]
    if any(key not in types or type(value) not in types[key] for key, value in config.items()):
        return False
    if not REQUIRED_KEYS | ARCHITECTURE_REQUIRED_KEYS[model_type] <= config.keys():
        return False
    vocab, hidden, heads = config["vocab_size"], config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or (hidden // heads if heads > 0 else 0)
    layers, positions = config["num_hidden_layers"], config["max_position_embeddings"]
    if min(vocab, hidden, config["intermediate_size"], layers, heads, kv_heads, head_dim, positions) < 1:
        return False  # zero sizes: shape_of reads some of them as their defaults
    if hidden % heads or heads % kv_heads or head_dim % 2:
        return False  # LlamaConfig refuses the first; RoPE refuses odd head sizes above 4, left to it here
    pad = config.get("pad_token_id")
    eos = config.get("eos_token_id")
    layer_types = config.get("layer_types")
    dtype = config.get("dtype") if config.get("dtype") is not None else config.get("torch_dtype")
    return (
        config["hidden_act"] in PARAMETER_FREE_ACTIVATIONS  # xielu and prelu hold parameters in every layer
        and (pad is None or -vocab <= pad < vocab)  # torch refuses a padding id outside the embedding
        and (not isinstance(eos, list) or all(type(token) is int for token in eos))
        and all(type(name) is str for name in config.get("architectures") or [])
        and 0 <= config.get("initializer_range", 0.02) <= 1
        and plain_rope(config.get("rope_scaling"))
        and plain_rope(config.get("rope_parameters"))
        and (
            layer_types is None
            or len(layer_types) == layers
            and all(kind in ("full_attention", "sliding_attention") for kind in layer_types)
        )
        and (dtype or "float32") in DTYPE_BYTES
    )


def plain_rope(rope: dict[str, Any] | None) -> bool:
    """Whether transformers accepts this `rope_scaling` / `rope_parameters`: one RoPE for every layer, of a type it
    knows, with the keys that type needs. RoPE holds no parameters; one transformers refuses fails the meta path."""
    if not rope:
        return True
    kind = rope.get("rope_type", rope.get("type", "default"))
    numbers = {key: value for key, value in rope.items() if key not in ("rope_type", "type")}
    return (
        isinstance(kind, str)
        and kind in ROPE_NEEDS
        and ROPE_NEEDS[kind] <= numbers.keys() <= ROPE_NUMBERS
        and all(type(value) in (int, float) for value in numbers.values())
        and numbers.get("original_max_position_embeddings", 1) > 0  # yarn divides by it
    )


def student_shape(train: TrainConfig, teacher: ModelShape | None) -> ModelShape:
    """The student: its config.json, or the Llama `build_student` makes from ``train.architecture``."""
    if train.student is not None:
        return model_shape(train.student, None, train.trust_remote_code)
    shape = train.architecture
    # The LlamaConfig `build_student` (training/train.py) makes, with LlamaConfig's defaults spelled out.
    config = {
        "model_type": "llama",
        "vocab_size": teacher.vocab_size if teacher else 32000,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_heads,
        "max_position_embeddings": max(train.max_seq_len, 128),
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    return shape_from_config(config, "train.architecture") or student_shape_on_meta(config)


def student_shape_on_meta(config: dict[str, Any]) -> ModelShape:
    """The student `student_shape` describes, built on the meta device (where arithmetic can't: an odd head size)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{key: value for key, value in config.items() if key != "model_type"}))
    return shape_of(model, "train.architecture")


# --- the estimate's parts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One named share of a stage's memory on one device."""

    name: str
    bytes: int


@dataclass
class StagePlan:
    """One stage on its devices: what it holds at its peak, whether that fits, and how long it takes."""

    stage: str
    model: str
    layout: str
    parts: list[Part]
    available_bytes: int
    device: str = "GPU"
    seconds: float | None = None
    fix: str | None = None  # what to change when it doesn't fit (or a better layout when it does)
    notes: list[str] = field(default_factory=list)
    advisory: bool = False  # on machines outside this plan (a served teacher's server): shown, never refused
    peak_override: int | None = None  # when the peak is not the sum of the parts (phases that don't overlap)

    @property
    def peak_bytes(self) -> int:
        return self.peak_override if self.peak_override is not None else sum(part.bytes for part in self.parts)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.available_bytes

    def largest_parts(self, count: int = 3) -> str:
        parts = sorted((p for p in self.parts if p.bytes > 0), key=lambda p: -p.bytes)[:count]
        return ", ".join(f"{p.name} {format_bytes(p.bytes)}" for p in parts)


@dataclass
class Plan:
    config_name: str
    hardware: Hardware
    stages: list[StagePlan]
    notes: list[str] = field(default_factory=list)

    def problems(self) -> list[StagePlan]:
        return [stage for stage in self.stages if not stage.fits and not stage.advisory]

    def stage(self, name: str) -> StagePlan:
        return next(stage for stage in self.stages if stage.stage == name)


def dtype_bytes(dtype: str, shape: ModelShape) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, shape.checkpoint_dtype_bytes)


def layer_activation_bytes(shape: ModelShape, precision: str) -> float:
    """Bytes autograd saves per token in one decoder layer.

    ``precision``: ``fp32``; ``bf16`` (bf16 parameters, as FSDP's mixed precision gathers them); ``amp`` (bf16
    autocast over fp32 weights, as the Trainer runs `bf16` under DDP). Key and value count at the query heads:
    a padded batch (an attention mask) makes transformers' SDPA path repeat them to every query head.
    """
    h, d, heads, width = shape.hidden_size, shape.head_dim, shape.num_heads, shape.intermediate_size
    attention_elements = 4 * heads * d  # query, key, value (repeated), output
    if precision == "fp32":
        # RMSNorm keeps its input, the normalized value and its output (3 x 4h), twice; attention and MLP in fp32.
        norms, attention, mlp, qk_norm = 24 * h, 4 * attention_elements, 16 * width, 12
    elif precision == "bf16":
        # RMSNorm upcasts: its fp32 input copy (4h), the bf16 normalized value and output (2h + 2h), twice.
        norms, attention, mlp, qk_norm = 16 * h, 2 * attention_elements, 8 * width, 8
    else:
        # fp32 residual: each RMSNorm keeps 4h + 4h; q, k, v, gate and up each save their own bf16 input (5 x 2h).
        norms, attention, mlp, qk_norm = 26 * h, 2 * attention_elements, 8 * width, 8
    extra = qk_norm * 2 * heads * d if shape.qk_norm else 0
    return norms + attention + mlp + 4 * heads + extra  # 4 * heads: the attention's fp32 log-sum-exp


def activation_bytes(shape: ModelShape, tokens: int, precision: str, checkpointing: bool) -> int:
    """Activations of a forward pass over ``tokens`` tokens, kept for the backward."""
    per_layer = layer_activation_bytes(shape, precision)
    residual = 4 if precision in ("fp32", "amp") else 2
    final_norm = 3 * residual * shape.hidden_size  # the last norm's input, normalized value and output
    if checkpointing:  # each layer's input, plus one layer recomputed during the backward
        return int(tokens * (shape.num_layers * residual * shape.hidden_size + per_layer + final_norm))
    return int(tokens * (shape.num_layers * per_layer + final_norm))


def loss_bytes(shape: ModelShape, train: TrainConfig, tokens: int, compute_bytes: int, top_k: int) -> list[Part]:
    """The logits and loss buffers of one micro-batch, and the top-k targets."""
    vocab, hidden = shape.vocab_size, shape.hidden_size
    kd = train.method == "kd"
    terms = (train.ce_weight > 0 or not kd) + (kd and train.kd_weight > 0)
    parts = []
    if train.loss_chunk_size:
        chunk = min(train.loss_chunk_size, tokens)
        # Per loss term the fused loss keeps an fp32 [V, h] LM-head gradient and a [N, h] hidden gradient until the
        # backward; one [chunk, V] fp32 buffer at a time (and, under bf16, the matmul's bf16 output it came from).
        gradients = terms * (4 * vocab * hidden + compute_bytes * tokens * hidden)
        buffer = chunk * vocab * (4 + (2 if compute_bytes == 2 else 0))
        parts.append(Part("chunked loss", int(gradients + buffer)))
    else:
        # Full [N, V] logits: cross-entropy alone peaks at 3 fp32 copies (the logits, the log-softmax, its gradient);
        # a top-k divergence beside it adds its indexed copy and softmax (5). Measured on CPU: 2.9 and 4.8 copies.
        copies = 3.0 + 2.0 * (terms - 1)
        parts.append(Part("logits and loss", int(copies * 4 * tokens * vocab)))
    if kd and train.kd.teacher != "online":  # an online teacher's logits are counted with it
        k = top_k if train.kd.teacher == "offline" else train.kd.online_top_k or 0
        parts.append(Part("top-k targets", 2 * 12 * tokens * k))  # int64 ids + fp32 log-probs, collated and shifted
    return parts


# --- training ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainLayout:
    """The layout knobs the planner varies for the student."""

    strategy: str
    processes: int  # per node
    nodes: int
    micro_batch: int
    lora_rank: int | None
    lora_targets: str | list[str]
    cpu_offload: bool
    reshard_after_forward: bool
    gradient_checkpointing: bool
    loss_chunk_size: int | None

    @property
    def world(self) -> int:
        return self.processes * self.nodes

    def describe(self) -> str:
        parts = [
            f"FSDP over {self.world}"
            if self.strategy == "fsdp"
            else (f"DDP x {self.world}" if self.world > 1 else "1 process")
        ]
        if self.cpu_offload and self.strategy == "fsdp":
            parts.append("CPU offload")
        if self.strategy == "fsdp" and not self.reshard_after_forward:
            parts.append("no reshard")
        if self.lora_rank:
            parts.append(f"LoRA r={self.lora_rank}")
        if self.gradient_checkpointing:
            parts.append("checkpointing")
        if self.loss_chunk_size:
            parts.append(f"loss chunk {self.loss_chunk_size}")
        parts.append(f"micro-batch {self.micro_batch}")
        return ", ".join(parts)


def configured_layout(train: TrainConfig) -> TrainLayout:
    world = train.num_processes * train.nodes
    return TrainLayout(
        strategy=train.strategy,
        processes=train.num_processes,
        nodes=train.nodes,
        micro_batch=max(1, train.batch_size // (world * train.gradient_accumulation_steps)),
        lora_rank=train.lora.r if train.lora else None,
        lora_targets=train.lora.target_modules if train.lora else "all-linear",
        cpu_offload=train.fsdp.cpu_offload,
        reshard_after_forward=train.fsdp.reshard_after_forward,
        gradient_checkpointing=train.gradient_checkpointing,
        loss_chunk_size=train.loss_chunk_size,
    )


def training_parts(
    student: ModelShape,
    train: TrainConfig,
    layout: TrainLayout,
    *,
    teacher: ModelShape | None,
    top_k: int,
    on_gpu: bool,
) -> tuple[list[Part], int, str]:
    """(parts, peak, which moment peaks) of one training process. The peak is the larger of two moments that
    don't overlap: the end of the forward (activations and loss buffers alive, gradients not yet) and the
    optimizer step (every gradient alive, no activations)."""
    world = layout.world
    parameters = student.parameters
    trainable = student.lora_parameters(layout.lora_rank, layout.lora_targets) if layout.lora_rank else parameters
    full_weights = 4 * parameters + (4 * trainable if layout.lora_rank else 0)
    bf16 = train.bf16
    compute_bytes = 2 if bf16 else 4
    fsdp = layout.strategy == "fsdp"
    parts: list[Part] = []
    if fsdp:
        on_device = 0 if layout.cpu_offload else 1
        precision = "bf16" if bf16 else "fp32"
        shard = full_weights / world
        parts.append(Part("fp32 weights (shard)", int(on_device * shard)))
        if layout.reshard_after_forward:
            # The root (embeddings, LM head) stays gathered through the step; two layers in flight (one prefetched).
            gathered = student.root_parameters + 2 * student.layer_parameters
        else:
            gathered = parameters
        parts.append(Part("gathered weights", int(compute_bytes * gathered)))
        gradients = on_device * 4 * trainable / world
        if not layout.lora_rank:  # the root's unsharded gradient, and a layer's, before their fp32 reduce-scatter
            gradients += (compute_bytes + 4) * (student.root_parameters + student.layer_parameters)
        optimizer = on_device * 8 * trainable / world
    else:
        precision = "amp" if bf16 else "fp32"
        parts.append(Part("fp32 weights", full_weights))
        if bf16:
            copies = student.layer_parameters if layout.gradient_checkpointing else parameters
            parts.append(Part("bf16 autocast copies", 2 * copies))
        gradients = 4 * trainable * (2 if world > 1 else 1)  # DDP's buckets hold a second copy
        optimizer = 8 * trainable
    tokens = layout.micro_batch * train.max_seq_len
    activations = activation_bytes(student, tokens, precision, layout.gradient_checkpointing)
    loss_parts = loss_bytes(
        student, train.model_copy(update={"loss_chunk_size": layout.loss_chunk_size}), tokens, compute_bytes, top_k
    )
    parts += [Part("AdamW states", int(optimizer)), Part("activations", activations), *loss_parts]
    if train.method == "kd" and train.kd.teacher == "online" and teacher is not None:
        # load_causal_lm loads it in float32; its logits [N, V] and their fp32 log-softmax for the loss.
        parts.append(Part("online teacher", 4 * teacher.parameters))
        parts.append(Part("teacher logits", 3 * 4 * tokens * teacher.vocab_size))
    if train.method == "kd" and train.kd.lmbda > 0:
        rollout_tokens = layout.micro_batch * (prompt_tokens_for(train) + train.kd.rollout_max_new_tokens)
        parts.append(Part("on-policy rollout KV cache", student.kv_bytes_per_token(compute_bytes) * rollout_tokens))
    forward_end = sum(part.bytes for part in parts)
    step_parts = [p for p in parts if p.name in ("fp32 weights", "fp32 weights (shard)", "AdamW states")]
    step = sum(p.bytes for p in step_parts) + gradients  # fused AdamW (the Trainer's default) needs no temporaries
    parts.append(Part("gradients", int(gradients)))
    if on_gpu:
        parts.append(Part("CUDA context and allocator", int(CUDA_RESERVE_BYTES + ALLOCATOR_SLACK * forward_end)))
        reserve = parts[-1].bytes
    else:
        reserve = 0
    # Gradients grow while activations are freed: the LM head's (under FSDP the unsharded root's) is the first to
    # exist, beside every activation; the rest replace activations layer by layer.
    if layout.lora_rank:
        early_gradients = 0
    elif fsdp:
        early_gradients = (compute_bytes + 4) * student.root_parameters
    else:
        early_gradients = 4 * student.output_parameters
    forward_peak = forward_end + min(gradients, early_gradients)
    moment = "the end of the forward" if forward_peak >= step else "the optimizer step"
    return parts, int(max(forward_peak, step) + reserve), moment


def prompt_tokens_for(train: TrainConfig, max_new_tokens: int = 0, length_cap: int | None = None) -> int:
    if length_cap is not None:
        return length_cap
    return max(train.max_seq_len - max_new_tokens, train.max_seq_len // 4)


def training_seconds(
    student: ModelShape, train: TrainConfig, layout: TrainLayout, teacher: ModelShape | None, hardware: Hardware
) -> float:
    """Upper bound: every sequence full length."""
    flops, _ = hardware.speeds()
    if not train.bf16 and not hardware.cpu:
        flops /= 8  # fp32 matmuls (no TF32 by default) run far below the bf16 peak
    tokens = train.max_steps * train.batch_size * train.max_seq_len
    per_token = (4 if layout.lora_rank else 6) + (2 if layout.gradient_checkpointing else 0)
    total = per_token * student.parameters * tokens
    if train.method == "kd" and train.kd.teacher == "online" and teacher is not None:
        total += 2 * teacher.parameters * tokens
    return total / (layout.world * flops * MFU)


# What each change costs the user, for choosing among layouts that fit: a chunked loss is free; recomputation costs
# about a third more compute; smaller micro-batches use the GPU less well; sharding adds communication; LoRA
# changes what is trained; CPU offload is the slowest.
CHANGE_COSTS = {"loss_chunk_size": 1, "gradient_checkpointing": 3, "micro_batch": 4, "fsdp": 10, "lora": 40}
CHANGE_COSTS |= {"cpu_offload": 50}


def layout_changes(train: TrainConfig, current: TrainLayout, candidate: TrainLayout) -> tuple[int, list[str]]:
    """(cost, the `--set` overrides) that turn the configured layout into ``candidate``."""
    cost, overrides = 0, []
    if candidate.loss_chunk_size != current.loss_chunk_size:
        cost += CHANGE_COSTS["loss_chunk_size"]
        overrides.append(f"train.loss_chunk_size={candidate.loss_chunk_size}")
    if candidate.gradient_checkpointing != current.gradient_checkpointing:
        cost += CHANGE_COSTS["gradient_checkpointing"]
        overrides.append("train.gradient_checkpointing=true")
    if (candidate.strategy, candidate.world) != (current.strategy, current.world):
        cost += CHANGE_COSTS["fsdp"]
        overrides += [f"train.strategy={candidate.strategy}", f"train.num_processes={candidate.processes}"]
        if candidate.nodes != current.nodes:
            overrides.append(f"train.nodes={candidate.nodes}")
    if candidate.micro_batch < current.micro_batch:
        cost += CHANGE_COSTS["micro_batch"] * int(math.log2(current.micro_batch / candidate.micro_batch))
    accumulation = train.batch_size // (candidate.world * candidate.micro_batch)
    if accumulation != train.gradient_accumulation_steps:
        overrides.append(f"train.gradient_accumulation_steps={accumulation}")
    if candidate.lora_rank != current.lora_rank:
        cost += CHANGE_COSTS["lora"]
        overrides.append(f"train.lora.r={candidate.lora_rank}")
    if candidate.cpu_offload != current.cpu_offload and candidate.strategy == "fsdp":
        cost += CHANGE_COSTS["cpu_offload"]
        overrides.append("train.fsdp.cpu_offload=true")
    return cost, overrides


def candidate_layouts(train: TrainConfig, hardware: Hardware, current: TrainLayout) -> list[TrainLayout]:
    """Every layout within reach of the configured one: the loss chunked, checkpointing on, smaller micro-batches,
    FSDP over every GPU of the plan, LoRA on a pretrained student, CPU offload under FSDP."""
    shardings = [(current.strategy, current.processes, current.nodes)]
    if not hardware.cpu and (current.strategy != "fsdp" or current.world < hardware.devices):
        shardings.append(("fsdp", hardware.gpus_per_node, hardware.nodes))
    layouts = []
    for strategy, processes, nodes in shardings:
        world = processes * nodes
        micro_batches = [m for m in range(current.micro_batch, 0, -1) if train.batch_size % (world * m) == 0]
        micro_batches = [m for m in micro_batches if m & (m - 1) == 0 or m == micro_batches[0]][:6]
        for micro in micro_batches:
            for chunk in {current.loss_chunk_size, current.loss_chunk_size or 1024}:
                for checkpointing in {current.gradient_checkpointing, True}:
                    for lora in {current.lora_rank, current.lora_rank or (16 if train.student else None)}:
                        for offload in {current.cpu_offload, strategy == "fsdp"}:
                            layouts.append(
                                TrainLayout(
                                    **{
                                        **current.__dict__,
                                        "strategy": strategy,
                                        "processes": processes,
                                        "nodes": nodes,
                                        "micro_batch": micro,
                                        "loss_chunk_size": chunk,
                                        "gradient_checkpointing": checkpointing,
                                        "lora_rank": lora,
                                        "cpu_offload": offload,
                                    }
                                )
                            )
    return layouts


def plan_training(config: PipelineConfig, hardware: Hardware, teacher: ModelShape | None) -> StagePlan:
    train = config.train
    student = student_shape(train, teacher)
    layout = configured_layout(train)
    top_k = config.sample.top_k_logprobs
    on_gpu = not hardware.cpu and train.device != "cpu"

    def estimate(candidate: TrainLayout) -> tuple[list[Part], int, str]:
        return training_parts(student, train, candidate, teacher=teacher, top_k=top_k, on_gpu=on_gpu)

    parts, peak, moment = estimate(layout)
    stage = StagePlan(
        stage="train",
        model=student.reference,
        layout=layout.describe(),
        parts=parts,
        peak_override=peak,
        available_bytes=hardware.gpu_memory_bytes,
        device=hardware.device,
        seconds=training_seconds(student, train, layout, teacher, hardware),
        notes=[f"the peak is at {moment}: gradients and activations are not alive together"],
    )
    if train.num_processes > hardware.gpus_per_node and not hardware.cpu:
        stage.notes.append(
            f"train.num_processes is {train.num_processes} per node but a node has {hardware.gpus_per_node} GPUs"
        )
        stage.available_bytes = 0
        stage.fix = f"set train.num_processes to at most {hardware.gpus_per_node}"
        return stage
    if train.nodes > hardware.nodes:
        stage.notes.append(f"train.nodes is {train.nodes} but the plan has {hardware.nodes} node(s) (--nodes)")
    if student.vocab_size >= 32000 and not train.loss_chunk_size:
        saved = sum(p.bytes for p in parts if p.name == "logits and loss")
        stage.notes.append(
            f"vocabulary {student.vocab_size:,}: train.loss_chunk_size (e.g. 1024) would replace the "
            f"{format_bytes(saved)} of full logits"
        )
    if stage.fits:
        return stage
    fitting = []
    for candidate in candidate_layouts(train, hardware, layout):
        peak = estimate(candidate)[1]
        if peak <= hardware.gpu_memory_bytes:
            cost, overrides = layout_changes(train, layout, candidate)
            fitting.append((cost, peak, overrides, candidate))
    if fitting:
        # The cheapest change that leaves a tenth of the memory free (estimates are good to about ±20%), else the
        # cheapest that fits at all.
        roomy = [option for option in fitting if option[1] <= HEADROOM * hardware.gpu_memory_bytes]
        cost, peak, overrides, candidate = min(roomy or fitting, key=lambda option: option[:2])
        stage.fix = (
            f"--set {' '.join(overrides)} ({candidate.describe()}: ≈ {format_bytes(peak)} per {hardware.device})"
        )
        if candidate.cpu_offload and not layout.cpu_offload:
            host = 16 * student.parameters / candidate.world * hardware.gpus_per_node
            stage.notes.append(
                f"CPU offload keeps ≈ {format_bytes(host)} of weights, gradients and states in each node's RAM"
            )
    else:
        stage.fix = (
            f"no layout found that fits {format_bytes(hardware.gpu_memory_bytes)} per {hardware.device}: add GPUs "
            "(--gpus, --nodes with train.nodes), use LoRA (train.lora) or a smaller student"
        )
    return stage


# --- sampling ------------------------------------------------------------------------------------------------


def sampling_sequence_tokens(config: PipelineConfig) -> int:
    cap = config.curate.filters.length.max_tokens
    return prompt_tokens_for(config.train, config.sample.max_new_tokens, cap) + config.sample.max_new_tokens


def prompt_count(config: PipelineConfig) -> int | None:
    if config.curate.max_rows is not None:
        return config.curate.max_rows
    if is_builtin(config.curate.source):
        return config.curate.demo_rows
    return None


def decode_seconds(
    shape: ModelShape,
    weight_bytes_per_device: float,
    rows: int,
    new_tokens_total: int,
    hardware: Hardware,
    devices: int,
) -> float:
    """Decoding ``new_tokens_total`` tokens, ``rows`` at a time: each step reads the weights once (memory bound)
    or does 2P FLOPs per row (compute bound), whichever is slower."""
    flops, bandwidth = hardware.speeds()
    step = max(weight_bytes_per_device / bandwidth, 2 * shape.parameters * rows / (devices * flops * MFU))
    return new_tokens_total / max(rows, 1) * step


def vllm_layout_parts(
    shape: ModelShape, sample: SampleConfig, tensor: int, pipeline: int, sequence_tokens: int
) -> tuple[list[Part], int]:
    """(parts, KV cache bytes per GPU of one ``sequence_tokens`` sequence) of one vLLM GPU."""
    weight_bytes = dtype_bytes(sample.dtype, shape)
    weights = weight_bytes * shape.parameters / (tensor * pipeline)
    heads_per_gpu = max(1, shape.num_kv_heads // tensor)  # fewer KV heads than GPUs: each GPU keeps one
    kv_per_token = (shape.num_layers / pipeline) * 2 * heads_per_gpu * shape.head_dim * weight_bytes
    max_model_len = sample.vllm.max_model_len or shape.max_position_embeddings
    step_activations = VLLM_STEP_TOKENS * (4 * shape.hidden_size + 3 * shape.intermediate_size / tensor) * weight_bytes
    sampler = 256 * shape.vocab_size * 4 * 2  # logits of vLLM's default 256 sequences, and their log-softmax
    parts = [
        Part("weights", int(weights)),
        Part("activations (profiling step)", int(step_activations + sampler)),
        Part("CUDA graphs", VLLM_GRAPHS_BYTES),
        Part("KV cache for one max_model_len sequence", int(kv_per_token * max_model_len)),
    ]
    return parts, int(kv_per_token * sequence_tokens)


def smallest_tensor_parallel(
    shape: ModelShape, sample: SampleConfig, hardware: Hardware, sequence_tokens: int
) -> int | None:
    """The smallest tensor-parallel degree (dividing the attention heads, within a node) whose GPUs fit the
    teacher in gpu_memory_utilization of their memory."""
    budget = sample.gpu_memory_utilization * hardware.gpu_memory_bytes
    for tensor in (1, 2, 4, 8, 16, 32, 64):
        if tensor > hardware.gpus_per_node:
            break
        if shape.num_heads % tensor:
            continue
        parts, _ = vllm_layout_parts(shape, sample, tensor, sample.vllm.pipeline_parallel_size, sequence_tokens)
        if sum(p.bytes for p in parts) <= budget:
            return tensor
    return None


def plan_vllm(config: PipelineConfig, hardware: Hardware, teacher: ModelShape, *, served: bool) -> StagePlan:
    sample = config.sample
    tokens = sampling_sequence_tokens(config)
    tensor, pipeline = sample.vllm.tensor_parallel_size, sample.vllm.pipeline_parallel_size
    smallest = smallest_tensor_parallel(teacher, sample, hardware, tokens)
    if served and "tensor_parallel_size" not in sample.vllm.model_fields_set:
        tensor = smallest or hardware.gpus_per_node  # the server's layout is unknown: show the smallest that fits
    parts, kv_per_sequence = vllm_layout_parts(teacher, sample, tensor, pipeline, tokens)
    budget = int(sample.gpu_memory_utilization * hardware.gpu_memory_bytes)
    room = budget - sum(p.bytes for p in parts[:3])
    concurrent = max(0, room // max(kv_per_sequence, 1))
    replicas = sample.vllm.replicas if not served else 1
    layout = (
        f"vLLM TP={tensor}" + (f" PP={pipeline}" if pipeline > 1 else "") + (f" x {replicas}" if replicas > 1 else "")
    )
    stage = StagePlan(
        stage="sample",
        model=teacher.reference,
        layout=("server: " if served else "") + layout,
        parts=parts,
        available_bytes=budget,
        device=hardware.device,
        advisory=served,
    )
    stage.notes.append(
        f"KV cache room holds ≈ {concurrent} sequences of {tokens} tokens at once "
        f"(sample.batch_size {sample.batch_size})"
    )
    if served:
        stage.notes.append(
            f"served teacher: start its server with `vllm serve {teacher.reference} --tensor-parallel-size {tensor}"
            f" --max-logprobs {max(20, sample.top_k_logprobs)}`"
            + (f" (TP={smallest} is the smallest that fits)" if smallest else " (no TP within a node fits)")
        )
    if sample.dtype == "float32":
        stage.notes.append("sample.dtype is float32: bfloat16 halves the weights and the KV cache")
    gpus = tensor * pipeline * replicas
    if not served and gpus > hardware.devices:
        stage.available_bytes = 0
        stage.fix = f"sample.vllm needs {gpus} GPUs but the plan has {hardware.devices}"
    elif not stage.fits:
        stage.fix = (
            f"--set sample.vllm.tensor_parallel_size={smallest} (smallest that fits)"
            if smallest
            else "no tensor-parallel degree within a node fits: set sample.vllm.pipeline_parallel_size, "
            "sample.vllm.max_model_len, or sample.dtype=bfloat16"
        )
    elif smallest is not None and smallest < tensor and not served:
        stage.notes.append(f"TP={smallest} also fits: more replicas (sample.vllm.replicas) of fewer GPUs sample faster")
    prompts = prompt_count(config)
    if prompts:
        weight_bytes = parts[0].bytes
        stage.seconds = (
            decode_seconds(
                teacher,
                weight_bytes,
                max(1, min(concurrent, 256)),
                prompts * sample.n * sample.max_new_tokens,
                hardware,
                tensor,
            )
            / replicas
        )
    return stage


def plan_sampling(config: PipelineConfig, hardware: Hardware, teacher: ModelShape | None) -> StagePlan | None:
    sample = config.sample
    if teacher is None:
        return None
    if sample.engine == "openai":
        return plan_vllm(config, hardware, teacher, served=True)
    if sample.engine == "vllm":
        return plan_vllm(config, hardware, teacher, served=False)
    weight_bytes = dtype_bytes(sample.dtype, teacher)
    tokens = sampling_sequence_tokens(config)
    rows = sample.batch_size * sample.n
    if sample.batch_tokens:
        rows = min(rows, max(1, sample.batch_tokens // tokens))
    prefill = rows * (tokens - sample.max_new_tokens) * (2 * teacher.hidden_size + 3 * teacher.intermediate_size)
    parts = [
        Part("weights", weight_bytes * teacher.parameters),
        Part("KV cache", teacher.kv_bytes_per_token(weight_bytes) * rows * tokens),
        Part("prefill activations", int(weight_bytes * prefill)),
        Part("next-token logits", 3 * 4 * rows * teacher.vocab_size),
    ]
    on_gpu = not hardware.cpu and sample.device != "cpu"
    if on_gpu:
        parts.append(Part("CUDA context and allocator", CUDA_RESERVE_BYTES))
    stage = StagePlan(
        stage="sample",
        model=teacher.reference,
        layout=f"hf, {sample.dtype}, {rows} rows x {tokens} tokens",
        parts=parts,
        available_bytes=hardware.gpu_memory_bytes,
        device=hardware.device,
    )
    prompts = prompt_count(config)
    if prompts:
        stage.seconds = decode_seconds(
            teacher, parts[0].bytes, rows, prompts * sample.n * sample.max_new_tokens, hardware, 1
        )
    if not stage.fits:
        fixes = []
        if sample.dtype == "float32":
            fixes.append("--set sample.dtype=bfloat16")
        smallest = smallest_tensor_parallel(teacher, sample, hardware, tokens) if on_gpu else None
        if smallest:
            fixes.append(
                f"--set sample.engine=vllm sample.vllm.tensor_parallel_size={smallest} (vLLM on {smallest} GPUs)"
            )
        fixes.append("lower sample.batch_size")
        stage.fix = "; or ".join(fixes)
    return stage


# --- evaluation and feedback ---------------------------------------------------------------------------------


def inference_parts(shape: ModelShape, rows: int, tokens: int, on_gpu: bool) -> list[Part]:
    """A model loaded by `load_causal_lm` (float32) generating and scoring ``rows`` sequences of ``tokens``."""
    parts = [
        Part("fp32 weights", 4 * shape.parameters),
        Part("KV cache", shape.kv_bytes_per_token(4) * rows * tokens),
        Part("scoring logits", 3 * 4 * rows * tokens * shape.vocab_size),
    ]
    if on_gpu:
        parts.append(Part("CUDA context and allocator", CUDA_RESERVE_BYTES))
    return parts


def plan_evaluation(
    config: PipelineConfig, hardware: Hardware, teacher: ModelShape | None, student: ModelShape
) -> StagePlan:
    evaluate = config.evaluate
    on_gpu = not hardware.cpu
    tokens = sampling_sequence_tokens(config) + max(0, evaluate.max_new_tokens - config.sample.max_new_tokens)
    roles: dict[str, ModelShape] = {"student": student}
    served = config.sample.engine == "openai"
    if teacher is not None and not served:
        roles["teacher"] = teacher
    if evaluate.baseline:
        baseline = try_shape(evaluate.baseline, None, False)
        if isinstance(baseline, ModelShape):
            roles["baseline"] = baseline
    estimates = {role: inference_parts(shape, evaluate.batch_size, tokens, on_gpu) for role, shape in roles.items()}
    largest = max(estimates, key=lambda role: sum(p.bytes for p in estimates[role]))
    stage = StagePlan(
        stage="evaluate",
        model=f"{largest}: {roles[largest].reference}",
        layout=f"fp32, one {hardware.device}, batch {evaluate.batch_size}",
        parts=estimates[largest],
        available_bytes=hardware.gpu_memory_bytes,
        device=hardware.device,
    )
    if served:
        stage.notes.append("the served teacher's stored answers stand in for its weights")
    prompts = evaluate.max_prompts or (
        int(prompt_count(config) * config.curate.eval_fraction) if prompt_count(config) else None
    )
    if prompts:
        stage.seconds = sum(
            decode_seconds(
                shape, 4 * shape.parameters, evaluate.batch_size, prompts * evaluate.max_new_tokens, hardware, 1
            )
            for shape in roles.values()
        )
    if not stage.fits:
        fits_without_teacher = all(
            sum(p.bytes for p in parts) <= hardware.gpu_memory_bytes
            for role, parts in estimates.items()
            if role != "teacher"
        )
        if largest == "teacher" and fits_without_teacher:
            stage.fix = (
                "evaluation loads each model in float32 on one device, and the teacher doesn't fit: serve it "
                "(sample.engine: openai, its stored answers then stand in) or evaluate on a larger device"
            )
        else:
            batch = evaluate.batch_size // 2
            while batch > 1 and not all(
                sum(p.bytes for p in inference_parts(shape, batch, tokens, on_gpu)) <= hardware.gpu_memory_bytes
                for shape in roles.values()
            ):
                batch //= 2
            stage.fix = f"--set evaluate.batch_size={max(batch, 1)}, or evaluate on a device with more memory"
    return stage


def plan_feedback(
    config: PipelineConfig, hardware: Hardware, teacher: ModelShape | None, student: ModelShape
) -> StagePlan:
    feedback = config.feedback
    on_gpu = not hardware.cpu
    tokens = prompt_tokens_for(config.train, feedback.max_new_tokens) + feedback.max_new_tokens
    candidates = inference_parts(student, 64, tokens, on_gpu)  # hf_engine.generate's default batch
    options = {"candidates": candidates}
    judge_engine_here = feedback.judge.engine == "hf" and feedback.judge.kind != "verifier"
    judge = try_shape(feedback.judge.model, None, False) if feedback.judge.model else teacher
    if judge_engine_here and isinstance(judge, ModelShape):
        options["judge"] = inference_parts(judge, 8, tokens, on_gpu)
    # DPO / best-of-n: a full fine-tune of the student in float32, chosen and rejected sequences per pair.
    rows = feedback.batch_size * (2 if feedback.method == "dpo" else 1)
    training = [
        Part("fp32 weights, gradients, AdamW", 16 * student.parameters),
        Part("activations", activation_bytes(student, rows * tokens, "fp32", False)),
        Part("logits and loss", 5 * 4 * rows * tokens * student.vocab_size),
    ]
    if on_gpu:
        training.append(Part("CUDA context and allocator", CUDA_RESERVE_BYTES))
    options[feedback.method] = training
    largest = max(options, key=lambda name: sum(p.bytes for p in options[name]))
    stage = StagePlan(
        stage="feedback",
        model=student.reference if largest != "judge" else judge.reference,
        layout=f"{largest}, fp32, one {hardware.device}",
        parts=options[largest],
        available_bytes=hardware.gpu_memory_bytes,
        device=hardware.device,
    )
    if not stage.fits:
        stage.fix = (
            "serve the judge (feedback.judge.engine: openai)"
            if largest == "judge"
            else "lower feedback.batch_size, or run feedback on a device with more memory"
        )
    return stage


# --- the plan ------------------------------------------------------------------------------------------------


def try_shape(reference: str | None, revision: str | None, trust_remote_code: bool) -> ModelShape | str:
    """The shape, or why it can't be read (offline, a private repo, an unknown architecture)."""
    try:
        return model_shape(reference, revision, trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError, InputError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"can't read the config.json of {reference!r} ({first_line})"


def teacher_shape(sample: SampleConfig) -> ModelShape | str:
    """The teacher's shape; a served teacher's from its name or, failing that, its tokenizer's repo."""
    shape = try_shape(sample.teacher, sample.revision, sample.trust_remote_code and sample.engine != "openai")
    if isinstance(shape, str) and sample.engine == "openai" and sample.openai.tokenizer:
        shape = try_shape(sample.openai.tokenizer, None, False)
    return shape


def plan_pipeline(config: PipelineConfig, hardware: Hardware) -> Plan:
    """Every stage that holds a model, on ``hardware``: peak memory per device, fit, layout and fix, time."""
    plan = Plan(config_name=config.name, hardware=hardware, stages=[])
    teacher = teacher_shape(config.sample)
    if isinstance(teacher, str):
        plan.notes.append(f"sample.teacher: {teacher}; the sample stage is not planned")
        teacher = None
    sampling = plan_sampling(config, hardware, teacher)
    if sampling is not None:
        plan.stages.append(sampling)
    try:
        training = plan_training(config, hardware, teacher)
    except (OSError, ValueError, KeyError, ImportError) as error:
        plan.notes.append(f"train.student: can't read its config.json ({error}); train is not planned")
        return plan
    plan.stages.append(training)
    student = student_shape(config.train, teacher)
    if config.feedback is not None:
        plan.stages.append(plan_feedback(config, hardware, teacher, student))
    plan.stages.append(plan_evaluation(config, hardware, teacher, student))
    return plan


plan = plan_pipeline  # the name the issue gives it: plan(config, hardware) -> Plan


def check_plan(plan: Plan) -> None:
    """Raise `InputError` for the first stage that can't fit: the stage, the estimate, the memory and the fix."""
    for stage in plan.problems():
        hardware = plan.hardware
        if hardware.cpu:
            memory = f"the CPU's RAM is {format_bytes(stage.available_bytes)}"
        else:
            share = (
                f" ({stage.available_bytes / hardware.gpu_memory_bytes:.0%} of it for vLLM)"
                if "vLLM" in stage.layout
                else ""
            )
            memory = f"one GPU of {hardware.describe()} has {format_bytes(stage.available_bytes)}{share}"
        raise InputError(
            f"{stage.stage}: {stage.model} ({stage.layout}) needs ≈ {format_bytes(stage.peak_bytes)} per "
            f"{stage.device} ({stage.largest_parts()}), but {memory}; fix: {stage.fix or 'use a larger device'}"
        )


def render(plan: Plan):
    """A rich Table of the plan: one row per stage, the fixes and notes in its caption."""
    from rich.table import Table

    table = Table(title=f"stillhouse plan · {plan.config_name} · {plan.hardware.describe()}", title_justify="left")
    for column, justify in (
        ("stage", "left"),
        ("model", "left"),
        ("layout", "left"),
        (f"peak / {plan.hardware.device}", "right"),
        ("available", "right"),
        ("fits", "center"),
        ("time", "right"),
        ("largest parts", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for stage in plan.stages:
        verdict = "[green]yes[/green]" if stage.fits else ("[yellow]no[/yellow]" if stage.advisory else "[red]NO[/red]")
        table.add_row(
            stage.stage,
            stage.model,
            stage.layout,
            format_bytes(stage.peak_bytes),
            format_bytes(stage.available_bytes),
            verdict,
            format_seconds(stage.seconds),
            stage.largest_parts(),
        )
    lines = []
    for stage in plan.stages:
        if stage.fix:
            lines.append(f"{stage.stage}: fix: {stage.fix}")
        lines += [f"{stage.stage}: {note}" for note in stage.notes]
    lines += plan.notes
    if lines:
        table.caption = "\n".join(lines)
        table.caption_justify = "left"
    return table

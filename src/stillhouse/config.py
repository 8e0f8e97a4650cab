"""Typed configuration: one pydantic model per stage and `PipelineConfig` holding them.

Every field carries a description (it becomes help text and the Prefect form). Unknown keys,
wrong types and impossible values are refused when the YAML is loaded, with the field's dotted
path and the reason, before any stage runs.

    from stillhouse.config import load_config
    config = load_config("configs/demo.yaml", overrides=["train.max_steps=50"])
"""

from __future__ import annotations

import difflib
import re
import string
import typing
import unicodedata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stillhouse import capabilities
from stillhouse.builtins import is_builtin
from stillhouse.capabilities import METRIC_GROUPS_NEEDING_REFERENCES

DEMO_SOURCE = "builtin:demo"
DEMO_TEACHER = "builtin:demo-teacher"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the file, the field and the fix."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# Names end up in folder names, MLflow, the Hub and terminals: bounded, and free of characters that hide or reorder
# text (NUL, escapes, bidi overrides such as U+202E, which can make a name read as something else).
MAX_NAME_LENGTH = 128
_HIDDEN_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def check_name(value: str, what: str) -> str:
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} is {len(value)} characters long; keep it under {MAX_NAME_LENGTH}")
    hidden = sorted({f"U+{ord(c):04X}" for c in value if unicodedata.category(c) in _HIDDEN_CATEGORIES})
    if hidden:
        raise ValueError(f"{what} contains control or invisible characters ({', '.join(hidden[:5])}); use visible text")
    return value


ChatFormat = Literal["auto", "columns", "messages", "sharegpt", "alpaca"]
FORMAT_HELP = (
    "How rows become chat messages. `columns`: `prompt_column` holds the prompt text (or a message list), with an "
    "optional `system_column`; `messages`: OpenAI-style list of {role, content} in `prompt_column` (or a `messages` "
    "column); `sharegpt`: a `conversations` list of {from, value}; `alpaca`: instruction/input(/output) columns; "
    "`auto`: `prompt_column` if the data has it, else the first of messages, conversations, instruction."
)


class SourceConfig(StrictModel):
    """One source of a mixture: where its rows come from, how they map to chat messages, and its share."""

    source: str = Field(
        description="A local .jsonl/.parquet/.csv file, a local `datasets` folder, a Hub dataset id, "
        f"or `{DEMO_SOURCE}`."
    )
    name: str | None = Field(
        None,
        min_length=1,
        description="Label of this source in the output's `source` column; null uses the file stem or dataset id.",
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="Relative share of this source in the mixture's output (after filtering and deduplication). "
        "Null on every entry keeps every row. Set on every entry, the mixture is drawn in those shares: the largest "
        "output the sources can fill, so rows of over-represented sources are dropped (counted, and said in the "
        "console).",
    )
    max_rows: int | None = Field(
        None, gt=0, description="Cap on the rows this source contributes; null leaves it uncapped."
    )
    format: ChatFormat = Field("auto", description=FORMAT_HELP)
    prompt_column: str = Field(
        "prompt", min_length=1, description="Column holding the prompt text (or a list of chat messages)."
    )
    system_column: str | None = Field(None, description="Optional column holding a system prompt (format `columns`).")
    reference_column: str | None = Field(
        "reference",
        description="Column holding a reference answer for exact-match evaluation; the default `reference` is used "
        "when the data has that column (a column named here explicitly must exist); null reads none.",
    )
    category_column: str | None = Field(
        None, description="Optional column naming each row's category, for per-category accuracy."
    )
    split: str = Field("train", description="Split to read when `source` is a `datasets` id or folder.")
    streaming: bool = Field(False, description="Stream a Hub dataset instead of downloading it first (Hub ids only).")


class LengthFilterConfig(StrictModel):
    """Bounds on a prompt's length, in characters and in teacher tokens; a bound left null is not checked."""

    min_chars: int | None = Field(
        None, ge=0, description="Drop prompts with fewer characters (all turns' content together)."
    )
    max_chars: int | None = Field(
        None, gt=0, description="Drop prompts with more characters (all turns' content together)."
    )
    min_tokens: int | None = Field(
        None, ge=0, description="Drop prompts shorter than this many tokens of `tokenizer`, chat template applied."
    )
    max_tokens: int | None = Field(
        None, gt=0, description="Drop prompts longer than this many tokens of `tokenizer`, chat template applied."
    )
    tokenizer: str | None = Field(
        None,
        description="The teacher's tokenizer for the token bounds: a local model folder, a Hub id, or "
        f"`{DEMO_TEACHER}`. Loaded only when a token bound is set.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> LengthFilterConfig:
        for low, high in (("min_chars", "max_chars"), ("min_tokens", "max_tokens")):
            if (
                getattr(self, low) is not None
                and getattr(self, high) is not None
                and getattr(self, low) > getattr(self, high)
            ):
                raise ValueError(
                    f"{low} ({getattr(self, low)}) is larger than {high} ({getattr(self, high)}); no prompt could pass"
                )
        if (self.min_tokens is not None or self.max_tokens is not None) and self.tokenizer is None:
            raise ValueError(
                "min_tokens/max_tokens need `tokenizer`: set it to the teacher (e.g. the value of sample.teacher)"
            )
        return self


class NearDuplicateConfig(StrictModel):
    """Near-duplicate removal with MinHash LSH over character shingles of the prompt's user turns."""

    enabled: bool = Field(
        False, description="Remove near-duplicates; off by default because short templated prompts look alike."
    )
    threshold: float = Field(
        0.6,
        gt=0,
        lt=1,
        description="Estimated Jaccard similarity of shingle sets at or above which two prompts are duplicates.",
    )
    shingle_size: int = Field(
        5, ge=1, le=64, description="Characters per shingle (of the lowercased, whitespace-collapsed text)."
    )
    num_perm: int = Field(
        128, ge=16, le=1024, description="MinHash permutations: more is more accurate, slower and larger."
    )


class RepetitionFilterConfig(StrictModel):
    """Drop degenerate prompts whose word n-grams repeat."""

    max_repeated_share: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Drop a prompt when more than this share of its word n-grams repeat an earlier one.",
    )
    ngram: int = Field(3, ge=1, le=32, description="Words per n-gram.")


class FilterConfig(StrictModel):
    """Row filters, each optional and each counted in the curation report."""

    empty: bool = Field(True, description="Drop prompts that are empty or whitespace-only.")
    length: LengthFilterConfig = Field(
        default_factory=LengthFilterConfig, description="Length bounds in characters and teacher tokens."
    )
    exact_duplicates: bool = Field(
        True, description="Drop prompts whose normalized text (lowercase, collapsed whitespace) repeats an earlier one."
    )
    near_duplicates: NearDuplicateConfig = Field(
        default_factory=NearDuplicateConfig, description="MinHash LSH near-duplicate removal."
    )
    repetition: RepetitionFilterConfig | None = Field(None, description="Repeated n-gram filter; null disables it.")
    mask_pii: list[Literal["email", "phone", "api_key"]] = Field(
        default_factory=list,
        description="Replace these patterns in message text by <EMAIL>, <PHONE>, <API_KEY>; rows are kept.",
    )


class DecontaminateConfig(StrictModel):
    """Drop training prompts that share an n-gram with the eval split or with a benchmark."""

    eval_split: bool = Field(True, description="Check training prompts against the pipeline's own eval split.")
    benchmarks: list[str] = Field(
        default_factory=list,
        description="Benchmark files (.jsonl/.parquet/.csv); every string field of every row is reference text.",
    )
    ngram: int = Field(
        13,
        ge=1,
        le=64,
        description="Words per n-gram (normalized: lowercase, punctuation stripped). "
        "Shorter texts count as one n-gram.",
    )
    ignore_common: int | None = Field(
        10,
        gt=0,
        description="Ignore n-grams found in more than this many reference rows (shared boilerplate, not leaks); "
        "null keeps all.",
    )


class CurateConfig(StrictModel):
    """Where prompts come from, how they are cleaned, and how they are split.

    One source (`source` plus the column fields) or a mixture (`sources`, a list with weights and caps).
    """

    source: str | None = Field(
        None,
        description="A local .jsonl/.parquet/.csv file, a local `datasets` folder, a Hub dataset id, "
        f"or `{DEMO_SOURCE}` for the bundled demo tasks. Leave null when `sources` lists a mixture.",
    )
    sources: list[SourceConfig] | None = Field(
        None, min_length=1, description="A mixture of sources with weights and caps, instead of `source`."
    )
    format: ChatFormat = Field("auto", description=FORMAT_HELP + " (for `source`; each mixture entry has its own)")
    prompt_column: str = Field(
        "prompt", min_length=1, description="Column holding the prompt text (or a list of chat messages)."
    )
    system_column: str | None = Field(None, description="Optional column holding a system prompt (format `columns`).")
    reference_column: str | None = Field(
        "reference",
        description="Column holding a reference answer for exact-match evaluation; the default `reference` is used "
        "when the data has that column (a column named here explicitly must exist); null reads none.",
    )
    category_column: str | None = Field(
        None, description="Optional column naming each row's category, for per-category accuracy."
    )
    split: str = Field("train", description="Split to read when `source` is a `datasets` id or folder.")
    streaming: bool = Field(False, description="Stream a Hub dataset instead of downloading it first (Hub ids only).")
    mixture_seed: int = Field(0, description="Seed of the rows drawn from each source of a mixture.")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Row filters and deduplication.")
    decontaminate: DecontaminateConfig = Field(
        default_factory=DecontaminateConfig, description="N-gram decontamination."
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="A malformed row (bad JSON, invalid UTF-8, missing column, not a conversation): `fail` stops, "
        "`skip` drops and counts it.",
    )
    batch_rows: int = Field(10000, ge=100, le=1_000_000, description="Rows read and processed per batch.")
    max_line_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Longest line of a JSON Lines or CSV file read, in bytes (32 MiB); a longer one is an error "
        "naming the line, or with on_error: skip is skipped and counted, without ever being held in memory.",
    )
    report_examples: int = Field(
        5, ge=0, le=100, description="Examples of removed rows kept per filter in the curation report."
    )
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of prompts held out for evaluation, chosen by a hash of the prompt."
    )
    split_salt: str = Field(
        "stillhouse", description="Salt of the split hash; change it to draw a different, equally stable split."
    )
    max_rows: int | None = Field(
        None, gt=0, description="Keep at most this many prompts after filtering (first by hash order); null keeps all."
    )
    demo_rows: int = Field(4000, gt=0, description=f"Rows to generate when `source` is `{DEMO_SOURCE}`.")
    demo_seed: int = Field(0, description=f"Seed of the generated rows when `source` is `{DEMO_SOURCE}`.")

    @model_validator(mode="after")
    def _one_source_form(self) -> CurateConfig:
        if (self.source is None) == (self.sources is None):
            raise ValueError(
                "set exactly one of `source` (one dataset) "
                "or `sources` (a mixture: a list of {source, weight, max_rows, ...})"
            )
        if self.sources is not None:
            per_source = {
                "format",
                "prompt_column",
                "system_column",
                "reference_column",
                "category_column",
                "split",
                "streaming",
            }
            misplaced = sorted(per_source & self.model_fields_set)
            if misplaced:
                raise ValueError(
                    f"{', '.join(misplaced)} apply to `source` only; with `sources`, set them in each mixture entry"
                )
            weighted = [source.weight is not None for source in self.sources]
            if any(weighted) and not all(weighted):
                unset = [str(index) for index, has_weight in enumerate(weighted) if not has_weight]
                raise ValueError(
                    f"sources[{', '.join(unset)}] have no weight while others do: set `weight` on every mixture entry "
                    "(to draw the mixture in those shares) or on none (to keep every row)"
                )
        return self

    def source_list(self) -> list[SourceConfig]:
        """The sources to read: the mixture's entries, or `source` with the top-level column fields."""
        if self.sources is not None:
            return list(self.sources)
        # Only what the user set is passed on, so the entry knows which values are defaults (a default
        # reference column that the data lacks means "no references", a named one that it lacks is an error).
        per_source = (
            "format",
            "prompt_column",
            "system_column",
            "reference_column",
            "category_column",
            "split",
            "streaming",
        )
        return [
            SourceConfig(source=self.source, **{k: getattr(self, k) for k in per_source if k in self.model_fields_set})
        ]


class OpenAIEngineConfig(StrictModel):
    """The `openai` engine: any OpenAI-compatible chat-completions endpoint (vLLM server, TGI, llama.cpp, hosted)."""

    base_url: str = Field(
        "http://127.0.0.1:8000/v1", pattern=r"^https?://", description="Endpoint root; `/chat/completions` is appended."
    )
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        min_length=1,
        description="Environment variable holding the API key (sent as a Bearer token, never stored or logged); "
        "null sends none.",
    )
    max_concurrency: int = Field(8, gt=0, le=1024, description="Requests in flight at once, per shard.")
    max_retries: int = Field(
        5, ge=0, le=50, description="Retries of one request after a 429, a 5xx, a timeout or a dropped connection."
    )
    backoff_seconds: float = Field(
        1.0, ge=0, le=600, description="First retry delay; it doubles each retry (a server's Retry-After wins)."
    )
    timeout_seconds: float = Field(
        120.0, gt=0, le=3600, description="Seconds to wait for one response before retrying."
    )
    tokenizer: str | None = Field(
        None,
        description="The served model's tokenizer (local folder or Hub id), to map returned tokens to ids and check "
        "prompt lengths and k; null trusts the server's token ids (`return_token_ids`).",
    )
    return_token_ids: bool = Field(
        True,
        description="Ask the server for tokens as ids (vLLM's `return_tokens_as_token_ids`); "
        "turn off for servers that refuse unknown fields.",
    )


class TaskRunnerConfig(StrictModel):
    """Where the sampling flow runs its shards: threads in this process, or a Ray cluster (prefect-ray)."""

    kind: Literal["threads", "ray"] = Field(
        "threads",
        description="`threads`: Prefect's thread pool here. `ray`: RayTaskRunner (pip install stillhouse[ray]).",
    )
    max_workers: int = Field(
        1, gt=0, le=256, description="Threads running shards at once (kind `threads`); one per GPU or one on a CPU."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster address (`ray://host:10001` or `auto`); null starts a local Ray."
    )
    ray_num_cpus: int | None = Field(
        None, gt=0, description="CPUs of a local Ray started when `ray_address` is null; null lets Ray count them."
    )
    gpus_per_shard: float = Field(
        1.0, ge=0, le=8, description="GPUs each shard asks Ray for (kind `ray`); 0 for CPU-only clusters."
    )
    gpu_concurrency: int = Field(
        1,
        gt=0,
        le=4096,
        description="Shards in flight at once, enforced by a Prefect tag concurrency limit on `gpu`, "
        "created at this size when absent.",
    )


class VLLMSettings(StrictModel):
    """Engine `vllm` for teachers that need several GPUs: tensor and pipeline parallelism, and data-parallel replicas.

    Each replica is one vLLM engine on its own group of tensor x pipeline GPUs, placed with a Ray placement
    group; the sampling shards are spread over the replicas.
    """

    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="GPUs one replica splits each layer over (vLLM tensor_parallel_size)."
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, le=64, description="Stages one replica splits the layers into (vLLM pipeline_parallel_size)."
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Longest prompt + response vLLM plans its KV cache for; null uses the model's context."
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of shared prompt prefixes (a system prompt, few-shot examples)."
    )
    replicas: int = Field(
        1,
        ge=1,
        le=1024,
        description="Data-parallel engines, each on tensor x pipeline GPUs of its own (a Ray placement group); "
        "shards are spread over them. More than one needs Ray (pip install stillhouse[ray]).",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster of the replicas (`auto`, `ray://host:10001`); null starts a local Ray."
    )

    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class SampleConfig(StrictModel):
    """How the teacher answers the prompts."""

    teacher: str = Field(
        description="Teacher model: a local folder, a Hub id such as `Qwen/Qwen2.5-1.5B-Instruct`, or "
        f"`{DEMO_TEACHER}`; for engine `openai`, the model name the server serves."
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) of the teacher; ignored for local folders."
    )
    trust_remote_code: bool = Field(
        False,
        description="Let the teacher's own Python code run (auto_map in its config); off, such a teacher is refused. "
        "Only for code you have read.",
    )
    engine: Literal["hf", "vllm", "openai"] = Field(
        "hf",
        description="Generation engine. `hf`: transformers in this process. `vllm`: vLLM on a GPU (pip install "
        "stillhouse[vllm]). `openai`: an OpenAI-compatible HTTP endpoint (see `openai`).",
    )
    max_new_tokens: int = Field(64, gt=0, le=32768, description="Most tokens the teacher may generate per response.")
    temperature: float = Field(0.0, ge=0, le=10, description="Sampling temperature; 0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (used when temperature > 0).")
    top_k: int = Field(
        0, ge=0, description="Sample only among the k most likely tokens (used when temperature > 0); 0 turns it off."
    )
    n: int = Field(
        1,
        gt=0,
        le=128,
        description="Responses sampled per prompt (rows get sample_index 0..n-1); n > 1 needs temperature > 0.",
    )
    stop: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Stop strings: a response ends with the token that completes one of them "
        "(kept in the response, like EOS).",
    )
    top_k_logprobs: int = Field(
        16,
        ge=0,
        description="Teacher top-k token ids and log-probs stored per generated position for white-box training; "
        "0 stores none.",
    )
    batch_size: int = Field(64, gt=0, description="Most prompts per generate call (sorted by length, left-padded).")
    batch_tokens: int | None = Field(
        None,
        gt=0,
        description="Token budget of one generate call: rows x n x (longest prompt + max_new_tokens) stays under it; "
        "null uses batch_size alone.",
    )
    overlong_prompts: Literal["error", "truncate_left", "skip"] = Field(
        "error",
        description="A prompt that leaves no room for max_new_tokens in the teacher's context: `error` before "
        "sampling, `truncate_left` (keep its end), or `skip` it; truncations and skips are counted in the manifest.",
    )
    context_length: int | None = Field(
        None,
        gt=0,
        description="Teacher's context in tokens; null reads max_position_embeddings from its config "
        "(engine `openai`: unchecked unless set).",
    )
    shard_rows: int = Field(
        2048,
        gt=0,
        description="Prompts per Parquet shard of the teacher-output store; "
        "a shard is the unit of resume and scale-out.",
    )
    seed: int = Field(0, description="Seed of sampling; fixed seeds give identical outputs on the same hardware.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("float32", description="Teacher weights' dtype.")
    device: str = Field("auto", description="`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`.")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="Engine `vllm`: share of GPU memory vLLM may take."
    )
    openai: OpenAIEngineConfig = Field(default_factory=OpenAIEngineConfig, description="Settings of engine `openai`.")
    vllm: VLLMSettings = Field(
        default_factory=VLLMSettings, description="Settings of engine `vllm`: parallelism, context, replicas."
    )
    task_runner: TaskRunnerConfig = Field(
        default_factory=TaskRunnerConfig, description="Where shards run: threads here or a Ray cluster."
    )

    @model_validator(mode="after")
    def _sampling_rules(self) -> SampleConfig:
        if self.temperature == 0 and self.top_p != 1.0:
            raise ValueError("top_p only applies when temperature > 0; set temperature or leave top_p at 1.0")
        if self.temperature == 0 and self.top_k != 0:
            raise ValueError("top_k only applies when temperature > 0; set temperature or leave top_k at 0")
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n={self.n} greedy responses would all be the same; set temperature > 0 or n: 1")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self


class StudentArchitecture(StrictModel):
    """A Llama-style student built from scratch with the teacher's tokenizer."""

    hidden_size: int = Field(gt=0, description="Width of the residual stream.")
    num_layers: int = Field(gt=0, description="Transformer blocks.")
    intermediate_size: int = Field(gt=0, description="Width of each MLP.")
    num_heads: int = Field(gt=0, description="Attention heads; must divide hidden_size.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> StudentArchitecture:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        return self


LossKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


class KDConfig(StrictModel):
    """White-box settings: which divergence, where the teacher's distribution comes from, on-policy share."""

    kind: LossKind = Field(
        "forward_kl",
        description="Divergence between teacher (p) and student (q): forward_kl = KL(p||q), reverse_kl, jsd, "
        "skew_forward_kl, skew_reverse_kl, tvd.",
    )
    beta: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Interpolation of `jsd`: beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q.",
    )
    alpha: float = Field(0.1, gt=0, lt=1, description="Skew of the skew_* kinds (DistiLLM).")
    temperature: float = Field(
        1.0,
        gt=0,
        description="Both distributions are softened by this temperature; the loss is multiplied by its square.",
    )
    tail: Literal["bucket", "renormalize"] = Field(
        "bucket",
        description="Top-k teachers: `bucket` adds one outcome for the rest of the mass; "
        "`renormalize` compares over the k ids only.",
    )
    teacher: Literal["offline", "online", "served"] = Field(
        "offline",
        description="`offline`: the top-k log-probs stored by the sample stage. "
        "`online`: the teacher model in memory scores every batch. `served`: an OpenAI-compatible server (vLLM) "
        "scores every batch, returning the top-k log-probs of the given tokens (`prompt_logprobs` on its completions "
        "endpoint), so a teacher too big for the training machines can sit on others.",
    )
    online_top_k: int | None = Field(
        None,
        gt=0,
        description="Online teacher: keep only its top-k per position (null compares full distributions). "
        "Served teacher: the k asked of the server (required; vLLM allows up to its --max-logprobs, 20 by default).",
    )
    served: OpenAIEngineConfig | None = Field(
        None,
        description="Served teacher (`teacher: served`): the endpoint, key variable, concurrency and retries; "
        "null uses sample.openai. The model name asked for is `served_model`.",
    )
    served_model: str | None = Field(
        None, min_length=1, description="Served teacher: the model name the server serves; null uses sample.teacher."
    )
    align: Literal["none", "uld", "byte"] = Field(
        "none",
        description="Teacher and student with different tokenizers (e.g. a Llama teacher, a Qwen student). `none`: "
        "they must share a vocabulary. `uld`: Universal Logit Distillation (Boizard et al.), the Wasserstein-1 "
        "distance between the sorted probability vectors, plus the KL on tokens both vocabularies spell the same "
        "(`uld_exact_weight`). `byte`: the teacher's next-token distribution mapped onto the student's vocabulary "
        "through shared byte prefixes at aligned byte offsets (byte-prefix marginalization), with a residual bucket "
        "for mass that maps nowhere, then the configured `kind`.",
    )
    uld_exact_weight: float = Field(
        1.0,
        ge=0,
        description="`align: uld`: weight of the KL on the tokens both vocabularies share exactly (as TRL's GOLD mixes "
        "it in); 0 is plain ULD.",
    )
    lmbda: float = Field(
        0.0,
        ge=0,
        le=1,
        description="On-policy share (GKD): the probability that a batch's responses are generated by the student and "
        "scored by the online teacher. 0 trains on the teacher's own responses (sequence-level KD).",
    )
    rollout_max_new_tokens: int = Field(
        64, gt=0, description="Most tokens the student generates per on-policy rollout."
    )
    rollout_temperature: float = Field(1.0, gt=0, description="Sampling temperature of on-policy rollouts.")

    @model_validator(mode="after")
    def _on_policy_needs_online_teacher(self) -> KDConfig:
        if self.lmbda > 0 and self.teacher == "offline":
            raise ValueError(
                "lmbda > 0 scores the student's own samples, which only a live teacher can do: "
                "set kd.teacher: online (in memory) or served (an OpenAI-compatible server)"
            )
        if self.online_top_k is not None and self.teacher == "offline":
            raise ValueError(
                "online_top_k applies to kd.teacher: online or served; the offline top-k size is sample.top_k_logprobs"
            )
        if self.teacher == "served" and self.online_top_k is None:
            raise ValueError(
                "kd.teacher: served needs online_top_k, the top-k log-probs asked of the server per position "
                "(e.g. 20, vLLM's default --max-logprobs)"
            )
        if self.teacher != "served" and (self.served is not None or self.served_model is not None):
            raise ValueError("kd.served and kd.served_model apply to kd.teacher: served")
        return self


class LoraSettings(StrictModel):
    """Train low-rank adapters (peft) instead of every weight; merged into the student before it is saved."""

    r: int = Field(16, gt=0, description="Rank of the adapters.")
    alpha: int = Field(32, gt=0, description="Scaling numerator of the adapters (lora_alpha).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: `all-linear` or a list of module names."
    )


class FSDPSettings(StrictModel):
    """How `train.strategy: fsdp` shards the student: torch FSDP2 through accelerate and `transformers.Trainer`.

    Activation checkpointing is `train.gradient_checkpointing`; with `train.bf16` the parameters are held in
    bfloat16 and gradients are reduced in float32.
    """

    cpu_offload: bool = Field(
        False,
        description="Keep the sharded parameters, gradients and optimizer states in CPU memory between uses: slower, "
        "for students that don't fit GPU memory even sharded (a CPU run holds everything there already).",
    )
    reshard_after_forward: bool = Field(
        True,
        description="Free each layer's gathered parameters after its forward and gather them again for the backward "
        "(ZeRO-3); false keeps them until the backward (ZeRO-2-like: faster, more memory).",
    )


class TrainConfig(StrictModel):
    """How the student learns from the teacher's outputs."""

    student: str | None = Field(
        None,
        description="Pretrained student: a local folder or a Hub id. "
        "Leave null and set `architecture` to build one from scratch.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Let the pretrained student's own Python code run (auto_map in its config); off, "
        "such a student is refused.",
    )
    architecture: StudentArchitecture | None = Field(
        None, description="Build the student from scratch with this shape and the teacher's tokenizer."
    )
    method: Literal["sft", "kd"] = Field(
        "sft",
        description="`sft`: cross-entropy on the teacher's response tokens (black-box). "
        "`kd`: a divergence (`kd.kind`: forward or reverse KL, JSD, skew KLs, TVD) to the teacher's distribution "
        "(`kd.teacher`: the stored top-k or the teacher in memory), "
        "mixed with cross-entropy by `kd_weight` and `ce_weight` (white-box).",
    )
    kd_weight: float = Field(1.0, ge=0, description="Weight of the divergence term (`kd.kind`) when method is `kd`.")
    ce_weight: float = Field(0.5, ge=0, description="Weight of the cross-entropy term when method is `kd`.")
    max_steps: int = Field(500, gt=0, description="Optimizer steps.")
    batch_size: int = Field(
        64, gt=0, description="Sequences per optimizer step, over all processes and accumulation steps."
    )
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="Peak learning rate of AdamW.")
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup", "warmup_stable_decay"] = Field(
        "cosine",
        description="Learning-rate schedule after warmup. `warmup_stable_decay` holds the peak rate, then decays it "
        "to 0 (cosine) over the last `decay_ratio` of the steps.",
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    decay_ratio: float = Field(
        0.2, gt=0, le=1, description="Share of steps spent decaying (`lr_scheduler: warmup_stable_decay` only)."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    adam_beta2: float = Field(
        0.999,
        gt=0,
        lt=1,
        description="AdamW's second-moment decay. Lower (0.95-0.98) adapts faster to changing gradients: the demo's "
        "small student reached 90.6% instead of 85.6% held-out exact match with 0.98 (mean of two seeds, same steps).",
    )
    max_seq_len: int = Field(
        512, gt=0, description="Prompt + response tokens kept per example; longer ones are cut from the right."
    )
    kd: KDConfig = Field(default_factory=KDConfig, description="White-box settings (used when method is `kd`).")
    loss_chunk_size: int | None = Field(
        None,
        gt=0,
        description="Compute the losses from the last hidden state this many positions at a time, so full-vocabulary "
        "logits never exist for the whole batch (large vocabularies); null uses the model's logits.",
    )
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step per process (they split batch_size)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
    )
    save_steps: int | None = Field(
        None,
        gt=0,
        description="Checkpoint every this many steps; a rerun after a crash resumes from the newest checkpoint. "
        "Null: no checkpoints.",
    )
    lora: LoraSettings | None = Field(
        None,
        description="Train LoRA adapters on a pretrained student (merged before saving); null trains every weight.",
    )
    num_processes: int = Field(
        1,
        gt=0,
        description="Training processes per node (one per GPU), started with torchrun; CPU runs use the gloo backend.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="`ddp`: every process holds the whole student (data parallel). `fsdp`: parameters, gradients "
        "and optimizer states are sharded over all processes (torch FSDP2), checkpoints are sharded (torch "
        "distributed checkpoint) and the saved student is consolidated into one set of safetensors.",
    )
    fsdp: FSDPSettings = Field(default_factory=FSDPSettings, description="Settings of strategy `fsdp`.")
    nodes: int = Field(
        1,
        ge=1,
        le=4096,
        description="Machines training together, each running `num_processes` processes; they meet at `rendezvous`.",
    )
    rendezvous: str | None = Field(
        None,
        pattern=r"^[\w.-]+:\d+$",
        description="host:port every node reaches (torchrun's c10d rendezvous, --rdzv-endpoint); required with "
        "nodes > 1. Start the same command on every node.",
    )
    rendezvous_id: str = Field(
        "stillhouse",
        min_length=1,
        pattern=r"^[\w.-]+$",
        description="Id of one multi-node training run (torchrun --rdzv-id): the same on every node, new per run.",
    )

    @field_validator("rendezvous_id", mode="before")
    @classmethod
    def _numeric_id_is_text(cls, value: Any) -> Any:
        # `--set train.rendezvous_id=$(date +%s)` arrives as a number (overrides are YAML-parsed).
        return str(value) if isinstance(value, int) else value

    seed: int = Field(0, description="Seed of initialization and data order.")
    logging_steps: int = Field(25, gt=0, description="Log the training loss every this many steps.")
    threads: int | None = Field(
        None, gt=0, description="CPU threads for torch; null keeps torch's default. One is fastest for tiny models."
    )
    device: Literal["auto", "cpu"] = Field(
        "auto", description="`auto` trains on the GPU when one is present; `cpu` forces the CPU."
    )
    bf16: bool = Field(False, description="Train in bfloat16 mixed precision (GPU).")

    @model_validator(mode="after")
    def _one_student(self) -> TrainConfig:
        if (self.student is None) == (self.architecture is None):
            raise ValueError(
                "set exactly one of `student` (a pretrained model) or `architecture` (a student built from scratch)"
            )
        if self.method == "kd" and self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: nothing to learn from")
        if self.nodes > 1 and self.rendezvous is None:
            raise ValueError(
                f"nodes is {self.nodes} but rendezvous is not set: name a host:port every node reaches "
                "(e.g. the first node's address and a free port, `10.0.0.1:29400`)"
            )
        world = self.nodes * self.num_processes
        if self.batch_size % (world * self.gradient_accumulation_steps):
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by nodes x num_processes x "
                f"gradient_accumulation_steps ({self.nodes} x {self.num_processes} x "
                f"{self.gradient_accumulation_steps})"
            )
        if self.lora is not None and self.student is None:
            raise ValueError("lora needs a pretrained `student`; a student built from scratch trains every weight")
        if self.lr_scheduler == "warmup_stable_decay" and self.warmup_ratio + self.decay_ratio > 1:
            raise ValueError(
                f"warmup_ratio ({self.warmup_ratio}) + decay_ratio ({self.decay_ratio}) is over 1: warming up and "
                "decaying would take more than all the steps; lower one of them"
            )
        return self


MetricGroup = Literal[
    "perplexity",
    "reference_perplexity",
    "kl",
    "agreement",
    "exact_match",
    "rouge_l_teacher",
    "rouge_l_reference",
    "speed",
    "size",
    "win_rate",
]
# Metrics each group adds (roles: teacher, student and, with evaluate.baseline, baseline). `<category>` stands for any
# category name; `parameter_ratio`, `*_parameters` are always computed. A gate may name any of these.
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "perplexity": ("teacher_perplexity", "student_perplexity", "baseline_perplexity"),
    "reference_perplexity": (
        "teacher_reference_perplexity",
        "student_reference_perplexity",
        "baseline_reference_perplexity",
    ),
    "kl": ("kl_teacher_student", "kl_teacher_baseline"),
    "agreement": (
        "student_teacher_agreement",
        "student_top1_agreement",
        "baseline_teacher_agreement",
        "baseline_top1_agreement",
    ),
    "exact_match": (
        "teacher_exact_match",
        "student_exact_match",
        "baseline_exact_match",
        "accuracy_ratio_to_teacher",
        "teacher_exact_match/<category>",
        "student_exact_match/<category>",
        "baseline_exact_match/<category>",
    ),
    "rouge_l_teacher": ("student_rouge_l_teacher", "baseline_rouge_l_teacher"),
    "rouge_l_reference": ("teacher_rouge_l_reference", "student_rouge_l_reference", "baseline_rouge_l_reference"),
    "speed": (
        "teacher_tokens_per_second",
        "student_tokens_per_second",
        "baseline_tokens_per_second",
        "teacher_latency_seconds",
        "student_latency_seconds",
        "baseline_latency_seconds",
        "speed_ratio",
        "latency_ratio",
    ),
    "size": ("teacher_size_mb", "student_size_mb", "baseline_size_mb", "size_ratio"),
    "win_rate": (
        "student_win_rate",
        "student_win_rate_low",
        "student_win_rate_high",
        "baseline_win_rate",
        "baseline_win_rate_low",
        "baseline_win_rate_high",
        "student_win_rate_vs_baseline",
        "student_win_rate_vs_baseline_low",
        "student_win_rate_vs_baseline_high",
    ),
    "always": ("teacher_parameters", "student_parameters", "baseline_parameters", "parameter_ratio"),
}


def metric_group(name: str) -> str | None:
    """The group that computes metric ``name`` (`always` for parameter counts), or None for an unknown name.

    lm-evaluation-harness results (`<role>_lm_eval/<task>/<metric>`) belong to group `lm_eval`.
    """
    if "_lm_eval/" in name:
        return "lm_eval"
    pattern = f"{name.split('/', 1)[0]}/<category>" if "/" in name else name
    return next((group for group, names in METRIC_NAMES.items() if pattern in names), None)


class LmEvalConfig(StrictModel):
    """Standard benchmarks through EleutherAI's lm-evaluation-harness (pip install stillhouse[eval])."""

    tasks: list[str] = Field(
        min_length=1,
        description="lm_eval task names (e.g. `hellaswag`, `gsm8k`) or tasks defined by YAML files in `include_path`.",
    )
    include_path: str | None = Field(
        None,
        description="Folder of extra lm_eval task YAMLs (custom tasks over local files); "
        "null uses lm_eval's own tasks only.",
    )
    limit: int | None = Field(
        None,
        gt=0,
        description="Evaluate at most this many documents per task (quick checks); null runs every document.",
    )
    num_fewshot: int | None = Field(
        None, ge=0, le=64, description="Few-shot examples per prompt; null keeps each task's default."
    )
    batch_size: int = Field(8, gt=0, le=4096, description="Requests per forward pass in lm_eval's HF model.")
    roles: list[Literal["teacher", "student", "baseline"]] = Field(
        default_factory=lambda: ["teacher", "student"],
        min_length=1,
        description="Which models run the benchmarks (the teacher must be a loadable model).",
    )


class GateConfig(StrictModel):
    """Promotion gate: thresholds a candidate student must meet before it becomes `champion` and is published.

    Every threshold left null is not checked, except that a floor relative to the teacher applies by default
    (`default_floor`). Metric names are those of the evaluation report.
    """

    enabled: bool = Field(True, description="Apply the gate; when false every candidate passes and becomes champion.")
    default_floor: bool = Field(
        True,
        description="While min_accuracy_ratio_to_teacher and max_kl are both unset, the candidate must still reach "
        "half the teacher's exact match (when the eval data has references and the teacher gets any right), or else "
        "a token KL to the teacher of at most 2 nats (when the teacher's top-k is stored): a first version that "
        "learned nothing is registered but never promoted. false turns the floor off.",
    )
    min_accuracy_ratio_to_teacher: float | None = Field(
        None,
        gt=0,
        le=10,
        description="Student exact match must be at least this share of the teacher's (e.g. 0.9); needs references.",
    )
    max_kl: float | None = Field(
        None,
        ge=0,
        description="Largest allowed kl_teacher_student (nats per response token); needs sample.top_k_logprobs > 0.",
    )
    must_beat_champion: bool = Field(
        True,
        description="The candidate must not be worse than the version holding the champion alias on `champion_metric` "
        "(within `champion_tolerance`); with no champion yet this check passes.",
    )
    champion_metric: str | None = Field(
        None,
        min_length=1,
        description="Metric compared with the champion; null uses student_exact_match when the eval set has "
        "references, else student_perplexity. Perplexity, KL, latency and size metrics are lower-is-better, "
        "the rest higher-is-better.",
    )
    champion_tolerance: float = Field(
        0.0,
        ge=0,
        description="How much worse (absolute, in the metric's units) than the champion the candidate may be.",
    )
    min: dict[str, float] = Field(
        default_factory=dict, description="Lower bounds on any metric, e.g. {student_exact_match: 0.5}."
    )
    max: dict[str, float] = Field(
        default_factory=dict, description="Upper bounds on any metric, e.g. {student_perplexity: 3.0}."
    )
    champion_alias: str = Field(
        "champion",
        pattern=r"^[A-Za-z][\w-]*$",
        description="Registry alias held by the current best version; moved to a passing candidate.",
    )

    def metric_names(self) -> list[str]:
        """Every metric this gate reads, for checking them against the selected metrics."""
        names = [*self.min, *self.max]
        if self.champion_metric is not None:
            names.append(self.champion_metric)
        return names


class EvaluateConfig(StrictModel):
    """How the student (and the teacher, on the same prompts) is measured."""

    max_prompts: int | None = Field(
        None, gt=0, description="Evaluate on at most this many held-out prompts; null uses the whole eval split."
    )
    max_new_tokens: int = Field(64, gt=0, description="Tokens generated per prompt for exact-match accuracy.")
    batch_size: int = Field(64, gt=0, description="Prompts per batch for generation and scoring.")
    metrics: list[MetricGroup] | None = Field(
        None,
        min_length=1,
        description="Metric groups to compute: perplexity (on teacher responses), reference_perplexity, kl (token KL "
        "teacher‖student), agreement (answer and top-1 token), exact_match, rouge_l_teacher, rouge_l_reference, speed "
        "(tokens/s, latency), size (on disk), win_rate (a judge compares each answer with the teacher's, and the "
        "student's with the baseline's, both orders). Null computes every group the data supports except win_rate; "
        "listing one that needs references the data lacks is an error.",
    )
    baseline: str | None = Field(
        None,
        min_length=1,
        description="Also evaluate this model (e.g. the student's initialization, "
        "a local folder or Hub id) as role `baseline`.",
    )
    judge_model: str | None = Field(
        None,
        min_length=1,
        description="Judge of group win_rate (a local folder or Hub id); null uses the teacher. "
        "Ties and order-inconsistent verdicts count half.",
    )
    win_rate_judge: Literal["model", "verifier"] = Field(
        "model",
        description="Group win_rate: `model` asks the judge model (both orders); `verifier` compares each answer with "
        "the reference (a win when only the first is right, a tie when both or neither are): "
        "for tasks with checkable answers.",
    )
    latency_prompts: int = Field(
        4, gt=0, le=1000, description="Prompts generated one at a time to time per-prompt latency (group `speed`)."
    )
    report: bool = Field(
        True, description="Write report.md, report.html and PNG plots into the evaluate stage's folder."
    )
    lm_eval: LmEvalConfig | None = Field(
        None, description="Standard benchmarks through lm-evaluation-harness; null runs none."
    )
    gate: GateConfig = Field(
        default_factory=GateConfig, description="Promotion gate in front of the champion alias and publishing."
    )

    def selected_groups(self, has_references: bool, has_top_k: bool) -> list[str]:
        """The groups to compute: the configured ones, or (null) every group the data supports."""
        if self.metrics is not None:
            return list(self.metrics)
        groups = [group for group in METRIC_NAMES if group not in ("always", "win_rate")]
        if not has_references:
            groups = [g for g in groups if g not in METRIC_GROUPS_NEEDING_REFERENCES]
        if not has_top_k:
            groups = [g for g in groups if g != "kl"]
        return groups


class JudgeConfig(StrictModel):
    """Who judges the candidates, and how."""

    kind: Literal["pointwise", "pairwise", "verifier"] = Field(
        "pointwise",
        description="`pointwise`: a 1-10 score per response (expected value over the score labels); "
        "`pairwise`: A/B comparisons of each candidate with the first, both orders; `verifier`: "
        "exact match with the reference answer.",
    )
    model: str | None = Field(
        None,
        description="Judge model (a local folder or Hub id); null uses the teacher. Engine `openai`: "
        "the model name the server serves (required).",
    )
    rubric: str | None = Field(
        None,
        description="The judge's prompt with {prompt} and {response} (pointwise) or {prompt}, {first}, {second} "
        "(pairwise); null uses the built-in rubric.",
    )
    tie_margin: float = Field(
        0.05, ge=0, lt=0.5, description="Pairwise: a P(first better) within this of 0.5 is a tie (dropped)."
    )
    engine: Literal["hf", "openai"] = Field(
        "hf",
        description="`hf`: the judge model in this process, labels scored by teacher forcing. `openai`: a served judge "
        "behind an OpenAI-compatible endpoint (`openai`); the verdict is read from its top_logprobs over the labels, "
        "or from its text when it returns none.",
    )
    openai: OpenAIEngineConfig = Field(
        default_factory=OpenAIEngineConfig,
        description="Engine `openai`: endpoint, key variable, concurrency, retries, timeout.",
    )
    top_logprobs: int = Field(
        20,
        ge=0,
        le=1000,
        description="Engine `openai`: log-probs asked per answer position (20 is OpenAI's and vLLM's usual cap); "
        "labels outside them count as improbable. 0 asks for none and parses the text "
        "(for servers that refuse `logprobs`).",
    )
    max_tokens: int = Field(
        4, gt=0, le=64, description="Engine `openai`: most tokens of the judge's answer; it only has to name a label."
    )
    shard_prompts: int = Field(
        256,
        gt=0,
        description="Prompts per shard of the judge stage (candidates sampled, then judged); a finished shard "
        "is kept on disk, so a rerun after a failure judges only the missing ones.",
    )

    @model_validator(mode="after")
    def _served_judge_needs_a_name(self) -> JudgeConfig:
        if self.engine == "openai" and self.kind != "verifier" and not self.model:
            raise ValueError(
                "judge.engine is `openai` but judge.model is not set: "
                "name the model the server serves (e.g. `Qwen/Qwen2.5-7B-Instruct`)"
            )
        return self


class FeedbackConfig(StrictModel):
    """Feedback-guided distillation after the first student: candidates, judged pairs, then DPO or best-of-n SFT."""

    method: Literal["dpo", "best_of_n"] = Field(
        "dpo", description="`dpo` on (best, worst) pairs, or `best_of_n`: SFT on each prompt's best candidate."
    )
    candidates: int = Field(4, ge=2, le=64, description="Responses sampled from the student per prompt.")
    include_teacher: bool = Field(False, description="Add the teacher's stored response to each prompt's candidates.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the candidates.")
    max_new_tokens: int = Field(64, gt=0, description="Most tokens per candidate.")
    max_prompts: int | None = Field(None, gt=0, description="Use at most this many training prompts; null uses all.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The judge.")
    min_margin: float = Field(
        0.5, ge=0, description="Keep a pair only when best and worst scores differ by at least this."
    )
    max_unusable_share: float = Field(
        0.5, ge=0, le=1, description="Fail the stage when more than this share of prompts yield no usable pair."
    )
    beta: float = Field(
        0.1, gt=0, description="DPO beta: how far the policy may move from the reference (the pre-DPO student)."
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="DPO: weight of an added negative log-likelihood of the chosen responses (RPO); 0 is plain DPO.",
    )
    learning_rate: float = Field(5e-4, gt=0, lt=1, description="Learning rate of the DPO or best-of-n SFT step.")
    warmup_ratio: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of the feedback steps spent warming the learning rate up: a fresh optimizer's first, "
        "full-size Adam steps would otherwise jolt the trained student.",
    )
    max_steps: int = Field(100, gt=0, description="Optimizer steps of the DPO or best-of-n SFT step.")
    batch_size: int = Field(32, gt=0, description="Pairs (or examples) per optimizer step.")
    seed: int = Field(0, description="Seed of candidate sampling and training.")
    threads: int | None = Field(None, gt=0, description="CPU threads for torch; null keeps torch's default.")


class TrackingConfig(StrictModel):
    """Where MLflow records runs."""

    uri: str | None = Field(
        None,
        description="MLflow tracking URI; null uses $MLFLOW_TRACKING_URI or, without it, sqlite:///.stillhouse/mlflow.db.",
    )
    experiment: str = Field("stillhouse", min_length=1, description="MLflow experiment name.")

    @field_validator("experiment")
    @classmethod
    def _visible_experiment(cls, experiment: str) -> str:
        return check_name(experiment, "the experiment name")


class RegisterConfig(StrictModel):
    """Registration of the student in the MLflow model registry."""

    enabled: bool = Field(True, description="Log the student as an MLflow model and register a version.")
    model_name: str = Field(min_length=1, description="Registered model name in the MLflow registry.")
    alias: str = Field(
        "candidate", pattern=r"^[A-Za-z][\w-]*$", description="Alias set on the new version (e.g. `candidate`)."
    )

    @field_validator("model_name")
    @classmethod
    def _mlflow_model_name(cls, name: str) -> str:
        """MLflow's own rules for registered model names, checked before training rather than at registration."""
        check_name(name, "the registered model name")
        if "/" in name or ":" in name or name.strip() != name or ".." in name:
            raise ValueError(
                f"{name!r}: MLflow model names can't contain `/` or `:`, `..`, or surrounding spaces; "
                "use e.g. `tiny-student`"
            )
        return name


class SigningConfig(StrictModel):
    """Signing of what is published, with OpenSSF's model-signing library (pip install model-signing)."""

    key: str = Field(
        min_length=1,
        description="The private key (PEM, elliptic curve) that signs: a file path, or `env:NAME` for a variable "
        "holding the PEM itself. Its public key is what `stillhouse pull --verify-key` checks against.",
    )


class StoreConfig(StrictModel):
    """Where stage outputs live, and how much of a stored output is checked before it is reused."""

    root: str = Field(
        ".stillhouse/store", description="Root of the content-addressed artifact store (a folder or s3://)."
    )
    verify: Literal["full", "sizes"] = Field(
        "full",
        description="Checks of a stored output before reuse: `full` compares every file's size and sha256 with its "
        "manifest; `sizes` compares sizes only, and hashes just small files and what is published.",
    )


class PublishConfig(StrictModel):
    """What is written for the Hub, and where it is pushed."""

    repo_id: str | None = Field(
        None,
        description="Hub repo `namespace/name` to push to (ASCII letters, digits, `_`, `.`, `-`; at most 96 "
        "characters a part); null only writes the folder.",
    )

    @field_validator("repo_id")
    @classmethod
    def _hub_repo_id(cls, repo_id: str | None) -> str | None:
        """The Hub's own rules, checked here so that a config can only ever publish to the repo it spells out."""
        if repo_id is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,96}/[A-Za-z0-9_.-]{1,96}", repo_id):
            raise ValueError(
                f"{excerpt(repo_id)} is not a Hub repo id: write `namespace/name` with ASCII letters, digits, `_`, `.` "
                "and `-` only, at most 96 characters a part (e.g. `alice/tiny-student`)"
            )
        for part in (repo_id or "").split("/"):
            if part and (part[0] in ".-" or part[-1] in ".-" or ".." in part or "--" in part):
                raise ValueError(
                    f"{repo_id!r}: each part of a Hub repo id must not start or end with `.` or `-` nor contain `..` "
                    "or `--`; write it as `namespace/name`, e.g. `alice/tiny-student`"
                )
        return repo_id

    endpoint: str | None = Field(None, description="Hub endpoint URL; null uses $HF_ENDPOINT or huggingface.co.")
    token_env: str = Field(
        "HF_TOKEN",
        min_length=1,
        description="Environment variable holding the Hub token (the token itself never goes in a config).",
    )
    private: bool = Field(True, description="Create the Hub repo as private.")
    license: str = Field(
        "apache-2.0",
        description="The student's license id, written into the model card (a Hub id like `apache-2.0` or `llama3.1`, "
        "or a name from stillhouse.licenses such as `qwen`); "
        "checked against the teacher's and base model's terms before publishing.",
    )
    teacher_license: str | None = Field(
        None,
        description="The teacher's license id; null reads `license:` from the teacher folder's README.md "
        "(or the local Hugging Face cache). Needed for a teacher whose license can't be read locally.",
    )
    base_model_license: str | None = Field(
        None, description="License id of train.student (the student's base model); null reads it like teacher_license."
    )
    license_override: str | None = Field(
        None,
        min_length=1,
        description="Publish despite a license check failure; your reason, written into the model card.",
    )
    teacher_name: str | None = Field(
        None,
        min_length=1,
        description="The teacher's public name on the model card and in stillhouse.json (e.g. "
        "`Qwen/Qwen2.5-1.5B-Instruct`); null uses sample.teacher when that is a Hub id, a served model's name or a "
        "`builtin:` model. Needed to push (publish.repo_id) a student whose teacher was read from a local folder.",
    )
    base_model_name: str | None = Field(
        None,
        min_length=1,
        description="The public name of train.student (the base model) on the card and in its `base_model:` "
        "metadata (a Hub id links there); null uses train.student when that is a Hub id. Needed to push a student "
        "fine-tuned from a local folder.",
    )
    dataset_names: list[str] = Field(
        default_factory=list,
        description="Public names of the training data, shown on the card instead of curate's sources; the Hub ids "
        "among them (`org/name`) go into the card's `datasets:` metadata. Empty uses the sources when they are Hub "
        "ids or `builtin:`; needed to push a student trained on local files.",
    )

    @field_validator("teacher_name", "base_model_name", "dataset_names")
    @classmethod
    def _public_names(cls, value: str | list[str] | None, info) -> str | list[str] | None:
        """A public name is what a reader of the Hub page can look up: refuse a local path (the very thing these
        fields keep off the card) and text that can't sit on one line of YAML metadata."""
        where = f"publish.{info.field_name}"
        for name in [value] if isinstance(value, str) else value or []:
            check_name(name, where)
            if not name.strip():
                raise ValueError(f"{where}: a name is empty; write the public name, e.g. Qwen/Qwen2.5-1.5B-Instruct")
            if name.startswith(("/", "~", "./", "../", "file:")) or "\\" in name or re.match(r"[A-Za-z]:[\\/]", name):
                raise ValueError(
                    f"{where}: {excerpt(name)} is a local path; write the public name readers can look up "
                    "instead (a Hub id such as Qwen/Qwen2.5-1.5B-Instruct, or a short description)"
                )
        return value

    tag: str = Field(
        "v{version}",
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="Git tag created on the Hub for each published version; `{version}` is the MLflow "
        "model version (or the publish fingerprint when registry.enabled is false), `{name}` the experiment name.",
    )

    @field_validator("tag")
    @classmethod
    def _tag_format(cls, tag: str) -> str:
        """Only {version} and {name}, with a short format spec, into a git-safe tag: checked before anything runs."""
        check_name(tag, "publish.tag")
        try:
            fields = list(string.Formatter().parse(tag))
        except ValueError as error:
            raise ValueError(f"{tag!r} is not a valid format string ({error}); write e.g. `v{{version}}`") from None
        for _, field, spec, conversion in fields:
            if field is None:
                continue
            if field not in ("version", "name"):
                raise ValueError(f"{tag!r}: unknown field {{{field}}}; only {{version}} and {{name}} are filled in")
            if conversion or not re.fullmatch(r"[<>^]?\d{0,2}", spec or ""):
                raise ValueError(
                    f"{tag!r}: keep the format of {{{field}}} plain (at most a width under 100, e.g. `{{version:>3}}`)"
                )
        example = tag.format(version="1234", name="experiment")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", example.strip()) or example.startswith(("-", ".")):
            raise ValueError(f"{tag!r} gives tags like {example!r}; a Hub tag takes letters, digits, `_`, `.`, `-`")
        return tag

    round_trip_prompts: int = Field(
        4,
        ge=0,
        description="After pushing, download the revision into a fresh cache and compare greedy generations "
        "on this many eval prompts with the local student; 0 skips the check.",
    )
    hub_retries: int = Field(
        4,
        ge=0,
        le=20,
        description="Retries of each idempotent Hub call (create repo, upload commit, tag) "
        "on HTTP 429/5xx and connection errors.",
    )
    retry_backoff_s: float = Field(
        2.0, ge=0, description="First wait before a Hub retry, in seconds; doubled after each try."
    )
    signing: SigningConfig | None = Field(
        None,
        description="Sign the published folder (its files' hashes) with model-signing; the signature travels in the "
        "Hub commit and `stillhouse pull --verify-key` checks it. Null publishes unsigned.",
    )


class PipelineConfig(StrictModel):
    """One distillation experiment: every stage's settings."""

    name: str = Field(
        min_length=1, pattern=r"^[\w.-]+$", description="Experiment name: used for run names and the published folder."
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, name: str) -> str:
        if set(name) == {"."}:  # `.` or `..` would put the published folder outside its stage folder
            raise ValueError(
                f"{name!r} is not usable as a folder name; use letters, digits, `_`, `-` or `.` (e.g. `tiny-run`)"
            )
        return name

    store: StoreConfig = Field(
        default_factory=StoreConfig,
        description="The artifact store: `root` (a folder or s3:// URL; a plain string sets just the root) "
        "and `verify`.",
    )

    @field_validator("store", mode="before")
    @classmethod
    def _store_root_alone(cls, value: Any) -> Any:
        return {"root": value} if isinstance(value, str) else value

    curate: CurateConfig = Field(description="Prompt curation.")
    sample: SampleConfig = Field(description="Teacher sampling.")
    train: TrainConfig = Field(description="Student training.")
    feedback: FeedbackConfig | None = Field(
        None, description="Feedback-guided distillation after training (e.g. dSFT -> dDPO); null skips it."
    )
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluation.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    registry: RegisterConfig = Field(description="MLflow model registry: where the student is registered.")
    publish: PublishConfig = Field(default_factory=PublishConfig, description="Hub publishing.")

    @model_validator(mode="after")
    def _cross_stage_rules(self) -> PipelineConfig:
        problem = capabilities.offline_kd_top_k_problem(
            method=self.train.method, kd_teacher=self.train.kd.teacher, top_k_stored=self.sample.top_k_logprobs > 0
        )
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _served_teacher_rules(self) -> PipelineConfig:
        """With sample.engine `openai` the teacher is a name on a server: only its answers
        (and top-k) reach later stages.

        Its tokenizer is known only through sample.openai.tokenizer; its weights never are. Online KD with it
        is ``train.kd.teacher: served`` (the server scores every batch), never ``online``. The rules live in
        `stillhouse.capabilities`, where the stages check them again on what the sample stage recorded.
        """
        served = self.sample.engine == "openai"
        tokenizer_known = not served or self.sample.openai.tokenizer is not None
        train, evaluate, feedback = self.train, self.evaluate, self.feedback
        listed = evaluate.metrics or []
        problems = [
            capabilities.online_teacher_problem(
                teacher_is_served=served, method=train.method, kd_teacher=train.kd.teacher
            ),
            capabilities.served_kd_vocabulary_problem(
                teacher_tokenizer_known=tokenizer_known, method=train.method, kd_teacher=train.kd.teacher
            ),
            capabilities.kd_vocabulary_problem(teacher_tokenizer_known=tokenizer_known, method=train.method),
            capabilities.student_from_scratch_problem(
                teacher_tokenizer_known=tokenizer_known, student_from_scratch=train.student is None
            ),
            capabilities.feedback_judge_problem(
                teacher_is_served=served, judge_kind=feedback.judge.kind, judge_model=feedback.judge.model
            )
            if feedback
            else None,
            capabilities.win_rate_judge_problem(
                teacher_is_served=served,
                listed_metric_groups=listed,
                win_rate_judge=evaluate.win_rate_judge,
                judge_model=evaluate.judge_model,
            ),
            capabilities.lm_eval_teacher_problem(
                teacher_is_served=served, lm_eval_roles=evaluate.lm_eval.roles if evaluate.lm_eval else []
            ),
            capabilities.teacher_weight_gate_problem(
                teacher_is_served=served, gate_metric_names=evaluate.gate.metric_names()
            ),
        ]
        for problem in problems:  # the first one found is reported
            if problem:
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _evaluation_rules(self) -> PipelineConfig:
        """Evaluation and gate settings the data or the other sections can't satisfy, refused before any sampling."""
        evaluate, gate, curate = self.evaluate, self.evaluate.gate, self.curate
        expected_rows = (
            curate.max_rows
            if curate.max_rows is not None
            else (curate.demo_rows if is_builtin(curate.source) else None)
        )
        if expected_rows is not None and expected_rows * curate.eval_fraction < 1:
            raise ValueError(
                f"the eval set would be empty: {expected_rows} rows x curate.eval_fraction {curate.eval_fraction} "
                "is under one row; raise curate.max_rows or curate.eval_fraction"
            )
        has_references = is_builtin(curate.source) or any(source.reference_column for source in curate.source_list())
        has_top_k = self.sample.top_k_logprobs > 0
        listed = evaluate.metrics or []
        for problem in (
            capabilities.reference_metrics_problem(listed_metric_groups=listed, has_references=has_references),
            capabilities.kl_top_k_problem(listed_metric_groups=listed, top_k_stored=has_top_k),
        ):
            if problem:
                raise ValueError(problem)
        groups = (
            evaluate.selected_groups(has_references, has_top_k) + ["always"] + (["lm_eval"] if evaluate.lm_eval else [])
        )
        checks = [(name, f"evaluate.gate.min.{name}") for name in gate.min] + [
            (name, f"evaluate.gate.max.{name}") for name in gate.max
        ]
        if gate.champion_metric is not None:
            checks.append((gate.champion_metric, "evaluate.gate.champion_metric"))
        if gate.min_accuracy_ratio_to_teacher is not None:
            checks.append(("accuracy_ratio_to_teacher", "evaluate.gate.min_accuracy_ratio_to_teacher"))
        if gate.max_kl is not None:
            checks.append(("kl_teacher_student", "evaluate.gate.max_kl"))
        for name, field in checks:
            group = metric_group(name)
            if group is None:
                known = sorted(n for names in METRIC_NAMES.values() for n in names)
                raise ValueError(
                    f"{field}: unknown metric {name!r}; known metrics: {', '.join(known)} "
                    "(and <role>_lm_eval/<task>/<metric>)"
                )
            if group not in groups:
                why = (
                    "the eval data has no references (set curate.reference_column)"
                    if group in METRIC_GROUPS_NEEDING_REFERENCES and not has_references
                    else "sample.top_k_logprobs is 0"
                    if group == "kl" and not has_top_k
                    else "evaluate.lm_eval is not set"
                    if group == "lm_eval"
                    else f"add {group!r} to evaluate.metrics"
                )
                raise ValueError(
                    f"{field}: metric {name!r} comes from metric group {group!r}, which this config does not compute: "
                    f"{why}"
                )
            if name.startswith("baseline_") and evaluate.baseline is None:
                raise ValueError(
                    f"{field}: metric {name!r} needs evaluate.baseline (the model evaluated as role `baseline`)"
                )
        return self


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides; values are parsed as YAML (`3`, `true`, `null`, `[a, b]`)."""
    for override in overrides:
        path, separator, value = override.partition("=")
        if not separator or not path:
            raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. train.max_steps=100")
        node = raw
        *parents, leaf = path.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if node is raw and part == "store" and isinstance(child, str):  # `store: path` is short for store.root
                child = node[part] = {"root": child}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {override!r}: {part!r} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            reason = str(getattr(error, "problem", None) or error).splitlines()[0]
            raise ConfigError(
                f"--set {excerpt(override)}: the value is not valid YAML ({reason}); quote text that holds YAML "
                f"syntax, e.g. --set '{path}=\"...\"'"
            ) from None
    return raw


# A config is a few kilobytes; these bounds keep a hostile or broken one from taking the machine down.
MAX_CONFIG_BYTES = 1_000_000
MAX_YAML_NODES = 100_000  # after aliases are expanded: a "billion laughs" file is tiny but expands without end
MAX_EXCERPT = 200


def excerpt(value: Any) -> str:
    """``repr(value)``, cut to a bounded length: error messages never echo a whole 10 MB value."""
    text = repr(value)
    return text if len(text) <= MAX_EXCERPT else f"{text[:MAX_EXCERPT]}... ({len(text):,} characters)"


def did_you_mean(location: tuple, key: str) -> str:
    """`; did you mean `max_steps`?` for a mistyped key, from the fields of the section it was found in."""
    model: Any = PipelineConfig
    for part in location:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return ""
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        candidates += [arg for candidate in candidates for arg in typing.get_args(candidate)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def safe_yaml(text: str, origin: str) -> Any:
    """`yaml.safe_load`, refusing documents whose aliases expand past MAX_YAML_NODES (measured before they expand)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        sizes: dict[int, int] = {}

        def expanded(node: yaml.Node) -> int:  # each aliased node is sized once, then reused: linear in the file
            if id(node) not in sizes:
                children = (
                    node.value
                    if isinstance(node, yaml.SequenceNode)
                    else ([item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else [])
                )
                sizes[id(node)] = 1 + sum(expanded(child) for child in children)
                if sizes[id(node)] > MAX_YAML_NODES:
                    raise ConfigError(
                        f"{origin}: the YAML expands to more than {MAX_YAML_NODES:,} values through its aliases "
                        "(`*name`); a config needs far fewer, write the values out"
                    )
            return sizes[id(node)]

        if node is None:
            return None
        expanded(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def format_validation_error(error: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid configuration ({error.error_count()} problem(s)):"]
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        reason = problem["msg"]
        if problem["type"] == "extra_forbidden":
            suggestion = did_you_mean(problem["loc"][:-1], str(problem["loc"][-1]))
            reason = f"unknown key{suggestion or '; check its spelling against `stillhouse schema`'}"
        elif problem["type"] == "missing":
            reason = "required field is missing"
        # A rule across fields already names them; echoing the whole section back would bury the message.
        whole_section = problem["type"] == "value_error" and isinstance(problem.get("input"), dict)
        given = (
            ""
            if problem["type"] in ("missing", "extra_forbidden") or whole_section
            else f" (got {excerpt(problem.get('input'))})"
        )
        lines.append(f"  {location}: {reason}{given}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], origin: str = "<config>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, origin)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML experiment, apply overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass a YAML file such as configs/demo.yaml")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: {path.stat().st_size:,} bytes is too large for a config (the limit is {MAX_CONFIG_BYTES:,}); "
            "keep data in dataset files and point curate.source at them"
        )
    try:
        raw = safe_yaml(path.read_text(errors="replace"), str(path)) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {excerpt(str(error))[1:-1]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (curate, sample, train, ...) at the top level")
    return parse_config(apply_overrides(raw, overrides or []), origin=str(path))

"""What a run can do with what it has: the rules about a served teacher, stored top-k and reference answers, held once.

A *served* teacher (``sample.engine: openai``) is a name on a server. Its answers (and top-k) reach the later
stages through the sample store; its weights never load here, and its tokenizer is known only when
``sample.openai.tokenizer`` names it. White-box KD from the store needs the teacher's top-k stored, and the
metrics that compare with reference answers need data that has them.

The served-teacher rules also cover ``train.kd.teacher: served``, where a server scores the trainer's
sequences: its vocabulary must be known and match the student's, and its server must answer
``prompt_logprobs``. One sampling rule counts the GPUs engine `vllm` asks for (tensor x pipeline x
replicas). The rules that need a server, tokenizers or hardware run in `stillhouse.preflight` and
`sampling.sample.check_teacher`, not in config validation.

Each rule is a pure function over plain facts (is the teacher served, is its tokenizer known, is the top-k
stored, does the data have references) that returns the problem, naming the field and the fix, or None.
`stillhouse.config.PipelineConfig` calls them on the config, so a config that breaks one is refused before
anything runs. The stages call the same functions on what earlier stages recorded (`SamplesRef`, `DatasetRef`):

- a served-teacher or top-k rule broken there means a stage was called with a hand-built config or reference
  (or there is a bug), and `assert_no_problem` raises it as an internal error;
- whether the data has references is known for sure only after curation (a reference column can be empty), so
  the evaluation stage raises the reference rules as `InputError`, an error the user fixes.
"""

from __future__ import annotations

from collections.abc import Collection

SERVED_TEACHER = "the teacher behind sample.engine `openai` is a served model that can't be loaded here"

METRIC_GROUPS_NEEDING_REFERENCES = ("reference_perplexity", "exact_match", "rouge_l_reference")

# Measured on the teacher's weights, so never computed for a served teacher (its answers come from the stored
# responses): its perplexities, speed, size and parameter count, and the student / teacher ratios built on them.
TEACHER_WEIGHT_METRICS = frozenset(
    {
        "teacher_perplexity",
        "teacher_reference_perplexity",
        "teacher_tokens_per_second",
        "teacher_latency_seconds",
        "speed_ratio",
        "latency_ratio",
        "teacher_size_mb",
        "size_ratio",
        "teacher_parameters",
        "parameter_ratio",
    }
)


def assert_no_problem(*problems: str | None) -> None:
    """Raise the first problem as an internal error: a rule config validation enforces, met again at run time.

    A `PipelineConfig` that breaks one of these rules never validates, so a stage meeting one was called
    with a hand-built config or reference, or there is a bug. The message still names the field and the fix.
    """
    for problem in problems:
        if problem is not None:
            raise AssertionError(problem)


# Training.


def online_teacher_problem(*, teacher_is_served: bool, method: str, kd_teacher: str) -> str | None:
    """``train.kd.teacher: online`` scores every batch with the teacher in memory; a served one has no weights here."""
    if teacher_is_served and method == "kd" and kd_teacher == "online":
        return (
            f"{SERVED_TEACHER}, but train.kd.teacher: online needs it in memory; let the server score every batch "
            "(train.kd.teacher: served, with train.kd.online_top_k and sample.openai.tokenizer set), use the stored "
            "top-k (train.kd.teacher: offline, with sample.openai.tokenizer set), or use train.method: sft"
        )
    return None


def served_kd_vocabulary_problem(*, teacher_tokenizer_known: bool, method: str, kd_teacher: str) -> str | None:
    """``train.kd.teacher: served`` gets the server's top-k as token ids; they mean nothing without its vocabulary."""
    if method == "kd" and kd_teacher == "served" and not teacher_tokenizer_known:
        return (
            "train.kd.teacher: served compares the server's top-k token ids with the student's, but the served "
            "teacher's vocabulary is unknown (sample.engine `openai` with sample.openai.tokenizer null); set "
            "sample.openai.tokenizer to the served model's tokenizer (a local folder or Hub id), or use "
            "train.method: sft"
        )
    return None


def served_kd_student_vocabulary_problem(*, method: str, kd_teacher: str, difference: str | None) -> str | None:
    """The served teacher scores the student's own token ids, so both must map tokens to the same ids.

    ``difference`` is `stillhouse.models.vocabulary_difference` of the student's and the teacher's tokenizers
    (None when they agree); a student built from scratch takes the teacher's tokenizer and never differs.
    """
    if method == "kd" and kd_teacher == "served" and difference is not None:
        return (
            "train.kd.teacher: served sends the student's token ids to the teacher's server, but the student's "
            f"vocabulary differs from the teacher's ({difference}); use a student of the teacher's family "
            "(train.student) or build one with the teacher's tokenizer (train.architecture)"
        )
    return None


def served_kd_prompt_logprobs_problem(*, url: str, problem: str | None) -> str | None:
    """A served teacher scores sequences through its completions endpoint's ``prompt_logprobs`` (a vLLM extension).

    ``problem`` is what the probe request (preflight) found wrong with the server's answer, None when it had them.
    """
    if problem is not None:
        return (
            f"train.kd.teacher: served needs the top-k log-probs of given tokens (`prompt_logprobs` on "
            f"{url}/completions), but the server {problem}; run vLLM's OpenAI-compatible server "
            "(`vllm serve MODEL --max-logprobs K`) there, or use train.kd.teacher: offline (the top-k stored "
            "by the sample stage)"
        )
    return None


# Sampling.


def vllm_gpu_problem(
    *, tensor_parallel_size: int, pipeline_parallel_size: int, replicas: int, gpus_available: int, where: str
) -> str | None:
    """Engine `vllm` takes tensor x pipeline GPUs per replica; ``where`` names what ``gpus_available`` counted."""
    needed = tensor_parallel_size * pipeline_parallel_size * replicas
    if needed > gpus_available:
        return (
            f"sample.vllm needs {needed} GPUs (tensor_parallel_size {tensor_parallel_size} x pipeline_parallel_size "
            f"{pipeline_parallel_size} x replicas {replicas}), but {where} has {gpus_available}; lower "
            "sample.vllm.replicas, tensor_parallel_size or pipeline_parallel_size, or set sample.vllm.ray_address "
            "to a Ray cluster with enough GPUs"
        )
    return None


def kd_vocabulary_problem(*, teacher_tokenizer_known: bool, method: str) -> str | None:
    """White-box KD compares token ids, which mean nothing while the teacher's vocabulary is unknown."""
    if method == "kd" and not teacher_tokenizer_known:
        return (
            "train.method `kd` compares the teacher's top-k token ids with the student's, but the served teacher's "
            "vocabulary is unknown (sample.openai.tokenizer is null); set sample.openai.tokenizer to the served "
            "model's tokenizer (a local folder or Hub id) and use a student that shares it, "
            "or use train.method: sft"
        )
    return None


def student_from_scratch_problem(*, teacher_tokenizer_known: bool, student_from_scratch: bool) -> str | None:
    """A student built from ``train.architecture`` takes the teacher's tokenizer, so that tokenizer must be known."""
    if student_from_scratch and not teacher_tokenizer_known:
        return (
            "train.architecture builds the student from scratch with the teacher's tokenizer, but the served "
            "teacher's is unknown (sample.openai.tokenizer is null); set sample.openai.tokenizer to the served "
            "model's tokenizer, or set train.student to a pretrained student"
        )
    return None


def offline_kd_top_k_problem(*, method: str, kd_teacher: str, top_k_stored: bool) -> str | None:
    """``train.kd.teacher: offline`` learns from the top-k the sample stage stored; with k = 0 there is none."""
    if method == "kd" and kd_teacher == "offline" and not top_k_stored:
        return (
            "train.method is `kd` but sample.top_k_logprobs is 0: store the teacher's top-k (e.g. 16), "
            "use train.kd.teacher: online, or use method `sft`"
        )
    return None


# Feedback.


def feedback_judge_problem(*, teacher_is_served: bool, judge_kind: str, judge_model: str | None) -> str | None:
    """A model judge left unnamed (``feedback.judge.model`` null) is the teacher, which must then be loadable."""
    if teacher_is_served and judge_kind != "verifier" and judge_model is None:
        return (
            f"feedback.judge.model is null, so the teacher would judge, but {SERVED_TEACHER}; set "
            "feedback.judge.model (a local judge, or the served name with feedback.judge.engine: openai), "
            "or use feedback.judge.kind: verifier"
        )
    return None


# Evaluation. ``listed_metric_groups`` is what evaluate.metrics lists, empty when it is null: then only the
# groups the data supports are computed, and none of these rules can be broken.


def win_rate_judge_problem(
    *, teacher_is_served: bool, listed_metric_groups: Collection[str], win_rate_judge: str, judge_model: str | None
) -> str | None:
    """Win rate's model judge is the teacher when ``evaluate.judge_model`` is null, which must then be loadable."""
    if teacher_is_served and "win_rate" in listed_metric_groups and win_rate_judge == "model" and judge_model is None:
        return (
            f"evaluate.metrics lists win_rate and evaluate.judge_model is null, so the teacher would judge, "
            f"but {SERVED_TEACHER}; set evaluate.judge_model to a local judge model, "
            "or evaluate.win_rate_judge: verifier"
        )
    return None


def lm_eval_teacher_problem(*, teacher_is_served: bool, lm_eval_roles: Collection[str]) -> str | None:
    """lm-evaluation-harness runs a model in memory. ``lm_eval_roles`` is empty when evaluate.lm_eval is null."""
    if teacher_is_served and "teacher" in lm_eval_roles:
        return f"evaluate.lm_eval.roles lists `teacher`, but {SERVED_TEACHER}; drop `teacher` from the roles"
    return None


def teacher_weight_gate_problem(*, teacher_is_served: bool, gate_metric_names: Collection[str]) -> str | None:
    """A gate can't read a metric a served teacher never gets (`TEACHER_WEIGHT_METRICS`)."""
    if teacher_is_served:
        for name in gate_metric_names:
            if name in TEACHER_WEIGHT_METRICS:
                return (
                    f"evaluate.gate: metric {name!r} is measured on the teacher's weights, but {SERVED_TEACHER}; "
                    "gate on a student metric instead"
                )
    return None


def reference_metrics_problem(*, listed_metric_groups: Collection[str], has_references: bool) -> str | None:
    """Reference perplexity, exact match and ROUGE-L against the references compare with reference answers."""
    needing = [group for group in listed_metric_groups if group in METRIC_GROUPS_NEEDING_REFERENCES]
    if needing and not has_references:
        return (
            f"evaluate.metrics lists {', '.join(needing)}, which need reference answers, but the data has none "
            "(curate sets no reference_column, or its column is empty); set curate.reference_column "
            "(or each source's) to the column holding them, or drop those metrics"
        )
    return None


def verifier_win_rate_problem(
    *, listed_metric_groups: Collection[str], win_rate_judge: str, has_references: bool
) -> str | None:
    """``evaluate.win_rate_judge: verifier`` decides each comparison by the reference answer."""
    if "win_rate" in listed_metric_groups and win_rate_judge == "verifier" and not has_references:
        return (
            "evaluate.win_rate_judge: `verifier` judges by reference answers, but the curated data has none; "
            "set curate.reference_column, or use win_rate_judge: model"
        )
    return None


def kl_top_k_problem(*, listed_metric_groups: Collection[str], top_k_stored: bool) -> str | None:
    """Group ``kl`` compares the student with the teacher's stored top-k."""
    if "kl" in listed_metric_groups and not top_k_stored:
        return (
            "evaluate.metrics lists kl, which needs the teacher's stored top-k: set sample.top_k_logprobs > 0 "
            "or drop kl"
        )
    return None

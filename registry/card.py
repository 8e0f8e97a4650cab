"""The model card and the provenance record of a published student.

The card is a README.md (`huggingface_hub.ModelCard`) whose metadata names the license, base
model, teacher, data, method (`distillation_method`'s short tag) and the evals of teacher and
student (models and data by their public names, `stillhouse.public_names`, never local paths); its
body says how the student was made, in words generated from the config
(`method_description`), with the same evaluation table as the terminal's. ``stillhouse.json``
holds `provenance_record`: the teacher's public name and exact revision, tokenizer fingerprint, store
fingerprints, the config (URL credentials dropped, local paths replaced by public names or ``<local path>``),
the MLflow run that trained the student and the one that published it, the Prefect flow run and the
code version; the stage adds the sha256 of every file beside it (``files``), `content_sha256` (what
identifies this publish on the Hub, so an interrupted push completes instead of committing twice)
and, when the folder is signed, the signature's file and the sha256 of the public key that checks it.

    card = model_card(config, dataset, samples, student, report, check, lineage)
    print(method_description(config))   # "white-box distillation: forward KL(teacher‖student) to ..."
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, metadata
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from stillhouse.config import PipelineConfig
from stillhouse.evaluation.report import comparison_rows
from stillhouse.health import redact_url_credentials
from stillhouse.licenses import LICENSES, LicenseCheck
from stillhouse.public_names import LOCAL, PublicNames, is_hub_id, is_local_path, public_names
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.registry.signing import SIGNATURE_FILE

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A student distilled by {{ project }} from the teacher **{{ teacher }}**
(revision `{{ teacher_revision }}`) with {{ method_long }}.
It has {{ parameters }} parameters{{ ratio }}{{ base_model_sentence }}.

## How it was made

| | |
|---|---|
| teacher | {{ teacher }} @ `{{ teacher_revision }}` |
| base model | {{ base_model }} |
| method | {{ method_long }} |
| data | {{ data }} |
| prompts | {{ train_rows }} for training, {{ eval_rows }} held out for evaluation |
| teacher outputs | {{ sample_rows }} responses (to training and held-out prompts), {{ generated_tokens }} tokens |
| training | {{ train_seconds }} ({{ train_steps }}) |

## Evaluation (held-out prompts)

| metric | teacher | student |
|---|---|---|
{{ metric_rows }}

## Intended use

Research and applications similar to the data it was distilled on ({{ data }}): a smaller, cheaper
stand-in for the teacher on those tasks. Compare it with the teacher on your own prompts before
relying on it.

## Limitations

A distilled student reproduces its teacher's mistakes and biases and adds its own: it was trained on the
teacher's responses to {{ train_rows }} training prompts only, is weaker than the teacher outside that distribution, and
was not safety-tuned beyond what it learned from the teacher. The evaluation above covers
{{ eval_rows }} held-out prompts from the same data, not general ability.

## License

{{ license_text }}

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{{ repo }}")
model = AutoModelForCausalLM.from_pretrained("{{ repo }}")
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "..."}], tokenize=False, add_generation_prompt=True)
inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0][inputs["input_ids"].shape[1]:], \
skip_special_tokens=True))
```

or, with checksums verified against `stillhouse.json`: `stillhouse pull {{ repo }} --prompt "..."`.

## Provenance

`stillhouse.json` records the teacher revision, tokenizer fingerprint, the store fingerprints of
every stage (data `{{ data_fingerprint }}`, teacher outputs `{{ samples_fingerprint }}`, student
`{{ student_fingerprint }}`), the full config and the sha256 of every file. Trained in MLflow run
{{ mlflow_link }}{{ flow_run_sentence }}{{ publish_run_sentence }}; code version `{{ code_version }}`.
"""

PROVENANCE_FILE = "stillhouse.json"
# Files that differ between two runs of the same publish (they name the MLflow and Prefect runs): left out of
# `content_sha256`, which is the same for every run that publishes the same thing.
RUN_SPECIFIC_FILES = frozenset({"README.md", PROVENANCE_FILE, SIGNATURE_FILE})


def content_sha256(files: dict[str, dict], publish_fingerprint: str | None) -> str:
    """The identity of a publish: the sha256 of ``{"files": {name: sha256}, "publish_fingerprint": ...}`` (JSON,
    sorted keys, no spaces) over every file but `RUN_SPECIFIC_FILES`.

    Same weights, tokenizer and config published by the same publish stage (its fingerprint covers the
    publish settings, the student, the evaluation and the registered version) give the same value,
    whichever run pushed them: a rerun finds its own commit on the Hub by it.
    """
    payload = {
        "files": {name: entry["sha256"] for name, entry in files.items() if name not in RUN_SPECIFIC_FILES},
        "publish_fingerprint": publish_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# How each `train.kd.kind` reads on a card (the formulas are in stillhouse.training.losses).
DIVERGENCES = {
    "forward_kl": "forward KL(teacher‖student)",
    "reverse_kl": "reverse KL(student‖teacher)",
    "jsd": "generalized JSD (β = {beta:g})",
    "skew_forward_kl": "skew forward KL (α = {alpha:g})",
    "skew_reverse_kl": "skew reverse KL (α = {alpha:g})",
    "tvd": "total variation distance",
}
# How a top-k teacher's missing mass was handled (`train.kd.tail`).
TAILS = {
    "bucket": "the rest of the teacher's mass as one extra outcome (tail: bucket)",
    "renormalize": "both distributions renormalized over the top-k ids (tail: renormalize)",
}


def distillation_method(config: PipelineConfig) -> str:
    """The method as one tag: ``sft``, ``kd``, ``gkd``, with ``+dpo`` / ``+best_of_n`` for a feedback stage."""
    method = "gkd" if config.train.method == "kd" and config.train.kd.lmbda > 0 else config.train.method
    return f"{method}+{config.feedback.method}" if config.feedback is not None else method


def method_description(config: PipelineConfig) -> str:
    """The card's method line, in words, from the config: what the student learned from, and how.

    One clause per setting that changes what was learned, in this order: the kind of distillation and
    the divergence; where the teacher's distribution came from; a top-k teacher's tail handling; τ;
    the loss weights; the on-policy share λ and its rollouts; then the feedback stage. A new setting
    of that sort (a cross-tokenizer ``train.kd.align``, say) is one more ``clauses.append``.
    """
    train, kd = config.train, config.train.kd
    if train.method == "sft":
        clauses = ["black-box distillation: SFT (cross-entropy) on the teacher's responses"]
    else:
        on_policy = kd.lmbda > 0
        if kd.teacher == "online":
            source = (
                f"the online teacher's top-{kd.online_top_k} log-probs"
                if kd.online_top_k is not None
                else "the online teacher's full distribution"
            ) + " (in memory)"
        elif config.sample.engine == "openai":
            source = (
                f"the served teacher's top-{config.sample.top_k_logprobs} log-probs stored by the sample stage "
                "(sample.engine openai)"
            )
        else:
            source = f"the teacher's top-{config.sample.top_k_logprobs} log-probs stored by the sample stage"
        kind = "on-policy distillation (GKD)" if on_policy else "white-box distillation"
        clauses = [f"{kind}: {DIVERGENCES[kd.kind].format(beta=kd.beta, alpha=kd.alpha)} to {source}"]
        if kd.teacher == "offline" or kd.online_top_k is not None:  # a dense teacher has no tail to handle
            clauses.append(TAILS[kd.tail])
        clauses.append(f"temperature τ = {kd.temperature:g}")
        terms = ([f"{train.kd_weight:g} × divergence"] if train.kd_weight > 0 else []) + (
            [f"{train.ce_weight:g} × cross-entropy"] if train.ce_weight > 0 else []
        )
        clauses.append("loss = " + " + ".join(terms) + " on the teacher's responses")
        if on_policy:
            clauses.append(
                f"on a λ = {kd.lmbda:g} share of batches the student's own samples instead (at most "
                f"{kd.rollout_max_new_tokens} new tokens at temperature {kd.rollout_temperature:g}), "
                "scored by the teacher without cross-entropy"
            )
    description = ", ".join(clauses)
    feedback = config.feedback
    if feedback is not None:
        # With include_teacher, the teacher's stored response competes with the student's samples.
        candidates = feedback.candidates + (1 if feedback.include_teacher else 0)
        judged = f"{candidates} candidates per prompt ({feedback.judge.kind} judge)"
        if feedback.method == "dpo":
            description += f"; then DPO (β = {feedback.beta:g}) on the judged best and worst of {judged}"
            if feedback.sft_weight > 0:
                description += f", plus {feedback.sft_weight:g} × the chosen responses' NLL (RPO)"
        else:
            description += f"; then best-of-n: SFT on the judged best of {judged}"
    return description


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page when MLflow is a server (http/https); None for a local sqlite/file store."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{redact_url_credentials(tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def project_link(urls: list[str] | None = None) -> str:
    """ "Stillhouse", linked to the project's page when the installed package declares one (pyproject's
    ``[project.urls]``, read back as ``Project-URL: Label, URL``); never a made-up address."""
    if urls is None:
        try:
            urls = metadata("stillhouse").get_all("Project-URL") or []
        except PackageNotFoundError:
            urls = []
    by_label = {label.strip().lower(): url.strip() for label, _, url in (entry.partition(",") for entry in urls)}
    for label in ("homepage", "repository", "source", "source code", "documentation"):
        if by_label.get(label, "").startswith("https://"):
            return f"[Stillhouse]({by_label[label]})"
    return "Stillhouse"


def eval_results(metrics: dict[str, float], dataset_name: str) -> list[EvalResult]:
    """The model-index results of teacher and student on the held-out prompts.

    One model-index entry, with the role in each metric's name ("teacher exact_match"): huggingface_hub
    reads a model-index as one model's flat list of results, so a second entry for the teacher would
    be merged into the student's under the last entry's name.
    """
    wanted = ("exact_match", "rouge_l", "perplexity", "reference_perplexity", "top1_agreement", "judge_win_rate")
    return [
        EvalResult(
            task_type="text-generation",
            dataset_type="stillhouse-eval",
            dataset_name=dataset_name,
            metric_type=name,
            metric_name=f"{role} {name}",
            metric_value=round(float(metrics[f"{role}_{name}"]), 4),
        )
        for role in ("teacher", "student")
        for name in wanted
        if f"{role}_{name}" in metrics
    ]


def evaluation_rows(metrics: dict[str, float]) -> list[str]:
    """The card's evaluation table rows, teacher and student columns: the terminal table's rows and labels."""
    header, rows = comparison_rows(metrics)
    columns = [header.index(role) if role in header else None for role in ("teacher", "student")]
    lines = []
    for row in rows:
        cells = [row[column] if column is not None else "" for column in columns]
        if any(cells):  # a row with a baseline's number only has nothing to show here
            label = row[0].replace("<", "&lt;").replace(">", "&gt;")  # `kl_teacher_<role>` is not an HTML tag to hide
            lines.append(f"| {label} | " + " | ".join(cell or "–" for cell in cells) + " |")
    return lines


def license_section(config: PipelineConfig, check: LicenseCheck, names: PublicNames) -> str:
    student = LICENSES.get(check.student_license)
    lines = [
        f"This model is released under **{student.name if student else config.publish.license}**"
        + (f" ({student.url})." if student else ".")
    ]
    if check.teacher_license:
        lines.append(
            f"The teacher {names.teacher} is under `{check.teacher_license}`"
            + (f"; the base model {names.base_model} under `{check.base_model_license}`." if names.base_model else ".")
        )
    if check.obligations:
        lines.append("\nTerms passed on from the teacher and base model:\n")
        lines += [f"- {line}" for line in check.obligations]
    if check.violations:
        title = (
            "**License override.** Published despite the license check, for this reason given by the publisher: "
            f"“{config.publish.license_override}”"
            if config.publish.license_override
            else "**Not publishable as is.** The license check reported:"
        )
        lines.append(f"\n{title}\n")
        lines += [
            f"- {violation.message}" + (f" ({violation.clause.quote()})" if violation.clause else "")
            for violation in check.violations
        ]
    return "\n".join(lines)


def model_card(
    config: PipelineConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    student: ModelRef,
    report: EvalReport,
    check: LicenseCheck,
    lineage: dict,
) -> ModelCard:
    """The model card: Hub metadata (license, base_model, tags, datasets, model-index for teacher and student) and a
    body.

    Models and data are named by their public names (`stillhouse.public_names`), never by the local paths they
    were read from; the MLflow run is the one that trained the student (``lineage["mlflow_run_id"]``), and the
    run that published it is named beside it when it is another.
    """
    metrics, method = report.metrics, distillation_method(config)
    names = public_names(config)
    student_license = LICENSES.get(check.student_license)
    license_fields = (
        {"license": check.student_license}
        if student_license is None or student_license.hub_id
        else {"license": "other", "license_name": check.student_license, "license_link": student_license.url}
    )
    model_name = (config.publish.repo_id or config.name).split("/")[-1]
    data = ModelCardData(
        **license_fields,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["distillation", "stillhouse", *method.split("+"), f"distillation-{method.split('+')[0]}"],
        base_model=names.base_model if is_hub_id(names.base_model) else None,  # the Hub links it: ids only
        datasets=[name for name in names.datasets if is_hub_id(name)] or None,
        model_name=model_name,
        eval_results=eval_results(metrics, f"{config.name} held-out prompts") or None,
    )
    data.stillhouse = {
        "teacher": names.teacher,
        "teacher_revision": samples.teacher_revision,
        "method": method,
        "data": names.datasets,
        "mlflow_run_id": lineage.get("mlflow_run_id"),
    }
    run_url = lineage.get("mlflow_run_url")
    run_id = lineage.get("mlflow_run_id") or "(not tracked)"
    flow_run = lineage.get("prefect_flow_run_id")
    publish_run = lineage.get("mlflow_publish_run_id")
    return ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        model_name=model_name,
        project=project_link(),
        teacher=names.teacher,
        teacher_revision=samples.teacher_revision,
        method_long=method_description(config),
        parameters=f"{student.parameters:,}",
        ratio=f" ({metrics['parameter_ratio']:.1%} of the teacher's)"
        if "parameter_ratio" in metrics
        else "",  # a served teacher's size is unknown
        base_model_sentence=f", fine-tuned from {names.base_model}" if names.base_model else ", trained from scratch",
        base_model=names.base_model or "none: initialized from scratch",
        data=", ".join(names.datasets),
        train_rows=f"{dataset.train_rows:,}",
        eval_rows=f"{dataset.eval_rows:,}",
        sample_rows=f"{samples.rows:,}",
        generated_tokens=f"{samples.generated_tokens:,}",
        train_seconds=f"{student.train_seconds:,.0f} s of training",
        train_steps=f"{config.train.max_steps} steps, batch {config.train.batch_size}",
        metric_rows="\n".join(evaluation_rows(metrics)) or "| (none) | – | – |",
        license_text=license_section(config, check, names),
        repo=config.publish.repo_id or "PATH_TO_THIS_FOLDER",
        data_fingerprint=dataset.fingerprint,
        samples_fingerprint=samples.fingerprint,
        student_fingerprint=student.fingerprint,
        mlflow_link=f"[`{run_id}`]({run_url})"
        if run_url
        else f"`{run_id}` (experiment `{config.tracking.experiment}`)",
        flow_run_sentence=f" from Prefect flow run `{flow_run}`" if flow_run else "",
        publish_run_sentence=f"; published from MLflow run `{publish_run}`"
        if publish_run and publish_run != lineage.get("mlflow_run_id")
        else "",
        code_version=lineage.get("code_version", "unknown"),
    )


def public_values(value: Any, replacements: dict[str, str]) -> Any:
    """``value`` (JSON-like) with every local path replaced: a reference that has a public name by that name, any
    other path on this machine (the store, a sqlite tracking database, a key file) by ``<local path>``."""
    if isinstance(value, dict):
        return {key: public_values(item, replacements) for key, item in value.items()}
    if isinstance(value, list):
        return [public_values(item, replacements) for item in value]
    if isinstance(value, str):
        if value in replacements:
            return replacements[value]
        if value.startswith(("/", "~", "file:", "sqlite:///")):
            return LOCAL
    return value


def provenance_record(
    config: PipelineConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    student: ModelRef,
    report: EvalReport,
    lineage: dict,
) -> dict:
    """What ``stillhouse.json`` says about where the student came from (the file checksums are added when written).

    It is published with the card: the teacher, base model and data are named by their public names, and
    every other local path (the store, an sqlite tracking database, a signing key file) reads ``<local path>``;
    what identifies their content stays: the teacher's revision (a hash of a local folder's files) and the
    store fingerprints.
    """
    names = public_names(config)
    replacements = {}
    if is_local_path(config.sample.teacher):
        replacements[config.sample.teacher] = names.teacher if config.publish.teacher_name else LOCAL
    if is_local_path(config.train.student):
        replacements[config.train.student] = names.base_model if config.publish.base_model_name else LOCAL
    for entry in config.curate.source_list():
        if is_local_path(entry.source):
            replacements[entry.source] = LOCAL
    record = {
        "pipeline": config.name,
        "teacher": {
            "id": names.teacher,
            "revision": samples.teacher_revision,
            "tokenizer_fingerprint": samples.tokenizer_fingerprint,
        },
        "base_model": names.base_model,
        "method": distillation_method(config),
        "fingerprints": {ref.stage: ref.fingerprint for ref in (dataset, samples, student, report)},
        "data": {
            "sources": names.datasets,
            "train_rows": dataset.train_rows,
            "eval_rows": dataset.eval_rows,
            "sample_rows": samples.rows,
        },
        # Secrets never live in the config (only the *names* of environment variables), and URL credentials are dropped.
        "config": redact_url_credentials(config.model_dump(mode="json")),
        **lineage,
    }
    return public_values(record, replacements)

"""Publishing: the exact folder that goes to the Hub, the push, and the round trip that checks it.

The folder holds safetensors weights, config, generation config, the tokenizer with its chat
template, a README.md model card (`huggingface_hub.ModelCard`) whose metadata names the license,
base model, teacher, data, method and evals of teacher and student, and ``stillhouse.json``: the
provenance (teacher id and exact revision, tokenizer fingerprint, store fingerprints, the config,
the MLflow run, the Prefect flow run, the code version) and the sha256 of every file beside it. It
loads with plain ``AutoModelForCausalLM.from_pretrained``.

The push uses the real ``huggingface_hub`` client: ``create_repo`` with the configured visibility,
then the whole folder as **one commit** (``create_commit``, pinned to the branch head it was
prepared against, so a retried commit can never land twice), then a git tag for the version.
Each of those calls is retried with backoff on 429/5xx answers and dropped connections; nothing
else is retried. The token is read from the environment (``publish.token_env``) and never written
anywhere.

    folder = write_publish_folder(...)
    published = push_folder(folder, config, tag="v3")
    round_trip(published, folder, prompts, config)   # download into a fresh cache, compare greedy generations
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, EvalResult, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile
from pydantic import BaseModel

from stillhouse.config import PipelineConfig
from stillhouse.errors import InputError, StillhouseError
from stillhouse.licenses import LICENSES, LicenseCheck
from stillhouse.models import load_causal_lm, load_tokenizer
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.store import file_sha256

PROVENANCE_FILE = "stillhouse.json"
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
Result = TypeVar("Result")

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A student distilled by [Stillhouse](https://github.com/stillhouse) from the teacher **{{ teacher }}**
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
| teacher outputs | {{ sample_rows }} responses, {{ generated_tokens }} generated tokens |
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

A distilled student reproduces its teacher's mistakes and biases and adds its own: it was trained on
{{ sample_rows }} teacher responses only, is weaker than the teacher outside that distribution, and
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
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

or, with checksums verified against `stillhouse.json`: `stillhouse pull {{ repo }} --prompt "..."`.

## Provenance

`stillhouse.json` records the teacher revision, tokenizer fingerprint, the store fingerprints of
every stage (data `{{ data_fingerprint }}`, teacher outputs `{{ samples_fingerprint }}`, student
`{{ student_fingerprint }}`), the full config and the sha256 of every file. Tracked as MLflow run
{{ mlflow_link }}{{ flow_run_sentence }}; code version `{{ code_version }}`.
"""

METHODS = {
    "sft": "black-box distillation: SFT on the teacher's responses",
    "kd": "white-box distillation: KL to the teacher's top-k log-probs, mixed with cross-entropy",
    "gkd": "on-policy distillation (GKD): KL to the teacher on a share of the student's own samples",
    "dpo": "then DPO on judged preference pairs",
    "best_of_n": "then SFT on the judged best of n samples",
}


class PublishedModel(BaseModel):
    folder: str
    cached: bool = False
    repo_id: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    tag: str | None = None
    revision_url: str | None = None


class RoundTrip(BaseModel):
    """A published revision downloaded into a fresh cache and compared with the local student."""

    prompts: int
    matching: int
    seconds: float
    mismatches: list[str] = []

    @property
    def passed(self) -> bool:
        return self.prompts > 0 and self.matching == self.prompts


def distillation_method(config: PipelineConfig) -> str:
    """The method as one tag: ``sft``, ``kd``, ``gkd``, with ``+dpo`` / ``+best_of_n`` for a feedback stage."""
    method = "gkd" if config.train.method == "kd" and config.train.kd.lmbda > 0 else config.train.method
    return f"{method}+{config.feedback.method}" if config.feedback is not None else method


def redact_url_credentials(value):
    """Drop ``user:password@`` from URLs anywhere in a config dump: a tracking URI may carry them."""
    if isinstance(value, dict):
        return {key: redact_url_credentials(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_url_credentials(item) for item in value]
    if isinstance(value, str):
        return re.sub(r"(\w+://)[^/@\s]+@", r"\1", value)
    return value


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page when MLflow is a server (http/https); None for a local sqlite/file store."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{redact_url_credentials(tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def hub_datasets(config: PipelineConfig) -> list[str]:
    """Hub dataset ids among the curation sources; local files and the demo are named in the card's body only."""
    names = [entry.source for entry in config.curate.source_list()]
    return [name for name in names if not name.startswith(("builtin:", "/", ".", "~")) and not Path(name).exists()]


def looks_like_hub_id(reference: str | None) -> bool:
    return bool(reference) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", reference) is not None and not Path(reference).exists()


def eval_results(metrics: dict[str, float], dataset_name: str) -> list[EvalResult]:
    """The model-index results of teacher and student on the held-out prompts.

    One model-index entry, with the role in each metric's name ("teacher exact_match"): huggingface_hub
    reads a model-index as one model's flat list of results, so a second entry for the teacher would
    be merged into the student's under the last entry's name.
    """
    wanted = ("exact_match", "rouge_l", "perplexity", "reference_perplexity", "top1_agreement", "judge_win_rate")
    return [
        EvalResult(task_type="text-generation", dataset_type="stillhouse-eval", dataset_name=dataset_name, metric_type=name,
                   metric_name=f"{role} {name}", metric_value=round(float(metrics[f"{role}_{name}"]), 4))
        for role in ("teacher", "student") for name in wanted if f"{role}_{name}" in metrics
    ]


def license_section(config: PipelineConfig, check: LicenseCheck) -> str:
    student = LICENSES.get(check.student_license)
    lines = [f"This model is released under **{student.name if student else config.publish.license}**"
             + (f" ({student.url})." if student else ".")]
    if check.teacher_license:
        lines.append(f"The teacher {config.sample.teacher} is under `{check.teacher_license}`"
                     + (f"; the base model {config.train.student} under `{check.base_model_license}`." if config.train.student else "."))
    if check.obligations:
        lines.append("\nTerms passed on from the teacher and base model:\n")
        lines += [f"- {line}" for line in check.obligations]
    if check.violations:
        title = ("**License override.** Published despite the license check, for this reason given by the publisher: "
                 f"“{config.publish.license_override}”" if config.publish.license_override
                 else "**Not publishable as is.** The license check reported:")
        lines.append(f"\n{title}\n")
        lines += [f"- {violation.message}" + (f" ({violation.clause.quote()})" if violation.clause else "") for violation in check.violations]
    return "\n".join(lines)


def model_card(
    config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, report: EvalReport,
    check: LicenseCheck, lineage: dict,
) -> ModelCard:
    """The model card: Hub metadata (license, base_model, tags, datasets, model-index for teacher and student) and a body."""
    metrics, method = report.metrics, distillation_method(config)
    data_sources = [entry.source for entry in config.curate.source_list()]
    student_license = LICENSES.get(check.student_license)
    license_fields = ({"license": check.student_license} if student_license is None or student_license.hub_id
                      else {"license": "other", "license_name": check.student_license, "license_link": student_license.url})
    base_model = config.train.student if looks_like_hub_id(config.train.student) else None
    model_name = (config.publish.repo_id or config.name).split("/")[-1]
    data = ModelCardData(
        **license_fields, library_name="transformers", pipeline_tag="text-generation",
        tags=["distillation", "stillhouse", *method.split("+"), f"distillation-{method.split('+')[0]}"],
        base_model=base_model, datasets=hub_datasets(config) or None,
        model_name=model_name, eval_results=eval_results(metrics, f"{config.name} held-out prompts") or None,
    )
    data.stillhouse = {"teacher": config.sample.teacher, "teacher_revision": samples.teacher_revision, "method": method,
                       "data": data_sources, "mlflow_run_id": lineage.get("mlflow_run_id")}
    rows = []
    for name in sorted({key.split("_", 1)[1] for key in metrics if key.startswith(("teacher_", "student_"))}):
        cells = [f"{metrics[f'{role}_{name}']:.4g}" if f"{role}_{name}" in metrics else "–" for role in ("teacher", "student")]
        rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    run_url = lineage.get("mlflow_run_url")
    run_id = lineage.get("mlflow_run_id") or "(not tracked)"
    flow_run = lineage.get("prefect_flow_run_id")
    return ModelCard.from_template(
        data, template_str=CARD_TEMPLATE, model_name=model_name, teacher=config.sample.teacher, teacher_revision=samples.teacher_revision,
        method_long=", ".join(METHODS[part] for part in method.split("+")),
        parameters=f"{student.parameters:,}", ratio=f" ({metrics['parameter_ratio']:.1%} of the teacher's)" if "parameter_ratio" in metrics else "",  # a served teacher's size is unknown
        base_model_sentence=f", fine-tuned from {config.train.student}" if config.train.student else ", trained from scratch",
        base_model=config.train.student or "none: initialized from scratch",
        data=", ".join(data_sources), train_rows=f"{dataset.train_rows:,}", eval_rows=f"{dataset.eval_rows:,}",
        sample_rows=f"{samples.rows:,}", generated_tokens=f"{samples.generated_tokens:,}",
        train_seconds=f"{student.train_seconds:,.0f} s of training", train_steps=f"{config.train.max_steps} steps, batch {config.train.batch_size}",
        metric_rows="\n".join(rows) or "| (none) | – | – |", license_text=license_section(config, check),
        repo=config.publish.repo_id or "PATH_TO_THIS_FOLDER",
        data_fingerprint=dataset.fingerprint, samples_fingerprint=samples.fingerprint, student_fingerprint=student.fingerprint,
        mlflow_link=f"[`{run_id}`]({run_url})" if run_url else f"`{run_id}` (experiment `{config.tracking.experiment}`)",
        flow_run_sentence=f" from Prefect flow run `{flow_run}`" if flow_run else "", code_version=lineage.get("code_version", "unknown"),
    )


def provenance_record(
    config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, report: EvalReport, lineage: dict,
) -> dict:
    """What ``stillhouse.json`` says about where the student came from (the file checksums are added when written)."""
    return {
        "pipeline": config.name,
        "teacher": {"id": config.sample.teacher, "revision": samples.teacher_revision, "tokenizer_fingerprint": samples.tokenizer_fingerprint},
        "base_model": config.train.student,
        "method": distillation_method(config),
        "fingerprints": {ref.stage: ref.fingerprint for ref in (dataset, samples, student, report)},
        "data": {"train_rows": dataset.train_rows, "eval_rows": dataset.eval_rows, "sample_rows": samples.rows},
        # Secrets never live in the config (only the *names* of environment variables), and URL credentials are dropped.
        "config": redact_url_credentials(config.model_dump(mode="json")),
        **lineage,
    }


def write_publish_folder(
    folder: Path, config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, report: EvalReport,
    check: LicenseCheck, lineage: dict,
) -> Path:
    """Write exactly what would be pushed; replaces the folder's previous content."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # Load and save rather than copy: trainer folders can hold extras (training_args.bin) that don't belong on the Hub.
    model, tokenizer = load_causal_lm(student.model_path, device="cpu"), load_tokenizer(student.model_path)
    model.save_pretrained(folder)  # safetensors, config.json, generation_config.json
    tokenizer.save_pretrained(folder)  # tokenizer.json, tokenizer_config.json, chat template
    card = model_card(config, dataset, samples, student, report, check, lineage)
    (folder / "README.md").write_text(card.content.rstrip("\n") + "\n")  # Jinja drops the template's final newline
    record = provenance_record(config, dataset, samples, student, report, lineage)
    record["files"] = {path.name: {"sha256": file_sha256(path), "size": path.stat().st_size} for path in sorted(folder.iterdir()) if path.is_file()}
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return folder


# -- the push -------------------------------------------------------------------------------------


def hub_failure(error: BaseException | None) -> HfHubHTTPError | httpx2.TransportError | None:
    """The Hub's answer or the network error behind ``error``; the client wraps LFS upload failures in a RuntimeError."""
    while error is not None:
        if isinstance(error, (HfHubHTTPError, httpx2.TransportError)):
            return error
        error = error.__cause__
    return None


def is_transient(error: BaseException) -> bool:
    """429 and 5xx answers, timeouts and dropped connections: worth another try. A 4xx is an answer, not a hiccup."""
    failure = hub_failure(error)
    if isinstance(failure, HfHubHTTPError) and failure.response is not None:
        return failure.response.status_code in TRANSIENT_STATUS
    return isinstance(failure, httpx2.TransportError)


def with_retries(step: str, call: Callable[[], Result], retries: int, backoff_s: float, log: Callable[[str], None] = print) -> Result:
    """``call()``, retried up to ``retries`` times on transient errors, waiting backoff_s, 2x, 4x ... Only for idempotent steps."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as error:
            if not is_transient(error) or attempt == retries:
                raise
            wait = backoff_s * 2**attempt
            log(f"Hub {step}: {describe_hub_error(error)}; retry {attempt + 1}/{retries} in {wait:.1f}s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def describe_hub_error(error: BaseException) -> str:
    failure = hub_failure(error) or error
    context = f"{error} " if failure is not error else ""  # e.g. "Error while uploading 'model.safetensors' to the Hub."
    if isinstance(failure, HfHubHTTPError) and failure.response is not None:
        return f"{context}HTTP {failure.response.status_code} {failure.response.headers.get('X-Error-Message') or failure.response.reason_phrase}"
    return f"{context}{type(failure).__name__}: {failure}"


def hub_token(config: PipelineConfig) -> str:
    token = os.environ.get(config.publish.token_env)
    if not token:
        raise InputError(f"publish.repo_id is set but ${config.publish.token_env} is empty; export a Hub token with write access in "
                         f"{config.publish.token_env}, or set publish.repo_id: null")
    return token


def hub_api(endpoint: str | None, token: str | bool | None) -> HfApi:
    if endpoint and "huggingface.co" not in endpoint:
        # A self-hosted Hub speaks plain LFS, not xet; the client reads this constant on every call.
        constants.HF_HUB_DISABLE_XET = True
    return HfApi(endpoint=endpoint, token=token)


def commit_operations(api: HfApi, folder: Path, repo_id: str, head: str) -> list:
    """Every file of the folder, and deletions of files the previous revision has that this one doesn't."""
    local = sorted(path.name for path in folder.iterdir() if path.is_file())
    remote = [entry.path for entry in api.list_repo_tree(repo_id, revision=head, recursive=True) if isinstance(entry, RepoFile)]
    stale = [path for path in remote if path not in local and path != ".gitattributes"]
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in local] + [
        CommitOperationDelete(path_in_repo=path) for path in stale]


def push_folder(folder: Path, config: PipelineConfig, tag: str | None = None, description: str = "", log: Callable[[str], None] = print) -> PublishedModel:
    """Create the repo if needed, upload the folder as one commit, tag it; each Hub call retried on transient errors.

    Raises `StillhouseError` with the Hub's answer when the push fails for good; the repo's previous
    revision is untouched then, since a commit is applied whole or not at all.
    """
    settings = config.publish
    api = hub_api(settings.endpoint, hub_token(config))
    repo_id, retries, backoff = settings.repo_id, settings.hub_retries, settings.retry_backoff_s
    message = f"Stillhouse: publish {config.name}" + (f" {tag}" if tag else "")
    try:
        with_retries("create repo", lambda: api.create_repo(repo_id, private=settings.private, exist_ok=True, repo_type="model"), retries, backoff, log)
        head = with_retries("read head", lambda: api.model_info(repo_id, revision="main").sha, retries, backoff, log)

        def commit():
            # Pinned to `head`: if an earlier try did land, this one is refused (412) instead of committing twice.
            return api.create_commit(repo_id, operations=commit_operations(api, folder, repo_id, head), commit_message=message,
                                     commit_description=description, parent_commit=head)

        try:
            info = with_retries("commit", commit, retries, backoff, log)
            commit_oid, commit_url = info.oid, info.commit_url
        except HfHubHTTPError as error:
            latest = api.list_repo_commits(repo_id)[0] if error.response is not None and error.response.status_code == 412 else None
            if latest is None or latest.title != message or description.strip() not in (latest.message or ""):
                raise
            commit_oid, commit_url = latest.commit_id, f"{api.endpoint}/{repo_id}/commit/{latest.commit_id}"  # an earlier try landed
        if tag:
            create_tag(api, repo_id, tag, commit_oid, message, retries, backoff, log)
    except (HfHubHTTPError, httpx2.TransportError, RuntimeError) as error:
        failure = hub_failure(error)
        if failure is None:  # a RuntimeError that isn't the Hub's: a bug, not a failed push
            raise
        status = failure.response.status_code if isinstance(failure, HfHubHTTPError) and failure.response is not None else None
        hint = {401: f"the Hub refused the token in ${settings.token_env} (invalid credentials); create a new token with write access",
                403: f"the token in ${settings.token_env} may not write to {repo_id}; use a token of that namespace or change publish.repo_id"}.get(status)
        tries = f" after {retries} retries" if is_transient(error) else ""
        raise StillhouseError(f"publishing {repo_id} to {api.endpoint} failed{tries}: {describe_hub_error(error)}; "
                              + (hint or "the repo's previous revision is unchanged (a commit is applied whole or not at all)")) from error
    return PublishedModel(folder=str(folder), repo_id=repo_id, commit_url=commit_url, commit_oid=commit_oid, tag=tag,
                          revision_url=f"{api.endpoint}/{repo_id}/tree/{commit_oid}")


def create_tag(api: HfApi, repo_id: str, tag: str, commit_oid: str, message: str, retries: int, backoff: float, log) -> None:
    """Tag ``commit_oid``; an existing tag on the same commit is fine (a retry, or an unchanged rerun), on another one an error."""
    try:
        with_retries("tag", lambda: api.create_tag(repo_id, tag=tag, revision=commit_oid, tag_message=message), retries, backoff, log)
    except HfHubHTTPError as error:
        if error.response is None or error.response.status_code != 409:
            raise
        existing = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).tags}
        if existing.get(tag) != commit_oid:
            raise StillhouseError(f"the Hub repo {repo_id} already has tag {tag!r} on commit {existing.get(tag)}, not on this publish ({commit_oid}); "
                                  "register a new version or change publish.tag (e.g. 'v{version}-{name}')") from error


# -- the round trip ---------------------------------------------------------------------------------


def greedy_generations(model_folder: str, prompts: list[list[dict]], max_new_tokens: int) -> list[list[int]]:
    """New token ids, greedy, one prompt at a time (no padding, so nothing but the weights can differ)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    outputs = []
    with torch.inference_mode():
        for messages in prompts:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            outputs.append(generated[0, inputs["input_ids"].shape[1]:].tolist())
    return outputs


def round_trip(published: PublishedModel, local_folder: Path, prompts: list[list[dict]], config: PipelineConfig, max_new_tokens: int = 16) -> RoundTrip:
    """Download the published revision into a fresh cache, load it with plain transformers, compare greedy generations."""
    started = time.perf_counter()
    api = hub_api(config.publish.endpoint, os.environ.get(config.publish.token_env) or None)
    with tempfile.TemporaryDirectory(prefix="stillhouse-round-trip-") as cache:
        downloaded = api.snapshot_download(published.repo_id, revision=published.commit_oid, cache_dir=cache)
        remote = greedy_generations(downloaded, prompts, max_new_tokens)
    local = greedy_generations(str(local_folder), prompts, max_new_tokens)
    mismatches = [json.dumps(messages[-1]["content"])[:80] for messages, a, b in zip(prompts, local, remote) if a != b]
    return RoundTrip(prompts=len(prompts), matching=len(prompts) - len(mismatches), seconds=round(time.perf_counter() - started, 2),
                     mismatches=mismatches)

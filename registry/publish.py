"""Publishing: the exact folder that goes to the Hub, and the push itself.

The folder holds safetensors weights, config, generation config, the tokenizer with its chat
template, a README.md model card whose metadata names the teacher, data, method, license and
evals, and ``provenance.json`` tying it back to the MLflow run and the store fingerprints. It loads
with plain ``AutoModelForCausalLM.from_pretrained``. The push is one commit, made with the real
``huggingface_hub`` client; the token is read from the environment and never written anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants
from pydantic import BaseModel

from stillhouse.config import PipelineConfig
from stillhouse.errors import InputError
from stillhouse.models import load_causal_lm, load_tokenizer
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A student distilled by [Stillhouse](https://github.com/stillhouse) from **{{ teacher }}**
({{ method_long }}), {{ parameters }} parameters ({{ ratio }} of the teacher's).

## Evaluation (held-out prompts)

| metric | teacher | student |
|---|---|---|
{{ metric_rows }}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{{ repo }}")
model = AutoModelForCausalLM.from_pretrained("{{ repo }}")
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "..."}], tokenize=False, add_generation_prompt=True)
print(tokenizer.decode(model.generate(**tokenizer(prompt, return_tensors="pt", add_special_tokens=False), max_new_tokens=64)[0]))
```

## Provenance

Teacher revision `{{ teacher_revision }}`; data `{{ data }}`; store fingerprints and the MLflow run
are in `provenance.json`.
"""

METHODS = {"sft": "black-box: SFT on the teacher's responses", "kd": "white-box: forward KL to the teacher's top-k log-probs + cross-entropy"}


class PublishedModel(BaseModel):
    folder: str
    cached: bool = False
    repo_id: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None


def model_card(config: PipelineConfig, samples: SamplesRef, student: ModelRef, report: EvalReport) -> ModelCard:
    metrics = report.metrics
    data_sources = [entry.source for entry in config.curate.source_list()]
    # Hub dataset ids go into the card's `datasets`; local files and the demo are named in the body only.
    hub_datasets = [name for name in data_sources if not name.startswith(("builtin:", "/", ".", "~")) and not Path(name).exists()]
    evals = [
        EvalResult(task_type="text-generation", dataset_type="stillhouse-eval", dataset_name=f"{config.name} held-out prompts",
                   metric_type=name, metric_value=round(metrics[f"student_{name}"], 4))
        for name in ("exact_match", "perplexity") if f"student_{name}" in metrics
    ]
    data = ModelCardData(
        license=config.publish.license, library_name="transformers", pipeline_tag="text-generation",
        tags=["stillhouse", "distillation", f"distillation-{config.train.method}"],
        base_model=config.train.student, model_name=config.name, eval_results=evals or None,
        datasets=hub_datasets or None,
    )
    data.stillhouse = {"teacher": config.sample.teacher, "teacher_revision": samples.teacher_revision,
                       "method": config.train.method, "data": data_sources}
    rows = []
    for name in sorted({key.split("_", 1)[1] for key in metrics if key.startswith(("teacher_", "student_"))}):
        cells = [f"{metrics[f'{role}_{name}']:.4g}" if f"{role}_{name}" in metrics else "–" for role in ("teacher", "student")]
        rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return ModelCard.from_template(
        data, template_str=CARD_TEMPLATE, model_name=config.name, teacher=config.sample.teacher, method_long=METHODS[config.train.method],
        parameters=f"{student.parameters:,}", ratio=f"{metrics.get('parameter_ratio', float('nan')):.1%}", metric_rows="\n".join(rows),
        repo=config.publish.repo_id or "PATH_TO_THIS_FOLDER", teacher_revision=samples.teacher_revision, data=", ".join(data_sources),
    )


def write_publish_folder(
    folder: Path, config: PipelineConfig, dataset: DatasetRef, samples: SamplesRef, student: ModelRef, report: EvalReport, provenance: dict,
) -> Path:
    """Write exactly what would be pushed; replaces the folder's previous content."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # Load and save rather than copy: trainer folders can hold extras (training_args.bin) that don't belong on the Hub.
    model, tokenizer = load_causal_lm(student.model_path, device="cpu"), load_tokenizer(student.model_path)
    model.save_pretrained(folder)  # safetensors, config.json, generation_config.json
    tokenizer.save_pretrained(folder)  # tokenizer.json, tokenizer_config.json, chat template
    model_card(config, samples, student, report).save(folder / "README.md")
    record = {"pipeline": config.name, "fingerprints": {ref.stage: ref.fingerprint for ref in (dataset, samples, student, report)}, **provenance}
    (folder / "provenance.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return folder


def push_folder(folder: Path, config: PipelineConfig) -> PublishedModel:
    """Create the repo if needed and upload the folder in a single commit."""
    settings = config.publish
    token = os.environ.get(settings.token_env)
    if not token:
        raise InputError(f"publish.repo_id is set but ${settings.token_env} is empty; export a Hub token with write access in {settings.token_env}, or set publish.repo_id: null")
    if settings.endpoint and "huggingface.co" not in settings.endpoint:
        # A self-hosted Hub speaks plain LFS, not xet; the client reads this constant on every call.
        constants.HF_HUB_DISABLE_XET = True
    api = HfApi(endpoint=settings.endpoint, token=token)
    api.create_repo(settings.repo_id, private=settings.private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=settings.repo_id, commit_message=f"Stillhouse: publish {config.name}")
    return PublishedModel(folder=str(folder), repo_id=settings.repo_id, commit_url=commit.commit_url, commit_oid=commit.oid)

"""Publishing: the exact folder that goes to the Hub, the round trip that checks what was pushed, the MLflow links.

The folder holds safetensors weights, config, generation config, the tokenizer with its chat
template, a README.md model card and ``stillhouse.json``, the provenance, with the sha256 of every
file beside it (`stillhouse.registry.card` writes both). It loads with plain
``AutoModelForCausalLM.from_pretrained``. The push itself, one commit plus a tag with retries, is
`stillhouse.registry.hub.push_folder`.

    folder = write_publish_folder(...)
    revision = push_folder(folder, config, tag="v3")                  # stillhouse.registry.hub
    published = PublishedModel(folder=str(folder), **revision.model_dump())
    round_trip(published, folder, prompts, config)   # download into a fresh cache, compare greedy generations
    link_to_hub_revision(tracking, registered, {"stillhouse.hub.commit": published.commit_oid, ...})
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from stillhouse.config import PipelineConfig
from stillhouse.licenses import LicenseCheck
from stillhouse.models import load_causal_lm, load_tokenizer
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.registry.card import model_card, provenance_record
from stillhouse.registry.hub import download_revision
from stillhouse.registry.model_registry import RegisteredModel
from stillhouse.registry.tracking import TrackingContext
from stillhouse.store import file_sha256

PROVENANCE_FILE = "stillhouse.json"


class PublishedModel(BaseModel):
    """The publish stage's result: the folder, and where it was pushed (the fields of a `HubRevision`) when it was."""

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


def write_publish_folder(
    folder: Path,
    config: PipelineConfig,
    dataset: DatasetRef,
    samples: SamplesRef,
    student: ModelRef,
    report: EvalReport,
    check: LicenseCheck,
    lineage: dict,
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
    record["files"] = {
        path.name: {"sha256": file_sha256(path), "size": path.stat().st_size}
        for path in sorted(folder.iterdir())
        if path.is_file()
    }
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return folder


def link_to_hub_revision(tracking: TrackingContext, registered: RegisteredModel | None, tags: dict[str, str]) -> None:
    """Tag the pipeline run and the registered model version with the Hub revision they were published as.

    The card links to the MLflow run; these tags link back, so the registry shows where each version went.
    """
    client = MlflowClient(tracking.tracking_uri)
    for key, value in tags.items():
        client.set_tag(tracking.parent_run_id, key, value)
        if registered is not None:
            client.set_model_version_tag(registered.name, registered.version, key, value)


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
            generated = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            outputs.append(generated[0, inputs["input_ids"].shape[1] :].tolist())
    return outputs


def round_trip(
    published: PublishedModel,
    local_folder: Path,
    prompts: list[list[dict]],
    config: PipelineConfig,
    max_new_tokens: int = 16,
) -> RoundTrip:
    """Download the published revision into a fresh cache, load it with plain transformers, compare greedy
    generations."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stillhouse-round-trip-") as cache:
        downloaded = download_revision(config, published.repo_id, published.commit_oid, cache)
        remote = greedy_generations(downloaded, prompts, max_new_tokens)
    local = greedy_generations(str(local_folder), prompts, max_new_tokens)
    mismatches = [json.dumps(messages[-1]["content"])[:80] for messages, a, b in zip(prompts, local, remote) if a != b]
    return RoundTrip(
        prompts=len(prompts),
        matching=len(prompts) - len(mismatches),
        seconds=round(time.perf_counter() - started, 2),
        mismatches=mismatches,
    )

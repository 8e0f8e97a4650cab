"""Publishing: the exact folder that goes to the Hub, the round trip that checks what was pushed, the MLflow links.

The folder holds safetensors weights, config, generation config, the tokenizer with its chat
template, a README.md model card and ``stillhouse.json``, the provenance, with the sha256 of every
file beside it (`stillhouse.registry.card` writes both). It loads with plain
``AutoModelForCausalLM.from_pretrained``. The push itself, one commit plus a tag with retries, is
`stillhouse.registry.hub.push_folder`.

Signing (``publish.signing.key``): the folder is signed with OpenSSF's model-signing library (an
elliptic-curve key, PEM), its signature written to ``model.sig`` beside the files it covers (every file
but itself and git's), and ``stillhouse.json`` names the sha256 of the public key that checks it.
``stillhouse pull --verify-key PUB.pem`` verifies it (`stillhouse.registry.pull`). A key given as
``env:NAME`` is written to a private temporary file only for the signing call.

    folder = write_publish_folder(...)
    revision = push_folder(folder, config, tag="v3")                  # stillhouse.registry.hub
    published = PublishedModel(folder=str(folder), **revision.model_dump())
    round_trip(published, folder, prompts, config)   # download into a fresh cache, compare greedy generations
    link_to_hub_revision(tracking, registered, {"stillhouse.hub.commit": published.commit_oid, ...})
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from stillhouse.config import PipelineConfig
from stillhouse.errors import StillhouseError
from stillhouse.licenses import LicenseCheck
from stillhouse.models import load_causal_lm, load_tokenizer
from stillhouse.public_names import private_lines, public_names
from stillhouse.refs import DatasetRef, EvalReport, ModelRef, SamplesRef
from stillhouse.registry.card import (
    CARD_TEMPLATE,
    PROVENANCE_FILE,
    content_sha256,
    mlflow_run_url,
    model_card,
    provenance_record,
)
from stillhouse.registry.hub import download_revision
from stillhouse.registry.model_registry import RegisteredModel
from stillhouse.registry.signing import SIGNATURE_FILE, check_signing, model_signing_version, sign_folder, signing_key
from stillhouse.registry.tracking import TrackingContext
from stillhouse.store import file_sha256


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
    """Write exactly what would be pushed, signed when ``publish.signing`` is set; replaces the folder's previous
    content."""
    check_signing(config)  # a key that can't sign fails before anything is written
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
    record["content_sha256"] = content_sha256(record["files"], lineage.get("publish_fingerprint"))
    signing = config.publish.signing
    with signing_key(signing) if signing else nullcontext() as key:
        record["signature"] = (
            {"file": SIGNATURE_FILE, "public_key_sha256": key[1], "method": f"model-signing {model_signing_version()}"}
            if key
            else None
        )
        (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if key:  # last: the signature covers stillhouse.json too
            sign_folder(folder, key[0])
    return folder


# -- nothing private on the Hub ----------------------------------------------------------------------

TEXT_SUFFIXES = (".md", ".json", ".jinja", ".txt", ".yaml", ".yml")
# The card template's own words: a login name that is one of them can't be told apart from the card's text.
CARD_WORDS = frozenset(word.lower() for word in re.findall(r"[A-Za-z][A-Za-z0-9_-]+", CARD_TEMPLATE))


def check_folder_is_public(folder: Path, config: PipelineConfig) -> None:
    """Right before a push: no text file of ``folder`` (the card, stillhouse.json, configs) holds an absolute local
    path, the home folder or the user's login name; `StillhouseError` quoting the first lines found otherwise.

    `check_public_names` refused local model and data paths before the run; this reads what is really about
    to leave the machine, whatever put it there.
    """
    allowed = [config.publish.repo_id or "", *public_names(config).given]
    found = [
        f"{path.name}: {line[:200]}"
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix in TEXT_SUFFIXES
        for line in private_lines(path.read_text(errors="replace"), allowed, ordinary_words=CARD_WORDS)
    ]
    if found:
        shown = "\n".join(f"  {line}" for line in found[:10]) + (
            f"\n  ... {len(found) - 10} more" if len(found) > 10 else ""
        )
        raise StillhouseError(
            f"publish: not pushing {config.publish.repo_id}: the folder {folder} names a local path, the home folder "
            f"or the login name:\n{shown}\nSet publish.teacher_name, publish.base_model_name and "
            "publish.dataset_names to public names, and keep local paths and the login name out of the names the "
            "card shows (config name, registry.model_name)"
        )


def training_run(tracking: TrackingContext, student: ModelRef, registered: RegisteredModel | None) -> dict:
    """The MLflow runs that trained ``student``: the pipeline run (``mlflow_run_id``) and its nested stage run.

    A rerun reuses the stored student, so the run publishing it is often not the one that trained it. The
    training stage's nested run carries the student's fingerprint and ``stillhouse.cached = false`` (the stage
    computed it); the newest such run in this experiment is the one whose weights the store holds. Without
    one (the store came from elsewhere), the registered version's run stands in, then this run.
    """
    client = MlflowClient(tracking.tracking_uri)
    found = client.search_runs(
        [tracking.experiment_id],
        filter_string=f"tags.`stillhouse.stage` = '{student.stage}' and "
        f"tags.`stillhouse.fingerprint` = '{student.fingerprint}' and tags.`stillhouse.cached` = 'false'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    stage_run = found[0] if found else (client.get_run(registered.run_id) if registered is not None else None)
    parent_id = stage_run.data.tags.get("mlflow.parentRunId") if stage_run is not None else None
    parent = client.get_run(parent_id) if parent_id else client.get_run(tracking.parent_run_id)
    experiment_id = parent.info.experiment_id
    return {
        "mlflow_run_id": parent.info.run_id,
        "mlflow_experiment_id": experiment_id,
        "mlflow_run_url": mlflow_run_url(tracking.tracking_uri, experiment_id, parent.info.run_id),
        "mlflow_train_stage_run_id": stage_run.info.run_id if found else None,
        "prefect_flow_run_id": parent.data.tags.get("prefect.flow_run_id") or None,
    }


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

"""Pulling a published student: download, verify against stillhouse.json and the Hub's LFS sha256, load, chat.

    stillhouse pull alice/Llama-tiny-student --revision v3 --prompt "reverse: abc"
    stillhouse pull alice/Llama-tiny-student                      # interactive chat; `exit` or Ctrl-D ends it

Verification: ``stillhouse.json`` must be there and parse; every file it lists must have the size and
sha256 it records, and every weights file must also match the sha256 the Hub reports for its LFS
object. A mismatch names the file and stops before the weights are loaded. Loading uses plain
``transformers``, nothing of Stillhouse's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError
from pydantic import BaseModel
from rich.markup import escape

from stillhouse.errors import StillhouseError
from stillhouse.registry.hub import describe_hub_error, hub_api
from stillhouse.registry.publish import PROVENANCE_FILE
from stillhouse.store import file_sha256


class PulledModel(BaseModel):
    repo_id: str
    revision: str
    commit: str
    folder: str
    provenance: dict
    verified_files: list[str]


def download(
    repo_id: str, revision: str | None, endpoint: str | None, token_env: str = "HF_TOKEN", cache_dir: str | None = None
) -> PulledModel:
    """Download ``repo_id`` at ``revision`` and verify it; raises `StillhouseError` naming what doesn't match."""
    api = hub_api(endpoint, os.environ.get(token_env) or None)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        folder = Path(api.snapshot_download(repo_id, revision=info.sha, cache_dir=cache_dir))
    except HfHubHTTPError as error:
        raise StillhouseError(
            f"can't download {repo_id}@{revision or 'main'} from {api.endpoint}: {describe_hub_error(error)}"
            f" (a private repo needs a token in ${token_env})"
        ) from None
    where = f"{repo_id}@{revision or 'main'} ({info.sha[:12]})"
    provenance_path = folder / PROVENANCE_FILE
    if not provenance_path.is_file():
        raise StillhouseError(
            f"{where} has no {PROVENANCE_FILE}: it was not published by Stillhouse, or the file was removed; "
            "its weights can't be checked against what was trained"
        )
    try:
        provenance = json.loads(provenance_path.read_text())
        recorded = provenance["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise StillhouseError(
            f"{where}: {PROVENANCE_FILE} is not valid provenance ({error}); republish the student"
        ) from None
    lfs_sha256 = {sibling.rfilename: sibling.lfs.sha256 for sibling in info.siblings or [] if sibling.lfs is not None}
    weights = sorted(path.name for path in folder.glob("*.safetensors"))
    if not weights:
        raise StillhouseError(f"{where} holds no .safetensors weights")
    for name in weights:
        if name not in recorded:
            raise StillhouseError(
                f"{where}: {name} is not listed in {PROVENANCE_FILE}; the weights were changed after publishing"
            )
    for name, expected in recorded.items():
        path = folder / name
        if not path.is_file():
            raise StillhouseError(f"{where}: {name}, listed in {PROVENANCE_FILE}, is missing from the repo")
        actual = file_sha256(path)
        if actual != expected["sha256"] or path.stat().st_size != expected["size"]:
            raise StillhouseError(
                f"{where}: {name} has sha256 {actual}, but {PROVENANCE_FILE} records {expected['sha256']}; "
                "the file was changed after publishing or the download is corrupt"
            )
        if name in lfs_sha256 and lfs_sha256[name] != actual:
            raise StillhouseError(
                f"{where}: {name} has sha256 {actual}, but the Hub's LFS object is {lfs_sha256[name]}; "
                "the download is corrupt"
            )
    return PulledModel(
        repo_id=repo_id,
        revision=revision or "main",
        commit=info.sha,
        folder=str(folder),
        provenance=provenance,
        verified_files=sorted(recorded),
    )


class Chat:
    """A pulled student loaded with plain transformers, answering chat messages greedily."""

    def __init__(self, folder: str, max_new_tokens: int = 128):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.max_new_tokens = max_new_tokens

    def reply(self, messages: list[dict]) -> str:
        import torch

        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def chat_loop(chat: Chat, console, read=input) -> int:
    """Read prompts until `exit`, `quit` or end of input; each turn sees the conversation so far. Returns the number
    of turns."""
    messages: list[dict] = []
    turns = 0
    while True:
        try:
            prompt = read("you> ")
        except EOFError:
            console.print()
            return turns
        if prompt.strip().lower() in ("exit", "quit"):
            return turns
        if not prompt.strip():
            continue
        messages.append({"role": "user", "content": prompt})
        answer = chat.reply(messages)
        messages.append({"role": "assistant", "content": answer})
        console.print(
            "[bold]student>[/bold] " + (escape(answer) if answer else "[dim](empty answer: it ended at once)[/dim]")
        )
        turns += 1


def pull_command(
    repo_id: str,
    revision: str | None,
    endpoint: str | None,
    prompt: str | None,
    max_new_tokens: int = 128,
    token_env: str = "HF_TOKEN",
) -> int:
    """`stillhouse pull`: download, verify, then answer ``prompt`` or chat interactively."""
    from rich.console import Console

    console = Console(soft_wrap=True)  # paths and ids stay on one line, copyable
    pulled = download(repo_id, revision, endpoint, token_env=token_env)
    teacher = pulled.provenance.get("teacher", {})
    console.print(
        f"Pulled [bold]{repo_id}[/bold] @ {pulled.revision} (commit {pulled.commit[:12]}) into {pulled.folder}"
    )
    console.print(
        f"  verified {len(pulled.verified_files)} files against {PROVENANCE_FILE}; "
        f"teacher {teacher.get('id')} @ {teacher.get('revision')}, "
        f"method {pulled.provenance.get('method')}, MLflow run {pulled.provenance.get('mlflow_run_id')}"
    )
    chat = Chat(pulled.folder, max_new_tokens=max_new_tokens)
    if prompt is not None:
        answer = chat.reply([{"role": "user", "content": prompt}])
        console.print(escape(answer) if answer else "[dim](empty answer: it ended at once)[/dim]", highlight=False)
        return 0
    console.print("Chat with the student; `exit` or Ctrl-D ends it.")
    chat_loop(chat, console, read=lambda text: console.input(text))
    return 0

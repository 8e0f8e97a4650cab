"""Pulling a published student: download, verify against stillhouse.json, the Hub's LFS sha256 and its
signature, load, chat.

    stillhouse pull alice/Llama-tiny-student --revision v3 --prompt "reverse: abc"
    stillhouse pull alice/Llama-tiny-student --verify-key signing-key.pub.pem   # refuse unless its signature verifies
    stillhouse pull alice/Llama-tiny-student                      # interactive chat; `exit` or Ctrl-D ends it

Verification, before any weights are loaded (a failure names the file and stops):

- the revision's file list (from the Hub, before anything is downloaded): no pickle file (``*.bin``,
  ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``, ``*.pickle``), and no file that ``stillhouse.json`` doesn't
  list, but ``.gitattributes`` and the signature ``model.sig``: an added ``special_tokens_map.json``
  changes answers as surely as changed weights;
- ``stillhouse.json`` parses, and every path it lists stays inside the download folder (no absolute
  path, no ``..``, no symlink out of the Hub cache);
- every listed file has the size and sha256 recorded, and a weights file the sha256 the Hub reports
  for its LFS object;
- the signature: with ``--verify-key PUB.pem`` it must verify with that public key (an unsigned
  revision is refused); without a key the output says plainly ``unsigned`` or ``signed, not verified
  (no --verify-key)``. Without a signature, files and stillhouse.json rewritten together can't be
  told from the real thing: only the signature ties them to the publisher's key.

Loading uses plain ``transformers``, nothing of Stillhouse's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath

from huggingface_hub.errors import HfHubHTTPError
from pydantic import BaseModel
from rich.markup import escape

from stillhouse.errors import InputError, StillhouseError
from stillhouse.registry.card import PROVENANCE_FILE
from stillhouse.registry.hub import describe_hub_error, hub_api
from stillhouse.registry.signing import SIGNATURE_FILE, import_model_signing, public_key_sha256, signature_hashing
from stillhouse.store import file_sha256

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
NOT_LISTED_OK = frozenset({".gitattributes", SIGNATURE_FILE})  # the Hub's own file; the signature comes after


class PulledModel(BaseModel):
    repo_id: str
    revision: str
    commit: str
    folder: str
    provenance: dict
    verified_files: list[str]
    signature: str = "unsigned"  # or "signed, not verified (no --verify-key)", or "verified with key <sha256>"


def unsafe_listed_path(name: object) -> str | None:
    """Why a path listed in stillhouse.json can't be used (None when it can): it must name a file in the repo."""
    if not isinstance(name, str) or not name:
        return "not a file name"
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("~") or "\\" in name or re.match(r"^[A-Za-z]:", name):
        return "an absolute path, outside the download"
    if ".." in path.parts:
        return "a path with `..`, outside the download"
    return None


def download(
    repo_id: str,
    revision: str | None,
    endpoint: str | None,
    token_env: str = "HF_TOKEN",
    cache_dir: str | None = None,
    verify_key: str | Path | None = None,
) -> PulledModel:
    """Download ``repo_id`` at ``revision`` and verify it; raises `StillhouseError` naming what doesn't match.

    ``verify_key``: a PEM public key; the revision's signature must verify with it.
    """
    public_key = read_public_key(verify_key) if verify_key is not None else None  # a bad key fails before the Hub
    api = hub_api(endpoint, os.environ.get(token_env) or None)
    where = f"{repo_id}@{revision or 'main'}"
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        where = f"{repo_id}@{revision or 'main'} ({info.sha[:12]})"
        repo_files = sorted(sibling.rfilename for sibling in info.siblings or [])
        pickled = [name for name in repo_files if name.lower().endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise StillhouseError(
                f"{where} holds pickle files ({', '.join(pickled)}), which can run arbitrary code when loaded; "
                "a Stillhouse publish has safetensors only. Nothing was downloaded"
            )
        if PROVENANCE_FILE not in repo_files:
            raise StillhouseError(
                f"{where} has no {PROVENANCE_FILE}: it was not published by Stillhouse, or the file was removed; "
                "its weights can't be checked against what was trained"
            )
        provenance_path = Path(api.hf_hub_download(repo_id, PROVENANCE_FILE, revision=info.sha, cache_dir=cache_dir))
        provenance, recorded = read_provenance(provenance_path, where)
        unlisted = [
            name for name in repo_files if name not in recorded and name not in NOT_LISTED_OK | {PROVENANCE_FILE}
        ]
        if unlisted:
            raise StillhouseError(
                f"{where}: {', '.join(unlisted)} {'is' if len(unlisted) == 1 else 'are'} in the repo but not listed in "
                f"{PROVENANCE_FILE}; files were added or swapped after publishing (a tokenizer or template file "
                "changes answers as surely as weights). Nothing else was downloaded"
            )
        folder = Path(api.snapshot_download(repo_id, revision=info.sha, cache_dir=cache_dir))
    except HfHubHTTPError as error:
        raise StillhouseError(
            f"can't download {where} from {api.endpoint}: {describe_hub_error(error)}"
            f" (a private repo needs a token in ${token_env})"
        ) from None
    lfs_sha256 = {sibling.rfilename: sibling.lfs.sha256 for sibling in info.siblings or [] if sibling.lfs is not None}
    if not any(name.endswith(".safetensors") for name in recorded):
        raise StillhouseError(f"{where} holds no .safetensors weights")
    # The Hub cache links each snapshot file to its blob in the repo's cache folder; nothing may lead elsewhere.
    inside = folder.parent.parent.resolve()
    for name, expected in sorted(recorded.items()):
        path = folder / name
        if not path.resolve().is_relative_to(inside):
            raise StillhouseError(f"{where}: {name}, listed in {PROVENANCE_FILE}, is a link out of the download folder")
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
    signed = SIGNATURE_FILE in repo_files
    if public_key is not None:
        signature = verify_signature(folder, public_key, provenance, where, signed)
    else:
        signature = "signed, not verified (no --verify-key)" if signed else "unsigned"
    return PulledModel(
        repo_id=repo_id,
        revision=revision or "main",
        commit=info.sha,
        folder=str(folder),
        provenance=provenance,
        verified_files=sorted(recorded),
        signature=signature,
    )


def read_provenance(path: Path, where: str) -> tuple[dict, dict]:
    """(stillhouse.json, its ``files``), each listed path checked to stay inside the download."""
    try:
        provenance = json.loads(path.read_text())
        recorded = provenance["files"]
        for name, entry in recorded.items():
            problem = unsafe_listed_path(name)
            if problem:
                raise StillhouseError(f"{where}: {PROVENANCE_FILE} lists {name!r}, {problem}; refusing the revision")
            if not isinstance(entry["sha256"], str) or not isinstance(entry["size"], int):
                raise TypeError(f"the entry of {name} is not {{sha256, size}}")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise StillhouseError(
            f"{where}: {PROVENANCE_FILE} is not valid provenance ({error}); republish the student"
        ) from None
    return provenance, recorded


def read_public_key(path: str | Path):
    """The public key of ``--verify-key``; `InputError` naming the file when it isn't one."""
    from cryptography.hazmat.primitives import serialization

    import_model_signing("--verify-key checks a signature", "pull without --verify-key")
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as error:
        raise InputError(f"--verify-key: can't read {path} ({error.strerror})") from None
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as error:
        raise InputError(
            f"--verify-key: {path} is not a PEM public key ({type(error).__name__}); export it from the signing key: "
            "openssl ec -in signing-key.pem -pubout -out signing-key.pub.pem"
        ) from None


def verify_signature(folder: Path, public_key, provenance: dict, where: str, signed: bool) -> str:
    """Check ``model.sig`` against every file of the download with ``public_key``; raise unless it verifies."""
    import tempfile

    from cryptography.hazmat.primitives import serialization
    from model_signing import verifying

    fingerprint = public_key_sha256(public_key)
    if not signed:
        raise StillhouseError(
            f"{where} is unsigned (no {SIGNATURE_FILE}), but --verify-key asks for a signature by key sha256 "
            f"{fingerprint[:16]}…; pull a signed revision, or drop --verify-key to accept an unsigned one"
        )
    claimed = (provenance.get("signature") or {}).get("public_key_sha256")
    if claimed and claimed != fingerprint:
        raise StillhouseError(
            f"{where}: {PROVENANCE_FILE} says it was signed by key sha256 {claimed[:16]}…, not by the --verify-key "
            f"(sha256 {fingerprint[:16]}…); refusing it"
        )
    with tempfile.TemporaryDirectory(prefix="stillhouse-verify-key-") as scratch:
        key_path = Path(scratch) / "public.pem"
        key_path.write_bytes(
            public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=key_path).set_hashing_config(
                signature_hashing(allow_symlinks=True)
            ).verify(folder, folder / SIGNATURE_FILE)
        except Exception as error:  # model-signing raises ValueError and others (a mangled bundle): all mean "no"
            raise StillhouseError(
                f"{where}: the signature {SIGNATURE_FILE} does not verify with the --verify-key (sha256 "
                f"{fingerprint[:16]}…): {type(error).__name__}: {str(error)[:500]}; the files are not the ones "
                "that key signed"
            ) from None
    return f"verified with key sha256 {fingerprint[:16]}…"


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
    verify_key: str | None = None,
) -> int:
    """`stillhouse pull`: download, verify (the signature too, with ``verify_key``), then answer ``prompt`` or chat
    interactively."""
    from rich.console import Console

    console = Console(soft_wrap=True)  # paths and ids stay on one line, copyable
    pulled = download(repo_id, revision, endpoint, token_env=token_env, verify_key=verify_key)
    teacher = pulled.provenance.get("teacher", {})
    console.print(
        f"Pulled [bold]{repo_id}[/bold] @ {pulled.revision} (commit {pulled.commit[:12]}) into {pulled.folder}"
    )
    console.print(
        f"  verified {len(pulled.verified_files)} files against {PROVENANCE_FILE}; "
        f"teacher {teacher.get('id')} @ {teacher.get('revision')}, "
        f"method {pulled.provenance.get('method')}, MLflow run {pulled.provenance.get('mlflow_run_id')}"
    )
    console.print(f"  signature: {pulled.signature}", highlight=False)
    chat = Chat(pulled.folder, max_new_tokens=max_new_tokens)
    if prompt is not None:
        answer = chat.reply([{"role": "user", "content": prompt}])
        console.print(escape(answer) if answer else "[dim](empty answer: it ended at once)[/dim]", highlight=False)
        return 0
    console.print("Chat with the student; `exit` or Ctrl-D ends it.")
    chat_loop(chat, console, read=lambda text: console.input(text))
    return 0

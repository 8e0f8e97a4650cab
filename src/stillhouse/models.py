"""Resolving model references (local folders, Hub ids, `builtin:` models such as the demo teacher) and loading them.

Two safety rules hold for every model Stillhouse loads:

- Weights load from safetensors only. Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) can run
  arbitrary code when unpickled; a folder that has only those is refused with the command that
  converts it, before anything is loaded.
- A model's own Python code (``auto_map`` in its config, ``trust_remote_code`` in transformers) runs
  only when the config enables it for that model (``sample.trust_remote_code``,
  ``train.trust_remote_code``); otherwise loading it is refused with a message naming the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stillhouse.builtins import MODELS, is_builtin, load_builtin
from stillhouse.errors import InputError
from stillhouse.store import file_sha256

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

# torch and transformers are imported where a model or tokenizer loads: `stillhouse validate` reads configs and
# tokenizer files only, and importing both costs about 3 s of its 2 s budget on a 2-core machine.

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_safetensors_weights(path: Path, field: str) -> None:
    """Refuse a local model folder whose weights exist only as pickle files."""
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickled:
        raise InputError(
            f"{field}: {str(path)!r} has weights only as pickle files ({', '.join(pickled[:3])}), which can run "
            "arbitrary code when loaded; Stillhouse loads safetensors only. If you trust the file, convert it once: "
            'python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{path}', use_safetensors=False).save_pretrained('{path}-safetensors')\" and point "
            f"{field} there"
        )


def check_hub_safetensors(repo_id: str, revision: str | None, field: str) -> None:
    """The Hub counterpart of `check_safetensors_weights`: one listing call, no download.

    Skipped offline (HF_HUB_OFFLINE): loading then uses the cache, and `use_safetensors=True` still
    refuses pickle files there.
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return
    files = HfApi().list_repo_files(repo_id, revision=revision)
    if any(name.endswith(".safetensors") for name in files):
        return
    pickled = sorted(name for name in files if name.endswith(tuple(pattern[1:] for pattern in PICKLE_WEIGHTS)))
    if pickled:
        raise InputError(
            f"{field}: {repo_id!r} at revision {revision or 'main'!r} has weights only as pickle files "
            f"({', '.join(pickled[:3])}), which can run arbitrary code when loaded; Stillhouse loads safetensors only. "
            "Use a revision with model.safetensors (many repos have one on the `refs/pr/N` branch the Hub's conversion "
            "bot opened), or convert a checkpoint you trust"
        )


def remote_code_error(model: str, field: str) -> InputError:
    return InputError(
        f"{field}: {model!r} ships its own Python code (auto_map in its config), which runs only when allowed; "
        f"if you trust it, set {field.rsplit('.', 1)[0]}.trust_remote_code: true, "
        "else use a model that plain transformers supports"
    )


def resolve_model(reference: str, field: str) -> str:
    """A loadable path or Hub id for ``reference``; raises `InputError` naming ``field`` otherwise."""
    if is_builtin(reference):
        return str(load_builtin(MODELS, reference, field)())
    path = Path(reference).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(
                f"{field}: {reference!r} is a folder without config.json; "
                "point it at a folder written by save_pretrained"
            )
        check_safetensors_weights(path, field)
        return str(path.resolve())
    looks_like_path = reference.startswith((".", "/", "~")) or reference.count("/") != 1
    if looks_like_path or not _HUB_ID.match(reference):
        raise InputError(
            f"{field}: model path {reference!r} does not exist; give an existing folder, a Hub id like `org/name`, "
            "or a `builtin:` model such as `builtin:demo-teacher`"
        )
    return reference


def model_file(location: str, name: str, revision: str | None = None, *, required: bool = False) -> Path | None:
    """``name`` of a local model folder or a Hub model (downloaded, or from the cache offline); None if it has none
    or it can't be fetched (the transformers path that follows then raises the precise error).

    With ``required``, a Hub that can't be reached for a file the cache doesn't hold raises `HubUnreachable`
    instead: transformers would repeat the same requests, with the same backoff (about 25 s of retries when
    connections are refused), only to fail the same way.
    """
    folder = Path(location)
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(location, name, revision=revision))
    except Exception as error:  # not found, gated, offline without a cached copy: the fallback names the problem
        # No answer at all: refused or timed out (the client's LocalEntryNotFoundError) or dropped mid-request (its
        # HTTP library's TransportError, raised as is; matched by name, as that library changed with the client).
        unreachable = isinstance(error, LocalEntryNotFoundError) or any(
            cls.__name__ == "TransportError" for cls in type(error).__mro__
        )
        if required and unreachable:
            raise HubUnreachable(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}") from error
        return None


class HubUnreachable(OSError):
    """The Hub gave no answer for a file the local cache doesn't hold (`model_file` with ``required``)."""


def plain_config(location: str, revision: str | None = None) -> dict[str, Any] | None:
    """config.json as transformers reads it, without importing transformers: the file's dict when it names a
    `model_type` and carries no `auto_map` (a model's own code may give its keys other meanings).

    None otherwise (no file, unreadable JSON, remote code): callers then ask `AutoConfig`, whose error names what
    is wrong. Keys the file leaves out are the config class's defaults, which this dict doesn't have: callers
    that need one fall back to `AutoConfig` too. A Hub that can't be reached raises `HubUnreachable`, as
    `AutoConfig` would fail, without a second round of retries.
    """
    path = model_file(location, "config.json", revision, required=True)
    if path is None:
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str) or "auto_map" in config:
        return None
    return config


def plain_chat_tokenizer(location: str, revision: str | None = None) -> bool:
    """Whether the tokenizer files alone show a loadable tokenizer with a chat template, without transformers:
    tokenizer.json parses with the `tokenizers` library, tokenizer_config.json (if any) is JSON without `auto_map`,
    and a template is there (chat_template.jinja, chat_template.json or tokenizer_config.json's `chat_template`).

    False means "not shown this way", not "broken": callers then load it with `load_tokenizer`, whose errors (or the
    missing template's) name the problem.
    """
    tokenizer_json = model_file(location, "tokenizer.json", revision)
    if tokenizer_json is None:
        return False
    settings_file = model_file(location, "tokenizer_config.json", revision)
    try:
        settings = json.loads(settings_file.read_text()) if settings_file is not None else {}
        from tokenizers import Tokenizer  # 20 ms, where transformers' AutoTokenizer costs seconds to import

        Tokenizer.from_file(str(tokenizer_json))
    except Exception:  # unreadable or a format `tokenizers` doesn't know: the transformers path decides
        return False
    if not isinstance(settings, dict) or "auto_map" in settings:
        return False
    return bool(
        settings.get("chat_template")
        or model_file(location, "chat_template.jinja", revision)
        or model_file(location, "chat_template.json", revision)
    )


def vocab_size(model: str, revision: str | None = None, *, trust_remote_code: bool = False) -> int:
    """The vocabulary size from the model's config alone (cheap: no weights are read)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code).vocab_size


def load_tokenizer(
    model: str, revision: str | None = None, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def pick_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_causal_lm(
    model: str,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    field: str = "model",
):
    """The model in eval mode on ``device``: safetensors weights only, its own code only when trusted.

    ``field`` names the config field the model came from, for the error messages.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    if Path(model).is_dir():
        check_safetensors_weights(Path(model), field)
    else:
        check_hub_safetensors(model, revision, field)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            model, revision=revision, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        text = str(error)
        if "trust_remote_code" in text:
            raise remote_code_error(model, field) from None
        if "pytorch_model.bin" in text or (".safetensors" in text and "does not appear to have" in text):
            raise InputError(
                f"{field}: {model!r} has no safetensors weights (only pickle files, which can run arbitrary code when "
                "loaded); use a revision that has model.safetensors, or convert a checkpoint you trust"
            ) from None
        raise
    return loaded.to(pick_device(device)).eval()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary, special tokens and chat template: equal means token ids are interchangeable."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": tokenizer.all_special_tokens,
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def vocabulary_difference(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> str | None:
    """None when both map every token to the same id (white-box KD can compare them); else what differs.

    Token->id maps are compared, not embedding sizes: Qwen2.5 checkpoints have 151,936 or 152,064
    embedding rows that differ only by padding, which is fine.
    """
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab == teacher_vocab:
        return None
    missing = sorted(set(teacher_vocab) - set(student_vocab))
    extra = sorted(set(student_vocab) - set(teacher_vocab))
    moved = sorted(t for t in set(student_vocab) & set(teacher_vocab) if student_vocab[t] != teacher_vocab[t])
    parts = [
        f"{len(missing)} teacher tokens missing (e.g. {missing[:3]})" if missing else "",
        f"{len(extra)} student-only tokens (e.g. {extra[:3]})" if extra else "",
        f"{len(moved)} tokens with other ids (e.g. {moved[:3]})" if moved else "",
    ]
    return "; ".join(p for p in parts if p)


_local_revisions: dict[tuple, str] = {}
# Files at least this large keep their sha256 across processes (`cached_file_sha256`): a 70B teacher's weights
# (140 GB) took minutes to hash at every `stillhouse run`. Smaller ones are read again; that costs little.
HASH_CACHE_MIN_BYTES = 64 << 20
HASH_CACHE_ENV = "STILLHOUSE_HASH_CACHE"
HASH_CACHE_ENTRIES = 4096


def hash_cache_path() -> Path:
    """``$STILLHOUSE_HASH_CACHE``, else ``$XDG_CACHE_HOME/stillhouse/file-sha256.json`` (``~/.cache/...``)."""
    if os.environ.get(HASH_CACHE_ENV):
        return Path(os.environ[HASH_CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stillhouse" / "file-sha256.json"


def cached_file_sha256(path: Path) -> str:
    """`file_sha256`, remembered for a large file while its identity stays: resolved path, inode, size, and its
    modification and status-change times. Any write to the file moves its ctime, which no tool can set back (touch
    and ``cp -p`` restore mtime only), so rewritten content of the same size and mtime is hashed again.

    The cache is a JSON file of the newest `HASH_CACHE_ENTRIES` entries; one that can't be read or written is
    ignored (the file is hashed, as without a cache), so a read-only home never fails a run.
    """
    status = path.stat()
    if status.st_size < HASH_CACHE_MIN_BYTES:
        return file_sha256(path)
    key = f"{path.resolve()}|{status.st_ino}|{status.st_size}|{status.st_mtime_ns}|{status.st_ctime_ns}"
    cache_file = hash_cache_path()
    try:
        known = json.loads(cache_file.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    digest = known.pop(key, None)
    if not isinstance(digest, str) or len(digest) != 64:
        digest = file_sha256(path)
    known[key] = digest  # newest last: the oldest go first when the cache is full
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(dict(list(known.items())[-HASH_CACHE_ENTRIES:])))
        os.replace(partial, cache_file)  # whole or not at all, also with two runs writing at once
    except OSError:
        pass
    return digest


def model_revision(model: str, revision: str | None, *, trust_remote_code: bool = False) -> str:
    """The exact revision: for a local folder, a hash of every file loading can read; else the Hub revision.

    Hashed: every regular file at the folder's top level (symlinks followed, as loading follows them),
    whatever its name: config and generation config, weights, every tokenizer file (tokenizer.json,
    vocab/merges, special tokens), chat templates (``chat_template.jinja`` changes the prompts a
    teacher sees), model code. Left out: ``*.md`` (README, the model card) and hidden files (``.git*``,
    ``.cache/``), which nothing loads, and subfolders, which ``from_pretrained`` doesn't read.
    """
    path = Path(model)
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != ".md"
        )
        # One run asks several times (preflight, the sample stage, a cached-stage check); a 70B teacher's folder
        # takes minutes to hash, so a folder whose files kept their names, sizes and modification times isn't
        # hashed again by this process, and its large files not by the next one either (`cached_file_sha256`).
        listing = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        key = (str(path.resolve()), listing)
        if key not in _local_revisions:
            digest = hashlib.sha256("".join(f"{p.name}:{cached_file_sha256(p)}" for p in files).encode()).hexdigest()
            _local_revisions[key] = f"local-sha256:{digest[:16]}"
        return _local_revisions[key]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    return getattr(config, "_commit_hash", None) or revision or "main"


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())

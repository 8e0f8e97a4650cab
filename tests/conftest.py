"""Shared fixtures: tiny models built on the spot, an isolated Hub/MLflow/Prefect per test session.

Nothing here touches the network: models are 2-layer random Llamas with the demo's character
tokenizer, the Hub is the loopback server in hub_server.py, MLflow is a sqlite file in tmp_path.
"""

import os
import tempfile

# Before anything imports huggingface_hub or Prefect (they read these at import time).
os.environ["HF_HUB_DISABLE_XET"] = "1"  # the loopback Hub (hub_server.py) speaks plain LFS, not xet
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("HF_TOKEN", None)
# Large files' digests (models.cached_file_sha256) go to a cache of this session, not the user's ~/.cache.
os.environ["STILLHOUSE_HASH_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="stillhouse-hashes-"), "file-sha256.json")

import json
from pathlib import Path

import prefect.main  # noqa: F401  (see below)
import pytest
import torch

# Prefect binds its console log handler to the sys.stderr of the moment `prefect.main` is first imported (its
# setup_logging). `stillhouse` imports Prefect only when a flow runs, so that moment fell inside whichever test ran
# a flow first; under capfd/capsys that stderr is closed when the test ends, and every later test's flow logging
# failed on it ("I/O operation on closed file", e.g. test_security then test_cli). Imported here, at collection,
# the handler binds pytest's session-wide capture, which stays open.

# Tiny models on a 2-core machine: with two threads while another process kept one core busy, a tiny model's
# `generate` was measured ~80x slower; one thread avoids that contention.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def build_tiny_model(folder: Path, *, hidden_size: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random 2-layer Llama with the demo's character tokenizer and chat template, saved to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stillhouse.demo.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Our own test models, declared apache-2.0 like the demo teacher, so the publish license check can read it.
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny test model\n")
    return folder


def curate_and_sample(store_root: Path, teacher: Path, prompts: Path):
    """(store, dataset, samples): the prompts curated (20% eval) and answered by ``teacher`` with top-4 log-probs."""
    from stillhouse.config import CurateConfig, SampleConfig
    from stillhouse.data.curate import curate
    from stillhouse.sampling.sample import sample_teacher
    from stillhouse.store import Store

    store = Store(store_root)
    dataset = curate(CurateConfig(source=str(prompts), category_column="task", eval_fraction=0.2), store)
    samples = sample_teacher(
        SampleConfig(teacher=str(teacher), max_new_tokens=8, top_k_logprobs=4, batch_size=32), dataset, store
    )
    return store, dataset, samples


def model_ref(path: Path | str, name: str, loss_history: list[dict] | None = None):
    """A `ModelRef` for a model folder made outside the train stage (a fixture's model, as if trained)."""
    from stillhouse.refs import ModelRef

    return ModelRef(
        stage="train",
        fingerprint=name,
        path=str(path),
        cached=True,
        model_path=str(path),
        parameters=0,
        train_seconds=0,
        final_loss=None,
        loss_history=loss_history or [],
    )


def upload_to_default_hub(hub, monkeypatch, folder: Path, repo_id: str) -> None:
    """Make the loopback ``hub`` the client's default endpoint (as for a model id in a config) and upload ``folder``.

    The client builds download URLs from constants fixed at import, so both are pointed at the hub, and
    transformers keeps one HfApi (with the endpoint of its first use), which is dropped.
    """
    import transformers.utils.hub
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    api = HfApi(endpoint=hub.url, token="hf_test_token")
    api.create_repo(repo_id)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id)


@pytest.fixture(autouse=True)
def mlflow_environment_kept():
    """A test that tracks into a server in this process must not point later tests' subprocesses at it."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    before = {name: os.environ.get(name) for name in names}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("teacher"), hidden_size=48, seed=1)


@pytest.fixture(scope="session")
def prompts_jsonl(tmp_path_factory) -> Path:
    """120 demo-style prompts with references and categories, one duplicate and one empty row."""
    from stillhouse.demo.tasks import make_examples

    rows = make_examples(120, seed=7)
    rows += [rows[0], {"prompt": "   ", "reference": "x", "task": "reverse"}]
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def pipeline_raw(tmp_path, tiny_teacher, prompts_jsonl) -> dict:
    """A small, fast pipeline config (as a dict) over the tiny teacher and the prompts file."""
    return tiny_pipeline_raw(tmp_path, tiny_teacher, prompts_jsonl)


def tiny_pipeline_raw(tmp_path: Path, tiny_teacher: Path, prompts_jsonl: Path) -> dict:
    """`pipeline_raw` for fixtures of a wider scope: store and sqlite tracking under ``tmp_path``."""
    return {
        "name": "tiny",
        "store": str(tmp_path / "store"),
        "curate": {"source": str(prompts_jsonl), "category_column": "task", "eval_fraction": 0.2},
        "sample": {
            "teacher": str(tiny_teacher),
            "max_new_tokens": 8,
            "top_k_logprobs": 4,
            "batch_size": 16,
            "shard_rows": 40,
        },
        "train": {
            "architecture": {"hidden_size": 16, "num_layers": 2, "intermediate_size": 32, "num_heads": 2},
            "method": "kd",
            "max_steps": 6,
            "batch_size": 8,
            "logging_steps": 2,
            "learning_rate": 0.01,
        },
        "evaluate": {"max_new_tokens": 8, "batch_size": 16},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
        "registry": {"model_name": "tiny-student"},
    }


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (~13 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A loopback Hub accepting token `hf_test_token` for user `alice`; HF caches kept in tmp_path."""
    from hub_server import LoopbackHub
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    for name, value in {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
    }.items():
        monkeypatch.setattr(constants, name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with LoopbackHub(tokens={"hf_test_token": "alice"}) as server:
        yield server
        assert not server.server_errors, server.server_errors

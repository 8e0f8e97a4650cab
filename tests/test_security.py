"""Security: pickle weights refused, a model's own code runs only when allowed, paths and repo ids that
could escape are refused, and secrets (Hub token, OpenAI key, the password in tracking.uri, the signing
key) never reach anything the pipeline writes or prints.

The pickle and the model code used here are real traps: each writes a marker file if it ever runs.
"""

import json
import os
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import upload_to_default_hub

from stillhouse.config import ConfigError, SampleConfig, TrainConfig, parse_config
from stillhouse.errors import InputError
from stillhouse.flows.cli import main
from stillhouse.models import load_causal_lm, resolve_model
from stillhouse.sampling.sample import check_teacher
from stillhouse.training.train import build_student


class RunsWhenUnpickled:
    """Unpickling this touches a file: what a malicious pytorch_model.bin could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture
def pickled_model(tmp_path, tiny_teacher) -> tuple[Path, Path]:
    """(a model folder whose only weights are a booby-trapped pickle, the marker it would write)."""
    folder = Path(shutil.copytree(tiny_teacher, tmp_path / "pickled"))
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": RunsWhenUnpickled(marker)}))
    return folder, marker


def test_a_pickle_only_checkpoint_is_refused_before_it_is_opened(pickled_model, tmp_path, pipeline_raw, capsys):
    folder, marker = pickled_model
    with pytest.raises(
        InputError,
        match=r"train.student: .* has weights only as pickle files \(pytorch_model.bin\), which can run arbitrary code",
    ):
        load_causal_lm(str(folder), field="train.student")
    with pytest.raises(InputError, match=r"sample.teacher: .*pickle files.*convert it once"):
        resolve_model(str(folder), "sample.teacher")
    pipeline_raw["sample"]["teacher"] = str(folder)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(pipeline_raw))
    assert main(["validate", str(config)]) == 2
    assert "sample.teacher" in capsys.readouterr().err
    assert not marker.exists()


def test_a_pickle_only_hub_repo_is_refused_before_any_weight_is_downloaded(pickled_model, hub, monkeypatch):
    folder, marker = pickled_model
    upload_to_default_hub(hub, monkeypatch, folder, "alice/pickled")
    with pytest.raises(
        InputError,
        match=r"sample.teacher: 'alice/pickled' at revision 'main' has weights only as pickle files "
        r"\(pytorch_model.bin\)",
    ):
        check_teacher(SampleConfig(teacher="alice/pickled"))
    with pytest.raises(
        InputError, match=r"train.student: 'alice/pickled' at revision 'main' has weights only as pickle files"
    ):
        load_causal_lm("alice/pickled", field="train.student")
    assert not marker.exists()
    assert not any(request.path.endswith("pytorch_model.bin") and request.method == "GET" for request in hub.requests)


def test_the_same_folder_with_safetensors_loads(tiny_teacher):
    assert load_causal_lm(str(tiny_teacher), device="cpu").config.vocab_size > 0


@pytest.fixture
def model_with_code(tmp_path, tiny_teacher, monkeypatch) -> tuple[Path, Path]:
    """(a model folder whose config names its own Python classes, the marker their module writes on import)."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # where transformers copies model code
    folder = Path(shutil.copytree(tiny_teacher, tmp_path / "custom-code"))
    marker = tmp_path / "model-code-ran"
    (folder / "configuration_custom.py").write_text(
        "from pathlib import Path\nfrom transformers import LlamaConfig\n"
        f"Path({str(marker)!r}).touch()\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
    )
    (folder / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_custom import CustomConfig\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    settings = json.loads((folder / "config.json").read_text())
    settings.update(
        model_type="custom-llama",
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(settings))
    return folder, marker


def test_model_code_runs_only_when_the_config_allows_it_for_that_model(model_with_code, tiny_teacher):
    folder, marker = model_with_code
    with pytest.raises(
        InputError, match=r"sample.teacher: .* ships its own Python code .*set sample.trust_remote_code: true"
    ):
        check_teacher(SampleConfig(teacher=str(folder)))
    student = {"student": str(folder), "method": "sft", "max_steps": 1, "batch_size": 8}
    with pytest.raises(
        InputError, match=r"train.student: .* ships its own Python code .*set train.trust_remote_code: true"
    ):
        build_student(TrainConfig.model_validate(student), str(tiny_teacher))
    assert not marker.exists()

    facts = check_teacher(SampleConfig(teacher=str(folder), trust_remote_code=True))
    assert marker.exists() and facts.vocab_size > 0  # allowed for this teacher: its code ran
    marker.unlink()
    model, _ = build_student(TrainConfig.model_validate({**student, "trust_remote_code": True}), str(tiny_teacher))
    assert type(model).__name__ == "CustomForCausalLM"


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("", "name", "..", "name: Value error, '..' is not usable as a folder name"),
        ("", "name", ".", "is not usable as a folder name"),
        ("", "name", "../outside", "name: String should match pattern"),
        ("", "name", "/etc", "name: String should match pattern"),
        ("publish", "repo_id", "alice/..", "publish.repo_id: Value error, 'alice/..': each part of a Hub repo id"),
        ("publish", "repo_id", "../alice", "each part of a Hub repo id must not start or end"),
        ("publish", "repo_id", "alice/x/../y", "publish.repo_id: Value error, 'alice/x/../y' is not a Hub repo id"),
        ("publish", "repo_id", "/alice/model", "publish.repo_id: Value error, '/alice/model' is not a Hub repo id"),
        ("publish", "repo_id", "alice/-model", "each part of a Hub repo id"),
    ],
)
def test_names_and_repo_ids_that_could_escape_are_refused(pipeline_raw, section, key, value, message):
    (pipeline_raw.setdefault(section, {}) if section else pipeline_raw)[key] = value
    with pytest.raises(ConfigError) as error:
        parse_config(pipeline_raw, origin="exp.yaml")
    assert message in str(error.value)


# Secrets ------------------------------------------------------------------------------------------

HUB_TOKEN = "hf_SENTINEL_hub_5e1f0c7a9d2b"
OPENAI_KEY = "sk-SENTINEL-openai-8c3a6f1e4b70"
TRACKING_PASSWORD = "pw-SENTINEL-mlflow-3d9e5a7c1f42"


def basic_auth_available() -> bool:
    try:
        import flask_wtf  # noqa: F401 (mlflow[auth]: the basic-auth app needs it)
    except ImportError:
        return False
    return True


@contextmanager
def mlflow_server_with_password(folder: Path, password: str) -> Iterator[tuple[str, bool]]:
    """(URL, whether it checks credentials): `mlflow server --app-name basic-auth`, user `admin` with ``password``.

    Without Flask-WTF (mlflow[auth]) the basic-auth app can't start: then a plain server, which ignores the
    credentials; it still shows they never reach stdout, MLflow's database or Prefect. The password reaches
    the server through its environment only, never a file under ``folder`` (which the test scans).
    """
    from servers import BIN, background, free_port, mlflow_server, wait_until_healthy

    if not basic_auth_available():
        with mlflow_server(folder) as url:
            yield url, False
        return
    port = free_port()
    (folder / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{folder / 'mlflow-auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Checked once, then cached: a PBKDF2 comparison on each of the run's hundreds of requests is slow.
        "auth_cache_ttl_seconds = 600\n"
    )
    command = [
        str(BIN / "mlflow"),
        *("server", "--app-name", "basic-auth"),
        *("--backend-store-uri", f"sqlite:///{folder / 'mlflow-server.db'}"),
        *("--artifacts-destination", str(folder / "mlflow-artifacts"), "--serve-artifacts"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
    }
    with background(command, folder / "mlflow-server.log", env) as process:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(f"{url}/health", process, folder / "mlflow-server.log")
        yield url, True


def files_below(folder: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.slow
@pytest.mark.integration
def test_tokens_never_reach_anything_the_pipeline_writes(
    prefect_harness, pipeline_raw, tiny_teacher, tmp_path, monkeypatch, capfd, caplog
):
    """The tiny pipeline with every secret set: the student pushed to a Hub that needs the token and signed with
    a key from the environment, the teacher sampled behind an OpenAI-compatible server that needs the key, and
    runs tracked on an MLflow server whose password is in tracking.uri. Every byte written or printed is
    scanned."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from hub_server import LoopbackHub
    from huggingface_hub import constants
    from mlflow.tracking import MlflowClient
    from openai_server import FakeOpenAIServer
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    from stillhouse.flows.distill import distill
    from stillhouse.registry.credentials import without_tracking_credentials

    home = tmp_path / "hf-home"
    for name, value in {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
    }.items():
        monkeypatch.setattr(constants, name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setenv("STILLHOUSE_TEST_OPENAI_KEY", OPENAI_KEY)
    signing_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    monkeypatch.setenv("STILLHOUSE_TEST_SIGNING_KEY", signing_key.decode())
    signing_secret = "".join(signing_key.decode().splitlines()[1:-1])  # the PEM's base64 body
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # set by the run: restored afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    server_folder = tmp_path / "mlflow-server"
    server_folder.mkdir()
    with (
        LoopbackHub(tokens={HUB_TOKEN: "alice"}) as hub,
        FakeOpenAIServer(tiny_teacher) as teacher_server,
        mlflow_server_with_password(server_folder, TRACKING_PASSWORD) as (mlflow_url, checks_password),
    ):
        host = mlflow_url.removeprefix("http://")
        pipeline_raw["tracking"]["uri"] = f"http://admin:{TRACKING_PASSWORD}@{host}"
        # The whole pipeline, published to the Hub with the token, signed.
        pipeline_raw["publish"] = {
            "repo_id": "alice/tiny-student",
            "endpoint": hub.url,
            "teacher_name": "alice/tiny-teacher",
            "dataset_names": ["alice/tiny-prompts"],
            "teacher_license": "apache-2.0",
            "signing": {"key": "env:STILLHOUSE_TEST_SIGNING_KEY"},
        }
        # What the CLI does before the flow starts: the password leaves the config (Prefect stores a flow run's
        # parameters) for MLflow's environment variables.
        config = without_tracking_credentials(parse_config(pipeline_raw))
        assert config.tracking.uri == mlflow_url
        result = distill(config)
        assert result.published is not None and result.published.repo_id == "alice/tiny-student"
        # The same prompts sampled through the OpenAI-compatible engine with the key, in the same store,
        # MLflow and Prefect. Up to sampling: the key is used only there (tests/test_served_teacher.py
        # runs the later stages with a served teacher).
        pipeline_raw["sample"].update(
            engine="openai",
            teacher="tiny-teacher",
            openai={
                "base_url": teacher_server.url,
                "api_key_env": "STILLHOUSE_TEST_OPENAI_KEY",
                "tokenizer": str(tiny_teacher),
                "backoff_seconds": 0,
            },
        )
        served = distill(without_tracking_credentials(parse_config(pipeline_raw)), until="sample")
        assert served.samples.rows == result.samples.rows and not served.samples.cached
        # Both secrets were used, so the scan below means something.
        assert {request["authorization"] for request in teacher_server.requests} == {f"Bearer {OPENAI_KEY}"}
        assert any(request.token == HUB_TOKEN for request in hub.requests)
        assert not hub.server_errors, hub.server_errors
        assert result.published.commit_oid and "model.sig" in hub.files("alice/tiny-student")
        # The runs are on the server (which refuses requests without the password, when it checks them).
        runs = MlflowClient(mlflow_url).search_runs(
            [MlflowClient(mlflow_url).get_experiment_by_name("tests").experiment_id]
        )
        assert {run.info.run_id for run in runs} >= {result.mlflow_run_id, served.mlflow_run_id}
        assert runs[0].data.params.get("tracking.uri", mlflow_url) == mlflow_url
        if checks_password:
            import httpx

            assert httpx.get(f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1").status_code == 401
        hub_files = {
            f"hub:{repo_id}@{sha}/{path}": content
            for (_, repo_id), repo in hub.repos.items()
            for sha, commit in repo.commits.items()
            for path, content in commit.files.items()
        }
        hub_files.update({f"hub-lfs:{oid}": content for oid, content in hub.lfs_objects.items()})

    # Everything under tmp_path: the store (with the published folder), MLflow's database and
    # artifacts, the HF cache of the round-trip download; then Prefect's database and the logs.
    written = files_below(tmp_path)
    prefect_db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    written.update(files_below(prefect_db.parent))
    captured = capfd.readouterr()
    written.update(
        {"stdout": captured.out.encode(), "stderr": captured.err.encode(), "log records": caplog.text.encode()}
    )
    written.update(hub_files)
    assert str(prefect_db) in written
    assert any(name.endswith("/README.md") for name in hub_files) and any(
        name.endswith("/model.safetensors") for name in hub_files
    )
    assert any(name.endswith("mlflow-server.db") for name in written)
    for secret in (HUB_TOKEN, OPENAI_KEY, TRACKING_PASSWORD, signing_secret):
        # Also a secret's distinctive middle, in case something wrote it truncated or quoted.
        for needle in (secret, secret[3:15]):
            leaks = [name for name, content in written.items() if needle.encode() in content]
            assert not leaks, f"{needle!r} found in {leaks}"
    print(
        f"scanned {len(written)} files and streams, {sum(map(len, written.values())) / 1e6:.1f} MB: no secret found "
        f"(MLflow server {'with' if checks_password else 'WITHOUT'} basic auth)"
    )


def test_a_password_in_tracking_uri_stays_out_of_the_error_when_the_server_is_down(pipeline_raw, tmp_path, capsys):
    from servers import free_port

    pipeline_raw["tracking"]["uri"] = f"http://admin:{TRACKING_PASSWORD}@127.0.0.1:{free_port()}"
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(pipeline_raw))
    assert main(["validate", str(config)]) == 2
    captured = capsys.readouterr()
    assert "the MLflow tracking server at http://127.0.0.1:" in captured.err and "does not answer" in captured.err
    assert TRACKING_PASSWORD not in captured.err + captured.out and "admin" not in captured.err

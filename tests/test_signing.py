"""Signed publishing: the folder signed with model-signing (an EC key made here with `cryptography`), the signature
pushed in the same Hub commit, and `pull --verify-key` refusing anything that key didn't sign.

    .venv/bin/python -m pytest tests/test_signing.py -q
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import build_tiny_model
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from huggingface_hub import CommitOperationAdd, HfApi
from test_publish import LINEAGE, refs

from stillhouse.config import parse_config
from stillhouse.errors import InputError, StillhouseError
from stillhouse.licenses import check_pipeline_licenses
from stillhouse.registry.hub import push_folder
from stillhouse.registry.publish import write_publish_folder
from stillhouse.registry.pull import download, pull_command
from stillhouse.registry.signing import public_key_sha256

pytest.importorskip("model_signing")  # the `signing` extra

TOKEN = "hf_test_token"
REPO = "alice/signed-student"


def key_pair(folder: Path, name: str = "signing") -> tuple[Path, Path, str]:
    """(private key PEM, public key PEM, the public key's sha256): a fresh P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}-key.pem", folder / f"{name}-key.pub.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public, public_key_sha256(key.public_key())


@pytest.fixture
def keys(tmp_path):
    return key_pair(tmp_path)


def publish(tmp_path, pipeline_raw, hub, monkeypatch, signing_key: str | None, name="out", seed=5):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    pipeline_raw["publish"] = {"repo_id": REPO, "endpoint": hub.url, "private": False, "retry_backoff_s": 0.01}
    if signing_key:
        pipeline_raw["publish"]["signing"] = {"key": signing_key}
    config = parse_config(pipeline_raw)
    student = build_tiny_model(tmp_path / f"student-{seed}", hidden_size=16, seed=seed)
    folder = write_publish_folder(tmp_path / name, config, *refs(student), check_pipeline_licenses(config), LINEAGE)
    return folder, push_folder(folder, config, tag="v1")


def test_a_signed_publish_verifies_with_its_public_key(tmp_path, pipeline_raw, hub, monkeypatch, keys, capsys):
    private, public, fingerprint = keys
    folder, pushed = publish(tmp_path, pipeline_raw, hub, monkeypatch, str(private))
    provenance = json.loads((folder / "stillhouse.json").read_text())
    assert provenance["signature"]["file"] == "model.sig"
    assert provenance["signature"]["public_key_sha256"] == fingerprint
    assert provenance["signature"]["method"].startswith("model-signing ")
    assert "model.sig" in hub.files(REPO, pushed.commit_oid)  # in the same commit as the files it covers
    assert "model.sig" not in provenance["files"]

    pulled = download(REPO, "v1", hub.url, cache_dir=str(tmp_path / "cache"), verify_key=public)
    assert pulled.signature == f"verified with key sha256 {fingerprint[:16]}…"
    assert pull_command(REPO, "v1", hub.url, "reverse: ab", max_new_tokens=2, verify_key=str(public)) == 0
    assert f"signature: verified with key sha256 {fingerprint[:16]}…" in capsys.readouterr().out
    # Without a key, pull says plainly that it didn't check.
    assert pull_command(REPO, "v1", hub.url, "reverse: ab", max_new_tokens=2) == 0
    assert "signature: signed, not verified (no --verify-key)" in capsys.readouterr().out


def test_an_unsigned_publish_says_so_and_is_refused_with_a_key(tmp_path, pipeline_raw, hub, monkeypatch, keys, capsys):
    _, public, _ = keys
    folder, _ = publish(tmp_path, pipeline_raw, hub, monkeypatch, None)
    assert json.loads((folder / "stillhouse.json").read_text())["signature"] is None
    assert not (folder / "model.sig").exists()
    assert pull_command(REPO, "v1", hub.url, "reverse: ab", max_new_tokens=2) == 0
    assert "signature: unsigned" in capsys.readouterr().out
    with pytest.raises(StillhouseError, match=r"is unsigned \(no model.sig\), but --verify-key asks for a signature"):
        download(REPO, "v1", hub.url, cache_dir=str(tmp_path / "cache"), verify_key=public)


def test_weights_and_stillhouse_json_rewritten_together_fail_the_signature(
    tmp_path, pipeline_raw, hub, monkeypatch, keys
):
    """Consistent to stillhouse.json and the Hub's LFS records, so only the signature can tell."""
    private, public, _ = keys
    publish(tmp_path, pipeline_raw, hub, monkeypatch, str(private))
    other = build_tiny_model(tmp_path / "other", hidden_size=16, seed=99)
    provenance = json.loads(hub.files(REPO)["stillhouse.json"])
    weights = (other / "model.safetensors").read_bytes()
    provenance["files"]["model.safetensors"] = {"sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}
    HfApi(endpoint=hub.url, token=TOKEN).create_commit(
        REPO,
        operations=[
            CommitOperationAdd("model.safetensors", weights),
            CommitOperationAdd("stillhouse.json", json.dumps(provenance).encode()),
        ],
        commit_message="swap the weights",
    )
    unchecked = download(REPO, None, hub.url, cache_dir=str(tmp_path / "cache"))  # every checksum agrees
    assert unchecked.signature == "signed, not verified (no --verify-key)"
    with pytest.raises(StillhouseError, match=r"the signature model.sig does not verify with the --verify-key"):
        download(REPO, None, hub.url, cache_dir=str(tmp_path / "cache2"), verify_key=public)
    # The tag still points at what was signed.
    assert download(REPO, "v1", hub.url, cache_dir=str(tmp_path / "cache3"), verify_key=public).signature.startswith(
        "verified"
    )

    HfApi(endpoint=hub.url, token=TOKEN).delete_file("model.sig", repo_id=REPO)
    with pytest.raises(StillhouseError, match=r"is unsigned \(no model.sig\)"):
        download(REPO, None, hub.url, cache_dir=str(tmp_path / "cache4"), verify_key=public)


def test_a_revision_signed_by_another_key_is_refused(tmp_path, pipeline_raw, hub, monkeypatch, keys):
    _, public, _ = keys
    intruder, _, intruder_fingerprint = key_pair(tmp_path, "intruder")
    publish(tmp_path, pipeline_raw, hub, monkeypatch, str(intruder))
    with pytest.raises(
        StillhouseError, match=rf"signed by key sha256 {intruder_fingerprint[:16]}…, not by the --verify-key"
    ):
        download(REPO, "v1", hub.url, cache_dir=str(tmp_path / "cache"), verify_key=public)


def test_a_key_from_the_environment_signs_and_never_lands_on_disk(tmp_path, pipeline_raw, hub, monkeypatch, keys):
    private, public, fingerprint = keys
    monkeypatch.setenv("STILLHOUSE_TEST_SIGNING_KEY", private.read_text())
    private.unlink()
    folder, _ = publish(tmp_path, pipeline_raw, hub, monkeypatch, "env:STILLHOUSE_TEST_SIGNING_KEY")
    assert json.loads((folder / "stillhouse.json").read_text())["signature"]["public_key_sha256"] == fingerprint
    assert download(REPO, "v1", hub.url, cache_dir=str(tmp_path / "cache"), verify_key=public).signature.startswith(
        "verified"
    )
    secret = "".join(os.environ["STILLHOUSE_TEST_SIGNING_KEY"].splitlines()[1:-1])  # the PEM's base64 body
    written = [path for path in tmp_path.rglob("*") if path.is_file() and secret[10:40].encode() in path.read_bytes()]
    assert not written, written


@pytest.mark.parametrize(
    "make, message",
    [
        ("rsa", r"holds a RSAPrivateKey, but model-signing signs with elliptic-curve keys"),
        ("garbage", r"is not an unencrypted PEM private key \(ValueError\)"),
        ("missing-file", r"publish.signing.key: can't read .*missing.pem \(No such file or directory\)"),
        ("empty-env", r"publish.signing.key is 'env:STILLHOUSE_NO_SUCH_KEY', but \$STILLHOUSE_NO_SUCH_KEY is empty"),
    ],
)
def test_a_bad_signing_key_fails_naming_the_field_before_anything_is_written(
    tmp_path, pipeline_raw, hub, monkeypatch, make, message
):
    from stillhouse.registry.signing import check_signing

    monkeypatch.delenv("STILLHOUSE_NO_SUCH_KEY", raising=False)
    key = tmp_path / "key.pem"
    if make == "rsa":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key.write_bytes(
            rsa_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    elif make == "garbage":
        key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    reference = {"missing-file": str(tmp_path / "missing.pem"), "empty-env": "env:STILLHOUSE_NO_SUCH_KEY"}.get(
        make, str(key)
    )
    pipeline_raw["publish"] = {"repo_id": REPO, "endpoint": hub.url, "signing": {"key": reference}}
    config = parse_config(pipeline_raw)
    with pytest.raises(InputError, match=message):
        check_signing(config)
    with pytest.raises(InputError, match=message):
        write_publish_folder(tmp_path / "out", config, *refs(tmp_path), check_pipeline_licenses(config), LINEAGE)
    assert not hub.requests


def test_a_bad_verify_key_names_the_file(tmp_path):
    bad = tmp_path / "not-a-key.pem"
    bad.write_text("hello")
    with pytest.raises(InputError, match=r"--verify-key: .*not-a-key.pem is not a PEM public key"):
        download(REPO, None, "http://127.0.0.1:9", verify_key=bad)


def test_the_pull_command_refuses_a_revision_another_key_signed(tmp_path, pipeline_raw, hub, monkeypatch, keys):
    """`stillhouse pull --verify-key` as a user types it: the right key prints the answer, another key exits 2."""
    import subprocess
    import sys

    private, public, _ = keys
    _, stranger, _ = key_pair(tmp_path, "stranger")
    publish(tmp_path, pipeline_raw, hub, monkeypatch, str(private))

    def pull(key: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "stillhouse.flows.cli", "pull", REPO, "--revision", "v1"]
        command += ["--endpoint", hub.url, "--prompt", "reverse: ab", "--max-new-tokens", "2", "--verify-key", str(key)]
        return subprocess.run(command, capture_output=True, text=True, timeout=180, env={**os.environ})

    verified = pull(public)
    assert verified.returncode == 0, verified.stderr
    assert "signature: verified with key sha256" in verified.stdout
    refused = pull(stranger)
    assert refused.returncode == 2
    assert "error: " in refused.stderr and "not by the --verify-key" in refused.stderr
    assert "Traceback" not in refused.stderr

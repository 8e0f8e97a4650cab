"""Signing a published folder with model-signing (Sigstore's library), and reading the key before any stage.

    check_signing(config)        # before a run: the library imports and the key reads, or an InputError naming the fix
    with signing_key(settings) as (path, fingerprint):
        sign_folder(folder, path)   # folder/model.sig over every file's sha256

Kept apart from publishing (MLflow, transformers) so `stillhouse validate` checks the key without importing either.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stillhouse.config import PipelineConfig, SigningConfig
from stillhouse.errors import InputError

SIGNATURE_FILE = "model.sig"  # model-signing's bundle: written after stillhouse.json, so not listed in it


def import_model_signing(needed_by: str = "publish.signing is set", instead: str = "set publish.signing: null"):
    try:
        import model_signing
    except ImportError as error:
        raise InputError(
            f"{needed_by}, but the model-signing library is not installed ({error}); "
            f"pip install 'stillhouse[signing]' (model-signing), or {instead}"
        ) from None
    return model_signing


def model_signing_version() -> str:
    return import_model_signing().__version__


def signature_hashing(allow_symlinks: bool = False):
    """How the folder is hashed for its signature: every file's sha256, except the signature and git's files.

    Verifying a Hub download allows symlinks: the Hub cache links each snapshot file to its blob.
    """
    from model_signing import hashing

    return (
        hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256")
        .set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=True)
        .set_allow_symlinks(allow_symlinks)
    )


def public_key_sha256(public_key) -> str:
    """The sha256 of a public key's DER SubjectPublicKeyInfo: what stillhouse.json and `pull` name a key by."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def read_signing_key(settings: SigningConfig) -> tuple[bytes, str]:
    """(the private key's PEM, the sha256 of its public key); `InputError` naming publish.signing.key otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    reference = settings.key
    if reference.startswith("env:"):
        name = reference.removeprefix("env:")
        pem = os.environ.get(name, "").encode()
        where = f"${name}"
        if not pem.strip():
            raise InputError(f"publish.signing.key is {reference!r}, but ${name} is empty; export the PEM key in it")
    else:
        path = Path(reference).expanduser()
        where = str(path)
        try:
            pem = path.read_bytes()
        except OSError as error:
            raise InputError(
                f"publish.signing.key: can't read {path} ({error.strerror}); give a PEM private key file or env:NAME"
            ) from None
    hint = "generate one with `openssl ecparam -name prime256v1 -genkey -noout -out signing-key.pem`"
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:  # the message never quotes the key
        raise InputError(
            f"publish.signing.key: {where} is not an unencrypted PEM private key ({type(error).__name__}); {hint}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise InputError(
            f"publish.signing.key: {where} holds a {type(key).__name__.lstrip('_')}, but model-signing signs with "
            f"elliptic-curve keys (P-256, P-384, P-521); {hint}"
        )
    return pem, public_key_sha256(key.public_key())


def check_signing(config: PipelineConfig) -> str | None:
    """Before a run: the library is installed and the key reads; returns the public key's sha256 (None: unsigned)."""
    if config.publish.signing is None:
        return None
    import_model_signing()
    return read_signing_key(config.publish.signing)[1]


@contextmanager
def signing_key(settings: SigningConfig) -> Iterator[tuple[Path, str]]:
    """(a path to the private key PEM, the sha256 of its public key) while signing.

    model-signing reads the key from a path: a key from the environment is written to a file only this
    user can read, in a fresh temporary folder outside the store, and removed right after.
    """
    import_model_signing()
    pem, fingerprint = read_signing_key(settings)
    if not settings.key.startswith("env:"):
        yield Path(settings.key).expanduser(), fingerprint
        return
    with tempfile.TemporaryDirectory(prefix="stillhouse-signing-") as private:
        path = Path(private) / "key.pem"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
        yield path, fingerprint


def sign_folder(folder: Path, private_key: Path) -> Path:
    """Sign every file of ``folder`` (but the signature and git's files) into ``folder/model.sig``."""
    from model_signing import signing

    signature = folder / SIGNATURE_FILE
    signing.Config().use_elliptic_key_signer(private_key=private_key).set_hashing_config(signature_hashing()).sign(
        folder, signature
    )
    return signature

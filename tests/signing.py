"""Publisher keys and repos signed with OpenSSF model signing (the `model_signing` library, as
`model_signing sign key` does), for the fake Hub's runtime repos."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakehub.repos import added_repo


def new_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An EC P-256 key pair as PEM files: (private, public)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / f"{name}.pem", directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def sign_directory(model_dir: Path, private_key: Path) -> bytes:
    """model.sig of the directory, git files (.gitattributes) included, as
    `model_signing sign key --no-ignore-git-paths --private_key KEY DIR` writes it."""
    from model_signing import hashing, signing

    signature = model_dir.parent / f"{model_dir.name}.sig"
    hashing_config = hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False)
    (signing.Config().use_elliptic_key_signer(private_key=private_key)
     .set_hashing_config(hashing_config).sign(model_dir, signature))
    return signature.read_bytes()


def signed_files(repo_id: str, files: dict[str, dict[str, Any]], private_key: Path,
                 work: Path) -> dict[str, dict[str, Any]]:
    """The fake Hub's file specs of the repo, plus its model.sig signed with the key."""
    model_dir = work / repo_id.replace("/", "--")
    for path, spec in added_repo(repo_id, files).commits.popitem()[1].items():
        (model_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / path).write_bytes(spec.content)
    sig = sign_directory(model_dir, private_key)
    return {**files, "model.sig": {"content_b64": base64.b64encode(sig).decode(), "lfs": False}}

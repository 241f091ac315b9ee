"""Publisher signatures (OpenSSF model signing): repos matched by a `require_signature` rule are
served only as their publisher signed them.

Such a repo has a `model.sig` at its root: a Sigstore bundle whose DSSE payload lists every file
with its sha256, signed with the publisher's private key. A file of the repo goes to a client or
a peer only after the `model.sig` of the same commit verified with the pinned public key and lists
the file with the sha256 of the bytes this node holds. An LFS blob is named by its sha256, which
the store checks anyway; a small (non-LFS) file's sha256 is computed once and kept in the index.
The verified manifest is kept per (repo, commit), so only the first file of a commit pays for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import functools
import hashlib
import logging
import tempfile
from pathlib import Path
from types import ModuleType

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .catalog import Catalog, FileEntry, Repo
from .errors import HubError, SignatureRefused
from .fetch import Fetcher
from .metrics import Metrics
from .transfer import Origin

log = logging.getLogger(__name__)

SIGNATURE_FILE = "model.sig"
MAX_SIGNATURE_BYTES = 16 * 1024**2
HASH_BLOCK = 1024**2
_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # those model_signing signs with


@dataclasses.dataclass(frozen=True)
class SignatureRule:
    pattern: str  # a glob over repo ids as the CLI writes them: org/name, datasets/org/name
    key_file: Path

    def matches(self, repo: Repo) -> bool:
        return fnmatch.fnmatchcase(str(repo), self.pattern)

    def __str__(self) -> str:
        return f"{self.pattern}={self.key_file}"


def parse_rule(value: str) -> SignatureRule:
    """'PATTERN=KEYFILE' (the flag, the TOML list item): the key must be a usable public key."""
    pattern, _, key_file = str(value).partition("=")
    if not pattern.strip() or not key_file.strip():
        raise ValueError(f"expected PATTERN=KEYFILE (e.g. 'acme/*=/etc/modelpeer/acme.pub'), "
                         f"got {value!r}")
    rule = SignatureRule(pattern.strip(), Path(key_file.strip()))
    check_public_key(rule.key_file)
    return rule


def check_public_key(path: Path) -> None:
    """A PEM EC public key of a curve `model_signing sign key` uses, or ValueError."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the public key: {e.strerror}") from e
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise ValueError(f"{path}: not a PEM public key") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVES:
        raise ValueError(f"{path}: not an EC P-256/P-384/P-521 public key (the keys "
                         "`model_signing sign key` signs with)")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a verified `model.sig` says: each signed file's sha256."""
    rule: SignatureRule
    signature_digest: str  # the blob of the model.sig that verified
    sha256: dict[str, str]


@functools.cache
def model_signing() -> tuple[ModuleType, ModuleType]:
    """model_signing's bundle reader and EC key verifier. Importing them takes half a second of
    CPU, so only a daemon with a rule does, at start or at the reload that brings the first rule
    (not at the first request, whose download it would hold up)."""
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    return sign_sigstore_pb, sign_ec_key


def verified_manifest(data: bytes, rule: SignatureRule) -> dict[str, str]:
    """The per-file sha256 of a model_signing bundle verified with the rule's key; ValueError
    saying why not. CPU-bound: run it in a thread."""
    sign_sigstore_pb, sign_ec_key = model_signing()
    with tempfile.NamedTemporaryFile(suffix=".sig") as f:
        f.write(data)
        f.flush()
        try:
            signature = sign_sigstore_pb.Signature.read(Path(f.name))
            manifest = sign_ec_key.Verifier(rule.key_file).verify(signature)
        except Exception as e:  # a hostile file can fail anywhere in parsing or verifying
            raise ValueError(f"{SIGNATURE_FILE} does not verify with {rule.key_file} "
                             f"({type(e).__name__}{': ' if str(e) else ''}{str(e)[:200]})") from e
    serialization_type: dict[str, object] = manifest.serialization_type
    if serialization_type.get("method") != "files" or serialization_type.get(
            "hash_type") != "sha256":
        raise ValueError(f"{SIGNATURE_FILE} lists {serialization_type.get('method')} hashed "
                         f"with {serialization_type.get('hash_type')}; modelpeer compares "
                         "whole-file sha256 (model_signing's default)")
    return {rd.identifier: rd.digest.digest_hex for rd in manifest.resource_descriptors()}


def _sha256_of_blob(fetcher: Fetcher, entry: FileEntry) -> str:
    h = hashlib.sha256()
    for offset in range(0, entry.blob.size, HASH_BLOCK):
        h.update(fetcher.store.read(entry.blob, offset,
                                    min(HASH_BLOCK, entry.blob.size - offset)))
    return h.hexdigest()


class SignaturePolicy:
    """The `require_signature` rules and what passed them since the start or the last reload:
    which blobs peers may get. Known before the fetcher exists (the LAN is built with it)."""

    def __init__(self, rules: list[SignatureRule], catalog: Catalog) -> None:
        self.catalog = catalog
        self.passed: set[tuple[Repo, str, str, str]] = set()  # (repo, commit, path, digest)
        self.rules: list[SignatureRule] = []
        self.set_rules(rules)

    def set_rules(self, rules: list[SignatureRule]) -> None:
        """A new policy (at start, at SIGHUP): what the old one verified counts no more."""
        if rules:
            model_signing()
        self.rules = rules
        self.passed.clear()

    def rule_for(self, repo: Repo) -> SignatureRule | None:
        return next((r for r in self.rules if r.matches(repo)), None)

    def may_share(self, digest: str) -> bool:
        """Whether peers may get this blob: not while a file of a repo under a rule has these
        bytes and has not passed its check on this node (since the start or the last reload)."""
        if not self.rules:
            return True
        return all((e.repo, e.commit, e.path, digest) in self.passed
                   for e in self.catalog.cached_entries(digest) if self.rule_for(e.repo))


class Signatures:
    """Enforces the policy: which files may be served (checking each against its repo's signed
    manifest, fetched through the fetcher like any file)."""

    def __init__(self, policy: SignaturePolicy, catalog: Catalog, fetcher: Fetcher,
                 metrics: Metrics) -> None:
        self.policy = policy
        self.catalog = catalog
        self.fetcher = fetcher
        self.metrics = metrics
        self._manifests: dict[tuple[Repo, str], asyncio.Task[Manifest]] = {}

    def set_rules(self, rules: list[SignatureRule]) -> None:
        self.policy.set_rules(rules)
        self._manifests.clear()

    async def check(self, entry: FileEntry, token: str | None) -> None:
        """Raise SignatureRefused unless the policy lets this file be served."""
        rule = self.policy.rule_for(entry.repo)
        if rule is None:
            return
        try:
            manifest = await self._manifest(entry.repo, entry.commit, rule, token)
            await self._check_file(entry, manifest, token)
        except SignatureRefused as e:
            self.metrics.signature_refused_file()
            log.warning("refused %s/%s@%s: %s", entry.repo, entry.path, entry.commit[:12],
                        e.reason)
            raise
        self.policy.passed.add((entry.repo, entry.commit, entry.path, entry.blob.digest))

    async def _manifest(self, repo: Repo, commit: str, rule: SignatureRule,
                        token: str | None) -> Manifest:
        """The verified manifest of repo@commit, verified once however many ask at once."""
        key = (repo, commit)
        task = self._manifests.get(key)
        if task is None:
            task = asyncio.create_task(self._verify_signature(repo, commit, rule, token),
                                       name=f"signature {repo}@{commit[:12]}")
            self._manifests[key] = task
            task.add_done_callback(lambda t: self._keep_if_final(key, t))
        return await asyncio.shield(task)

    def _keep_if_final(self, key: tuple[Repo, str], task: asyncio.Task[Manifest]) -> None:
        """A verdict at a commit is final; a failure to fetch model.sig is asked again."""
        final = not task.cancelled() and isinstance(task.exception(), SignatureRefused | None)
        if not final and self._manifests.get(key) is task:
            del self._manifests[key]

    async def _verify_signature(self, repo: Repo, commit: str, rule: SignatureRule,
                                token: str | None) -> Manifest:
        what = f"{repo}@{commit[:12]}"
        try:
            sig = await self.catalog.resolve_file(repo, commit, SIGNATURE_FILE, token)
        except HubError as e:
            if e.status != 404:
                raise
            self._count_signature(False, what, f"it has no {SIGNATURE_FILE}")
            raise SignatureRefused(what, f"the repo has no {SIGNATURE_FILE} at this commit, and "
                                         f"{rule.pattern} requires one signed by "
                                         f"{rule.key_file}") from e
        if sig.blob.size > MAX_SIGNATURE_BYTES:
            self._count_signature(False, what, f"{SIGNATURE_FILE} too large")
            raise SignatureRefused(what, f"its {SIGNATURE_FILE} is {sig.blob.size} bytes, more "
                                         f"than {MAX_SIGNATURE_BYTES}")
        await self._fetched(sig, token)
        data = self.fetcher.store.read(sig.blob, 0, sig.blob.size)
        try:
            sha256 = await asyncio.to_thread(verified_manifest, data, rule)
        except ValueError as e:
            self._count_signature(False, what, str(e))
            raise SignatureRefused(what, str(e)) from e
        self._count_signature(True, what, f"{len(sha256)} files signed by {rule.key_file}")
        self.policy.passed.add((repo, commit, SIGNATURE_FILE, sig.blob.digest))
        return Manifest(rule, sig.blob.digest, sha256)

    def _count_signature(self, verified: bool, what: str, detail: str) -> None:
        self.metrics.signature_checked(verified)
        if verified:
            log.info("signature of %s verified: %s", what, detail)
        else:
            log.warning("signature of %s refused: %s", what, detail)

    async def _check_file(self, entry: FileEntry, manifest: Manifest, token: str | None) -> None:
        what = f"{entry.repo}/{entry.path}@{entry.commit[:12]}"
        if entry.path == SIGNATURE_FILE:
            if entry.blob.digest != manifest.signature_digest:
                raise SignatureRefused(what, "not the signature that verified")
            return
        expected = manifest.sha256.get(entry.path)
        if expected is None:
            raise SignatureRefused(what, f"the file is not in the manifest signed by "
                                         f"{manifest.rule.key_file}")
        actual = await self._file_sha256(entry, token)
        if actual != expected:
            raise SignatureRefused(what, f"its sha256 is {actual}, the manifest signed by "
                                         f"{manifest.rule.key_file} says {expected}")

    async def _file_sha256(self, entry: FileEntry, token: str | None) -> str:
        """An LFS blob is named by its sha256; a small file's is computed once, kept."""
        if entry.blob.algo == "sha256":
            return entry.blob.digest
        db = self.catalog.db
        row = db.execute("SELECT sha256 FROM blob_sha256 WHERE digest=?",
                         (entry.blob.digest,)).fetchone()
        if row is not None:
            return str(row[0])
        await self._fetched(entry, token)
        sha256 = await asyncio.to_thread(_sha256_of_blob, self.fetcher, entry)
        db.execute("INSERT OR REPLACE INTO blob_sha256 VALUES (?, ?)", (entry.blob.digest, sha256))
        return sha256

    async def _fetched(self, entry: FileEntry, token: str | None) -> None:
        """The file's blob, whole and checked against its digest, in the store."""
        transfer = self.fetcher.open(entry.blob, Origin(entry.resolve_path, token,
                                                        f"{entry.repo}/{entry.path}"))
        try:
            await asyncio.shield(transfer.done)
        except Exception as e:  # whatever failed the transfer was logged by the fetcher
            raise HubError(502, "", f"{entry.repo}/{entry.path}: could not fetch it to check "
                                    f"the publisher signature: {e}") from e
        if transfer.upstream_served(entry.resolve_path, token):
            self.catalog.upstream_served_file(entry.repo, token)

    # --- the CLI's view -----------------------------------------------------------------
    async def recheck(self) -> list[dict[str, str]]:
        """`modelpeer verify --signatures`: every cached commit of a repo under a rule is
        verified again (the signature, then each file whose bytes are here); the problems."""
        self._manifests.clear()
        self.policy.passed.clear()
        problems = []
        for entry in self.catalog.cached_entries():
            if self.policy.rule_for(entry.repo) is None or not self.fetcher.store.is_complete(
                    entry.blob.digest):
                continue
            try:
                await self.check(entry, None)
            except HubError as e:
                problems.append({"repo": str(entry.repo), "commit": entry.commit,
                                 "path": entry.path, "error": e.message})
        return problems

    async def revisions(self, repo: Repo) -> list[dict[str, object]]:
        """Each cached commit of the repo, its revisions, and who signed it (for `ls`)."""
        rule = self.policy.rule_for(repo)
        out: list[dict[str, object]] = []
        for commit, names in self.catalog.cached_commits(repo).items():
            signed_by = error = ""
            if rule is not None:
                try:
                    signed_by = str((await self._manifest(repo, commit, rule, None)).rule.key_file)
                except HubError as e:
                    error = e.message
            out.append({"commit": commit, "revisions": names, "signed_by": signed_by,
                        "signature_error": error})
        return out

"""The fake Hub's repos: deterministic contents, commits and revisions, computed the same way in
the server and in the tests (which compare downloads byte by byte against them)."""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from tests.harness import MiB

MODEL = "acme/tiny-tts"  # the repo most tests use: small and LFS files, four revisions, Xet
GATED = "acme/gated-model"  # a gated repo: GOOD_TOKEN's account has access, OTHER_TOKEN's not
GOOD_TOKEN = "hf_good_token"  # an account with access to every gated and private repo
OTHER_TOKEN = "hf_other_token"  # another valid account, with access to none of them


def json_document(seed: str, size: int) -> bytes:
    """Valid JSON derived from the seed, padded with a vocabulary to about `size` bytes."""
    doc: dict[str, object] = {"seed": seed, "model_type": "tiny-tts"}
    rng = random.Random(seed)
    vocab: dict[str, int] = {}
    approx = len(json.dumps(doc))
    while approx < size - 40:
        token = rng.randbytes(6).hex()
        vocab[token] = len(vocab)
        approx += len(token) + len(str(len(vocab))) + 6
    if vocab:
        doc["vocab"] = vocab
    return json.dumps(doc, indent=2 if not vocab else None).encode()


@dataclasses.dataclass(frozen=True)
class FileSpec:
    path: str
    size: int
    lfs: bool
    seed: str  # contents are a pure function of this

    @functools.cached_property
    def content(self) -> bytes:
        if self.path.endswith(".json"):
            return json_document(self.seed, self.size)
        return random.Random(self.seed).randbytes(self.size)

    @property
    def real_size(self) -> int:
        return len(self.content) if self.path.endswith(".json") else self.size

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @functools.cached_property
    def git_sha1(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {self.real_size}\n").encode()

    @property
    def oid(self) -> str:
        data = self.pointer if self.lfs else self.content
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1


class BigFile(FileSpec):
    """A large file generated once into the data dir, never held in memory whole."""

    def write_to(self, path: Path) -> None:
        """Generate the file once; a later start with the same data dir reuses it."""
        done = path.with_name(path.name + ".sha256")
        if path.exists() and path.stat().st_size == self.size and done.exists():
            self.__dict__["sha256"] = done.read_text().strip()
            return
        rng = random.Random(self.seed)
        h = hashlib.sha256()
        with open(path, "wb") as f:
            left = self.size
            while left:
                block = rng.randbytes(min(16 * MiB, left))
                f.write(block)
                h.update(block)
                left -= len(block)
        self.__dict__["sha256"] = h.hexdigest()  # what cached_property would have stored
        done.write_text(h.hexdigest())

    @property
    def content(self) -> bytes:  # type: ignore[override]
        raise RuntimeError(f"{self.path} is too big to hold in memory; read it from disk")

    @property
    def real_size(self) -> int:
        return self.size


@dataclasses.dataclass(frozen=True)
class GivenFile(FileSpec):
    """A file whose bytes the test gives (e.g. a model.sig it signed)."""
    data: bytes = b""

    @property
    def content(self) -> bytes:  # type: ignore[override]
        return self.data

    @property
    def real_size(self) -> int:
        return len(self.data)


@dataclasses.dataclass
class Repo:
    repo_type: str
    repo_id: str
    revisions: dict[str, str]  # name -> commit
    commits: dict[str, dict[str, FileSpec]]
    gated: bool = False
    private: bool = False
    xet: bool = False

    def commit_of(self, revision: str) -> str | None:
        if revision in self.revisions:
            return self.revisions[revision]
        if revision in self.commits:
            return revision
        if len(revision) >= 7:
            return next((c for c in self.commits if c.startswith(revision)), None)
        return None


def _commit(repo_type: str, repo_id: str, name: str) -> str:
    return hashlib.sha1(f"{repo_type}/{repo_id}@{name}".encode()).hexdigest()


def _files(repo_id: str, specs: dict[str, tuple[int, bool]],
           variant: str = "") -> dict[str, FileSpec]:
    return {p: FileSpec(p, size, lfs, f"{repo_id}/{p}/{variant if p == 'config.json' else ''}")
            for p, (size, lfs) in specs.items()}


def _repo(repo_type: str, repo_id: str, revs: dict[str, dict[str, FileSpec]], **kw: bool) -> Repo:
    revisions = {name: _commit(repo_type, repo_id, name) for name in revs}
    commits = {revisions[name]: files for name, files in revs.items()}
    return Repo(repo_type, repo_id, revisions, commits, **kw)


def tiny_tts() -> Repo:
    base = {".gitattributes": (120, False), "README.md": (900, False), "config.json": (0, False),
            "tokenizer.json": (0, False), "model.safetensors": (48 * MiB, True),
            "sub/folder/weights.bin": (3 * MiB, True), "voices/speaker one.wav": (1 * MiB, True),
            "data/naïve file ü.txt": (333, False), "empty.txt": (0, False)}
    main = _files(MODEL, base, "main")
    main["tokenizer.json"] = FileSpec("tokenizer.json", 200_000, False, "tok")
    dev = {**main, **_files(MODEL, {"config.json": (0, False)}, "dev"),
           "dev-only.txt": FileSpec("dev-only.txt", 77, False, "dev-only")}
    old = {p: f for p, f in main.items() if not p.startswith("voices/")}
    old.update(_files(MODEL, {"config.json": (0, False)}, "v1"))
    pr = {**main, **_files(MODEL, {"config.json": (0, False)}, "pr1")}
    return _repo("model", MODEL,
                 {"main": main, "dev": dev, "v1.0": old, "refs/pr/1": pr}, xet=True)


def catalogue(big_size: int = 0) -> dict[tuple[str, str], Repo]:
    repos = [
        tiny_tts(),
        _repo("model", "gpt2", {"main": _files("gpt2", {"config.json": (0, False),
                                                         "model.safetensors": (2 * MiB, True)})}),
        _repo("model", GATED,
              {"main": _files(GATED, {"config.json": (0, False),
                                      "model.safetensors": (4 * MiB, True)})},
              gated=True),
        _repo("model", "acme/private-model",
              {"main": _files("acme/private-model", {"config.json": (0, False)})}, private=True),
        _repo("dataset", "acme/speech-set", {"main": {
            **_files("acme/speech-set", {"README.md": (500, False),
                                         "data/train-00000.parquet": (5 * MiB, True)}),
            **{f"shards/shard-{i:03d}.txt": FileSpec(f"shards/shard-{i:03d}.txt", 64, False,
                                                     f"shard{i}") for i in range(120)}}}),
    ]
    if big_size:
        big = BigFile("big.bin", big_size, True, "acme/big/big.bin")
        repos.append(_repo("model", "acme/big", {"main": {"big.bin": big}}))
    return {(r.repo_type, r.repo_id): r for r in repos}


def added_repo(repo_id: str, files: dict[str, dict[str, Any]], repo_type: str = "model",
               seed: int = 0) -> Repo:
    """A repo added at runtime (POST /_fake/repos): one commit on `main`. A file is
    {"size": N, "lfs": bool}, optionally with its own "seed" (other bytes, same commit: what a
    tampering mirror serves), "big": true (generated on disk, never in memory) or
    "content_b64" (these exact bytes)."""
    return _repo(repo_type, repo_id,
                 {"main": {p: _added_file(repo_id, p, f, seed) for p, f in files.items()}})


def _added_file(repo_id: str, path: str, f: dict[str, Any], seed: int) -> FileSpec:
    seed_text = f"{repo_id}/{path}/{f.get('seed', seed)}"
    if "content_b64" in f:
        data = base64.b64decode(f["content_b64"])
        return GivenFile(path, len(data), bool(f.get("lfs", False)), seed_text, data)
    kind = BigFile if f.get("big") else FileSpec
    return kind(path, int(f.get("size", 0)), bool(f.get("lfs", True)), seed_text)


# Repos this process added through FakeHub.add_repo, so expected_files knows them too.
ADDED: dict[tuple[str, str], Repo] = {}


def find_repo(repo_id: str, repo_type: str = "model") -> Repo:
    repo = ADDED.get((repo_type, repo_id)) or _static_catalogue().get((repo_type, repo_id))
    assert repo is not None, f"no {repo_type} {repo_id} in the fake hub's catalogue"
    return repo


@functools.cache
def _static_catalogue() -> dict[tuple[str, str], Repo]:
    return catalogue()


def _commit_files(repo_id: str, revision: str, repo_type: str) -> dict[str, FileSpec]:
    repo = find_repo(repo_id, repo_type)
    commit = repo.commit_of(revision)
    assert commit is not None, f"no revision {revision} in {repo_id}"
    return repo.commits[commit]


def expected_files(repo_id: str, revision: str = "main",
                   repo_type: str = "model") -> dict[str, bytes]:
    """What a snapshot of the repo at that revision must contain, byte for byte."""
    return {p: f.content for p, f in _commit_files(repo_id, revision, repo_type).items()}


def file_sha256(repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> str:
    """The sha256 of one file of the catalogue (what X-Linked-Etag says for LFS files)."""
    return _commit_files(repo_id, revision, repo_type)[path].sha256

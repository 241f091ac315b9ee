"""The names the Hub uses, checked: repo ids, revisions, file paths, blob digests. Used for what
clients send the proxy and for what peers send in warm jobs, so both obey the same rules."""

from __future__ import annotations

import re
from urllib.parse import unquote

from .errors import InvalidName

REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_DIGEST_RE = {"sha256": re.compile(r"[0-9a-f]{64}"), "gitsha1": re.compile(r"[0-9a-f]{40}")}
MAX_PATH = 4096


def repo_id(segments: list[str]) -> str:
    if not 1 <= len(segments) <= 2:
        raise InvalidName(f"invalid repo id {'/'.join(segments)!r} (want NAME or ORG/NAME)")
    for s in segments:
        if not _SEGMENT_RE.fullmatch(s) or ".." in s:
            raise InvalidName(f"invalid repo id segment {s!r}")
    return "/".join(segments)


def repo_type(value: str) -> str:
    if value not in REPO_TYPES:
        raise InvalidName(f"unknown repo type {value!r} (want one of {', '.join(REPO_TYPES)})")
    return value


def file_path(path: str) -> str:
    parts = path.split("/")
    if (not path or len(path) > MAX_PATH or path.startswith("/") or "\\" in path
            or "\x00" in path or any(p in ("", ".", "..") for p in parts)):
        raise InvalidName(f"invalid file path {path!r}")
    return path


def quoted_file_path(raw: str) -> str:
    return file_path(unquote(raw))


def revision(rev: str) -> str:
    if not rev or len(rev) > 256 or any(c in rev for c in "\x00\r\n") or ".." in rev:
        raise InvalidName(f"invalid revision {rev!r}")
    return rev


def commit(sha: str) -> str:
    if not COMMIT_RE.fullmatch(sha):
        raise InvalidName(f"invalid commit {sha!r} (want 40 lowercase hex digits)")
    return sha


def digest(value: str, algo: str) -> str:
    pattern = _DIGEST_RE.get(algo)
    if pattern is None:
        raise InvalidName(f"unknown digest algorithm {algo!r}")
    if not pattern.fullmatch(value):
        raise InvalidName(f"invalid {algo} digest {value!r}")
    return value


def any_digest(value: str) -> str:
    """A blob digest of either kind (sha256 for LFS files, git blob sha1 for the others)."""
    if not any(p.fullmatch(value) for p in _DIGEST_RE.values()):
        raise InvalidName(f"invalid blob digest {value!r}")
    return value

"""The Hub API answers about a commit, built from the catalog's file entries: for a repo that came
from a bundle or an HF cache on a node whose upstream cannot be asked and that never cached the
client's own API requests (`snapshot_download` asks the revision and the tree first).

Only what the entries say: paths, sizes, git blob ids and LFS sha256. The git blob id of an LFS
file is that of its pointer file, which is a pure function of the sha256 and size. Directories
have no git tree id here; they get a stable stand-in (clients list them but do not use it).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from .catalog import FileEntry, Repo


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            f"size {size}\n").encode()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tree_entry(e: FileEntry) -> dict[str, object]:
    if not e.lfs:
        return {"type": "file", "oid": e.blob.digest, "size": e.blob.size, "path": e.path}
    pointer = lfs_pointer(e.blob.digest, e.blob.size)
    return {"type": "file", "oid": _git_blob_id(pointer), "size": e.blob.size, "path": e.path,
            "lfs": {"oid": e.blob.digest, "size": e.blob.size, "pointerSize": len(pointer)}}


def revision_answer(repo: Repo, commit: str, entries: list[FileEntry]) -> dict[str, object]:
    return {"id": repo.id, "sha": commit, "private": False, "disabled": False, "tags": [],
            "siblings": [{"rfilename": e.path} for e in entries]}


def tree_answer(entries: list[FileEntry], sub: str, query: str) -> list[dict[str, object]] | None:
    """The listing of `sub` ("" for the root), recursive when the query says so; None when
    `sub` is not a directory of the commit."""
    recursive = parse_qs(query).get("recursive", [""])[0] in ("true", "1", "True")
    listing: dict[str, dict[str, object]] = {}
    for e in entries:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            listing.setdefault(d, {"type": "directory", "size": 0, "path": d,
                                   "oid": hashlib.sha1(f"tree {d}".encode()).hexdigest()})
        listing[e.path] = tree_entry(e)
    if sub and listing.get(sub, {}).get("type") != "directory":
        return None
    prefix = f"{sub}/" if sub else ""
    return [v for p, v in sorted(listing.items())
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])]

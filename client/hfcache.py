"""The Hugging Face cache on this machine, read as the user who owns it, turned into bundles.

Layout (huggingface_hub): `<hub>/models--org--name/` (datasets--, spaces--) with `blobs/<etag>`
(sha256 for LFS files, git blob sha1 otherwise), `refs/<branch>` holding a commit, and
`snapshots/<commit>/<path>` symlinks into blobs/. Each snapshot becomes one bundle streamed to
the daemon, which checks every blob against its digest (the name is only a claim).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

from modelpeer.daemon.bundle import Manifest, blob_member, end, head, member_header, padding
from modelpeer.daemon.peermsg import WarmFile

READ_BLOCK = 1024 * 1024
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def default_dirs() -> list[Path]:
    """Where huggingface_hub keeps its cache for this user."""
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"])]
    if os.environ.get("HF_HOME"):
        return [Path(os.environ["HF_HOME"]) / "hub"]
    xdg = os.environ.get("XDG_CACHE_HOME")
    return [(Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"]


@dataclasses.dataclass
class Snapshot:
    manifest: Manifest
    sources: dict[str, Path]  # digest -> the blob file to read
    problems: list[str]  # files left out before any byte was read, and why


def snapshots(root: Path) -> Iterator[Snapshot]:
    for repo_dir in sorted(root.glob("*--*")):
        kind, _, name = repo_dir.name.partition("--")
        if kind not in _TYPES or not (repo_dir / "snapshots").is_dir():
            continue
        refs = _refs(repo_dir / "refs")
        for snap in sorted((repo_dir / "snapshots").iterdir()):
            yield _snapshot(_TYPES[kind], name.replace("--", "/"), snap,
                            sorted(r for r, c in refs.items() if c == snap.name))


def _refs(refs_dir: Path) -> dict[str, str]:
    """Branch or tag name -> commit (refs/pr/1 included)."""
    if not refs_dir.is_dir():
        return {}
    return {p.relative_to(refs_dir).as_posix(): p.read_text().strip()
            for p in refs_dir.rglob("*") if p.is_file()}


def _snapshot(repo_type: str, repo_id: str, snap: Path, revisions: list[str]) -> Snapshot:
    files: list[WarmFile] = []
    sources: dict[str, Path] = {}
    problems: list[str] = []
    for link in sorted(p for p in snap.rglob("*") if p.is_symlink() or p.is_file()):
        path = link.relative_to(snap).as_posix()
        if not link.is_symlink():
            problems.append(f"{path}: not a link into blobs/, so its digest is unknown")
            continue
        blob = link.resolve()
        if not blob.is_file():
            problems.append(f"{path}: its blob {blob.name} is missing")
            continue
        lfs = len(blob.name) == 64
        files.append(WarmFile(path, blob.name, "sha256" if lfs else "gitsha1",
                              blob.stat().st_size, lfs))
        sources.setdefault(blob.name, blob.absolute())
    manifest = Manifest(repo_type, repo_id, tuple(revisions), snap.name, False, tuple(files))
    return Snapshot(manifest, sources, problems)


class BlobFile(TypedDict):
    path: str
    digest: str
    size: int


def blob_files(root: Path) -> Iterator[tuple[str, list[BlobFile]]]:
    """Per repo directory, its blob files named by a digest."""
    for repo_dir in sorted(root.glob("*--*")):
        blobs = [BlobFile(path=str(p.resolve()), digest=p.name, size=p.stat().st_size)
                 for p in sorted((repo_dir / "blobs").glob("*"))
                 if p.is_file() and len(p.name) in (40, 64)]
        if blobs:
            yield repo_dir.name, blobs


def archive(snapshot: Snapshot) -> Iterator[bytes]:
    """The bundle's bytes, exactly manifest.archive_size() of them: a blob file that changed
    size since it was listed is cut or padded with zeros, and then fails its digest."""
    yield head(snapshot.manifest)
    for f in snapshot.manifest.blobs():
        yield member_header(blob_member(f.digest), f.size)
        yield from _exactly(snapshot.sources[f.digest], f.size)
        yield padding(f.size)
    yield end()


def _exactly(path: Path, size: int) -> Iterator[bytes]:
    left = size
    with open(path, "rb") as f:
        while left and (data := f.read(min(READ_BLOCK, left))):
            left -= len(data)
            yield data
    if left:
        yield b"\0" * left

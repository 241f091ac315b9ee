"""The models already on disk in HF caches, where the cache and the store share a filesystem
with reflinks: the store takes a cache blob without copying it (adopt), and a cache blob is made
to share the store's blocks (dedupe). The paths come from the CLI; reflink.py opens only files
every local account could read. Where extents cannot be shared, NoReflink says why and nothing
is changed; the CLI then streams the bytes instead (ingest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import xxhash

from .errors import ContentDiffers, DigestMismatch, NoReflink
from .reflink import clone_range, dedupe_range, open_readable_by_all
from .store import READ_BLOCK, BlobId, Store, blob_hasher

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Part:
    idx: int
    length: int
    path: Path


async def adopt(store: Store, blob: BlobId, path: str) -> None:
    """The blob into the store, its chunks cloned from the file at `path`, then checked: the
    clones are the store's own, so the file's owner cannot change them after the check."""
    parts = await asyncio.to_thread(_clone_chunks, store, blob, path)
    try:
        xxh3s = await asyncio.to_thread(_check_parts, blob, parts, path)
    except BaseException:
        _unlink(parts)
        raise
    store.register(blob)
    for part, xxh3 in zip(parts, xxh3s, strict=True):
        os.replace(part.path, store.chunk_path(blob.digest, part.idx))
        store.adopt_chunk(blob.digest, part.idx, part.length, xxh3)
    store.mark_complete(blob.digest)


def _clone_chunks(store: Store, blob: BlobId, path: str) -> list[_Part]:
    src = open_readable_by_all(path)
    parts: list[_Part] = []
    try:
        size = os.fstat(src).st_size
        if size != blob.size:
            raise DigestMismatch(f"{path} is {size} bytes, its entry says {blob.size}")
        for idx, offset, length in store.chunk_spans(blob.size):
            part = _Part(idx, length, store.chunk_path(blob.digest, idx, partial=True))
            part.path.parent.mkdir(parents=True, exist_ok=True)
            dst = os.open(part.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            parts.append(part)
            try:
                if length:  # a length of 0 would mean "to the end of the file"
                    clone_range(src, offset, length, dst, 0)
                os.fsync(dst)
            finally:
                os.close(dst)
    except BaseException:
        _unlink(parts)
        raise
    finally:
        os.close(src)
    return parts


def _check_parts(blob: BlobId, parts: list[_Part], path: str) -> list[str]:
    """Each part's xxh3-128, once the whole matched the blob's digest."""
    h = blob_hasher(blob)
    xxh3s = []
    for part in parts:
        x = xxhash.xxh3_128()
        with open(part.path, "rb") as f:
            while data := f.read(READ_BLOCK * 8):
                h.update(data)
                x.update(data)
        xxh3s.append(x.hexdigest())
    if h.hexdigest() != blob.digest:  # the hash itself is not told: the caller may not read it
        raise DigestMismatch(f"{path} does not match its digest {blob.digest}")
    return xxh3s


def _unlink(parts: list[_Part]) -> None:
    for part in parts:
        with contextlib.suppress(FileNotFoundError):
            part.path.unlink()


async def dedupe(store: Store, files: list[tuple[str, BlobId]]) -> dict[str, object]:
    """Make each file share the blocks of the store's copy of its blob, where the kernel finds
    them identical. Stops at once, changing nothing more, when extents cannot be shared."""
    shared: list[str] = []
    problems: list[dict[str, str]] = []
    free_before = _free_bytes(files[0][0]) if files else 0
    for path, blob in files:
        if store.complete_blob(blob.digest) != blob:
            continue
        try:
            await asyncio.to_thread(_dedupe_file, store, blob, path)
        except NoReflink as e:
            if not shared:
                return {"reflink": False, "reason": e.strerror, "shared_files": 0,
                        "shared_bytes": 0, "freed_bytes": 0, "problems": []}
            problems.append({"path": path, "error": str(e.strerror)})
            continue
        except (ContentDiffers, OSError) as e:
            problems.append({"path": path, "error": str(e)})
            log.warning("dedupe: %s left as it is: %s", path, e)
            continue
        shared.append(path)
        log.info("dedupe: %s shares the store's blocks of %s", path, blob.digest[:12])
    freed = max(0, _free_bytes(files[0][0]) - free_before) if files else 0
    return {"reflink": True, "reason": "", "shared_files": len(shared),
            "shared_bytes": sum(b.size for p, b in files if p in set(shared)),
            "freed_bytes": freed, "problems": problems}


def _dedupe_file(store: Store, blob: BlobId, path: str) -> None:
    dst = open_readable_by_all(path)
    try:
        if os.fstat(dst).st_size != blob.size:
            raise ContentDiffers(f"{path} is not {blob.size} bytes long")
        for idx, offset, length in store.chunk_spans(blob.size):
            if not length:
                continue
            src = os.open(store.chunk_path(blob.digest, idx), os.O_RDONLY)
            try:
                dedupe_range(src, 0, length, dst, offset)
            finally:
                os.close(src)
    finally:
        os.close(dst)


def _free_bytes(path: str) -> int:
    try:
        st = os.statvfs(Path(path).parent)
    except OSError:
        return 0
    return st.f_bfree * st.f_frsize

"""Bundles in and out of the store: export a cached revision, import one (a bundle file, an HF
cache snapshot the CLI turned into a bundle, or one whose files the store clones by reflink),
with every byte checked before anything counts.

An import writes each blob through the store's BlobWriter (chunks, xxh3, digest) as an ordinary
Transfer of the fetcher, so a client asking for the same blob meanwhile joins it instead of
writing it a second time, and eviction and `gc` leave it alone until the import ends. Only when
the whole archive checked are the file entries and refs recorded; a damaged archive leaves the
store as it was (the blobs it added are removed). Who may read an imported repo is decided in
`_confirm` (docs/security.md, "Bundles and imported caches").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable

from . import hfcache
from .bundle import Manifest, Reader, blob_member, end, head, member_header, padding
from .catalog import Catalog, FileEntry, Repo
from .errors import BundleError, DigestMismatch, HubError, TransferFailed
from .fetch import Fetcher
from .peermsg import WarmFile
from .store import BlobId, Store, blob_hasher
from .transfer import Transfer

log = logging.getLogger(__name__)

READ_BLOCK = 1024 * 1024


def _blob(f: WarmFile) -> BlobId:
    return BlobId(f.digest, f.algo, f.size)


class Ingest:
    def __init__(self, store: Store, catalog: Catalog, fetcher: Fetcher) -> None:
        self.store = store
        self.catalog = catalog
        self.fetcher = fetcher

    # --- export -------------------------------------------------------------------------
    async def export_manifest(self, repo: Repo, revision: str, token: str | None) -> Manifest:
        """What a bundle of the revision holds: the files the cache knows at its commit, all
        of which must be cached; gated or private repos only for a token with access."""
        commit = self.catalog.known_commit(repo, revision)
        entries = self.catalog.entries_at(repo, commit) if commit else []
        if commit is None or not entries:
            raise HubError(404, "", f"{repo}@{revision} is not cached; `modelpeer warm` it "
                                    "first")
        if not self.catalog.is_public(repo):
            # the same check as a client's download: a grant, else the upstream asked
            await self.catalog.resolve_file(repo, commit, entries[0].path, token)
        missing = [e.path for e in entries if not self.store.is_complete(e.blob.digest)]
        if missing:
            raise HubError(409, "", f"{len(missing)} files of {repo}@{revision} are not in the "
                                    f"cache (e.g. {missing[0]}); `modelpeer warm` it first")
        files = tuple(WarmFile(e.path, e.blob.digest, e.blob.algo, e.blob.size, e.lfs)
                      for e in entries)
        return Manifest(repo.type, repo.id, (revision,) if revision != commit else (), commit,
                        self.catalog.is_public(repo), files)

    async def export_stream(self, manifest: Manifest) -> AsyncIterator[bytes]:
        yield head(manifest)
        for f in manifest.blobs():
            blob = _blob(f)
            yield member_header(blob_member(f.digest), f.size)
            for pos in range(0, f.size, READ_BLOCK):
                yield await asyncio.to_thread(self.store.read, blob, pos,
                                              min(READ_BLOCK, f.size - pos))
            yield padding(f.size)
        yield end()

    # --- import -------------------------------------------------------------------------
    async def import_bundle(self, reader: Reader, token: str | None, *,
                            lenient: bool) -> dict[str, object]:
        """Read a bundle to its end and record it. Strict (a bundle file): any damage refuses
        the whole archive. Lenient (an HF cache): a blob failing its digest is skipped and
        reported, damage to the archive itself still refuses it."""
        manifest = await reader.manifest()
        return await self._import(manifest, token, "copy", lambda batch: self._fill_from_archive(
            reader, manifest, batch, lenient=lenient))

    async def import_reflinked(self, manifest: Manifest, sources: dict[str, str],
                               token: str | None) -> dict[str, object]:
        """An HF-cache snapshot whose blob files (`sources`, by digest) the store clones;
        NoReflink (after undoing what it did) when their extents cannot be shared."""
        return await self._import(manifest, token, "reflink", lambda batch: self._fill_by_reflink(
            manifest, sources, batch))

    async def _import(self, manifest: Manifest, token: str | None, method: str,
                      fill: Callable[[_Batch], Awaitable[None]]) -> dict[str, object]:
        repo = Repo(manifest.repo_type, manifest.repo_id)
        public, by_upstream = await self._confirm(manifest, repo, token)
        batch = _Batch(self.store, self.fetcher, repo)
        try:
            await fill(batch)
        except BaseException as e:
            batch.undo()
            log.warning("import of %s refused, nothing of it kept: %s", repo, e)
            raise
        finally:
            batch.release()
        kept = [FileEntry(repo, manifest.commit, f.path, _blob(f), f.lfs)
                for f in manifest.files if f.digest not in batch.bad]
        # branch names are the upstream's to say when it can (asked in _confirm)
        names = () if by_upstream else manifest.revisions
        for revision in names or (manifest.commit,):
            self.catalog.remember(repo, revision, manifest.commit, kept)
        self.catalog.imported(repo, public=public, token=token)
        self.store.evict(self.store.max_bytes)
        skipped = [{"path": f.path, "digest": f.digest, "error": batch.bad[f.digest]}
                   for f in manifest.files if f.digest in batch.bad]
        added = sum(b.size for b in batch.added)
        log.info("imported %s@%s (%s): %d files, %d bytes new in the store, %d skipped, %s",
                 repo, manifest.commit[:12], method, len(kept), added, len(skipped),
                 "public" if public else "not public")
        return {"repo": str(repo), "repo_type": repo.type, "repo_id": repo.id,
                "commit": manifest.commit, "files": len(kept),
                "revisions": [r for r in manifest.revisions
                              if self.catalog.known_commit(repo, r) == manifest.commit],
                "bytes": sum(e.blob.size for e in kept), "stored_bytes": added,
                "skipped": skipped, "public": public,
                "confirmed_by": "upstream" if by_upstream else "bundle", "method": method}

    async def _confirm(self, manifest: Manifest, repo: Repo,
                       token: str | None) -> tuple[bool, bool]:
        """(public, confirmed by the upstream). A reachable upstream must agree with every
        file entry, and says itself whether the repo is public (a file served without a
        token) and whether `token` has access; when it cannot be reached, the bundle's word
        is taken: it is the operator's to vouch for."""
        for f in manifest.files:
            try:
                entry = await self.catalog.resolve_file(repo, manifest.commit, f.path, token)
            except HubError as e:
                if e.status >= 500:
                    log.info("importing %s: the upstream cannot confirm it (%s); taking the "
                             "bundle's entries", repo, e.message)
                    return manifest.public, False
                raise HubError(e.status, e.code, f"the upstream does not confirm "
                               f"{repo}/{f.path}@{manifest.commit[:12]}: {e.message}") from e
            if entry.blob != _blob(f):
                raise HubError(409, "", f"{repo}/{f.path}@{manifest.commit[:12]}: the bundle "
                                        f"says {f.digest}, the upstream {entry.blob.digest}")
        if manifest.files:
            await self._ask_revisions(manifest, repo, token)
        return self.catalog.is_public(repo), bool(manifest.files)

    async def _ask_revisions(self, manifest: Manifest, repo: Repo, token: str | None) -> None:
        """Where the bundle's branch names point now, as the upstream says (the catalog
        records the answer; a branch that moved on keeps its newer commit)."""
        for revision in manifest.revisions:
            try:
                await self.catalog.resolve_file(repo, revision, manifest.files[0].path, token)
            except HubError as e:
                log.info("importing %s: %s is not recorded: %s", repo, revision, e.message)

    async def _fill_from_archive(self, reader: Reader, manifest: Manifest, batch: _Batch, *,
                                 lenient: bool) -> None:
        for f in manifest.blobs():
            at, name, blob = reader.offset, blob_member(f.digest), _blob(f)
            await reader.header(name, f.size)
            data = reader.data(name, f.size, READ_BLOCK)
            try:
                transfer = await batch.claim(blob, f.path)
                if transfer is None:
                    await _check_digest(blob, data)
                else:
                    await batch.fill(transfer, self._write(transfer, data))
            except DigestMismatch as e:
                if not lenient:
                    raise BundleError(f"{name} ({batch.repo}/{f.path}): {e}", at) from e
                batch.skip(f, e)
        await reader.end()

    async def _write(self, transfer: Transfer, data: AsyncIterator[bytes]) -> None:
        blob = transfer.blob
        self.store.remove(blob.digest)  # a partial prefix: every byte comes from the bundle
        writer = self.store.open_writer(blob)
        try:
            await writer.prepare()
            async for piece in data:
                await writer.write(piece)
                transfer.advance(writer.offset)
            await writer.verify()
            transfer.finish()
            await writer.finish()
        finally:
            with contextlib.suppress(OSError, sqlite3.Error):
                await writer.close()

    async def _fill_by_reflink(self, manifest: Manifest, sources: dict[str, str],
                               batch: _Batch) -> None:
        for f in manifest.blobs():
            transfer = await batch.claim(_blob(f), f.path)
            if transfer is None:
                continue
            try:
                await batch.fill(transfer, self._adopt(transfer, sources[f.digest]))
            except DigestMismatch as e:
                batch.skip(f, e)

    async def _adopt(self, transfer: Transfer, path: str) -> None:
        await hfcache.adopt(self.store, transfer.blob, path)
        transfer.advance(transfer.blob.size)
        transfer.finish()


class _Batch:
    """The blobs one import puts in the store: each as a Transfer of the fetcher while the
    import runs (clients join it, eviction and gc skip it), all removed again by undo()."""

    def __init__(self, store: Store, fetcher: Fetcher, repo: Repo) -> None:
        self.store = store
        self.fetcher = fetcher
        self.repo = repo
        self.added: list[BlobId] = []
        self.bad: dict[str, str] = {}  # digest -> why it was skipped
        self._ours: list[Transfer] = []

    async def claim(self, blob: BlobId, path: str) -> Transfer | None:
        """A transfer to fill, or None when the store has the blob already."""
        while (running := self.fetcher.transfers.running.get(blob.digest)) is not None \
                and not running.verified:
            if running.done.done():  # failed: its writer is still closing, wait until it left
                await asyncio.sleep(0.05)
            else:
                await asyncio.wait([running.done])
        if self.store.is_complete(blob.digest):
            return None
        transfer = Transfer(blob, f"{self.repo}/{path}")
        self.fetcher.transfers.add(transfer)
        self._ours.append(transfer)
        return transfer

    async def fill(self, transfer: Transfer, writing: Awaitable[None]) -> None:
        try:
            await writing
        except BaseException as e:
            transfer.fail(e if isinstance(e, Exception) else TransferFailed("cancelled"))
            self.store.remove(transfer.blob.digest)
            raise
        self.added.append(transfer.blob)

    def skip(self, f: WarmFile, error: Exception) -> None:
        log.warning("importing %s/%s: %s; skipped", self.repo, f.path, error)
        self.bad[f.digest] = str(error)

    def undo(self) -> None:
        for blob in self.added:
            self.store.remove(blob.digest)

    def release(self) -> None:
        for t in self._ours:
            self.fetcher.transfers.remove(t)


async def _check_digest(blob: BlobId, data: AsyncIterator[bytes]) -> None:
    h = blob_hasher(blob)
    async for piece in data:
        await asyncio.to_thread(h.update, piece)
    if h.hexdigest() != blob.digest:
        raise DigestMismatch(f"blob {blob.digest}: content hashes to {h.hexdigest()}")

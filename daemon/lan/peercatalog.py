"""Repo metadata from peers, for when the upstream cannot be asked.

A node that never saw a repo has no commit and no file entries for it, so with the upstream
down it could not serve the repo even when a peer holds every byte (after an HF cache import or
a bundle on that peer). It then asks its live peers for the files at the commit the revision
names (`GET /repo/{type}/{id}?revision=`); a peer answers only for a repo it has marked public.
The answer is the peers' word, as an offline bundle's is the importer's (security.md): taken
only while the upstream cannot be asked, only when every peer that answers says the same, and
the branch name learned so is asked of the upstream again once it answers (after `ref_ttl`).
The bytes still come checked against the digests, as always.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import quote

from aiohttp import web

from .. import hubnames
from ..catalog import Catalog, FileEntry, Repo
from ..errors import InvalidName, PeerError
from ..peermsg import RepoListing, WarmFile, parse_repo_listing
from ..store import BlobId
from .peers import Peer, PeerRoute, PeerSet

log = logging.getLogger(__name__)

ASK_TIMEOUT = 2.0  # a peer slower than this to list a repo is left out of the answer


class PeerCatalog:
    def __init__(self, catalog: Catalog, peers: PeerSet) -> None:
        self.catalog = catalog
        self.peers = peers

    def peer_routes(self) -> list[PeerRoute]:
        return [PeerRoute("GET", "/repo/{repo_type}/{repo_id:.+}", self._serve)]

    async def _serve(self, request: web.Request, sender: str) -> web.Response:
        try:
            repo = Repo(hubnames.repo_type(request.match_info["repo_type"]),
                        hubnames.repo_id(request.match_info["repo_id"].split("/")))
            revision = hubnames.revision(request.query.get("revision", "main"))
        except InvalidName as e:
            return web.json_response({"error": str(e)}, status=400)
        commit = self.catalog.known_commit(repo, revision)
        if commit is None or not self.catalog.is_public(repo):
            return web.json_response({"error": "no public repo known at that revision"},
                                     status=404)
        files = tuple(WarmFile(e.path, e.blob.digest, e.blob.algo, e.blob.size, e.lfs)
                      for e in self.catalog.entries_at(repo, commit))
        if not files:
            return web.json_response({"error": "no file known at that revision"}, status=404)
        log.info("listed %s@%s for peer %s (%d files)", repo, revision, sender, len(files))
        return web.json_response(RepoListing(commit, files).to_json())

    async def learn(self, repo: Repo, revision: str) -> bool:
        """Record what the live peers know of the repo at `revision`; False when none knows
        it, or when they disagree (then a broken peer cannot slip its version in)."""
        peers = self.peers.usable()
        answers = await asyncio.gather(*(self._listing(p, repo, revision) for p in peers))
        known = {(p.name or p.node_id): a for p, a in zip(peers, answers, strict=True) if a}
        if not known:
            return False
        if len(set(known.values())) > 1:
            log.warning("%s@%s: the upstream cannot be asked and peers %s list it differently;"
                        " not taken", repo, revision, ", ".join(sorted(known)))
            return False
        listing = next(iter(known.values()))
        self.catalog.remember(repo, revision, listing.commit, [
            FileEntry(repo, listing.commit, f.path, BlobId(f.digest, f.algo, f.size), f.lfs)
            for f in listing.files])
        self.catalog.imported(repo, public=True, token=None)
        log.warning("%s@%s: the upstream cannot be asked; took its %d file entries at commit %s "
                    "from peer %s (asked of the upstream again once it answers)", repo,
                    revision, len(listing.files), listing.commit[:12], ", ".join(sorted(known)))
        return True

    async def _listing(self, peer: Peer, repo: Repo, revision: str) -> RepoListing | None:
        path = f"/repo/{repo.type}/{repo.id}?revision={quote(revision, safe='')}"
        try:
            return await asyncio.wait_for(
                self.peers.request_json(peer, "GET", path, parse_repo_listing), ASK_TIMEOUT)
        except (PeerError, TimeoutError) as e:
            log.debug("no listing of %s@%s from peer %s: %s", repo, revision, peer.node_id, e)
            return None

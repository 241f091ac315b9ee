"""Chunks shared with the LAN: the bridge between the store (bytes and digests) and the swarm
(torrents). It seeds every chunk of every verified blob as its own deterministic torrent, tells
peers which chunks it holds, and gets chunks from peers for the fetcher.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiohttp import web

from .peers import Peer, PeerApi, PeerError, PeerSet
from .store import BlobId, Store, blob_hasher
from .swarm import Swarm, SwarmError, SwarmStalled, chunk_torrent, info_hash_of

log = logging.getLogger(__name__)

SMALL_BLOB = 1024 * 1024  # smaller blobs travel over the peer API, not as torrents
BAN_SECONDS = 600.0
PREFETCH = 6  # chunks downloaded ahead of the one being written


@dataclasses.dataclass
class Holders:
    chunks: dict[int, list[tuple[Peer, str]]] = dataclasses.field(default_factory=dict)
    transfers: dict[str, str] = dataclasses.field(default_factory=dict)  # node id -> source


class Sharing:
    def __init__(self, store: Store, swarm: Swarm, peers: PeerSet, api: PeerApi, *,
                 node_name: str, version: str, bt_port: int) -> None:
        self.store = store
        self.swarm = swarm
        self.peers = peers
        self.api = api
        self.node_name = node_name
        self.version = version
        self.bt_port = bt_port
        self.torrents_dir = store.root / "torrents"
        self.torrents_dir.mkdir(exist_ok=True)
        self._seeded: dict[tuple[str, int], tuple[str, str]] = {}  # -> (info_hash, xxh3)
        self.transfer_state: Callable[[str], str] = lambda digest: ""
        self._tasks: set[asyncio.Task[None]] = set()
        swarm.on_bad_peer = self._bad_peer
        peers.on_change = self._peers_changed
        api.route("GET", "/status", self._status)
        api.route("GET", "/chunks/{digest}", self._chunk_map)
        api.route("GET", "/torrent/{digest}/{idx}", self._torrent)
        api.route("GET", "/blob/{digest}", self._blob)

    # --- seeding ------------------------------------------------------------------------
    async def seed_all(self) -> None:
        """At start: every complete chunk (its xxh3 was checked by Store.recover)."""
        rows = self.store.db.execute("SELECT digest, algo, size FROM blobs").fetchall()
        for r in rows:
            await self.seed_blob(BlobId(r["digest"], r["algo"], r["size"]))
        log.info("seeding %d chunks of %d blobs", len(self._seeded), len(rows))

    def chunk_complete(self, blob: BlobId, idx: int) -> None:
        """A chunk just landed: share it now, long before its blob is complete, so that a
        cluster pipelines one upstream download. (The blob digest still guards every node.)"""
        if blob.size > SMALL_BLOB:
            task = asyncio.get_running_loop().create_task(self.seed_blob(blob))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def seed_blob(self, blob: BlobId) -> None:
        if blob.size <= SMALL_BLOB:
            return
        for c in self.store.chunks(blob):
            if c.complete and (blob.digest, c.idx) not in self._seeded:
                await self._seed_chunk(blob.digest, c.idx, c.xxh3)

    async def _seed_chunk(self, digest: str, idx: int, xxh3: str) -> None:
        path = self.store.chunk_path(digest, idx)
        cached = self.torrents_dir / f"{digest}.{idx}.torrent"
        if cached.exists():
            torrent = cached.read_bytes()
            info_hash = info_hash_of(torrent)
        else:
            ct = await asyncio.to_thread(chunk_torrent, path)
            torrent, info_hash = ct.torrent, ct.info_hash
            tmp = cached.with_suffix(".tmp")
            tmp.write_bytes(torrent)
            tmp.replace(cached)
        self.swarm.seed(torrent, path)
        self._seeded[(digest, idx)] = (info_hash, xxh3)

    def forget_blob(self, digest: str) -> None:
        for key in [k for k in self._seeded if k[0] == digest]:
            info_hash, _ = self._seeded.pop(key)
            self.swarm.unseed(info_hash)
            (self.torrents_dir / f"{key[0]}.{key[1]}.torrent").unlink(missing_ok=True)

    # --- the peer API -------------------------------------------------------------------
    async def _status(self, request: web.Request, sender: str) -> web.Response:
        return web.json_response({"node_id": self.peers.node_id, "name": self.node_name,
                                  "version": self.version, "bt_port": self.bt_port,
                                  "chunks": len(self._seeded)})

    async def _chunk_map(self, request: web.Request, sender: str) -> web.Response:
        digest = request.match_info["digest"]
        chunks = [{"index": idx, "info_hash": ih, "xxh3": x}
                  for (d, idx), (ih, x) in sorted(self._seeded.items()) if d == digest]
        small = self.store.is_complete(digest) and not chunks
        return web.json_response({"digest": digest, "chunks": chunks, "small": small,
                                  "transfer": self.transfer_state(digest)})

    async def _torrent(self, request: web.Request, sender: str) -> web.Response:
        key = (request.match_info["digest"], int(request.match_info["idx"]))
        if key not in self._seeded:
            return web.json_response({"error": "chunk not held"}, status=404)
        path = self.torrents_dir / f"{key[0]}.{key[1]}.torrent"
        return web.Response(body=path.read_bytes(), content_type="application/x-bittorrent")

    async def _blob(self, request: web.Request, sender: str) -> web.Response:
        digest = request.match_info["digest"]
        row = self.store.db.execute("SELECT algo, size, complete FROM blobs WHERE digest=?",
                                    (digest,)).fetchone()
        if row is None or not row["complete"] or row["size"] > SMALL_BLOB:
            return web.json_response({"error": "small blob not held"}, status=404)
        blob = BlobId(digest, row["algo"], row["size"])
        data = self.store.read(blob, 0, blob.size)
        peer = self.peers.peers.get(sender)
        if peer is not None:
            peer.bytes_to += len(data)
        return web.Response(body=data, content_type="application/octet-stream")

    # --- fetching from peers --------------------------------------------------------------
    async def holders(self, blob: BlobId) -> Holders:
        """Which live peers hold which chunks (index -1: the whole small blob), and which are
        transferring the blob right now (by source: "upstream", "peer", "store")."""
        peers = self.peers.usable()
        maps = await asyncio.gather(*(self._map_of(p, blob.digest) for p in peers))
        out = Holders()
        for peer, m in zip(peers, maps, strict=True):
            if m is None:
                continue
            if m.get("small"):
                out.chunks.setdefault(-1, []).append((peer, ""))
            for c in m.get("chunks", []):
                out.chunks.setdefault(int(c["index"]), []).append((peer, str(c["info_hash"])))
            if m.get("transfer"):
                out.transfers[peer.node_id] = str(m["transfer"])
        return out

    async def _map_of(self, peer: Peer, digest: str) -> dict[str, Any] | None:
        try:
            return await self.peers.request_json(peer, "GET", f"/chunks/{digest}")
        except PeerError as e:
            log.debug("no chunk map of %s from %s: %s", digest[:12], peer.node_id, e)
            return None

    async def small_blob(self, blob: BlobId, holders: list[tuple[Peer, str]]) -> bytes | None:
        for peer, _ in holders:
            try:
                data = await self.peers.request(peer, "GET", f"/blob/{blob.digest}")
            except PeerError as e:
                log.info("small blob %s from peer %s failed: %s", blob.digest[:12],
                         peer.node_id, e)
                continue
            h = blob_hasher(blob)
            h.update(data)
            if len(data) == blob.size and h.hexdigest() == blob.digest:
                peer.bytes_from += len(data)
                return data
            self.peers.ban(peer.node_id, BAN_SECONDS, f"sent wrong bytes for {blob.digest}")
        return None

    async def chunks_in_order(self, blob: BlobId, indices: list[int],
                              holders: dict[int, list[tuple[Peer, str]]],
                              co_downloaders: list[Peer]) -> AsyncIterator[bytes]:
        """The bytes of these chunks in order; the next PREFETCH chunks download meanwhile,
        so per-chunk start-up (metadata, connecting) overlaps the transfer."""
        queues: dict[int, asyncio.Queue[bytes | BaseException | None]] = {}
        tasks: list[asyncio.Task[None]] = []

        def start(i: int) -> None:
            if i < len(indices) and indices[i] not in queues:
                q: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
                queues[indices[i]] = q
                tasks.append(asyncio.create_task(
                    self._pump(blob, indices[i], holders[indices[i]], co_downloaders, q)))

        try:
            for i, idx in enumerate(indices):
                for ahead in range(i, i + PREFETCH + 1):
                    start(ahead)
                while (item := await queues[idx].get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                del queues[idx]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, blob: BlobId, idx: int, holders: list[tuple[Peer, str]],
                    co_downloaders: list[Peer],
                    q: asyncio.Queue[bytes | BaseException | None]) -> None:
        try:
            async for data in self.chunk(blob, idx, holders, co_downloaders):
                q.put_nowait(data)
            q.put_nowait(None)
        except PeerError as e:
            q.put_nowait(e)

    async def chunk(self, blob: BlobId, idx: int, holders: list[tuple[Peer, str]],
                    co_downloaders: Sequence[Peer] = ()) -> AsyncIterator[bytes]:
        """The chunk's bytes in order, over BitTorrent from the peers that hold it and from
        those downloading it at the same time (they trade the pieces they already have, so a
        cluster does not queue behind the first holder's uplink)."""
        peer0, info_hash = holders[0]
        torrent = await self.peers.request(peer0, "GET", f"/torrent/{blob.digest}/{idx}")
        if _safe_info_hash(torrent) != info_hash:
            self.peers.ban(peer0.node_id, BAN_SECONDS, "torrent does not match its info-hash")
            raise PeerError(f"peer {peer0.node_id} sent a torrent that is not {info_hash}")
        sources = [p for p, ih in holders if ih == info_hash] + list(co_downloaders)
        endpoints = list(dict.fromkeys((p.address, p.bt_port) for p in sources if p.bt_port))
        try:
            async for data in self.swarm.fetch(torrent, endpoints):
                yield data
        except (SwarmError, SwarmStalled) as e:
            raise PeerError(f"BitTorrent transfer of {blob.digest}.{idx} failed: {e}") from e

    # --- events -------------------------------------------------------------------------
    def _bad_peer(self, ip: str, info_hash: str) -> None:
        peer = self.peers.by_address(ip)
        if peer is not None:
            self.peers.ban(peer.node_id, BAN_SECONDS, f"sent data failing piece hashes of "
                                                      f"torrent {info_hash}")
        self._peers_changed()

    def _peers_changed(self) -> None:
        self.swarm.allow_only({p.address for p in self.peers.usable()})


def _safe_info_hash(torrent: bytes) -> str:
    """The info-hash of bytes a peer sent as a torrent; '' if they are not one."""
    try:
        return info_hash_of(torrent)
    except (RuntimeError, ValueError, TypeError):
        return ""

"""Chunks shared with the LAN: the bridge between the store (bytes and digests) and the swarm
(torrents). It tells peers which complete chunks it holds, seeds each as its own deterministic
torrent when a peer first asks for it, and gets chunks from peers for the fetcher.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from aiohttp import web

from .. import hubnames
from ..errors import BadMessage, InvalidName, PeerError, SwarmError, SwarmStalled
from ..peermsg import (
    MAX_STATUS_TRANSFERS,
    PeerTransfer,
    parse_map_query,
    transfer_fields,
)
from ..ratelimit import PeerUploadCap
from ..registry import Transfers
from ..store import BlobId, Store, blob_hasher, xxh3_of_file
from ..upstreamfetch import UpstreamFetch
from .chunkmaps import ChunkMaps
from .peers import BAN_SECONDS, Peer, PeerRoute, PeerSet
from .plan import (
    blob_transfers,
    own_upstream_rate,
    peer_view,
    upstream_intake,
    upstream_reads,
)
from .swarm import ChunkTorrent, Swarm, chunk_torrent, info_hash_of, torrent_file

log = logging.getLogger(__name__)

SMALL_BLOB = 1024 * 1024  # blobs up to this size travel over the peer API, not as torrents
SHARED_BLOB = SMALL_BLOB + 1  # the smallest blob shared chunk by chunk
PREFETCH = 6  # chunks downloaded ahead of the one being written
MAX_TORRENT = 1024 * 1024


@dataclasses.dataclass
class Holders:
    chunks: dict[int, list[tuple[Peer, str]]] = dataclasses.field(default_factory=dict)
    small: list[Peer] = dataclasses.field(default_factory=list)  # hold the whole small blob
    transfers: dict[str, PeerTransfer] = dataclasses.field(default_factory=dict)  # by node id
    upstream_rates: dict[str, float] = dataclasses.field(default_factory=dict)  # by node id
    # what each peer reads from the upstream now, all blobs together, bytes/s
    upstream_intakes: dict[str, float] = dataclasses.field(default_factory=dict)
    # how many blobs each peer reads from the upstream now
    upstream_reads: dict[str, int] = dataclasses.field(default_factory=dict)
    stood_in: int = 0  # peers whose earlier answer stood in for a late one


class Sharing:
    def __init__(self, store: Store, swarm: Swarm, peers: PeerSet,
                 upload: PeerUploadCap, transfers: Transfers, upstream: UpstreamFetch,
                 may_share: Callable[[str], bool], *, node_name: str, version: str,
                 bt_port: int) -> None:
        self.store = store
        self.upload = upload  # peer_upload_rate: small blobs are sent within it
        self.swarm = swarm
        self.peers = peers
        self._maps = ChunkMaps(peers, store.chunk_size)
        self.node_name = node_name
        self.version = version
        self.bt_port = bt_port
        self.torrents_dir = store.root / "torrents"
        self.torrents_dir.mkdir(exist_ok=True)
        self._seeded: dict[tuple[str, int], str] = {}  # (digest, index) -> info-hash
        self._making: dict[tuple[str, int], asyncio.Future[bytes | None]] = {}
        self.transfers = transfers
        self.upstream = upstream  # what the upstream gives this node, for the chunk maps
        self.may_share = may_share  # signatures.py's policy
        swarm.bad_peer.connect(self._bad_peer)
        peers.changed.connect(self._peers_changed)

    # --- seeding: a chunk's torrent is made the first time a peer asks for it ---------------
    async def seed_all(self) -> None:
        """At start: the chunks whose torrents were made before (no hashing here: in seed mode
        libtorrent checks each piece before its first upload)."""
        held = {(c.digest, c.idx) for c in self.store.complete_chunks(min_blob_size=SHARED_BLOB)}
        for path in self.torrents_dir.glob("*.tmp"):  # a torrent being written when it stopped
            path.unlink(missing_ok=True)
        for path in self.torrents_dir.glob("*.torrent"):
            digest, _, idx = path.name.removesuffix(".torrent").rpartition(".")
            key = (digest, int(idx)) if idx.isdigit() else None
            try:
                if key in held:
                    self._seed(key, path.read_bytes())
                    continue
            except (OSError, RuntimeError, TypeError, ValueError) as e:  # libtorrent: Runtime
                log.warning("torrent %s is damaged (%s): removed; made again when a peer asks",
                            path, e)
            path.unlink(missing_ok=True)
        log.info("seeding %d chunks whose torrents were made before", len(self._seeded))

    def _seed(self, key: tuple[str, int], torrent: bytes) -> None:
        self.swarm.seed(torrent, self.store.chunk_path(*key))
        self._seeded[key] = info_hash_of(torrent)

    async def torrent_of(self, digest: str, idx: int) -> bytes | None:
        """The chunk's torrent, made and seeded on first use; None when the chunk is not
        complete here or its file no longer matches its checksum. (Made lazily, a cluster
        that relays a blob spends no CPU on torrents nobody asks for.)"""
        key = (digest, idx)
        path = self.torrents_dir / f"{digest}.{idx}.torrent"
        if key in self._seeded:
            return path.read_bytes()
        making = self._making.get(key)
        if making is None:
            making = self._making[key] = asyncio.ensure_future(self._make_torrent(key, path))
            making.add_done_callback(lambda _: self._making.pop(key, None))
        return await asyncio.shield(making)

    async def _make_torrent(self, key: tuple[str, int], path: Path) -> bytes | None:
        chunk = next((c for c in self.store.complete_chunks(digest=key[0],
                                                            min_blob_size=SHARED_BLOB)
                      if c.idx == key[1]), None)
        if chunk is None:
            return None
        made = await asyncio.to_thread(_checked_torrent, self.store.chunk_path(*key),
                                       chunk.length, chunk.xxh3)
        if made is None:
            log.error("chunk %s.%d no longer matches its xxh3 on disk: not shared (run "
                      "`modelpeer verify`)", *key)
            return None
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(made.torrent)
        tmp.replace(path)
        self._seed(key, made.torrent)
        return made.torrent

    def forget_blob(self, digest: str) -> None:
        for key in [k for k in self._seeded if k[0] == digest]:
            self.swarm.unseed(self._seeded.pop(key))
            (self.torrents_dir / f"{key[0]}.{key[1]}.torrent").unlink(missing_ok=True)

    # --- the peer API -------------------------------------------------------------------
    def peer_routes(self) -> list[PeerRoute]:
        return [PeerRoute("GET", "/status", self._status, any_receiver=True),
                PeerRoute("GET", "/chunks/{digest}", self._chunk_map),
                PeerRoute("GET", "/chunks", self._chunk_maps),
                PeerRoute("GET", "/torrent/{digest}/{idx}", self._torrent),
                PeerRoute("GET", "/blob/{digest}", self._blob)]

    async def _status(self, request: web.Request, sender: str) -> web.Response:
        transfers = [t.to_json() for t in blob_transfers(self.transfers)
                     if self.may_share(t.digest)]
        return web.json_response({"node_id": self.peers.node_id, "name": self.node_name,
                                  "version": self.version, "bt_port": self.bt_port,
                                  "chunks": self.store.count_complete_chunks(SHARED_BLOB),
                                  "transfers": transfers[:MAX_STATUS_TRANSFERS]})

    async def _chunk_map(self, request: web.Request, sender: str) -> web.Response:
        digest = request.match_info["digest"]
        if not _is_digest(digest):
            return web.json_response({"error": "not a blob digest"}, status=400)
        return web.json_response(self._map_of(digest))

    async def _chunk_maps(self, request: web.Request, sender: str) -> web.Response:
        """The maps of several blobs at once: nodes that start a warm job's files together
        asked every peer for each file's map, 528 requests at 12 nodes and 4 files, which
        took 0.4 s on 2 cores."""
        try:
            digests = parse_map_query(request.query.getall("digest", []))
        except BadMessage as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response({"maps": [self._map_of(d) for d in digests]})

    def _map_of(self, digest: str) -> dict[str, object]:
        if not self.may_share(digest):
            return {"digest": digest, "chunks": [], "small": False, "transfer": ""}
        chunks = [{"index": c.idx, "info_hash": self._seeded.get((digest, c.idx), "")}
                  for c in self.store.complete_chunks(digest=digest, min_blob_size=SHARED_BLOB)]
        small = self.store.is_complete(digest) and not chunks
        running = self.transfers.running.get(digest)
        transfer = {} if running is None else transfer_fields(peer_view(running))
        every = self.transfers.running.values()
        return {"digest": digest, "chunks": chunks, "small": small,
                "upstream_rate": round(own_upstream_rate(self.upstream.rate(), every)),
                "upstream_intake": round(upstream_intake(every)),
                "upstream_reads": upstream_reads(every), **transfer}

    async def _torrent(self, request: web.Request, sender: str) -> web.Response:
        idx, digest = request.match_info["idx"], request.match_info["digest"]
        torrent = (await self.torrent_of(digest, int(idx))
                   if idx.isdigit() and len(idx) < 9 and _is_digest(digest)
                   and self.may_share(digest) else None)
        if torrent is None:
            return web.json_response({"error": "chunk not held"}, status=404)
        return web.Response(body=torrent, content_type="application/x-bittorrent")

    async def _blob(self, request: web.Request, sender: str) -> web.Response:
        digest = request.match_info["digest"]
        blob = self.store.complete_blob(digest) if self.may_share(digest) else None
        if blob is None or blob.size > SMALL_BLOB:
            return web.json_response({"error": "small blob not held"}, status=404)
        with self.upload.stream() as pace:
            await pace.take(blob.size)  # before the read: nothing held in memory meanwhile
        data = self.store.read(blob, 0, blob.size)
        peer = self.peers.peers.get(sender)
        if peer is not None:
            peer.bytes_to += len(data)
        return web.Response(body=data, content_type="application/octet-stream")

    # --- fetching from peers --------------------------------------------------------------
    async def holders(self, blob: BlobId, *, fresh: bool = False) -> Holders:
        """Which live peers hold which chunks or the whole small blob, and which are
        transferring the blob right now (by source). A peer that does not answer within its
        deadline (PeerSet.quick_json) is left out rather than holding up everyone; one that
        is late while transferring it stands in with its recent answer (chunkmaps.py),
        unless `fresh`."""
        peers = self.peers.usable()
        maps = await asyncio.gather(*(self._maps.of(p, blob, fresh=fresh) for p in peers))
        out = Holders()
        for peer, m in zip(peers, maps, strict=True):
            if m is None:
                continue
            out.stood_in += m.stood_in
            if m.small:
                out.small.append(peer)
            for c in m.chunks:
                out.chunks.setdefault(c.index, []).append((peer, c.info_hash))
            if m.transfer is not None:
                out.transfers[peer.node_id] = m.transfer
            if m.upstream_rate:
                out.upstream_rates[peer.node_id] = m.upstream_rate
            out.upstream_intakes[peer.node_id] = m.upstream_intake
            out.upstream_reads[peer.node_id] = m.upstream_reads
        return out

    async def small_blob(self, blob: BlobId, holders: list[Peer]) -> bytes | None:
        for peer in holders:
            try:
                data = await self.peers.request(peer, "GET", f"/blob/{blob.digest}",
                                                limit=SMALL_BLOB)
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
        except Exception as e:  # noqa: BLE001 - the reader must get an end, whatever broke
            log.exception("getting chunk %d of %s from peers failed", idx, blob.digest[:12])
            q.put_nowait(PeerError(f"chunk {idx} of {blob.digest}: {e!r}"))

    async def chunk(self, blob: BlobId, idx: int, holders: list[tuple[Peer, str]],
                    co_downloaders: Sequence[Peer] = ()) -> AsyncIterator[bytes]:
        """The chunk's bytes in order, over BitTorrent from the peers that hold it and from
        those downloading it at the same time (they trade the pieces they already have, so a
        cluster does not queue behind the first holder's uplink)."""
        peer0, info_hash = holders[0]
        torrent = await self.peers.request(peer0, "GET", f"/torrent/{blob.digest}/{idx}",
                                           limit=MAX_TORRENT)
        got = _safe_info_hash(torrent)
        if not got or info_hash not in ("", got):
            self.peers.ban(peer0.node_id, BAN_SECONDS, "torrent does not match its info-hash")
            raise PeerError(f"peer {peer0.node_id} sent a torrent that is not {info_hash}")
        length = min(self.store.chunk_size, blob.size - idx * self.store.chunk_size)
        if torrent_file(torrent) != (f"{blob.digest}.{idx}", length):
            raise PeerError(f"peer {peer0.node_id}: its torrent of chunk {idx} of {blob.digest} "
                            f"is not the {length}-byte chunk here (is chunk_size the same on "
                            "every node?)")
        holding = [p for p, ih in holders if ih in ("", got)]
        sources = holding + list(co_downloaders)
        endpoints = list(dict.fromkeys((p.address, p.bt_port) for p in sources if p.bt_port))

        def holders_left() -> bool:
            """A holder that froze is left out within its chunk-map deadline; waiting the
            stall timeout for it held a frozen-first bench's nodes 9 s."""
            usable = {p.node_id for p in self.peers.usable()}
            return any(p.node_id in usable for p in holding)

        try:
            async for data in self.swarm.fetch(torrent, endpoints, sources_left=holders_left):
                yield data
        except (SwarmError, SwarmStalled) as e:
            names = ", ".join(dict.fromkeys(p.node_id for p in sources))
            raise PeerError(f"BitTorrent transfer of {blob.digest}.{idx} from peers {names} "
                            f"failed: {e}") from e

    # --- events -------------------------------------------------------------------------
    def _bad_peer(self, ip: str, info_hash: str) -> None:
        peer = self.peers.by_address(ip)
        if peer is not None:
            self.peers.ban(peer.node_id, BAN_SECONDS, f"sent data failing piece hashes of "
                                                      f"torrent {info_hash}")
        self._peers_changed()

    def _peers_changed(self) -> None:
        self.swarm.allow_only({p.address for p in self.peers.usable()})


def _is_digest(value: str) -> bool:
    try:
        hubnames.any_digest(value)
    except InvalidName:
        return False
    return True


def _safe_info_hash(torrent: bytes) -> str:
    """The info-hash of bytes a peer sent as a torrent; '' if they are not one."""
    try:
        return info_hash_of(torrent)
    except (RuntimeError, ValueError, TypeError):
        return ""


def _checked_torrent(path: Path, length: int, xxh3: str) -> ChunkTorrent | None:
    """The chunk file's torrent, if the file still matches its checksum."""
    if xxh3_of_file(path, length) != xxh3:
        return None
    return chunk_torrent(path)


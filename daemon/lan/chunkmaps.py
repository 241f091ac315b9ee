"""Peers' chunk maps for the transfer plan, asked once at a time per peer and blob, with a
recent answer standing in for one that is late.

A node whose link is full both ways (a slow node fetching, and relaying what it gets) answers
through queues that drop packets: in the slow-first bench each plan round waited 0.25 s for its
chunk map, and one 1.6 s (a request resent after a drop), while every other peer had answered in
milliseconds. A round now waits LATE_AFTER for a peer that answered within MAP_FRESH that it
fetches or relays the blob, then takes that answer's transfer (not its complete chunks: no
torrent is started on a peer that may be frozen); the question goes on and its answer serves
the next round. A peer with no recent answer, or one that was not fetching or relaying the blob
then, is waited for as before (up to its deadline, peers.py), and so is every peer when a node is
about to go to the upstream: it must see what the others do now.

Questions to one peer that arise within BATCH_WINDOW of each other travel as one request: a
warm job starts all its files at once, and each asks every peer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from urllib.parse import urlencode

from ..errors import PeerError
from ..peermsg import MAX_MAPS, ChunkMap, parse_chunk_map, parse_chunk_maps
from ..store import BlobId
from ..transfer import TransferSource
from .peers import Peer, PeerSet

log = logging.getLogger(__name__)

LATE_AFTER = 0.1  # s a round waits for a peer it has a recent map of
MAP_FRESH = 1.0  # s an answer may stand in for a late one
# s a question waits for others to the same peer: a warm job's files reach their first round
# over a few turns of the event loop (their writers are prepared in threads), 1-2 ms apart
BATCH_WINDOW = 0.01
Key = tuple[str, str]  # (node id, blob digest)
Question = tuple[BlobId, asyncio.Future["ChunkMap | None"]]


class ChunkMaps:
    def __init__(self, peers: PeerSet, chunk_size: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.peers = peers
        self.chunk_size = chunk_size
        self._clock = clock
        self._asking: dict[Key, asyncio.Future[ChunkMap | None]] = {}
        self._recent: dict[Key, tuple[float, ChunkMap]] = {}
        self._queued: dict[str, list[Question]] = {}  # by node id: not sent yet
        self._requests: set[asyncio.Task[None]] = set()

    async def of(self, peer: Peer, blob: BlobId, *, fresh: bool = False) -> ChunkMap | None:
        """The peer's chunk map of the blob: its answer to a question asked now (or still
        under way), or, when that is late and not `fresh`, its answer of less than MAP_FRESH
        ago (marked `stood_in`)."""
        key = (peer.node_id, blob.digest)
        asking = self._asking.get(key)
        if asking is None:
            asking = self._asking[key] = self._queue(peer, blob)
            asking.add_done_callback(lambda f: self._answered(key, f))
        recent = self._recent.get(key)
        if fresh or recent is None or not _stands_in(recent[1], self._clock() - recent[0]):
            return await asyncio.shield(asking)
        done, _ = await asyncio.wait({asking}, timeout=LATE_AFTER)
        return asking.result() if done else _aged(recent[1], self._clock() - recent[0])

    def _queue(self, peer: Peer, blob: BlobId) -> asyncio.Future[ChunkMap | None]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[ChunkMap | None] = loop.create_future()
        queued = self._queued.get(peer.node_id)
        if queued is None:
            queued = self._queued[peer.node_id] = []
            loop.call_later(BATCH_WINDOW, self._send, peer, queued)
        queued.append((blob, answer))
        if len(queued) == MAX_MAPS:
            self._send(peer, queued)
        return answer

    def _send(self, peer: Peer, queued: list[Question]) -> None:
        if self._queued.get(peer.node_id) is not queued:
            return  # sent when it was full
        del self._queued[peer.node_id]
        request = asyncio.get_running_loop().create_task(self._ask(peer, queued))
        self._requests.add(request)
        request.add_done_callback(self._requests.discard)

    async def _ask(self, peer: Peer, queued: list[Question]) -> None:
        chunks = {blob.digest: max(1, -(-blob.size // self.chunk_size)) for blob, _ in queued}
        maps: dict[str, ChunkMap] | None = None
        try:
            if len(queued) == 1:
                blob = queued[0][0]
                one = await self.peers.quick_json(
                    peer, f"/chunks/{blob.digest}",
                    lambda v: parse_chunk_map(v, blob.digest, chunks[blob.digest]),
                    f"chunk map of {blob.digest[:12]}")
                maps = None if one is None else {blob.digest: one}
            else:
                maps = await self.peers.quick_json(
                    peer, "/chunks?" + urlencode([("digest", d) for d in chunks]),
                    lambda v: parse_chunk_maps(v, chunks), f"chunk maps of {len(chunks)} blobs")
        except PeerError as e:
            log.info("no chunk map of %s from peer %s: %s",
                     ", ".join(d[:12] for d in chunks), peer.node_id, e)
        finally:
            for blob, answer in queued:
                if not answer.done():
                    answer.set_result(None if maps is None else maps.get(blob.digest))

    def _answered(self, key: Key, asking: asyncio.Future[ChunkMap | None]) -> None:
        del self._asking[key]
        now = self._clock()
        for old in [k for k, (at, _) in self._recent.items() if now - at > MAP_FRESH]:
            del self._recent[old]
        answer = None if asking.cancelled() or asking.exception() else asking.result()
        if answer is None:  # silent or broken: the next round waits for it
            self._recent.pop(key, None)
        else:
            self._recent[key] = (now, answer)


def _stands_in(answer: ChunkMap, age: float) -> bool:
    """Whether an answer this old may stand in for a late one: it is recent and the peer was
    fetching or relaying the blob then. One from the moment the peer started it (no source
    yet) said it had no byte, and a node went to the upstream beside it."""
    t = answer.transfer
    return (age <= MAP_FRESH and t is not None
            and t.source in (TransferSource.UPSTREAM, TransferSource.PEER))


def _aged(answer: ChunkMap, age: float) -> ChunkMap:
    """An answer standing in `age` seconds after it came: its transfer that much older, and
    none of its complete chunks. A late peer is busy or frozen, and a torrent waits on it as
    long: in the frozen-fetcher bench the others asked the frozen node for its first chunks
    over BitTorrent and got nothing in 2-3 s."""
    t = answer.transfer
    aged = None if t is None else dataclasses.replace(t, since=t.since + age)
    return dataclasses.replace(answer, chunks=[], transfer=aged, stood_in=True)

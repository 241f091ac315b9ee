"""Relay: a blob's bytes streamed from a peer's copy over the signed peer API, as they land
there. While several nodes transfer the same blob, each reads from the node ahead of it (the
fetcher picks which), so no node waits for a whole chunk to complete before it passes bytes on.
A relayed stream is trusted no more than a torrent: the reader's blob digest guards it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Callable

from aiohttp import web

from ..errors import ChunkDamaged, TransferFailed
from ..ratelimit import PeerUploadCap
from ..registry import Transfers
from ..store import BlobId
from .peers import Peer, PeerRoute, PeerSet

log = logging.getLogger(__name__)


class Relay:
    def __init__(self, peers: PeerSet, upload: PeerUploadCap,
                 transfers: Transfers, may_share: Callable[[str], bool]) -> None:
        self.peers = peers
        self.upload = upload  # peer_upload_rate
        self.transfers = transfers
        self.may_share = may_share  # signatures.py's policy

    def peer_routes(self) -> list[PeerRoute]:
        return [PeerRoute("GET", "/relay/{digest}", self._serve)]

    async def stream(self, peer: Peer, blob: BlobId, start: int,
                     end: int) -> AsyncGenerator[memoryview, None]:
        """Bytes [start, end) of the blob from the peer's copy, as it gets them: views of one
        buffer, each good until the next is asked for. More or fewer bytes than asked are a
        PeerError."""
        body = self.peers.stream(peer, f"/relay/{blob.digest}?start={start}&end={end}",
                                 end - start)
        async with contextlib.aclosing(body):
            async for piece in body:
                peer.bytes_from += len(piece)
                yield piece

    async def _serve(self, request: web.Request, sender: str) -> web.StreamResponse:
        digest = request.match_info["digest"]
        if not self.may_share(digest) or (transfer := self.transfers.joinable(digest)) is None:
            return web.json_response({"error": "not transferring this blob"}, status=404)
        try:
            start = int(request.query.get("start", "0"))
            end = int(request.query.get("end", str(transfer.blob.size)))
        except ValueError:
            return web.json_response({"error": "start and end must be integers"}, status=400)
        if not 0 <= start < end <= transfer.blob.size:
            return web.json_response({"error": "range outside the blob"}, status=416)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = end - start
        await resp.prepare(request)
        peer = self.peers.peers.get(sender)
        try:
            with self.upload.stream() as pace:
                async for _, n in self.transfers.send(request.transport, transfer, start, end,
                                                      to_peer=True, pace=pace):
                    if peer is not None:
                        peer.bytes_to += n
        except ConnectionError:  # reset or broken pipe: the peer moved to another source
            return resp
        except (TransferFailed, ChunkDamaged) as e:
            log.info("relay of %s to peer %s stopped: %s", transfer.label, sender, e)
            if request.transport is not None:
                request.transport.abort()
            return resp
        await resp.write_eof()
        return resp

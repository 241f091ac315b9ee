"""The one place that decides where a blob's bytes come from: the store, else the LAN, else the
upstream.

One Transfer per blob at a time (single-flight): every client that wants the blob reads from
the same Transfer as its contiguous prefix grows on disk. The LAN (a PeerSource) gives what
peers have or are getting; the upstream (upstreamfetch.py) the rest, several Range requests at
once, written in order, so the prefix a client streams keeps moving while later segments
arrive. The last byte is held back until the blob's digest has checked, so no client ever
completes a wrong file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from typing import Protocol

from .errors import DigestMismatch, PeerError, TransferFailed, UpstreamError
from .registry import Transfers
from .store import BlobId, BlobWriter, Store
from .transfer import Origin, Transfer
from .upstreamfetch import UpstreamFetch

log = logging.getLogger(__name__)

EXPECTED_FAILURES = (UpstreamError, PeerError, DigestMismatch, OSError, sqlite3.Error)


class PeerSource(Protocol):
    """The LAN, as the fetcher sees it (lan/peerfetch.py)."""

    async def fill(self, transfer: Transfer, writer: BlobWriter, origin: Origin) -> None:
        """As much of the blob, in order from the writer's offset, as peers have or are
        getting; returns when the upstream should take over."""

    async def outpaced(self, transfer: Transfer, writer: BlobWriter) -> None:
        """Returns when peers should feed the transfer, which reads from the upstream now:
        they hold the rest of the blob complete, or one reads it from the upstream too, ahead
        of this node, at least as fast and not slow itself."""

    def blame(self, transfer: Transfer) -> None:
        """The blob failed its digest: the peers that sent parts of it are not trusted."""

    def has_members(self) -> bool:
        """Whether other nodes are live on the LAN (they may read the upstream too)."""

    async def upstream_shared(self, transfer: Transfer) -> bool:
        """Whether another node reads from the upstream now: the link is shared."""


class NoPeers:
    """No LAN: every byte not in the store comes from the upstream."""

    async def fill(self, transfer: Transfer, writer: BlobWriter, origin: Origin) -> None:
        return None

    async def outpaced(self, transfer: Transfer, writer: BlobWriter) -> None:
        await asyncio.Event().wait()  # no peer ever is

    def blame(self, transfer: Transfer) -> None:
        return None

    def has_members(self) -> bool:
        return False

    async def upstream_shared(self, transfer: Transfer) -> bool:
        return False


class Fetcher:
    def __init__(self, store: Store, transfers: Transfers, upstream: UpstreamFetch,
                 peers: PeerSource) -> None:
        self.store = store
        self.transfers = transfers
        self.upstream = upstream
        self.peers = peers
        self._tasks: set[asyncio.Task[None]] = set()
        self._runs: dict[str, asyncio.Task[None]] = {}  # digest -> the last transfer's task

    def open(self, blob: BlobId, origin: Origin) -> Transfer:
        """The blob's bytes: from the store when complete, else joined to (or starting) the
        one transfer that fetches it."""
        if self.store.is_complete(blob.digest):
            self.store.touch(blob.digest)
            return Transfer(blob, origin.label, available=blob.size, verified=True)
        if (running := self.transfers.live(blob.digest)) is not None:
            return running
        transfer = Transfer(blob, origin.label)
        self.transfers.add(transfer)
        # a failed transfer may still be closing its writer: the new one starts after it
        previous = self._runs.get(blob.digest)
        task = asyncio.create_task(self._run(transfer, origin, previous),
                                   name=f"fetch {blob.digest}")
        self._runs[blob.digest] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return transfer

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, transfer: Transfer, origin: Origin,
                   previous: asyncio.Task[None] | None) -> None:
        blob = transfer.blob
        with self.store.pinned(blob.digest):
            try:
                if previous is not None:
                    await asyncio.wait([previous])
                await self._make_available(transfer, origin)
            except asyncio.CancelledError:
                transfer.fail(TransferFailed("the daemon is shutting down"))
                raise
            except Exception as e:  # any failure must reach the readers, or they wait forever
                self._failed(transfer, origin, e)
            finally:
                self.transfers.remove(transfer)
                if self._runs.get(blob.digest) is asyncio.current_task():
                    del self._runs[blob.digest]
                self.store.evict(self.store.max_bytes)

    async def _make_available(self, transfer: Transfer, origin: Origin) -> None:
        blob = transfer.blob
        writer = self.store.open_writer(blob)
        try:
            await writer.prepare()
            transfer.start_offset = writer.offset
            transfer.advance(writer.offset)
            while writer.offset < blob.size:
                await self.peers.fill(transfer, writer, origin)
                if writer.offset < blob.size:
                    await self._upstream_unless_outpaced(transfer, writer, origin)
            await writer.verify()
            transfer.finish()  # the last byte goes out now; durability follows
            await writer.finish()
            log.info("stored %s (%s, %d bytes, %d from peers, %d from upstream)", origin.label,
                     blob.digest[:12], blob.size, transfer.bytes_peers, transfer.bytes_upstream)
        finally:
            with contextlib.suppress(OSError, sqlite3.Error):
                await writer.close()

    async def _upstream_unless_outpaced(self, transfer: Transfer, writer: BlobWriter,
                                        origin: Origin) -> None:
        """The rest from the upstream, until a peer that fetches it too is ahead and as fast:
        then back to the peers, so the WAN carries the blob once."""
        outpaced = asyncio.create_task(self.peers.outpaced(transfer, writer))
        try:
            shared = self.peers.upstream_shared if self.peers.has_members() else None
            await self.upstream.fetch_rest(transfer, writer, origin, until=outpaced,
                                           shared=shared)
        finally:
            outpaced.cancel()
            watched = (await asyncio.gather(outpaced, return_exceptions=True))[0]
            if isinstance(watched, Exception):  # the upstream read went on without it
                log.warning("watching the peers while fetching %s from upstream failed: %s",
                            transfer.label, watched, exc_info=watched)

    def _failed(self, transfer: Transfer, origin: Origin, error: Exception) -> None:
        if isinstance(error, DigestMismatch):
            self.peers.blame(transfer)
            self.transfers.remember_failed_digest(transfer.blob.digest)
        expected = isinstance(error, EXPECTED_FAILURES)
        log.error("fetching %s (%s) failed%s: %s", origin.label, transfer.blob.digest[:12],
                  "" if expected else " unexpectedly", error,
                  exc_info=None if expected else error)
        transfer.fail(error)

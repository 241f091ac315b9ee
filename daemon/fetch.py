"""The one place that decides where a blob's bytes come from: the store, else the upstream.

One Transfer per blob at a time (single-flight): every client that wants the blob reads from
the same Transfer as its contiguous prefix grows on disk. The upstream is read with several
Range requests at once (segments), written to the store strictly in order, so the prefix a
client streams keeps moving while later segments arrive. The last byte is held back until the
blob's digest has checked, so no client ever completes a wrong file.

With LAN peers, the bytes come from them first: nodes transferring the same blob at once relay
it to each other as the bytes land, following the transfer plan (plan.py: who feeds whom, by
measured rate; who goes to the upstream), so the upstream is read once; chunks that peers
already hold come over BitTorrent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from .errors import (
    DigestMismatch,
    PeerError,
    RangeIgnored,
    TransferFailed,
    UpstreamError,
    UpstreamRefused,
)
from .peermsg import BlobTransfer, PeerTransfer, TransferSource
from .peers import BAN_SECONDS
from .plan import STALL_WINDOW, GoUpstream, Plan, RateMeter, Relay
from .ratelimit import RateLimit
from .store import BlobId, BlobWriter, Store
from .upstream import Upstream, backoff

if TYPE_CHECKING:
    from .peers import Peer
    from .relay import Relay as RelayApi
    from .sharing import Holders, Sharing

log = logging.getLogger(__name__)

SEGMENT = 8 * 1024 * 1024
MAX_ATTEMPTS_WITHOUT_PROGRESS = 6
COMMIT_BATCH = 1024 * 1024  # fewer, larger writes; the first bytes still go at once
PACED_PIECE = 1024 * 1024  # what a paced sender (peer_upload_rate) sends per turn
SETTLE = 0.3  # nodes that start a blob within this long of each other see each other first
CHECK_EVERY = 1.0  # a rate measured over a shorter time says little
MIN_RELAY_RATE = 64 * 1024  # a source with bytes to send that gives less is dropped
REPLAN_EVERY = 1.5  # how long a relay runs before the plan is made again with fresh news
PROBE_BYTES = 4 * 1024 * 1024
PROBED_BLOB = 64 * 1024 * 1024  # smaller blobs are not worth reading twice in part
UPSTREAM_RATE_KEPT = 600.0  # how long a measured upstream rate is believed
WRONG_BLOB_KEPT = 3600.0  # how long a blob that failed its digest answers a resume whole
MAX_WRONG_BLOBS = 4096
EXPECTED_FAILURES = (UpstreamError, PeerError, DigestMismatch, OSError, sqlite3.Error)


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where the upstream serves a blob: the Hub resolve path (at a commit) and the token
    of the client that asked, kept in memory only."""
    resolve_path: str
    token: str | None
    label: str  # "repo_type:repo_id/path", for logs and status


def is_disk_full(error: BaseException | None) -> bool:
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    return isinstance(error, sqlite3.Error) and "full" in str(error)


class Transfer:
    """A blob being made available: its contiguous prefix, growing; readers wait on it."""

    def __init__(self, blob: BlobId, label: str, available: int = 0,
                 verified: bool = False) -> None:
        self.blob = blob
        self.label = label
        self.available = available
        self.verified = verified
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.start_offset = available
        self.bytes_upstream = 0
        self.upstream_origin: Origin | None = None  # whose request the upstream bytes were for
        self.bytes_peers = 0
        self.peers_used: set[str] = set()  # node ids that sent bytes or torrents
        self.feeder = ""  # the node relaying the blob to this one now, if any
        self.probing = False  # reading a few MiB from the upstream to measure it
        self.meter = RateMeter()
        self._sources: list[tuple[int, str]] = [(0, "store")]
        self.readers = 0
        self._event = asyncio.Event()
        self.done = asyncio.get_running_loop().create_future()
        if verified:
            self.done.set_result(None)

    def upstream_served(self, resolve_path: str, token: str | None) -> bool:
        """Whether the upstream sent bytes of this transfer for that resolve path and token (a
        transfer joined from another request may have been fetched for another repo or token)."""
        o = self.upstream_origin
        return (self.bytes_upstream > 0 and o is not None
                and (o.resolve_path, o.token) == (resolve_path, token))

    def servable(self, end: int, *, to_peer: bool = False) -> int:
        """How far a response ending at `end` may be sent. Before the digest checks, no
        response to a client may complete: one that ends at the blob's end gets all but its
        last byte, a shorter Range nothing at all (it would complete with bytes never
        verified). A peer may have unverified bytes: it checks the blob's digest itself."""
        if self.verified:
            return self.available
        if end < self.blob.size and not to_peer:
            return 0
        return min(self.available, self.blob.size - 1)

    def mark_source(self, offset: int, source: str) -> None:
        """Bytes from `offset` on come from `source` (peer or upstream)."""
        if self._sources[-1][1] != source:
            self._sources.append((offset, source))

    @property
    def source(self) -> str:
        return self._sources[-1][1]

    def source_at(self, offset: int) -> str:
        return next((s for start, s in reversed(self._sources) if offset >= start), "store")

    def advance(self, available: int) -> None:
        self.meter.add(available - self.available)
        self.available = available
        self._wake()

    def finish(self) -> None:
        self.verified = True
        self._wake()
        if not self.done.done():
            self.done.set_result(None)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()
        if not self.done.done():
            self.done.set_exception(error)
            self.done.exception()  # a failure nobody awaited is still not "never retrieved"

    def _wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def readable(self, pos: int, end: int, *, to_peer: bool = False) -> int:
        """Wait until bytes past `pos` of a response ending at `end` may be served; returns
        the servable limit."""
        while True:
            if self.error is not None:
                raise TransferFailed(str(self.error)) from self.error
            limit = self.servable(end, to_peer=to_peer)
            if limit > pos or (self.verified and pos >= self.blob.size):
                return limit
            await self._event.wait()

    def snapshot(self) -> dict[str, object]:
        elapsed = max(1e-3, time.monotonic() - self.started)
        return {"digest": self.blob.digest, "file": self.label, "size": self.blob.size,
                "available": self.available, "verified": self.verified,
                "bytes_upstream": self.bytes_upstream, "bytes_peers": self.bytes_peers,
                "source": self.source, "feeder": self.feeder, "readers": self.readers,
                "rate": round((self.available - self.start_offset) / elapsed),
                "rate_now": round(self.meter.rate)}


class _Segment:
    """Bytes [start, end) of the blob, read over one connection and put into the store's
    files as they arrive (no buffer holds the segment); committed in order later."""

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.filled = 0  # bytes from start on that are in the store's files
        self.finished = False
        self.error: BaseException | None = None
        self.changed = asyncio.Event()
        self.pending: list[bytes | memoryview] = []  # received, not yet put
        self.pending_bytes = 0

    async def put_pending(self, writer: BlobWriter) -> None:
        if not self.pending:
            return
        try:
            await writer.put(self.start + self.filled, self.pending)
        except OSError as e:
            raise _StoreFailed(f"writing {writer.blob.digest}: {e}") from e
        self.filled += self.pending_bytes
        self.pending, self.pending_bytes = [], 0
        self.changed.set()


class _StoreFailed(Exception):
    """Putting received bytes into the store failed: the disk, not the upstream."""


class Fetcher:
    def __init__(self, store: Store, upstream: Upstream, *, connections: int = 4,
                 max_cache_size: int = 0, offline: bool = False, max_transfers: int = 8) -> None:
        self.store = store
        self.upstream = upstream
        self.connections = connections
        # a memory bound: blobs read from the upstream at once
        self._upstream_slots = asyncio.Semaphore(max_transfers)
        self.offline = offline
        self.max_cache_size = max_cache_size
        self.sharing: Sharing | None = None
        self.relay: RelayApi | None = None
        self._upstream_rate = (0.0, 0.0)  # bytes/s the upstream gave this node, and when
        self._probing = False  # one probe at a time: its rate serves every transfer
        self.transfers: dict[str, Transfer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._runs: dict[str, asyncio.Task[None]] = {}  # digest -> the last transfer's task
        self._failed_digest: dict[str, float] = {}  # digest -> until when it is remembered
        self.on_upstream_bytes: Callable[[int], None] = lambda n: None
        self.on_upstream_error: Callable[[str], None] = lambda kind: None

    @property
    def max_cache_size(self) -> int:
        return self.store.max_bytes

    @max_cache_size.setter
    def max_cache_size(self, value: int) -> None:
        self.store.max_bytes = value

    def open(self, blob: BlobId, origin: Origin) -> Transfer:
        """The blob's bytes: from the store when complete, else joined to (or starting) the
        one transfer that fetches it."""
        if self.store.is_complete(blob.digest):
            self.store.touch(blob.digest)
            return Transfer(blob, origin.label, available=blob.size, verified=True)
        running = self.transfers.get(blob.digest)
        if running is not None and running.error is None:
            return running
        transfer = Transfer(blob, origin.label)
        self.transfers[blob.digest] = transfer
        # a failed transfer may still be closing its writer: the new one starts after it
        previous = self._runs.get(blob.digest)
        task = asyncio.create_task(self._run(transfer, origin, previous),
                                   name=f"fetch {blob.digest}")
        self._runs[blob.digest] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return transfer

    def joinable(self, digest: str) -> Transfer | None:
        """The blob's running transfer, or a done one when the store holds it; never starts
        one (for peers, who must not make this node download)."""
        running = self.transfers.get(digest)
        if running is not None and running.error is None:
            return running
        blob = self.store.complete_blob(digest)
        return Transfer(blob, digest[:12], blob.size, verified=True) if blob else None

    @contextlib.contextmanager
    def reading(self, transfer: Transfer) -> Iterator[Transfer]:
        """A client reads the blob: its bytes stay (against eviction, gc and rm) until the
        response is done. Enter it right after open(), before any await."""
        with self.store.pinned(transfer.blob.digest):
            transfer.readers += 1
            try:
                yield transfer
            finally:
                transfer.readers -= 1

    async def send(self, transport: asyncio.Transport | None, transfer: Transfer, start: int,
                   end: int, *, to_peer: bool = False,
                   pace: RateLimit | None = None) -> AsyncIterator[tuple[int, int]]:
        """Send bytes [start, end) of the blob on the transport, each as soon as the transfer
        may serve it, from the store's files with sendfile (the bytes are not read into this
        process, so memory does not grow with the readers); yields (offset, length) of each
        piece sent. The blob stays pinned. With `pace` (peer_upload_rate), each piece of at
        most PACED_PIECE bytes waits for its turn."""
        loop = asyncio.get_running_loop()
        pos = start
        with self.store.pinned(transfer.blob.digest):
            while pos < end:
                limit = min(await transfer.readable(pos, end, to_peer=to_peer), end)
                while pos < limit:
                    if transport is None or transport.is_closing():
                        raise ConnectionResetError(f"the reader of {transfer.label} left")
                    await self.store.check_span(transfer.blob.digest, pos, pos + 1)
                    with self.store.chunk_file(transfer.blob, pos) as (f, within, left):
                        n = min(left, limit - pos, PACED_PIECE if pace else left)
                        if pace is not None:
                            await pace.take(n)
                        await loop.sendfile(transport, f, within, n)
                    yield pos, n
                    pos += n

    def transfer_state(self, digest: str) -> PeerTransfer | None:
        """This node's transfer of a blob as its peers see it (None when none runs)."""
        t = self.transfers.get(digest)
        if t is None:
            return None
        source = TransferSource.PEER if t.probing else TransferSource(t.source)
        return PeerTransfer(source, t.available, t.meter.settled_rate, t.feeder)

    def blob_transfers(self) -> list[BlobTransfer]:
        """Every running transfer as the cluster sees it, for the plan view."""
        return [BlobTransfer(t.blob.digest, t.label, t.blob.size, state)
                for digest, t in self.transfers.items()
                if (state := self.transfer_state(digest)) is not None]

    def upstream_rate(self) -> float:
        """What the upstream gave this node lately (0: not known), from whole transfers and
        probes: a running transfer's rate swings as its segments land in bursts."""
        rate, when = self._upstream_rate
        return rate if time.monotonic() - when < UPSTREAM_RATE_KEPT else 0.0

    def _note_upstream_rate(self, nbytes: int, seconds: float) -> None:
        if nbytes >= PROBE_BYTES and seconds > 0:  # a smaller read says little of the rate
            self._upstream_rate = (nbytes / seconds, time.monotonic())

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
                if self.transfers.get(blob.digest) is transfer:
                    del self.transfers[blob.digest]
                if self._runs.get(blob.digest) is asyncio.current_task():
                    del self._runs[blob.digest]
                if self.max_cache_size:
                    self.store.evict(self.max_cache_size)

    async def _make_available(self, transfer: Transfer, origin: Origin) -> None:
        blob = transfer.blob
        writer = self.store.open_writer(blob)
        try:
            await writer.prepare()
            transfer.start_offset = writer.offset
            transfer.advance(writer.offset)
            if writer.offset < blob.size and self.sharing is not None:
                await self._from_peers(transfer, writer, self.sharing, origin)
            if writer.offset < blob.size:
                if self.offline:
                    raise UpstreamError("offline mode: the blob is not fully cached")
                async with self._upstream_slots:
                    log.info("fetching %s (%s) from upstream at byte %d of %d",
                             origin.label, blob.digest[:12], writer.offset, blob.size)
                    started, before = time.monotonic(), writer.offset
                    await self._from_upstream(transfer, writer, origin)
                    self._note_upstream_rate(writer.offset - before,
                                             time.monotonic() - started)
            await writer.verify()
            transfer.finish()  # the last byte goes out now; durability follows
            await writer.finish()
            log.info("stored %s (%s, %d bytes, %d from peers, %d from upstream)", origin.label,
                     blob.digest[:12], blob.size, transfer.bytes_peers, transfer.bytes_upstream)
        finally:
            with contextlib.suppress(OSError, sqlite3.Error):
                await writer.close()

    def _failed(self, transfer: Transfer, origin: Origin, error: Exception) -> None:
        if isinstance(error, DigestMismatch):
            self._blame_peers(transfer)
            self._remember_failed_digest(transfer.blob.digest)
        expected = isinstance(error, EXPECTED_FAILURES)
        log.error("fetching %s (%s) failed%s: %s", origin.label, transfer.blob.digest[:12],
                  "" if expected else " unexpectedly", error,
                  exc_info=None if expected else error)
        transfer.fail(error)

    async def _from_peers(self, transfer: Transfer, writer: BlobWriter, sharing: Sharing,
                          origin: Origin) -> None:
        """As much of the blob, in order from the writer's offset, as LAN peers have or are
        getting: relayed from other nodes transferring it (plan.py says which), over
        BitTorrent where peers hold its chunks. Returns when the upstream should take over."""
        blob = transfer.blob
        transfer.mark_source(writer.offset, "peer")
        plan = Plan(sharing.peers.node_id, blob.digest)
        held_failed_at = -1  # where getting complete chunks from their holders broke last
        while writer.offset < blob.size:
            held = await sharing.holders(blob)
            if held.small:
                data = await sharing.small_blob(blob, held.small)
                if data is not None:
                    await self._write(transfer, writer, memoryview(data)[writer.offset:])
                break
            decision = plan.decide(held.transfers, writer.offset)
            overtake = isinstance(decision, Relay) and plan.overtakes(
                held.transfers, decision.node, held.upstream_rates, self.upstream_rate())
            log.debug("%s at byte %d: %s%s (peers: %s)", transfer.label, writer.offset, decision,
                      ", overtaking it" if overtake else "", held.transfers)
            chunks = (_without(held.chunks, decision.node)
                      if overtake and isinstance(decision, Relay) else held.chunks)
            run = self._held_run(blob, writer.offset, chunks)
            relay = decision.node if isinstance(decision, Relay) and not overtake else ""
            if relay and not (run and writer.offset != held_failed_at
                              and _has_nothing_past(held, relay, writer.offset)):
                await self._relay_decided(transfer, writer, sharing, plan, held, relay, origin)
            elif run:
                # complete chunks somewhere beat the upstream, and a feeder that waits for its
                # own bytes: BitTorrent from their holders (if that breaks, the feeder again)
                if not await self._chunks_held(transfer, writer, sharing, chunks, held):
                    if not relay:
                        break
                    held_failed_at = writer.offset
            elif isinstance(decision, GoUpstream):
                settle = SETTLE - (time.monotonic() - transfer.started)
                if settle <= 0:
                    break
                await asyncio.sleep(settle)  # a node that started with this one may be first
            else:
                if overtake and isinstance(decision, Relay):
                    if not await self._still_overtakes(plan, sharing, transfer, decision.node):
                        continue
                    log.info("%s: node %s gets it from the upstream at %.1f MB/s, the upstream "
                             "gives more; fetching the rest from there", transfer.label,
                             decision.node,
                             (plan.delivered(decision.node, held.transfers) or 0) / 1e6)
                break
        transfer.feeder = ""
        transfer.mark_source(writer.offset, "upstream")

    async def _still_overtakes(self, plan: Plan, sharing: Sharing, transfer: Transfer,
                               node: str) -> bool:
        """Whether overtaking `node` still stands after a pause of this node's own and fresh
        chunk maps: two nodes that each took themselves for the first behind it (their news
        a round apart) do not both go to the upstream; the later one sees the earlier one
        fetching and relays from it."""
        await asyncio.sleep(plan.overtake_pause())
        held = await sharing.holders(transfer.blob)
        return plan.overtakes(held.transfers, node, held.upstream_rates, self.upstream_rate())

    async def _relay_decided(self, transfer: Transfer, writer: BlobWriter, sharing: Sharing,
                             plan: Plan, held: Holders, node: str, origin: Origin) -> None:
        """Relay from the node the plan chose for a while, or first measure the upstream
        when only that node knows what it gives."""
        peer = sharing.peers.peers.get(node)
        if peer is None or self.relay is None:
            plan.drop(node)
        elif (plan.needs_probe(held.transfers, node, held.upstream_rates, self.upstream_rate())
                and not plan.probed and not self._probing
                and transfer.blob.size >= PROBED_BLOB):
            plan.probed = True
            await self._probe_upstream(transfer, writer, origin)
        else:
            await self._relay_from(transfer, writer, self.relay, plan, held.transfers, peer)

    async def _chunks_held(self, transfer: Transfer, writer: BlobWriter, sharing: Sharing,
                           chunks: dict[int, list[tuple[Peer, str]]], held: Holders) -> bool:
        """The complete chunks peers hold from the writer's offset on, over BitTorrent; False
        when there are none or the transfer broke."""
        run = self._held_run(transfer.blob, writer.offset, chunks)
        co = [sharing.peers.peers[n] for n in held.transfers if n in sharing.peers.peers]
        return bool(run) and await self._stream_chunks(transfer, writer, sharing, run, chunks,
                                                        co)

    async def _relay_from(self, transfer: Transfer, writer: BlobWriter, relay: RelayApi,
                          plan: Plan, transfers: dict[str, PeerTransfer], peer: Peer) -> None:
        """Bytes of the blob from `peer`'s copy as they land there, for REPLAN_EVERY seconds
        at most (then the plan is made again with fresh news), to the end of the current
        chunk, or until the peer is silent for the stall window."""
        before = writer.offset
        end = min(transfer.blob.size, (before // self.store.chunk_size + 1) * self.store.chunk_size)
        transfer.peers_used.add(peer.node_id)
        transfer.feeder = peer.node_id
        meter = RateMeter()
        batch: list[bytes] = []  # socket reads are small: fewer, larger writes cost less CPU
        pos = before  # the blob offset after the bytes received
        stream = relay.stream(peer, transfer.blob, before, end)
        try:
            async with contextlib.aclosing(stream):
                while meter.age < REPLAN_EVERY:
                    try:
                        data = await asyncio.wait_for(anext(stream), STALL_WINDOW)
                    except StopAsyncIteration:
                        break
                    batch.append(data)
                    meter.add(len(data))
                    pos += len(data)
                    if pos - writer.offset >= COMMIT_BATCH:
                        await self._write_batch(transfer, writer, batch)
                        batch = []
        except TimeoutError:
            dropped = plan.stalled(peer.node_id, transfers, pos)
            log.warning("relaying %s from peer %s: no byte for %.0fs at byte %d; %s",
                        transfer.label, peer.node_id, STALL_WINDOW, pos,
                        "trying another source" if dropped else "looking again")
        except PeerError as e:
            plan.drop(peer.node_id)
            log.info("relaying %s from peer %s stopped at byte %d: %s", transfer.label,
                     peer.node_id, pos, e)
        if meter.age >= CHECK_EVERY:
            plan.measured[peer.node_id] = meter.rate
            if (meter.rate < MIN_RELAY_RATE
                    and plan.stalled(peer.node_id, transfers, pos)):
                log.warning("relaying %s from peer %s: %.0f B/s, a drip; trying another source",
                            transfer.label, peer.node_id, meter.rate)
        await self._write_batch(transfer, writer, batch)

    async def _write_batch(self, transfer: Transfer, writer: BlobWriter,
                           pieces: list[bytes]) -> None:
        """Pieces from a peer, in order: into the files while they are in the CPU cache, then
        hashed as read back (no joining of the pieces, a copy)."""
        n = sum(len(p) for p in pieces)
        if n:
            await writer.put(writer.offset, pieces)
            await writer.commit(n)
            transfer.bytes_peers += n
            transfer.advance(writer.offset)

    async def _probe_upstream(self, transfer: Transfer, writer: BlobWriter,
                              origin: Origin) -> None:
        """The next PROBE_BYTES from the upstream, to learn what it gives this node."""
        start, end = writer.offset, min(transfer.blob.size, writer.offset + PROBE_BYTES)
        transfer.mark_source(start, "upstream")
        transfer.probing = True  # peers must not take this node for an upstream fetcher
        self._probing = True
        try:
            url = await self._locate(origin)
            transfer.upstream_origin = origin
            began = time.monotonic()
            async for data in self.upstream.read_range(url, start, end, token=origin.token):
                await writer.write(data)
                transfer.bytes_upstream += len(data)
                self.on_upstream_bytes(len(data))
                transfer.advance(writer.offset)
        except (UpstreamError, OSError, TimeoutError, aiohttp.ClientError) as e:
            log.info("probing the upstream for %s failed: %s", transfer.label, e)
            return
        finally:
            transfer.probing = self._probing = False
            transfer.mark_source(writer.offset, "peer")
        self._note_upstream_rate(writer.offset - start, time.monotonic() - began)
        log.info("%s: the upstream gave %.1f MB/s for %d bytes", transfer.label,
                 self.upstream_rate() / 1e6, writer.offset - start)

    def _remember_failed_digest(self, digest: str) -> None:
        now = time.monotonic()
        if len(self._failed_digest) >= MAX_WRONG_BLOBS:
            self._failed_digest = {d: t for d, t in self._failed_digest.items() if t > now}
        self._failed_digest[digest] = now + WRONG_BLOB_KEPT

    def failed_digest_lately(self, digest: str) -> bool:
        """Whether a transfer of the blob failed its digest lately. Its readers got all but
        the last byte before the check (the bytes stream as they land), so a client resuming
        with a Range holds wrong bytes and must start over."""
        return self._failed_digest.get(digest, 0.0) > time.monotonic()

    def _blame_peers(self, transfer: Transfer) -> None:
        """The blob failed its digest: the peers that sent parts of it are not trusted again
        for a while (the upstream alone cannot produce a wrong blob twice)."""
        if self.sharing is not None:
            for node_id in transfer.peers_used:
                self.sharing.peers.ban(node_id, BAN_SECONDS, f"{transfer.label} built with "
                                       "its bytes failed the blob digest")

    def _held_run(self, blob: BlobId, offset: int,
                  chunks: dict[int, list[tuple[Peer, str]]]) -> list[int]:
        """The chunks from the one holding `offset` on that some peer holds, in a row."""
        run = []
        for chunk in self.store.chunks(blob):
            if chunk.offset + chunk.length <= offset:
                continue
            if chunk.idx not in chunks:
                break
            run.append(chunk.idx)
        return run

    async def _stream_chunks(self, transfer: Transfer, writer: BlobWriter, sharing: Sharing,
                             run: list[int], chunks: dict[int, list[tuple[Peer, str]]],
                             co_downloaders: list[Peer]) -> bool:
        blob = transfer.blob
        pos = run[0] * self.store.chunk_size  # the blob offset of the bytes coming next
        try:
            async for data in sharing.chunks_in_order(blob, run, chunks, co_downloaders):
                skip = max(0, writer.offset - pos)
                pos += len(data)
                await self._write(transfer, writer, memoryview(data)[skip:])
        except PeerError as e:
            log.warning("getting %s from peers stopped at byte %d (%s); the upstream takes "
                        "over", transfer.label, writer.offset, e)
            return False
        finally:
            transfer.peers_used.update(chunks[i][0][0].node_id for i in run if chunks.get(i))
        return True

    async def _write(self, transfer: Transfer, writer: BlobWriter, data: memoryview | bytes,
                     source: str = "peer") -> None:
        """Bytes in order, from peers or from an upstream read as one stream."""
        if not data:
            return
        await writer.write(data)
        if source == "upstream":
            transfer.bytes_upstream += len(data)
            self.on_upstream_bytes(len(data))
        else:
            transfer.bytes_peers += len(data)
        transfer.advance(writer.offset)

    async def _locate(self, origin: Origin) -> URL:
        """The URL the upstream serves the bytes at (a CDN after a redirect, or the Hub)."""
        answer = await self.upstream.hub("HEAD", origin.resolve_path, token=origin.token,
                                         headers={"Accept-Encoding": "identity"})
        if answer.status in (301, 302, 303, 307, 308) and answer.location is not None:
            return answer.location
        if answer.status == 200:
            return answer.url
        if answer.status in (401, 403):
            raise UpstreamRefused(f"upstream answered HTTP {answer.status} for {origin.label}: "
                                  "a token with access to the repo is needed")
        raise UpstreamError(f"upstream answered HTTP {answer.status} for {origin.label}")

    async def _from_upstream(self, transfer: Transfer, writer: BlobWriter, origin: Origin) -> None:
        url = await self._locate(origin)
        transfer.upstream_origin = origin
        transfer.mark_source(writer.offset, "upstream")
        if self.upstream.serves_ranges(url):
            try:
                await self._read_segments(transfer, writer, origin, url)
                return
            except RangeIgnored as e:
                log.warning("fetching %s: %s; reading it as one stream", origin.label, e)
        await self._read_sequentially(transfer, writer, origin, url)

    async def _read_segments(self, transfer: Transfer, writer: BlobWriter, origin: Origin,
                             url: URL) -> None:
        """The rest of the blob over several connections at once, one Range each."""
        size = transfer.blob.size
        starts = range(writer.offset, size, SEGMENT)
        segments: list[_Segment] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            for i in range(len(starts)):
                while len(segments) < min(len(starts), i + self.connections):
                    start = starts[len(segments)]
                    segments.append(_Segment(start, min(start + SEGMENT, size)))
                    tasks.append(asyncio.create_task(
                        self._fill(segments[-1], url, origin, transfer, writer)))
                await self._commit(segments[i], writer, transfer)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_sequentially(self, transfer: Transfer, writer: BlobWriter, origin: Origin,
                                 url: URL) -> None:
        """The rest of the blob over one connection, for an origin that ignores Range; after
        a break it is asked again from where it stopped (skipping what is already here)."""
        log.info("fetching %s from %s as one stream at byte %d (it ignores Range)",
                 origin.label, url.host, writer.offset)
        failures = 0
        while writer.offset < transfer.blob.size:
            before = writer.offset
            try:
                async for data in self.upstream.read_from(url, writer.offset, transfer.blob.size,
                                                           token=origin.token):
                    await self._write(transfer, writer, data, "upstream")
            except (UpstreamError, OSError, TimeoutError, aiohttp.ClientError) as e:
                failures = 0 if writer.offset > before else failures + 1
                url = await self._after_break(origin, url, failures, writer.offset, e)

    async def _after_break(self, origin: Origin, url: URL, failures: int, pos: int,
                           error: Exception) -> URL:
        """An upstream read broke at `pos`, the `failures`th time in a row without progress:
        give up, or wait and return the URL to resume at."""
        self.on_upstream_error(type(error).__name__)
        if failures >= MAX_ATTEMPTS_WITHOUT_PROGRESS:
            raise UpstreamError(f"{origin.label}: byte {pos} failed {failures} times: "
                                f"{error}") from error
        log.warning("upstream read of %s at byte %d broke (%s); resuming", origin.label, pos,
                    error)
        await backoff(failures)
        return await self._locate(origin) if failures >= 2 else url  # a signed URL may expire

    async def _commit(self, seg: _Segment, writer: BlobWriter,
                      transfer: Transfer) -> None:
        written = 0
        while True:
            pending = seg.filled - written
            if pending >= COMMIT_BATCH or (pending and (seg.finished or seg.error
                                                         or written == 0)):
                await writer.commit(pending)
                written += pending
                transfer.advance(writer.offset)
                continue
            if seg.error is not None:
                raise seg.error
            if seg.finished:
                return
            seg.changed.clear()
            await seg.changed.wait()

    async def _fill(self, seg: _Segment, url: URL, origin: Origin, transfer: Transfer,
                    writer: BlobWriter) -> None:
        failures = 0
        try:
            while seg.start + seg.filled < seg.end:
                before = seg.filled
                try:
                    async for data in self.upstream.read_range(
                            url, seg.start + seg.filled, seg.end, token=origin.token):
                        seg.pending.append(data)
                        seg.pending_bytes += len(data)
                        transfer.bytes_upstream += len(data)
                        self.on_upstream_bytes(len(data))
                        await seg.put_pending(writer)  # a view of a reused buffer: now
                    await seg.put_pending(writer)
                except (RangeIgnored, _StoreFailed):
                    raise
                except (UpstreamError, OSError, TimeoutError, aiohttp.ClientError) as e:
                    await seg.put_pending(writer)  # what arrived before the break is good
                    failures = 0 if seg.filled > before else failures + 1
                    url = await self._after_break(origin, url, failures,
                                                  seg.start + seg.filled, e)
            seg.finished = True
        except BaseException as e:
            cause = e.__cause__ if isinstance(e, _StoreFailed) else e
            seg.error = cause if isinstance(cause, Exception) else TransferFailed("cancelled")
            raise
        finally:
            seg.changed.set()


def _has_nothing_past(held: Holders, node: str, offset: int) -> bool:
    """Whether `node` has no byte of the blob past `offset` yet: waiting for it loses to
    complete chunks that other peers hold (a slow upstream fetcher can be minutes away)."""
    t = held.transfers.get(node)
    return t is None or t.available <= offset


def _without(chunks: dict[int, list[tuple[Peer, str]]],
             node: str) -> dict[int, list[tuple[Peer, str]]]:
    """Who holds which chunk, leaving out one node (an upstream fetcher being overtaken)."""
    left = {i: [(p, ih) for p, ih in holders if p.node_id != node]
            for i, holders in chunks.items()}
    return {i: holders for i, holders in left.items() if holders}

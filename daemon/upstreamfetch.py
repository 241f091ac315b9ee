"""The upstream side of a transfer: a blob's bytes from the Hub (or the CDN it redirects to),
over several Range requests at once (segments) put into the store's files as they arrive and
committed in order, or as one stream from an origin that ignores Range; a break resumes at
the exact byte. Also what the upstream gives this node lately, measured from whole transfers
and short probes (the LAN's transfer plan compares it with what peers deliver)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
from yarl import URL

from .errors import RangeIgnored, TransferFailed, UpstreamError, UpstreamRefused
from .store import BlobWriter
from .transfer import Origin, Transfer, TransferSource
from .upstream import REDIRECTS, Upstream, backoff

log = logging.getLogger(__name__)

SEGMENT = 8 * 1024 * 1024
MIN_SEGMENT = 1024 * 1024  # the last segments shrink to this (segment_bounds)
MAX_ATTEMPTS_WITHOUT_PROGRESS = 6
COMMIT_BATCH = 1024 * 1024  # fewer, larger commits; the first bytes still go at once
PROBE_BYTES = 4 * 1024 * 1024  # a probe reads at least this much, for at least PROBE_SECONDS
PROBE_SECONDS = 0.25  # and at most PROBE_MAX_BYTES
PROBE_MAX_BYTES = 16 * 1024 * 1024
PROBE_MAX_SECONDS = 0.6  # and for at most this long, whatever it read by then
# s: after a probe that got under PROBE_BYTES (the link full of the cluster's own reads), no
# other probe: a 2-node warm's second node probed its four blobs in turn, each locked out of
# the full link (0.6-8.8 MB/s), and every probe's bytes in flight went over the WAN twice
PROBE_HELD_FOR = 10.0
# a segment that got less than 1/STARVED_SHARE of what its siblings got (STARVED_SIBLING_BYTES
# at least) over STARVED_SECONDS is asked again on a new connection, STARVED_RETRIES times at most
STARVED_SECONDS = 1.0
STARVED_SHARE = 16
STARVED_SIBLING_BYTES = 2 * 1024 * 1024
STARVED_RETRIES = 3
# a blob's read starts on one connection and opens the others after this long, when it has
# the upstream link to itself (UpstreamFetch._alone): beside other reads, more connections
# into the link's queue only starve each other (the 4- and 12-node lab benches, 4 per blob:
# fetchers stuck at their first 2 packets for 1-2 s, overtaken, the blob read twice)
RAMP_AFTER = 1.0
UPSTREAM_RATE_KEPT = 600.0  # how long a measured upstream rate is believed
READ_ERRORS = (UpstreamError, OSError, TimeoutError, aiohttp.ClientError)


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
        # when the segment's window of STARVED_SECONDS began, its bytes and the blob's then
        self.window = (time.monotonic(), 0, 0)
        self.restarts = 0  # reads of a starved connection asked again

    def new_window(self, bytes_read: int) -> None:
        self.window = (time.monotonic(), self.filled, bytes_read)

    def starved(self, bytes_read: int) -> bool:
        """Whether, over the window just ended, the segment got less than 1/STARVED_SHARE of
        what this node's other upstream connections got (`bytes_read`: every blob's; a blob
        read beside others has one connection); a new window begins when one ended otherwise.
        One of many connections into a full drop-tail queue that TCP left waiting: in the
        lab one read 11 KB in 3 s beside siblings at full speed, and an overtaker's first
        segment trickled 1 MiB in 3 s; the prefix stops there, so peers took the whole
        fetcher for a slow one, or had nothing to relay from it."""
        since, filled, then = self.window
        if time.monotonic() - since < STARVED_SECONDS:
            return False
        own = self.filled - filled
        others = bytes_read - then - own
        if (self.restarts < STARVED_RETRIES and others >= STARVED_SIBLING_BYTES
                and own * STARVED_SHARE < others):
            return True
        self.new_window(bytes_read)
        return False

    async def put(self, writer: BlobWriter, piece: bytes | memoryview) -> None:
        """A piece just received (a view of a reused buffer: put before the next is read)."""
        try:
            await writer.put(self.start + self.filled, [piece])
        except OSError as e:
            raise _StoreFailed(f"writing {writer.blob.digest}: {e}") from e
        self.filled += len(piece)
        self.changed.set()


class _Stop:
    """Whether a fetch should end early: once `until` returned (not when it failed)."""

    def __init__(self, until: asyncio.Future[None] | None) -> None:
        self._until = until

    def __call__(self) -> bool:
        u = self._until
        return u is not None and u.done() and not u.cancelled() and u.exception() is None

    def on_stop(self, wake: Callable[[], object]) -> None:
        """Call wake() when `until` is done, so that a wait on the bytes sees it."""
        if self._until is not None:
            self._until.add_done_callback(lambda _: wake())


class _StoreFailed(Exception):
    """Putting received bytes into the store failed: the disk, not the upstream."""


class _Starved(Exception):
    """A segment's connection starved beside its siblings (_Segment.starved)."""


# whether another node reads from the upstream now (the LAN's answer; fetch.PeerSource)
Shared = Callable[[Transfer], Awaitable[bool]]


class UpstreamFetch:
    def __init__(self, upstream: Upstream, *, connections: int = 4, offline: bool = False,
                 max_transfers: int = 8, on_bytes: Callable[[int], None] = lambda n: None,
                 on_error: Callable[[str], None] = lambda kind: None) -> None:
        self.upstream = upstream
        self.connections = connections
        self.offline = offline
        # a memory bound: blobs read from the upstream at once
        self._slots = asyncio.Semaphore(max_transfers)
        self._on_bytes = on_bytes  # metrics: file bytes read from the upstream
        self._on_error = on_error  # metrics: a read that broke, by the error's kind
        self._rate = (0.0, 0.0)  # bytes/s the upstream gave this node, and when
        self.probing = False  # one probe at a time: its rate serves every transfer
        self._probe_held_until = 0.0  # a probe found the link full: none until then
        self._reading: set[Transfer] = set()  # blobs read from the upstream now
        self.bytes_read = 0  # from the upstream, every blob: what a starved segment is held to

    async def fetch_rest(self, transfer: Transfer, writer: BlobWriter, origin: Origin,
                         until: asyncio.Future[None] | None = None,
                         shared: Shared | None = None) -> None:
        """The blob from the writer's offset to its end, or to where `until` returned (an
        error in it stops nothing). `shared` says whether other nodes read the upstream
        (None: no other node is live)."""
        stop = _Stop(until)
        blob = transfer.blob
        if self.offline:
            raise UpstreamError("offline mode: the blob is not fully cached")
        async with self._slots:
            log.info("fetching %s (%s) from upstream at byte %d of %d",
                     origin.label, blob.digest[:12], writer.offset, blob.size)
            started, before = time.monotonic(), writer.offset
            self._reading.add(transfer)
            try:
                await self._from_upstream(transfer, writer, origin, stop, shared)
            finally:
                self._reading.discard(transfer)
            self._note_rate(writer.offset - before, time.monotonic() - started)

    def rate(self) -> float:
        """What the upstream gave this node lately (0: not known), from whole transfers and
        probes: a running transfer's rate swings as its segments land in bursts."""
        rate, when = self._rate
        return rate if time.monotonic() - when < UPSTREAM_RATE_KEPT else 0.0

    def may_probe(self) -> bool:
        """Whether a probe may start now: none runs, and none found the link full lately."""
        return not self.probing and time.monotonic() >= self._probe_held_until

    def _note_rate(self, nbytes: int, seconds: float) -> None:
        if nbytes >= PROBE_BYTES and seconds > 0:  # a smaller read says little of the rate
            self._rate = (nbytes / seconds, time.monotonic())

    async def probe(self, transfer: Transfer, writer: BlobWriter, origin: Origin) -> None:
        """The next bytes from the upstream, to learn what it gives this node: PROBE_BYTES and
        PROBE_SECONDS at least, timed from the end of the first piece. 4 MiB alone took 80 ms
        at 50 MB/s, and probes of one 400 Mbit/s lab link read 16 to 56 MB/s: one pause of a
        busy machine weighed that much (below 3x a slow fetcher, nobody overtakes it). At
        most PROBE_MAX_SECONDS: three nodes probing a fast node's four blobs at once read
        2.8 MB/s each, 1.5 s for their 4 MiB, and slowed the fetcher all that time. A probe
        that read less than PROBE_BYTES is not kept as what the upstream gives, and holds the
        next probes for PROBE_HELD_FOR."""
        start = writer.offset
        end = min(transfer.blob.size, start + PROBE_MAX_BYTES)
        transfer.mark_source(start, TransferSource.UPSTREAM)
        transfer.probing = True  # peers must not take this node for an upstream fetcher
        self.probing = True
        first: tuple[int, float] | None = None  # where the first piece ended, and when
        try:
            url = await self._locate(origin)
            transfer.upstream_origin = origin
            pieces = self.upstream.read_range(url, start, end, token=origin.token)
            async with contextlib.aclosing(pieces):
                async for data in pieces:
                    await self._write(transfer, writer, data)
                    if first is None:
                        first = (writer.offset, time.monotonic())
                    elif _probed_enough(writer.offset - first[0], time.monotonic() - first[1]):
                        break
        except READ_ERRORS as e:
            log.info("probing the upstream for %s failed: %s", transfer.label, e)
            return
        finally:
            transfer.probing = self.probing = False
            transfer.mark_source(writer.offset, TransferSource.PEER)
        if first is None:
            return
        nbytes, seconds = writer.offset - first[0], time.monotonic() - first[1]
        self._note_rate(nbytes, seconds)
        if nbytes < PROBE_BYTES:
            self._probe_held_until = time.monotonic() + PROBE_HELD_FOR
        log.info("%s: the upstream gave %.1f MB/s for %d bytes", transfer.label,
                 nbytes / max(seconds, 1e-3) / 1e6, writer.offset - start)

    async def _locate(self, origin: Origin) -> URL:
        """The URL the upstream serves the bytes at (a CDN after a redirect, or the Hub)."""
        answer = await self.upstream.hub("HEAD", origin.resolve_path, token=origin.token,
                                         headers={"Accept-Encoding": "identity"})
        if answer.status in REDIRECTS and answer.location is not None:
            return answer.location
        if answer.status == 200:
            return answer.url
        if answer.status in (401, 403):
            raise UpstreamRefused(f"upstream answered HTTP {answer.status} for {origin.label}: "
                                  "a token with access to the repo is needed")
        raise UpstreamError(f"upstream answered HTTP {answer.status} for {origin.label}")

    async def _from_upstream(self, transfer: Transfer, writer: BlobWriter, origin: Origin,
                             stop: _Stop, shared: Shared | None) -> None:
        url = await self._locate(origin)
        transfer.upstream_origin = origin
        transfer.mark_source(writer.offset, TransferSource.UPSTREAM)
        if self.upstream.serves_ranges(url):
            try:
                await self._read_segments(transfer, writer, origin, url, stop, shared)
                return
            except RangeIgnored as e:
                log.warning("fetching %s: %s; reading it as one stream", origin.label, e)
        await self._read_sequentially(transfer, writer, origin, url, stop)

    async def _read_segments(self, transfer: Transfer, writer: BlobWriter, origin: Origin,
                             url: URL, stop: _Stop, shared: Shared | None) -> None:
        """The rest of the blob in Range reads of a segment each: one at a time, then
        `connections` at once once the read has the upstream link to itself, asked every
        RAMP_AFTER (what nodes starting at the same moment do shows by then; with no other
        node live, asked at once first)."""
        bounds = segment_bounds(writer.offset, transfer.blob.size, self.connections)
        segments: list[_Segment] = []
        tasks: list[asyncio.Task[None]] = []
        parallel, i = 1, 0

        def open_segments() -> None:
            while len(segments) < min(len(bounds), i + parallel):
                segments.append(_Segment(*bounds[len(segments)]))
                tasks.append(asyncio.create_task(
                    self._fill(segments[-1], url, origin, transfer, writer)))

        async def ramp() -> None:
            nonlocal parallel
            delay = RAMP_AFTER if shared is not None else 0.0
            while True:
                await asyncio.sleep(delay)
                if await self._alone(transfer, shared):
                    break
                delay = RAMP_AFTER
            log.debug("fetching %s: the upstream link is its own; %d connections",
                      transfer.label, self.connections)
            parallel = self.connections
            open_segments()

        def wake() -> None:  # a commit waiting on a starved segment sees the stop too
            for seg in segments:
                seg.changed.set()

        stop.on_stop(wake)
        ramping = [asyncio.create_task(ramp())] if self.connections > 1 else []
        try:
            for i in range(len(bounds)):  # open_segments reads i
                open_segments()
                if not await self._commit(segments[i], writer, transfer, stop):
                    return
        finally:
            for t in ramping + tasks:
                t.cancel()
            await asyncio.gather(*ramping, *tasks, return_exceptions=True)
            await writer.quiesce()

    async def _alone(self, transfer: Transfer, shared: Shared | None) -> bool:
        """Whether the read has the upstream link to itself: this node reads no other blob
        from it, and no other node reads from it."""
        return self._reading == {transfer} and not (shared is not None
                                                    and await shared(transfer))

    async def _read_sequentially(self, transfer: Transfer, writer: BlobWriter, origin: Origin,
                                 url: URL, stop: _Stop) -> None:
        """The rest of the blob over one connection, for an origin that ignores Range; after
        a break it is asked again from where it stopped (skipping what is already here)."""
        log.info("fetching %s from %s as one stream at byte %d (it ignores Range)",
                 origin.label, url.host, writer.offset)
        failures = 0
        while writer.offset < transfer.blob.size and not stop():
            before = writer.offset
            try:
                async for data in self.upstream.read_from(url, writer.offset, transfer.blob.size,
                                                           token=origin.token):
                    await self._write(transfer, writer, data)
                    if stop():
                        return
            except READ_ERRORS as e:
                failures = 0 if writer.offset > before else failures + 1
                url = await self._after_break(origin, url, failures, writer.offset, e)

    async def _write(self, transfer: Transfer, writer: BlobWriter,
                     data: bytes | memoryview) -> None:
        """Bytes read in order (a stream, a probe)."""
        if data:
            await writer.write(data)
            self._received(transfer, len(data))
            transfer.advance(writer.offset)

    async def _after_break(self, origin: Origin, url: URL, failures: int, pos: int,
                           error: Exception) -> URL:
        """An upstream read broke at `pos`, the `failures`th time in a row without progress:
        give up, or wait and return the URL to resume at."""
        self._on_error(type(error).__name__)
        if failures >= MAX_ATTEMPTS_WITHOUT_PROGRESS:
            raise UpstreamError(f"{origin.label}: byte {pos} failed {failures} times: "
                                f"{error}") from error
        log.warning("upstream read of %s at byte %d broke (%s); resuming", origin.label, pos,
                    error)
        await backoff(failures)
        return await self._locate(origin) if failures >= 2 else url  # a signed URL may expire

    async def _commit(self, seg: _Segment, writer: BlobWriter, transfer: Transfer,
                      stop: _Stop) -> bool:
        """The segment's bytes in order as they are put; False when stop() ended it early."""
        written = 0
        while not stop():
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
                return True
            seg.changed.clear()
            await seg.changed.wait()
        return False

    async def _fill(self, seg: _Segment, url: URL, origin: Origin, transfer: Transfer,
                    writer: BlobWriter) -> None:
        failures = 0
        try:
            while seg.start + seg.filled < seg.end:
                before = seg.filled
                try:
                    await self._read_unless_starved(seg, url, origin, transfer, writer)
                except _Starved:
                    seg.restarts += 1
                    log.info("fetching %s: the connection for bytes %d to %d got under 1/%d "
                             "of what the others got in %.1fs; asking again", transfer.label,
                             seg.start + seg.filled, seg.end, STARVED_SHARE, STARVED_SECONDS)
                except (RangeIgnored, _StoreFailed):
                    raise
                except READ_ERRORS as e:
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

    async def _read_unless_starved(self, seg: _Segment, url: URL, origin: Origin,
                                   transfer: Transfer, writer: BlobWriter) -> None:
        """The rest of the segment over one connection; _Starved if it starves. Not under a
        local upstream_rate: the limit's own queue holds a segment that long (at 1 MB/s, the
        fourth of four 1 MiB pieces waits 4 s)."""
        reading = asyncio.ensure_future(self._read_range(seg, url, origin, transfer, writer))
        try:
            while not reading.done():
                await asyncio.wait({reading}, timeout=STARVED_SECONDS / 4)
                if (not reading.done() and not self.upstream.rate.rate
                        and seg.starved(self.bytes_read)):
                    raise _Starved
            reading.result()
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    async def _read_range(self, seg: _Segment, url: URL, origin: Origin, transfer: Transfer,
                          writer: BlobWriter) -> None:
        seg.new_window(self.bytes_read)
        pieces = self.upstream.read_range(url, seg.start + seg.filled, seg.end,
                                          token=origin.token)
        async with contextlib.aclosing(pieces):
            async for data in pieces:
                self._received(transfer, len(data))
                await seg.put(writer, data)

    def _received(self, transfer: Transfer, n: int) -> None:
        transfer.received(n)
        self.bytes_read += n
        self._on_bytes(n)


def _probed_enough(nbytes: int, seconds: float) -> bool:
    return seconds >= PROBE_MAX_SECONDS or (nbytes >= PROBE_BYTES and seconds >= PROBE_SECONDS)


def segment_bounds(offset: int, size: int, connections: int) -> list[tuple[int, int]]:
    """The Range reads of bytes [offset, size): SEGMENT long, shorter towards the end (a
    1/(2 x connections) share of what is left, MIN_SEGMENT at least). What a node can serve
    ends at its first unfinished segment, and the segments in flight fill at once: with equal
    segments the last 4 x 8 MiB became servable only as the blob completed, and the nodes
    relaying from this one ended that far behind it."""
    bounds = []
    while offset < size:
        end = min(size, offset + max(MIN_SEGMENT,
                                     min(SEGMENT, (size - offset) // (2 * connections))))
        bounds.append((offset, end))
        offset = end
    return bounds

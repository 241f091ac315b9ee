"""A blob being made available (Transfer) and where the upstream serves it (Origin): what the
proxy, the fetcher, the LAN and the status share. A leaf: it knows no other module but the
store's blob id and the errors."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections import deque
from collections.abc import Callable

from .errors import TransferFailed
from .store import BlobId

RATE_WINDOW = 2.0
# a rate counts once measured this long: the slow-first bench judged a slow upstream fetcher
# 1 s sooner than after a whole window, and an upstream read's rate counts every byte that
# arrives (Transfer.received), so a young read is not mistaken for a slow one
RATE_SETTLES = 1.0
# what arrives from a source counts sooner: an upstream fetcher is judged by it (overtakes),
# and the slow-first bench overtook a 50 Mbit/s fetcher 1.5-2 s into the pull with 1 s
RECEIVED_SETTLES = 0.5


class TransferSource(enum.StrEnum):
    NONE = ""
    STORE = "store"
    PEER = "peer"
    UPSTREAM = "upstream"


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where the upstream serves a blob: the Hub resolve path (at a commit) and the token
    of the client that asked, kept in memory only."""
    resolve_path: str
    token: str | None
    label: str  # "repo_type:repo_id/path", for logs and status
    # the nodes that start the blob together by arrangement (a warm job's): the first of them
    # in the blob's rendezvous order needs no wait to see who else starts it
    cohort: frozenset[str] = frozenset()


class RateMeter:
    """Bytes per second over the last RATE_WINDOW seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 settles: float = RATE_SETTLES) -> None:
        self._clock = clock
        self._settles = settles
        self._samples: deque[tuple[float, int]] = deque()
        self._started = clock()

    def add(self, n: int) -> None:
        now = self._clock()
        self._samples.append((now, n))
        while self._samples and self._samples[0][0] < now - RATE_WINDOW:
            self._samples.popleft()

    @property
    def rate(self) -> float:
        now = self._clock()
        while self._samples and self._samples[0][0] < now - RATE_WINDOW:
            self._samples.popleft()
        span = min(RATE_WINDOW, max(now - self._started, 0.25))
        return sum(n for _, n in self._samples) / span

    @property
    def age(self) -> float:
        return self._clock() - self._started

    @property
    def settled_rate(self) -> float:
        """The rate once measured for its settling time (0 before: a ramp-up says little)."""
        return self.rate if self.age >= self._settles else 0.0


def _intake_meter() -> RateMeter:
    return RateMeter(settles=RECEIVED_SETTLES)


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
        self.leaf = False  # handed its upstream read to a faster fetcher: it feeds no peer
        self.overtook = False  # reads from the upstream since it overtook a slow fetcher
        self.meter = RateMeter()  # how fast the prefix grows: what this node can relay
        self.intake = _intake_meter()  # bytes arriving from the current source: see received()
        self._sources: list[tuple[int, TransferSource]] = [(0, TransferSource.STORE)]
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

    def mark_source(self, offset: int, source: TransferSource) -> None:
        """Bytes from `offset` on come from `source` (peer or upstream). The rate is measured
        anew from here: a node that waited on a peer and then went to the upstream is not an
        upstream fetcher at the waiting rate (peers took such a fetcher for a slow one)."""
        if self._sources[-1][1] != source:
            self._sources.append((offset, source))
            self.meter, self.intake = RateMeter(), _intake_meter()

    def received(self, n: int) -> None:
        """n bytes of the blob came from the upstream, in order or not: an upstream read's
        intake counts what arrives over all its connections, not how far the prefix moved
        (with several segments at once the prefix moves at a fraction of that until the
        first segment is complete, and a fetcher looked four times slower than it was)."""
        self.bytes_upstream += n
        self.intake.add(n)

    @property
    def source(self) -> TransferSource:
        return self._sources[-1][1]

    def source_at(self, offset: int) -> TransferSource:
        return next((s for start, s in reversed(self._sources) if offset >= start),
                    TransferSource.STORE)

    def advance(self, available: int) -> None:
        self.meter.add(available - self.available)
        if self.source != TransferSource.UPSTREAM:  # upstream bytes count in received()
            self.intake.add(available - self.available)
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
                "source": self.source.value, "feeder": self.feeder, "readers": self.readers,
                "rate": round((self.available - self.start_offset) / elapsed),
                "rate_now": round(self.meter.rate)}

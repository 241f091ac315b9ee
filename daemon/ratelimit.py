"""Byte rates: RateLimit, shared by every stream it paces (a token bucket kept as virtual time),
and PeerUploadCap, which splits one budget between libtorrent and the peer API's streams.

Each caller reserves its bytes' share of time at once, so concurrent streams split the rate
between them; a stream idle for a while may send up to BURST seconds' worth at full speed.
The rate may change at any time (SIGHUP); 0 means no limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

BURST = 0.25  # seconds of the rate that may go out at once after an idle time


class RateLimit:
    def __init__(self, rate: int = 0) -> None:
        self.rate = rate  # bytes per second; 0: unlimited
        self._free_at = 0.0  # monotonic time from which the next bytes may go

    async def take(self, n: int) -> None:
        """Wait until `n` more bytes fit in the rate."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        self._free_at = max(self._free_at, now - BURST) + n / self.rate
        if self._free_at > now:
            await asyncio.sleep(self._free_at - now)


class PeerUploadCap:
    """peer_upload_rate: one budget for everything this node sends to peers.

    libtorrent paces BitTorrent (the session's upload limit, set through `limit_bittorrent`);
    the peer API's streams (relays, small blobs) take from `streams`, a RateLimit. With no such
    stream open, BitTorrent has the whole budget; while any is open, each side has half. An even
    split keeps the sum under the cap without measuring either side (libtorrent reports its
    rate a second late), and neither side starves: a relay feeds a peer waiting behind this
    node's own download, BitTorrent copies complete chunks to nodes that have other sources.
    """

    def __init__(self, limit_bittorrent: Callable[[int], None]) -> None:
        self.rate = 0  # bytes per second; 0: unlimited
        self.streams = RateLimit()
        self._limit_bittorrent = limit_bittorrent
        self._applied = 0  # what libtorrent was last told (it starts unlimited)
        self._open = 0

    def set_rate(self, rate: int) -> None:
        self.rate = rate
        self._split()

    @contextlib.contextmanager
    def stream(self) -> Iterator[RateLimit]:
        """While a peer API answer is being sent: the RateLimit its bytes take from."""
        self._open += 1
        self._split()
        try:
            yield self.streams
        finally:
            self._open -= 1
            self._split()

    def split(self) -> dict[str, int]:
        """The budget as it is shared now, bytes per second (0: unlimited)."""
        return {"bittorrent": self._bittorrent_rate(), "peer_api": self.streams.rate}

    def _bittorrent_rate(self) -> int:
        if self._open and self.rate:
            return max(1, self.rate - self.streams.rate)
        return self.rate

    def _split(self) -> None:
        self.streams.rate = max(1, self.rate // 2) if self._open and self.rate else self.rate
        if self._bittorrent_rate() != self._applied:
            self._applied = self._bittorrent_rate()
            self._limit_bittorrent(self._applied)

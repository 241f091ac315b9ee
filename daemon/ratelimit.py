"""A byte rate shared by every stream it paces (a token bucket kept as virtual time).

Each caller reserves its bytes' share of time at once, so concurrent streams split the rate
between them; a stream idle for a while may send up to BURST seconds' worth at full speed.
The rate may change at any time (SIGHUP); 0 means no limit.
"""

from __future__ import annotations

import asyncio
import time

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

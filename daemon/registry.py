"""The blobs being made available on this node, by digest (one Transfer each), and the ways to
read them: a client's reading hold, sending their bytes with sendfile as they may be served,
and the blobs whose digest failed lately. The fetcher adds and removes transfers; the proxy,
the relay, the control API and the status read them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

from .ratelimit import RateLimit
from .store import Store
from .transfer import Transfer

PACED_PIECE = 1024 * 1024  # what a paced sender (peer_upload_rate) sends per turn
WRONG_BLOB_KEPT = 3600.0  # how long a blob that failed its digest answers a resume whole
MAX_WRONG_BLOBS = 4096


class Transfers:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.running: dict[str, Transfer] = {}  # digest -> its transfer
        self._failed_digest: dict[str, float] = {}  # digest -> until when it is remembered

    def add(self, transfer: Transfer) -> None:
        self.running[transfer.blob.digest] = transfer

    def remove(self, transfer: Transfer) -> None:
        """Forget the transfer, unless another one of the blob took its place."""
        if self.running.get(transfer.blob.digest) is transfer:
            del self.running[transfer.blob.digest]

    def live(self, digest: str) -> Transfer | None:
        """The blob's running transfer, unless it failed."""
        running = self.running.get(digest)
        return running if running is not None and running.error is None else None

    def joinable(self, digest: str) -> Transfer | None:
        """The blob's running transfer, or a done one when the store holds it; never starts
        one (for peers, who must not make this node download)."""
        if (running := self.live(digest)) is not None:
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
        blob, chunk_size = transfer.blob, self.store.chunk_size
        pos = start
        idx = -1  # the chunk whose file is open: kept open while its bytes are sent
        with self.store.pinned(blob.digest), contextlib.ExitStack() as chunk:
            while pos < end:
                limit = min(await transfer.readable(pos, end, to_peer=to_peer), end)
                while pos < limit:
                    if transport is None or transport.is_closing():
                        raise ConnectionResetError(f"the reader of {transfer.label} left")
                    await self.store.check_span(blob.digest, pos, pos + 1)
                    if pos // chunk_size != idx:
                        chunk.close()
                        idx = pos // chunk_size
                        f = chunk.enter_context(self.store.chunk_file(blob, idx))
                    chunk_end = min((idx + 1) * chunk_size, blob.size)
                    n = min(chunk_end, limit) - pos
                    if pace is not None:
                        n = min(n, PACED_PIECE)
                        await pace.take(n)
                    await loop.sendfile(transport, f, pos - idx * chunk_size, n)
                    yield pos, n
                    pos += n

    def remember_failed_digest(self, digest: str) -> None:
        now = time.monotonic()
        if len(self._failed_digest) >= MAX_WRONG_BLOBS:
            self._failed_digest = {d: t for d, t in self._failed_digest.items() if t > now}
        self._failed_digest[digest] = now + WRONG_BLOB_KEPT

    def failed_digest_lately(self, digest: str) -> bool:
        """Whether a transfer of the blob failed its digest lately. Its readers got all but
        the last byte before the check (the bytes stream as they land), so a client resuming
        with a Range holds wrong bytes and must start over."""
        return self._failed_digest.get(digest, 0.0) > time.monotonic()

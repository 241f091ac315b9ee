"""Transfer and Fetcher in one process, over a real Store in a tmp dir: no daemon, no network."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

from modelpeer.daemon.errors import TransferFailed
from modelpeer.daemon.fetch import Fetcher, NoPeers
from modelpeer.daemon.index import open_index
from modelpeer.daemon.registry import Transfers
from modelpeer.daemon.store import BlobId, Store
from modelpeer.daemon.transfer import Origin, Transfer, TransferSource
from modelpeer.daemon.upstream import Answer, Upstream
from modelpeer.daemon.upstreamfetch import (
    MIN_SEGMENT,
    PROBE_BYTES,
    PROBE_MAX_SECONDS,
    PROBE_SECONDS,
    SEGMENT,
    STARVED_RETRIES,
    STARVED_SECONDS,
    STARVED_SHARE,
    UpstreamFetch,
    _probed_enough,
    _Segment,
    segment_bounds,
)
from tests.harness import MiB

DATA = bytes(range(10))
BLOB = BlobId(hashlib.sha256(DATA).hexdigest(), "sha256", len(DATA))
WAITS = None


@pytest.mark.parametrize(("available", "verified", "pos", "end", "limit"), [
    (10, True, 0, 10, 10),     # verified: everything on disk
    (10, True, 10, 10, 10),    # verified and at the end: nothing left, no wait
    (10, True, 2, 5, 10),      # a Range of a verified blob
    (5, False, 0, 10, 5),      # to the end, in transfer: the prefix on disk
    (10, False, 0, 10, 9),     # all on disk, not verified: the last byte is held back
    (10, False, 9, 10, WAITS),  # ... until the digest checks
    (10, False, 0, 5, WAITS),  # a shorter Range would complete unverified: it waits
    (0, False, 0, 10, WAITS),  # nothing on disk yet
])
async def test_readable(available: int, verified: bool, pos: int, end: int,
                        limit: int | None) -> None:
    transfer = Transfer(BLOB, "t/f", available=available, verified=verified)
    if limit is None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(transfer.readable(pos, end), 0.05)
    else:
        assert await transfer.readable(pos, end) == limit


async def test_readable_wakes_on_verification_and_fails_on_error() -> None:
    transfer = Transfer(BLOB, "t/f", available=10)
    waiting = asyncio.create_task(transfer.readable(0, 5))
    await asyncio.sleep(0)
    transfer.finish()
    assert await asyncio.wait_for(waiting, 1) == 10
    failed = Transfer(BLOB, "t/f", available=3)
    waiting = asyncio.create_task(failed.readable(3, 10))
    await asyncio.sleep(0)
    failed.fail(OSError("disk gone"))
    with pytest.raises(TransferFailed):
        await asyncio.wait_for(waiting, 1)


class BrokenUpstream(Upstream):
    """An upstream whose client code hits a bug: not an UpstreamError, a KeyError."""

    async def hub(self, *args: Any, **kwargs: Any) -> Answer:
        raise KeyError("a bug nobody expected")

    def read_range(self, *args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
        raise AssertionError("never reached")


class PacedUpstream(Upstream):
    """An upstream that gives `piece` bytes every `every` seconds."""

    def __init__(self, piece: int, every: float) -> None:
        super().__init__(["http://hub.invalid"])
        self.piece, self.every = piece, every

    async def hub(self, *args: Any, **kwargs: Any) -> Answer:
        return Answer(200, CIMultiDict(), b"", URL("http://cdn.invalid/blob"))

    async def read_range(self, url: URL, start: int, end: int, *,
                         token: str | None = None) -> AsyncIterator[bytes]:
        for pos in range(start, end, self.piece):
            await asyncio.sleep(self.every)
            yield bytes(min(self.piece, end - pos))


@pytest.mark.parametrize(("piece", "held"), [(64 * 1024, True), (MiB, False)])
async def test_a_probe_that_finds_the_link_full_holds_the_next_probes(
        tmp_path: Path, piece: int, held: bool) -> None:
    store = Store(tmp_path, open_index(tmp_path / "index.sqlite3"), chunk_size=16 * MiB)
    blob = BlobId("e" * 64, "sha256", 64 * MiB)
    # 64 KiB every 20 ms: 3.2 MB/s, a small share of a full link; 1 MiB: 50 MB/s, the link
    fetch = UpstreamFetch(PacedUpstream(piece, 0.02))
    writer = store.open_writer(blob)
    await writer.prepare()
    try:
        assert fetch.may_probe()
        started = time.monotonic()
        await fetch.probe(Transfer(blob, "t/f"), writer, Origin("/t/f/resolve/main/f", None,
                                                                 "t/f"))
        assert time.monotonic() - started < PROBE_MAX_SECONDS + 0.5
        assert fetch.may_probe() is not held
        assert (fetch.rate() == 0) is held  # a short read is not what the upstream gives
    finally:
        await writer.close()
        store.db.close()


async def test_an_unexpected_exception_fails_the_transfer_and_its_readers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path, open_index(tmp_path / "index.sqlite3"), chunk_size=MiB)
    fetcher = Fetcher(store, Transfers(store), UpstreamFetch(BrokenUpstream([])), NoPeers())
    try:
        transfer = fetcher.open(BLOB, Origin("/t/f/resolve/main/f", None, "t/f"))
        with pytest.raises(TransferFailed, match="a bug nobody expected"):
            await asyncio.wait_for(transfer.readable(0, BLOB.size), 1)
        await asyncio.sleep(0)
        assert fetcher.transfers.running == {}
        assert not store.is_pinned(BLOB.digest)
        failures = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
        assert len(failures) == 1 and failures[0].exc_info is not None
    finally:
        await fetcher.close()
        store.db.close()


async def test_an_upstream_read_is_measured_by_what_arrives_from_when_it_began() -> None:
    blob = BlobId("e" * 64, "sha256", 64 * MiB)
    t = Transfer(blob, "acme/model:w.bin")
    t.mark_source(0, TransferSource.PEER)
    t.advance(MiB)  # a relay brought 1 MiB
    assert t.meter.rate > 0 and t.intake.rate == t.meter.rate  # a relay: both the prefix
    t.mark_source(MiB, TransferSource.UPSTREAM)
    assert t.intake.rate == t.meter.rate == 0  # a new source is measured anew
    assert t.intake.age < 1
    # four segments at once: 4 MiB arrived, none of it in order yet
    t.received(4 * MiB)
    assert t.available == MiB and t.bytes_upstream == 4 * MiB
    assert t.intake.rate == 16 * MiB  # 4 MiB in the meter's shortest span, 0.25 s
    assert t.meter.rate == 0  # nothing to relay yet
    t.advance(5 * MiB)  # the first segment is committed: the prefix moves, the intake does not
    assert t.intake.rate == 16 * MiB and t.meter.rate == 16 * MiB


@given(offset=st.integers(0, 300 * MiB), length=st.integers(1, 300 * MiB),
       connections=st.integers(1, 8))
def test_segments_cover_the_rest_and_shrink_to_the_end(offset: int, length: int,
                                                       connections: int) -> None:
    size = offset + length
    bounds = segment_bounds(offset, size, connections)
    assert bounds[0][0] == offset and bounds[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))  # in a row, no gap
    lengths = [end - start for start, end in bounds]
    assert all(n <= SEGMENT for n in lengths)
    assert all(n >= MIN_SEGMENT for n in lengths[:-1])
    # the segments in flight as the blob completes are small: the prefix a node serves
    # catches up with what it received within a few MiB, not 4 x 8 MiB
    assert sum(lengths[-connections:]) <= connections * MIN_SEGMENT
    # and the long run of the blob still goes in whole SEGMENTs (few requests)
    assert len(bounds) <= length / SEGMENT + 6 * connections + 1


def test_a_probe_reads_enough_to_measure_and_never_long() -> None:
    assert not _probed_enough(PROBE_BYTES, 0.1)  # a pause of a busy machine weighs too much
    assert _probed_enough(PROBE_BYTES, PROBE_SECONDS)
    assert not _probed_enough(PROBE_BYTES // 2, PROBE_SECONDS)
    assert _probed_enough(PROBE_BYTES // 2, PROBE_MAX_SECONDS)  # a crowded link: stop anyway


def test_a_segment_starves_only_while_its_siblings_get_bytes() -> None:
    seg = _Segment(0, 8 * MiB)
    ended = time.monotonic() - STARVED_SECONDS - 0.1
    seg.window = (ended, 0, 10 * MiB)
    assert seg.starved(13 * MiB)  # nothing here, 3 MiB to the others
    seg.filled = 3 * MiB // STARVED_SHARE - 1
    assert seg.starved(13 * MiB + seg.filled)  # a trickle beside them
    seg.window = (ended, 0, 10 * MiB)
    seg.filled = MiB
    assert not seg.starved(14 * MiB)  # a quarter of what came: its share
    assert seg.window[1:] == (MiB, 14 * MiB)  # and a new window begins
    seg.window = (ended, MiB, 10 * MiB)
    assert not seg.starved(10 * MiB + 100)  # nothing came to anyone: the upstream is slow
    seg.window = (time.monotonic() - STARVED_SECONDS / 2, MiB, 10 * MiB)
    assert not seg.starved(40 * MiB)  # the window has not ended
    seg.window = (ended, MiB, 10 * MiB)
    seg.restarts = STARVED_RETRIES
    assert not seg.starved(40 * MiB)  # asked again enough: it waits like any other read

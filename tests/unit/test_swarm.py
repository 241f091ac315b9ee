"""BitTorrent sessions in-process, on loopback: a chunk goes from a seeding session to a fetching
one, piece by piece, and a fetch ends as soon as no peer holding its chunk is left, not after its
stall timeout (a frozen holder held a node 9 s in the frozen-first bench); the stall timeout
counts bytes, not whole pieces."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelpeer.daemon.errors import SwarmStalled
from modelpeer.daemon.lan.swarm import Swarm, chunk_torrent
from tests.harness import free_port

HOST = "127.0.0.1"


@pytest.fixture
async def swarms(tmp_path: Path) -> AsyncIterator[tuple[Swarm, Swarm]]:
    seeder = Swarm((HOST, free_port()), tmp_path / "seeder")
    fetcher = Swarm((HOST, free_port()), tmp_path / "fetcher")
    for s in (seeder, fetcher):
        await s.start()
        s.allow_only({HOST})
    yield seeder, fetcher
    for s in (seeder, fetcher):
        await s.close()


def a_chunk(tmp_path: Path) -> Path:
    path = tmp_path / "chunks" / "blob.0"
    path.parent.mkdir()
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    return path


async def test_a_chunk_goes_from_its_holder_to_the_fetcher(
        swarms: tuple[Swarm, Swarm], tmp_path: Path) -> None:
    seeder, fetcher = swarms
    path = a_chunk(tmp_path)
    made = chunk_torrent(path)
    seeder.seed(made.torrent, path)
    got = b"".join([piece async for piece in fetcher.fetch(made.torrent, [seeder.listen])])
    assert got == path.read_bytes()


async def test_a_fetch_ends_as_soon_as_no_holder_is_left(
        swarms: tuple[Swarm, Swarm], tmp_path: Path) -> None:
    _, fetcher = swarms
    made = chunk_torrent(a_chunk(tmp_path))
    gone = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, gone.set)  # its only holder is left out
    started = time.monotonic()
    with pytest.raises(SwarmStalled, match="no peer holding it is left"):
        async for _ in fetcher.fetch(made.torrent, [], stall_timeout=30,
                                     sources_left=lambda: not gone.is_set()):
            pass
    assert time.monotonic() - started < 2.5


async def test_bytes_arriving_keep_a_fetch_whose_pieces_are_slower_than_its_stall_timeout(
        swarms: tuple[Swarm, Swarm], tmp_path: Path) -> None:
    seeder, fetcher = swarms
    path = a_chunk(tmp_path)
    made = chunk_torrent(path, piece_size=512 * 1024)
    seeder.seed(made.torrent, path)
    # the first bytes come about 2.3 s in, then some every 0.5-1 s: a piece takes over 5 s
    seeder.limit_upload(100_000)
    pieces = fetcher.fetch(made.torrent, [seeder.listen], stall_timeout=4.5)
    first = await anext(pieces)
    await pieces.aclose()
    assert first == path.read_bytes()[:512 * 1024]


async def test_a_fetch_that_gets_no_byte_ends_after_its_stall_timeout(
        swarms: tuple[Swarm, Swarm], tmp_path: Path) -> None:
    _, fetcher = swarms
    made = chunk_torrent(a_chunk(tmp_path))
    started = time.monotonic()
    with pytest.raises(SwarmStalled, match="no progress for"):
        async for _ in fetcher.fetch(made.torrent, [], stall_timeout=1.0):
            pass
    assert time.monotonic() - started < 3

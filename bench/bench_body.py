"""The upstream receive path alone, in one process: a blob from the fake Hub's CDN in Range
reads of fetch.py's SEGMENT, `--connections` at a time, as a cold download reads it, the
pieces counted and dropped. Three readers, one after the other in each run:

- httpbody: Upstream.read_range (the daemon's own body reader: recv_into a reused buffer);
- httpbody + a copy of each piece: what keeping pieces past the next read would cost;
- aiohttp: a GET with Range, the body as the socket delivered it (iter_chunks), which is
  what read_range did before httpbody.

With --store, the blob as one stream (as a relay between nodes brings it) received, written
into a store and hashed in order (BlobWriter.write), two ways in each run: on the event
loop's thread, the core that received the bytes (Store.inline_write), and in worker threads
(what the store does while the disk is slow, and did for every write before).

Reports the process's CPU seconds per GiB (user + sys, all threads; the fake Hub runs in a
process of its own) and the time, worst run and all runs.

    python bench/bench_body.py --size 1GiB --runs 3
    python bench/bench_body.py --size 1GiB --runs 3 --store
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_proxy import FILE, REPO, cdn_location  # noqa: E402
from modelpeer.daemon.config import parse_size  # noqa: E402
from modelpeer.daemon.index import open_index  # noqa: E402
from modelpeer.daemon.store import BlobId, Store  # noqa: E402
from modelpeer.daemon.upstream import Upstream  # noqa: E402
from modelpeer.daemon.upstreamfetch import SEGMENT  # noqa: E402
from tests.fakehub import FakeHub  # noqa: E402

Reader = Callable[[URL, int, int], AsyncIterator[bytes | memoryview]]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def read_all(read: Reader, url: URL, size: int, connections: int,
                   use: Callable[[bytes | memoryview], object]) -> int:
    """Every segment of the blob, `connections` at a time; the bytes received."""
    starts = iter(range(0, size, SEGMENT))
    received = 0

    async def worker() -> None:
        nonlocal received
        for start in starts:
            async for piece in read(url, start, min(start + SEGMENT, size)):
                use(piece)
                received += len(piece)

    await asyncio.gather(*(worker() for _ in range(connections)))
    return received


def aiohttp_reader(session: aiohttp.ClientSession) -> Reader:
    async def read(url: URL, start: int, end: int) -> AsyncIterator[bytes]:
        async with session.get(url, headers={"Range": f"bytes={start}-{end - 1}",
                                             "Accept-Encoding": "identity"}) as resp:
            async for data, _ in resp.content.iter_chunks():
                yield data
    return read


async def measure(url: URL, size: int, connections: int, runs: int
                  ) -> dict[str, list[tuple[float, float]]]:
    """Per reader, (seconds, CPU seconds) of each run."""
    up = Upstream([], timeout=30)
    await up.start()
    session = aiohttp.ClientSession(auto_decompress=False)
    readers: dict[str, tuple[Reader, Callable[[bytes | memoryview], object]]] = {
        "httpbody": (up.read_range, len),
        "httpbody + a copy of each piece": (up.read_range, bytes),
        "aiohttp": (aiohttp_reader(session), len),
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in readers}
    try:
        for _ in range(runs):
            for name, (read, use) in readers.items():
                results[name].append(await timed(read_all(read, url, size, connections, use),
                                                 size))
    finally:
        await session.close()
        await up.close()
    return results


async def measure_store(url: URL, size: int, runs: int, work: Path
                        ) -> dict[str, list[tuple[float, float]]]:
    """Per way of writing, (seconds, CPU seconds) of each run."""
    up = Upstream([], timeout=30)
    await up.start()
    digest = hashlib.sha256()
    async for piece in up.read_range(url, 0, size):
        digest.update(piece)
    blob = BlobId(digest.hexdigest(), "sha256", size)
    ways = {"on the event loop's thread": True, "in worker threads": False}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
    try:
        for _ in range(runs):
            for name, inline in ways.items():
                results[name].append(await timed(
                    stream_into_store(up, url, blob, work / "store", inline), size))
    finally:
        await up.close()
    return results


async def stream_into_store(up: Upstream, url: URL, blob: BlobId, root: Path,
                            inline: bool) -> int:
    """The blob read as one stream into a new store; the bytes written and verified."""
    store = Store(root, open_index(root / "index.sqlite3"), 64 * 1024**2)
    if not inline:
        store.inline_write = lambda write: False  # type: ignore[method-assign]
    store.register(blob)
    writer = store.open_writer(blob)
    try:
        await writer.prepare()
        async for piece in up.read_range(url, 0, blob.size):
            await writer.write(piece)
        await writer.verify()
        await writer.finish()
        return writer.offset
    finally:
        await writer.close()
        store.db.close()
        shutil.rmtree(root)


async def timed(work: Awaitable[int], size: int) -> tuple[float, float]:
    cpu, started = cpu_seconds(), time.perf_counter()
    got = await work
    assert got == size, f"read {got} of {size} bytes"
    return time.perf_counter() - started, cpu_seconds() - cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--store", action="store_true",
                    help="one stream written and hashed into a store, two ways")
    args = ap.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="mp-bench-body-") as work:
        hub = FakeHub(Path(work) / "hub", big_size=size)
        hub.start()
        try:
            url = URL(cdn_location(f"{hub.url}/{REPO}/resolve/main/{FILE}"), encoded=True)
            results = asyncio.run(
                measure_store(url, size, args.runs, Path(work)) if args.store
                else measure(url, size, args.connections, args.runs))
        finally:
            hub.stop()
    gib = size / 2**30
    print(f"\n{gib:.2f} GiB as one stream into a store, {args.runs} runs\n" if args.store else
          f"\n{gib:.2f} GiB in {SEGMENT >> 20} MiB Range reads, {args.connections} at a time, "
          f"{args.runs} runs\n")
    print("| reader | CPU s/GiB (worst) | CPU s/GiB, runs | s (worst) | s, runs |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        cpus = [c / gib for _, c in runs]
        times = [t for t, _ in runs]
        print(f"| {name} | {max(cpus):.2f} | {' '.join(f'{c:.2f}' for c in cpus)} | "
              f"{max(times):.2f} | {' '.join(f'{t:.2f}' for t in times)} |")


if __name__ == "__main__":
    main()

"""The upstream receive path alone, in one process: a blob from the fake Hub's CDN in Range
reads of fetch.py's SEGMENT, `--connections` at a time, as a cold download reads it, the
pieces counted and dropped. Three readers, one after the other in each run:

- httpbody: Upstream.read_range (the daemon's own body reader: recv_into a reused buffer);
- httpbody + a copy of each piece: what keeping pieces past the next read would cost;
- aiohttp: a GET with Range, the body as the socket delivered it (iter_chunks), which is
  what read_range did before httpbody.

Reports the process's CPU seconds per GiB (user + sys, all threads; the fake Hub runs in a
process of its own) and the time, worst run and all runs.

    python bench/bench_body.py --size 1GiB --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import resource
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
    args = ap.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="mp-bench-body-") as work:
        hub = FakeHub(Path(work) / "hub", big_size=size)
        hub.start()
        try:
            url = URL(cdn_location(f"{hub.url}/{REPO}/resolve/main/{FILE}"), encoded=True)
            results = asyncio.run(measure(url, size, args.connections, args.runs))
        finally:
            hub.stop()
    gib = size / 2**30
    print(f"\n{gib:.2f} GiB in {SEGMENT >> 20} MiB Range reads, {args.connections} at a time, "
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

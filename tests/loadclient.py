"""Many clients reading one URL at once, each over its own connection, each checking its whole
body: `python -m tests.loadclient URL CLIENTS` prints one JSON line {"bodies": {xxh3: count},
"errors": [...], "seconds": s}. A process of its own, so its CPU and memory are not the
daemon's."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import time
from typing import Any

import aiohttp
import xxhash

from tests.harness import ROOT

READ = 1024 * 1024


async def read_one(session: aiohttp.ClientSession, url: str) -> str:
    """The xxh3-128 of the body, or an "error: ..." line when the read failed or came short."""
    h = xxhash.xxh3_128()
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return f"error: HTTP {resp.status}"
            got = 0
            async for data in resp.content.iter_chunked(READ):
                h.update(data)
                got += len(data)
            if resp.content_length is not None and got != resp.content_length:
                return f"error: {got} of {resp.content_length} bytes"
    except (TimeoutError, aiohttp.ClientError) as e:
        return f"error: {type(e).__name__}: {e}"
    return h.hexdigest()


async def read_all(url: str, clients: int, seconds: float) -> dict[str, object]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, trust_env=False,
                                     timeout=aiohttp.ClientTimeout(total=seconds)) as session:
        results = await asyncio.gather(*(read_one(session, url) for _ in range(clients)))
    seconds = time.monotonic() - started
    errors = [r for r in results if r.startswith("error:")]
    bodies = collections.Counter(r for r in results if not r.startswith("error:"))
    return {"bodies": dict(bodies), "errors": errors, "seconds": seconds}


def many_readers(url: str, clients: int, seconds: float = 600) -> dict[str, Any]:
    """Run the clients in a process of their own and return what main() prints."""
    out = subprocess.run([sys.executable, "-m", "tests.loadclient", url, str(clients),
                          str(seconds)], capture_output=True, text=True, cwd=ROOT, check=True,
                         timeout=seconds + 60)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    url, clients = sys.argv[1], int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 600
    print(json.dumps(asyncio.run(read_all(url, clients, timeout))), flush=True)


if __name__ == "__main__":
    main()

"""Pins: a pinned revision is never evicted, by gc or by the size limit; the rest goes LRU."""

from __future__ import annotations

import json

from tests.fakehub import FakeHub, expected_files
from tests.harness import MiB, Modelpeerd, StartDaemon, cli, fetch


def add(hub: FakeHub, repo: str, size: int) -> None:
    hub.add_repo(repo, {"w.bin": {"size": size, "lfs": True}})


def get(d: Modelpeerd, repo: str) -> bytes:
    status, _, body = fetch(f"{d.url}/{repo}/resolve/main/w.bin")
    assert status == 200, body[:300]
    assert body == expected_files(repo)["w.bin"]
    return body


def cached(d: Modelpeerd) -> dict[str, int]:
    return {r["repo_id"]: r["bytes"] for r in json.loads(cli(d, "ls", "--json").stdout)}


def test_pinned_repo_survives_gc_and_a_limit_below_its_size(start_daemon: StartDaemon,
                                                             hub: FakeHub) -> None:
    for repo, size in (("pins/a", 4 * MiB), ("pins/b", 3 * MiB), ("pins/c", 3 * MiB)):
        add(hub, repo, size)
    d = start_daemon("--max-cache-size", "8MiB")
    get(d, "pins/a")
    pinned = cli(d, "pin", "pins/a")
    assert pinned.returncode == 0, pinned.stderr
    assert "pinned pins/a@main" in pinned.stdout
    get(d, "pins/b")
    get(d, "pins/c")  # 10 MiB > 8 MiB: b, the least recently used unpinned repo, goes
    assert cached(d) == {"pins/a": 4 * MiB, "pins/b": 0, "pins/c": 3 * MiB}
    ls = cli(d, "ls")
    assert [line.split()[-1] for line in ls.stdout.splitlines() if "pins/a" in line] == ["main"]
    assert d.stop() == 0

    small = start_daemon("--max-cache-size", "1MiB", cache_dir=d.cache_dir)
    gc = json.loads(cli(small, "gc", "--json").stdout)
    assert len(gc["evicted"]) == 1  # c; a is pinned
    assert cached(small) == {"pins/a": 4 * MiB, "pins/b": 0, "pins/c": 0}
    get(small, "pins/b")  # a download above the limit still succeeds
    assert cli(small, "gc").returncode == 0  # b, read just now, goes once nobody reads it
    status = json.loads(cli(small, "status", "--json").stdout)
    assert status["pins"] == 1 and status["pinned_bytes"] == 4 * MiB
    assert status["over_limit_bytes"] == 4 * MiB - 1 * MiB
    assert "pinned" in cli(small, "status").stdout
    assert "stays" in small.log() and "above max_cache_size" in small.log()

    assert cli(small, "unpin", "pins/a").returncode == 0
    cli(small, "gc")
    assert cached(small)["pins/a"] == 0
    assert cli(small, "unpin", "pins/a").returncode == 4


def test_pinning_what_is_not_cached_says_so_and_warm_pin_fetches_it(
        start_daemon: StartDaemon, hub: FakeHub) -> None:
    add(hub, "pins/d", MiB)
    d = start_daemon()
    refused = cli(d, "pin", "pins/d")
    assert refused.returncode == 4
    assert "is not cached" in refused.stderr and "warm --pin" in refused.stderr
    warmed = cli(d, "warm", "pins/d", "--nodes", "local", "--pin", "--wait")
    assert warmed.returncode == 0, warmed.stderr
    pins = json.loads(cli(d, "ls", "--json").stdout)[0]["pins"]
    assert [(p["revision"], p["files"], p["cached_files"]) for p in pins] == [("main", 1, 1)]

"""Hundreds of clients of one file: every body right, one upstream download, and the daemon's
memory bounded by its settings rather than by the number of clients (bench/bench_memory.py
measures the same at 40 MiB and 1 GiB)."""

from __future__ import annotations

from collections.abc import Callable

import xxhash

from tests.fakehub import FakeHub, expected_files
from tests.harness import MiB, Modelpeerd, PeakRss
from tests.loadclient import many_readers

CLIENTS = 400
# an idle daemon is ~50 MiB; bytes go out with sendfile and segments write what they receive
# at once, so readers add little (68 MiB at 400 clients of 40 MiB); a block held per waiting
# client took 780
RSS_BOUND_MIB = 160


def test_400_clients_of_one_cold_file_then_of_the_cached_file(
        hub: FakeHub, start_daemon: Callable[..., Modelpeerd]) -> None:
    repo = "acme/crowd"
    hub.add_repo(repo, {"weights.bin": {"size": 16 * MiB}})
    want = xxhash.xxh3_128(expected_files(repo)["weights.bin"]).hexdigest()
    hub.faults(cdn_rate=4 * MiB)  # the clients join the transfer while it runs
    d = start_daemon()
    assert d.proc is not None
    url = f"{d.url}/{repo}/resolve/main/weights.bin"
    for phase in ("cold", "cached"):
        with PeakRss(d.proc.pid) as rss:
            got = many_readers(url, CLIENTS, seconds=300)
        assert got["errors"] == [], f"{phase}: {got['errors'][:3]}"
        assert got["bodies"] == {want: CLIENTS}, f"{phase}: wrong bodies"
        assert rss.peak_kib / 1024 < RSS_BOUND_MIB, \
            f"{phase}: the daemon peaked at {rss.peak_kib / 1024:.0f} MiB with {CLIENTS} clients"
    assert hub.stats()["cdn_bytes"] == 16 * MiB  # one upstream download

"""upstream_rate: file bytes from the upstream are paced, and SIGHUP changes the rate."""

from __future__ import annotations

import hashlib
import time
import urllib.request
from pathlib import Path

from tests.fakehub import FakeHub, expected_files
from tests.harness import MiB, Modelpeerd, fetch, raw


def timed_download(d: Modelpeerd, repo: str) -> float:
    started = time.monotonic()
    status, _, body = fetch(f"{d.url}/{repo}/resolve/main/w.bin")
    assert status == 200 and body == expected_files(repo)["w.bin"]
    return time.monotonic() - started


def test_upstream_rate_paces_downloads_and_reloads(tmp_path: Path, hub: FakeHub) -> None:
    for repo in ("rate/capped", "rate/free"):
        hub.add_repo(repo, {"w.bin": {"size": 12 * MiB, "lfs": True}})
    config = tmp_path / "modelpeer.toml"
    config.write_text('upstream_rate = "2MiB"\n')
    with Modelpeerd(tmp_path / "cache", hub.url, extra=["--config", str(config)]) as d:
        assert timed_download(d, "rate/capped") >= (12 - 1) / 2  # a 0.5 MiB burst at most
        config.write_text("upstream_rate = 0\n")
        d.reload("upstream_rate)")
        assert timed_download(d, "rate/free") < 4


def test_a_large_download_keeps_to_the_cap(tmp_path: Path, hub: FakeHub) -> None:
    """256 MiB at upstream_rate = 100mbit: no faster than the cap allows (the bucket's burst is
    small beside 21 s), and byte-exact."""
    size = 256 * MiB
    hub.add_repo("rate/large", {"w.bin": {"size": size, "big": True}}, timeout=120)
    status, headers, _ = raw(hub.url, "HEAD", "/rate/large/resolve/main/w.bin")
    sha256 = headers["X-Linked-Etag"].strip('"')  # the Hub's answer, before its redirect
    with Modelpeerd(tmp_path / "cache", hub.url, extra=["--upstream-rate", "100mbit"]) as d:
        started = time.monotonic()
        h = hashlib.sha256()
        with urllib.request.urlopen(f"{d.url}/rate/large/resolve/main/w.bin", timeout=120) as r:
            while data := r.read(MiB):
                h.update(data)
        took = time.monotonic() - started
    assert h.hexdigest() == sha256
    implied = size * 8 / 100e6
    assert took >= 0.95 * implied, f"{took:.1f} s for what 100 Mbit/s takes {implied:.1f} s"

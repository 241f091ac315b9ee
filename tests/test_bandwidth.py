"""upstream_rate: file bytes from the upstream are paced, and SIGHUP changes the rate."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.fakehub import FakeHub, expected_files
from tests.harness import Modelpeerd, fetch

MiB = 1024 * 1024


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
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "upstream_rate)" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert timed_download(d, "rate/free") < 4

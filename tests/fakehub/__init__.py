"""The test double of the Hub, run as a real process, and a handle to drive it from tests."""

from __future__ import annotations

import json
import logging
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tests.fakehub.repos import (
    ADDED,
    GATED,
    GOOD_TOKEN,
    MODEL,
    OTHER_TOKEN,
    added_repo,
    catalogue,
    expected_files,
    file_sha256,
)
from tests.harness import ROOT, http_json

log = logging.getLogger("fakehub.handle")

__all__ = ["GATED", "GOOD_TOKEN", "MODEL", "OTHER_TOKEN", "FakeHub", "catalogue", "expected_files",
           "file_sha256"]


def _read_ready(stdout: Any, found: queue.Queue[str | None]) -> None:
    """Hand the READY line (or None at EOF) to the starting thread; drain the rest."""
    for line in stdout:
        if line.startswith("FAKEHUB READY "):
            found.put(line)
    found.put(None)


class FakeHub:
    """A fake Hub process: `.url` (hub) and `.cdn_url` (CDN) once started."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", cdn_host: str = "127.0.0.1",
                 port: int = 0, cdn_port: int = 0, prefix_cmd: list[str] | None = None,
                 big_size: int = 0, page_size: int = 50) -> None:
        self.data_dir = data_dir
        self.host, self.cdn_host = host, cdn_host
        self.port, self.cdn_port = port, cdn_port
        self.prefix_cmd = prefix_cmd or []
        self.big_size = big_size
        self.page_size = page_size
        self.url = self.cdn_url = ""
        self.proc: subprocess.Popen[str] | None = None
        self._added: list[dict[str, Any]] = []  # replayed by restart()

    def start(self, timeout: float | None = None) -> FakeHub:
        """Spawn the server and wait for its READY line (30 s, plus time to write big.bin)."""
        if timeout is None:
            timeout = 30 + self.big_size / (50 * 1024 * 1024)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [*self.prefix_cmd, sys.executable, "-m", "tests.fakehub",
               "--host", self.host, "--port", str(self.port), "--cdn-host", self.cdn_host,
               "--cdn-port", str(self.cdn_port), "--data-dir", str(self.data_dir),
               "--page-size", str(self.page_size), "--big-size", str(self.big_size)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        found: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_read_ready, args=(self.proc.stdout, found), daemon=True).start()
        try:
            line = found.get(timeout=timeout)
        except queue.Empty:
            line = None
        if line is None:
            self.stop()
            raise RuntimeError(f"the fake hub did not start: {' '.join(cmd)}")
        urls = json.loads(line.removeprefix("FAKEHUB READY "))
        self.url, self.cdn_url = urls["hub"], urls["cdn"]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.cdn_port = int(self.cdn_url.rsplit(":", 1)[1])
        log.info("fake hub at %s, CDN at %s", self.url, self.cdn_url)
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> FakeHub:
        """Stop and start again on the same ports (the hub comes back)."""
        self.stop()
        self.start()
        for body in self._added:
            self._call("POST", "/_fake/repos", body)
        return self

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        return http_json(method, self.url + path, body, self.prefix_cmd, timeout)

    def stats(self) -> dict[str, Any]:
        """cdn_bytes, cdn_requests, cdn_requests_with_auth, cdn_range_requests, hub_requests,
        xet_requests, requests (the last 200 "METHOD raw-path")."""
        return self._call("GET", "/_fake/stats")

    def faults(self, **faults: Any) -> dict[str, Any]:
        """Set some faults (hub_status, hub_down, cdn_status, cdn_drop_after, cdn_drop_count,
        cdn_rate, cdn_first_byte_delay, cdn_corrupt, cdn_corrupt_at, cdn_short,
        cdn_ignore_range, cdn_stall_at); returns all of them."""
        return self._call("POST", "/_fake/faults", faults)

    def reset(self) -> None:
        """Clear faults and counters."""
        self._call("POST", "/_fake/reset", {})

    def add_repo(self, repo_id: str, files: dict[str, dict[str, Any]],
                 repo_type: str = "model", seed: int = 0, timeout: float = 30) -> str:
        """Add a repo at runtime ({"path": {"size": N, "lfs": bool}}, more in added_repo);
        returns its commit.

        expected_files() and file_sha256() know it afterwards, in this process."""
        body = {"repo_id": repo_id, "repo_type": repo_type, "files": files, "seed": seed}
        commit = self._call("POST", "/_fake/repos", body, timeout)["commit"]
        self._added.append(body)
        ADDED[(repo_type, repo_id)] = added_repo(repo_id, files, repo_type, seed)
        return commit

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

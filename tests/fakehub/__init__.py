"""The test double of the Hub, run as a real process, and a handle to drive it from tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.fakehub.repos import GOOD_TOKEN, catalogue, expected_files

ROOT = Path(__file__).resolve().parent.parent.parent
_HTTP_JSON = """
import json, sys, urllib.request
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(url, data=body.encode() if body else None, method=method,
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=float(sys.argv[4])) as resp:
    sys.stdout.write(resp.read().decode())
"""


def http_json(method: str, url: str, body: Any = None, prefix_cmd: list[str] | None = None,
              timeout: float = 30) -> Any:
    """A JSON request, run inside a network namespace when prefix_cmd enters one."""
    payload = json.dumps(body) if body is not None else ""
    out = subprocess.run([*(prefix_cmd or []), sys.executable, "-c", _HTTP_JSON, method, url,
                          payload, str(timeout)], capture_output=True, timeout=timeout + 10)
    if out.returncode != 0:
        raise OSError(f"{method} {url} failed: {out.stderr.decode()[-800:]}")
    return json.loads(out.stdout)

__all__ = ["GOOD_TOKEN", "FakeHub", "catalogue", "expected_files"]


class FakeHub:
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

    def start(self, timeout: float = 120) -> FakeHub:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [*self.prefix_cmd, sys.executable, "-m", "tests.fakehub",
               "--host", self.host, "--port", str(self.port), "--cdn-host", self.cdn_host,
               "--cdn-port", str(self.cdn_port), "--data-dir", str(self.data_dir),
               "--page-size", str(self.page_size), "--big-size", str(self.big_size)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            if line.startswith("FAKEHUB READY "):
                urls = json.loads(line.removeprefix("FAKEHUB READY "))
                self.url, self.cdn_url = urls["hub"], urls["cdn"]
                self.port = int(self.url.rsplit(":", 1)[1])
                self.cdn_port = int(self.cdn_url.rsplit(":", 1)[1])
                return self
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("the fake hub did not start")

    def stop(self) -> None:
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
        return self.start()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        return http_json(method, self.url + path, body, self.prefix_cmd)

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_fake/stats")

    def faults(self, **faults: Any) -> dict[str, Any]:
        return self._call("POST", "/_fake/faults", faults)

    def reset(self) -> None:
        self._call("POST", "/_fake/reset", {})

    def add_repo(self, repo_id: str, files: dict[str, dict[str, Any]],
                 repo_type: str = "model", seed: int = 0) -> str:
        return self._call("POST", "/_fake/repos", {"repo_id": repo_id, "repo_type": repo_type,
                                                    "files": files, "seed": seed})["commit"]

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

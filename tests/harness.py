"""Real processes for tests and benchmarks: a modelpeerd, and the real huggingface_hub client.

The Hub client reads HF_ENDPOINT when it is imported, so each client run is a subprocess with
its own environment and an empty HF cache of its own.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def raw(d: Modelpeerd, method: str, path: str,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to the daemon: status, headers, body."""
    conn = http.client.HTTPConnection(d.host, d.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def cli(d: Modelpeerd | str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `modelpeer` CLI against a daemon (or a URL)."""
    url = d if isinstance(d, str) else d.url
    return subprocess.run([sys.executable, "-m", "modelpeer.client.cli", "--daemon", url, *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def get_json(url: str, method: str = "GET", timeout: float = 10) -> Any:
    req = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class Modelpeerd:
    """A modelpeerd process with its own cache dir and port."""

    def __init__(self, cache_dir: Path, upstream: str | list[str], *, host: str = "127.0.0.1",
                 port: int = 0, extra: list[str] | None = None, prefix_cmd: list[str] | None = None,
                 env: dict[str, str] | None = None,
                 getter: Callable[[str], Any] | None = None, peers: bool = False) -> None:
        self.cache_dir = cache_dir
        self.upstreams = [upstream] if isinstance(upstream, str) else upstream
        self.host = host
        self.port = port or free_port(host if host != "0.0.0.0" else "127.0.0.1")
        self.extra = extra or []
        self.prefix_cmd = prefix_cmd or []
        self.env = env or {}
        self.get = getter or get_json
        self.peers = peers
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = cache_dir.parent / f"{cache_dir.name}.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [*self.prefix_cmd, sys.executable, "-m", "modelpeer.daemon.main",
               "--cache-dir", str(self.cache_dir), "--listen", f"{self.host}:{self.port}",
               "--log-level", "debug"] + ([] if self.peers else ["--no-peers"])
        for u in self.upstreams:
            cmd += ["--upstream", u]
        return cmd + self.extra

    def start(self, wait: bool = True) -> Modelpeerd:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPEER_")}
        env.update(self.env)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=env, cwd=ROOT)
        log.close()
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"modelpeerd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get(self.url + "/_modelpeer/v1/health")["status"] == "ok":
                    return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"modelpeerd not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def status(self) -> dict[str, Any]:
        return self.get(self.url + "/_modelpeer/v1/status")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> Modelpeerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def hf_client(endpoint: str, hf_home: Path, call: str, *args: Any, token: str | None = None,
              timeout: float = 180, prefix_cmd: list[str] | None = None,
              env: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run one huggingface_hub function in a fresh process against `endpoint`.
    Returns {"result": ...} or {"error": ExceptionClassName, "message": ...}."""
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("HF_", "HUGGING_FACE"))}
    environment.update({"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home),
                        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "10",
                        "HF_HUB_DOWNLOAD_TIMEOUT": "10", "PYTHONPATH": str(ROOT)})
    environment.update(env or {})
    if token:
        kwargs["token"] = token
    payload = json.dumps({"call": call, "args": args, "kwargs": kwargs})
    cmd = [*(prefix_cmd or []), sys.executable, "-m", "tests.hfclient", payload]
    proc = subprocess.run(cmd, capture_output=True, env=environment, timeout=timeout, cwd=ROOT)
    lines = proc.stdout.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"client crashed ({proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    return json.loads(lines[-1])


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root (following the HF cache's symlinks) by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and ".cache" not in p.parts}

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
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fakehub import FakeHub

ROOT = Path(__file__).resolve().parent.parent
KiB = 1024
MiB = 1024 * 1024
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via http_proxy


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
    if not prefix_cmd:
        req = urllib.request.Request(url, data=payload.encode() if payload else None,
                                     method=method, headers={"Content-Type": "application/json"})
        with DIRECT.open(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    out = subprocess.run([*(prefix_cmd or []), sys.executable, "-c", _HTTP_JSON, method, url,
                          payload, str(timeout)], capture_output=True, timeout=timeout + 10)
    if out.returncode != 0:
        raise OSError(f"{method} {url} failed: {out.stderr.decode()[-800:]}")
    return json.loads(out.stdout)


def raw(d: Modelpeerd | str, method: str, path: str,
        headers: Mapping[str, str | None] | None = None,
        body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request to the daemon `d` (or the server at a base URL) with exactly these headers
    (a browser's, a hostile client's): Host defaults to the server's address, and a header
    given as None is not sent at all."""
    if isinstance(d, str):
        split = urllib.parse.urlsplit(d)
        host, port = split.hostname or "", split.port or 80
    else:
        host, port = d.host, d.port
    headers = {"Host": f"{host}:{port}", **(headers or {})}
    if body is not None:
        headers["Content-Length"] = str(len(body))
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            if value is not None:
                conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def cli(d: Modelpeerd | str, *args: str,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The `modelpeer` CLI against the daemon `d` (or a URL)."""
    url = d if isinstance(d, str) else d.url
    return subprocess.run([sys.executable, "-m", "modelpeer.client.cli", "--daemon", url, *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def fetch(url: str, headers: dict[str, str] | None = None, method: str = "GET",
          body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request, also when the status is an error."""
    req = urllib.request.Request(url, headers=headers or {}, method=method, data=body)
    try:
        with DIRECT.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_body(url: str, headers: dict[str, str] | None = None, timeout: float = 60) -> bytes:
    """The body of a GET answered 200; an error status raises urllib's HTTPError, a cut
    connection http.client's IncompleteRead."""
    with DIRECT.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
        return r.read()


def read_in_background(url: str) -> threading.Thread:
    """A client reading the whole body in a thread of its own; the test may stop the server
    under it, so a failed read is not an error."""
    def read() -> None:
        try:
            with DIRECT.open(url, timeout=120) as resp:
                resp.read()
        except (OSError, http.client.HTTPException):
            pass

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def proc_status_kib(pid: int, field: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakRss:
    """The highest resident size of a process seen every 50 ms while in the `with` block
    (VmHWM covers the process's whole life; this covers one phase)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmRSS"))
            self._stop.wait(0.05)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 10) -> Any:
    """Poll `check` until it returns something true; fail naming `what` after `timeout`.
    A check that raises OSError (a daemon or a lab host not answering yet) is not true yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not true after {timeout}s (last: {last!r:.300})")


def durable_bytes(cache: Path) -> int:
    """The bytes the store under `cache` has made durable (its index says), all blobs."""
    db = sqlite3.connect(f"file:{cache / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COALESCE(SUM(durable), 0) FROM chunks").fetchone()[0])
    finally:
        db.close()


def transferring(d: Modelpeerd, at_least: int = 1) -> bool:
    """Whether `d` is making a blob available and has at least `at_least` bytes of it in."""
    return any(t["available"] >= at_least for t in d.status()["transfers"])


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
        self.get = getter or (lambda url: http_json("GET", url, timeout=10))
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
        try:
            wait_for(self._healthy, "modelpeerd healthy", timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.log()}") from None

    def _healthy(self) -> bool:
        """Whether the health check answers ok; raises if the process has exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"modelpeerd exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return bool(self.get(self.url + "/_modelpeer/v1/health")["status"] == "ok")
        except ValueError:  # a half-started server's answer; OSError is wait_for's to retry
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def log_size(self) -> int:
        """Where the log stands now: `logged(since=...)` gives what comes after."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def logged(self, since: int = 0) -> str:
        """The whole log from byte `since` on (`log()` is only its tail, for failure messages)."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def reload(self, until_logged: str, timeout: float = 10) -> None:
        """SIGHUP, then wait until the log says `until_logged` (the reload's outcome)."""
        assert self.proc is not None, "reload of a daemon never started"
        since = self.log_size()
        self.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: until_logged in self.logged(since), f"the log says {until_logged!r}",
                 timeout=timeout)

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


def keyed_daemon(cache_dir: Path, upstream: str, key: Path, *extra: str,
                 peer_port: int = 0) -> Modelpeerd:
    """A modelpeerd (not started) holding the cluster key `key`, its peer API (on `peer_port`
    if given) and BitTorrent on free local ports."""
    return Modelpeerd(cache_dir, upstream, peers=True, extra=[
        "--chunk-size", "8MiB", "--cluster-key-file", str(key), "--interface", "127.0.0.1",
        "--peer-listen", f"127.0.0.1:{peer_port or free_port()}",
        "--bt-listen", f"127.0.0.1:{free_port()}", *extra])


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


StartDaemon = Callable[..., Modelpeerd]  # the start_daemon fixture
HfHome = Callable[[], Path]  # the hf_home fixture


def snapshot(d: Modelpeerd, home: Path, repo: str, **kw: object) -> dict[str, bytes]:
    out = hf_client(d.url, home, "snapshot_download", repo, **kw)
    assert "result" in out, out
    return tree_bytes(Path(out["result"]))


def download(d: Modelpeerd, home: Path, repo: str, filename: str, **kw: object) -> bytes:
    out = hf_client(d.url, home, "hf_hub_download", repo, filename, **kw)
    assert "result" in out, out
    return Path(out["result"]).read_bytes()


def assert_no_leaks(hub: FakeHub) -> None:
    stats = hub.stats()
    assert stats["xet_requests"] == 0, "the client left the proxy for Xet"
    assert stats["cdn_requests_with_auth"] == 0, "a token reached the CDN"

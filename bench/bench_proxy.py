"""Single-node benchmark: a cold download through modelpeerd vs the same download straight from
the (fake) Hub and its CDN and vs nginx `proxy_cache` in front of the same CDN (cold), and a
cache hit vs nginx serving the same file, in one run. The daemon's CPU time (user + sys, all
threads) is read from /proc around each download.

    python bench/bench_proxy.py --size 2GiB [--runs 3]

Prints a Markdown table of times (worst and spread over the runs), rates, CPU seconds per GiB
and ratios taken within each run (what goes into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelpeer.daemon.config import parse_size  # noqa: E402
from tests.fakehub import FakeHub  # noqa: E402
from tests.harness import Modelpeerd, free_port  # noqa: E402

REPO = "acme/big"
FILE = "big.bin"
BLOCK = 1024 * 1024
ROWS = {"direct": "direct from the fake Hub + CDN (baseline)",
        "nginx_cold": "nginx proxy_cache in front of the CDN, cold (baseline)",
        "cold": "cold, through modelpeerd",
        "hit": "cache hit, through modelpeerd",
        "old_cold": "cold, through modelpeerd of --old-code",
        "old_hit": "cache hit, through modelpeerd of --old-code",
        "nginx": "nginx serving the same file (baseline)"}


def timed_get(url: str) -> tuple[float, float, str]:
    """(seconds to the first body byte, seconds to the last, sha256) of a GET; the reader
    hashes, like a client."""
    h = hashlib.sha256()
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as resp:
        data = resp.read(1)
        first = time.perf_counter() - started
        while data:
            h.update(data)
            data = resp.read(BLOCK)
    return first, time.perf_counter() - started, h.hexdigest()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and of its live children."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(cpu_seconds(int(c)) for c in children)


def timed_get_cpu(url: str, pid: int) -> tuple[float, float, str, float]:
    """timed_get, and the CPU seconds process `pid` spent meanwhile."""
    before = cpu_seconds(pid)
    first, seconds, digest = timed_get(url)
    return first, seconds, digest, cpu_seconds(pid) - before


def nginx_running(server: str, work: Path, prefix_cmd: list[str] | None = None,
                  http: str = "") -> subprocess.Popen[bytes]:
    """nginx (one worker, sendfile) with that server block, its files under `work`."""
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "nginx.conf"
    user = "user root root;" if os.geteuid() == 0 else ""  # workers must read our temp dir
    conf.write_text(f"""
{user} worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 64; }}
http {{
  access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  {http}
  server {{ {server} }}
}}""")
    proc = subprocess.Popen([*(prefix_cmd or []), "nginx", "-c", str(conf)],
                            stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def nginx_serving(root: Path, work: Path, prefix_cmd: list[str] | None = None,
                  host: str = "127.0.0.1") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = nginx_running(f"listen {host}:{port}; root {root};", work, prefix_cmd)
    return proc, f"http://{host}:{port}"


def nginx_caching(origin: str, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """nginx proxy_cache (an empty cache) in front of `origin`: a C caching proxy."""
    port = free_port()
    proc = nginx_running(
        f"listen 127.0.0.1:{port}; location / {{ proxy_pass {origin}; proxy_cache big;"
        " proxy_cache_valid 200 1h; proxy_buffering on; }", work,
        http=f"proxy_cache_path {work}/cache levels=1:2 keys_zone=big:10m max_size=20g;")
    return proc, f"http://127.0.0.1:{port}"


def cdn_location(url: str) -> str:
    """Where the Hub redirects a resolve URL (the CDN's signed URL)."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(urllib.request.Request(url, method="HEAD"))
    except urllib.error.HTTPError as e:
        return str(e.headers["Location"])
    raise RuntimeError(f"{url} did not redirect to a CDN")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait()


def _per_row() -> dict[str, list[float]]:
    return {k: [] for k in ROWS}


@dataclasses.dataclass
class Measures:
    """Per row of ROWS, each run's seconds to the last byte, to the first, and server CPU."""
    times: dict[str, list[float]] = dataclasses.field(default_factory=_per_row)
    first: dict[str, list[float]] = dataclasses.field(default_factory=_per_row)
    cpu: dict[str, list[float]] = dataclasses.field(default_factory=_per_row)

    def add(self, kind: str, first: float, seconds: float, cpu: float | None = None) -> None:
        self.first[kind].append(first)
        self.times[kind].append(seconds)
        if cpu is not None:
            self.cpu[kind].append(cpu)


def one_run(hub: FakeHub, work: Path, m: Measures, old_code: str | None,
            old_first: bool = False) -> str:
    """Direct, nginx proxy_cache cold, modelpeerd cold and hit, in that order, with the old
    code's cold and hit after modelpeerd's (before them if old_first); the digest."""
    first, t, digest = timed_get(f"{hub.url}/{REPO}/resolve/main/{FILE}")
    m.add("direct", first, t)
    if shutil.which("nginx"):
        location = cdn_location(f"{hub.url}/{REPO}/resolve/main/{FILE}")
        path = location[location.index("/repos/"):]
        proc, url = nginx_caching(hub.cdn_url, work / "nginx-cache")
        try:
            first, t, got, c = timed_get_cpu(url + path, proc.pid)
        finally:
            stop(proc)
            shutil.rmtree(work / "nginx-cache", ignore_errors=True)
        assert got == digest, "nginx proxy_cache answered other bytes"
        m.add("nginx_cold", first, t, c)
    daemons: list[tuple[str, dict[str, str]]] = [("", {})]
    if old_code is not None:
        daemons.insert(0 if old_first else 1, ("old_", {"PYTHONPATH": old_code}))
    for prefix, env in daemons:
        daemon_cold_and_hit(hub, work, digest, prefix, env, m)
    return digest


def daemon_cold_and_hit(hub: FakeHub, work: Path, digest: str, prefix: str,
                        env: dict[str, str], m: Measures) -> None:
    """A fresh daemon (with that environment): the file cold, then again (a cache hit)."""
    d = Modelpeerd(work / "cache", hub.url, env=env)
    d.extra = ["--log-level", "warning"]
    d.start()
    try:
        assert d.proc is not None
        for kind in (prefix + "cold", prefix + "hit"):
            first, t, got, c = timed_get_cpu(f"{d.url}/{REPO}/resolve/main/{FILE}",
                                             d.proc.pid)
            assert got == digest, f"{kind} download through the proxy differs"
            m.add(kind, first, t, c)
    finally:
        d.stop()
        shutil.rmtree(work / "cache", ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--old-code", metavar="DIR",
                    help="also run the daemon from DIR/modelpeer/daemon in each run, e.g. an "
                         "earlier commit's daemon/ (git archive) linked there: before and after "
                         "in the same run, alternately first")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="mp-bench-"))
    hub = FakeHub(work / "hub", big_size=size)
    hub.start()
    m = Measures()
    try:
        for run in range(args.runs):  # the old code first in every other run
            digest = one_run(hub, work, m, args.old_code, old_first=run % 2 == 1)
        if shutil.which("nginx"):
            www = work / "www"
            www.mkdir()
            (www / FILE).symlink_to(_big_file(work / "hub", size))
            proc, url = nginx_serving(www, work / "nginx")
            try:
                for _ in range(args.runs):
                    first, t, got, c = timed_get_cpu(f"{url}/{FILE}", proc.pid)
                    assert got == digest
                    m.add("nginx", first, t, c)
            finally:
                stop(proc)
    finally:
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(size, m)


def _big_file(root: Path, size: int) -> Path:
    return next(p for p in root.rglob("*") if p.is_file() and p.stat().st_size == size)


def report(size: int, m: Measures) -> None:
    gib = size / 2**30
    times, cpu = m.times, m.cpu
    print(f"\n{gib:.2f} GiB file, {len(times['cold'])} runs, loopback; worst run, then median "
          "and all runs\n")
    print("| what | worst s | MB/s (worst) | median s | runs s | first byte ms, runs "
          "| server CPU s/GiB (worst) | server CPU s/GiB, runs |")
    print("|---|---|---|---|---|---|---|---|")
    for k, label in ROWS.items():
        if times[k]:
            runs = " ".join(f"{t:.2f}" for t in times[k])
            first = " ".join(f"{t * 1000:.0f}" for t in m.first[k])
            cpu_worst = f"{max(cpu[k]) / gib:.2f}" if cpu[k] else ""
            cpu_runs = " ".join(f"{c / gib:.2f}" for c in cpu[k])
            print(f"| {label} | {max(times[k]):.2f} | {size / 1e6 / max(times[k]):.0f} | "
                  f"{statistics.median(times[k]):.2f} | {runs} | {first} | {cpu_worst} "
                  f"| {cpu_runs} |")
    print("\n| ratio within each run | worst | median | runs |\n|---|---|---|---|")
    for what, a, b, label in (
            (times, "cold", "direct", "cold through modelpeerd / direct"),
            (times, "cold", "nginx_cold", "cold through modelpeerd / nginx proxy_cache cold"),
            (times, "hit", "nginx", "cache hit / nginx serving"),
            (times, "cold", "old_cold", "cold through modelpeerd / the same, old code"),
            (m.first, "cold", "old_cold", "cold, first byte / the same, old code"),
            (cpu, "cold", "old_cold", "cold, daemon CPU / the same, old code"),
            (times, "hit", "old_hit", "cache hit / the same, old code")):
        if what[a] and what[b]:
            ratios = [x / y for x, y in zip(what[a], what[b], strict=False)]
            print(f"| {label} | {max(ratios):.2f} | {statistics.median(ratios):.2f} | "
                  f"{' '.join(f'{r:.2f}' for r in ratios)} |")


if __name__ == "__main__":
    main()

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


def timed_get(url: str) -> tuple[float, str]:
    """Seconds to read the whole body, and its sha256 (the reader hashes, like a client)."""
    h = hashlib.sha256()
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as resp:
        while data := resp.read(BLOCK):
            h.update(data)
    return time.perf_counter() - started, h.hexdigest()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and of its live children."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(cpu_seconds(int(c)) for c in children)


def timed_get_cpu(url: str, pid: int) -> tuple[float, str, float]:
    """timed_get, and the CPU seconds process `pid` spent meanwhile."""
    before = cpu_seconds(pid)
    seconds, digest = timed_get(url)
    return seconds, digest, cpu_seconds(pid) - before


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


def one_run(hub: FakeHub, work: Path, times: dict[str, list[float]],
            cpu: dict[str, list[float]], old_code: str | None, old_first: bool = False) -> str:
    """Direct, nginx proxy_cache cold, modelpeerd cold and hit, in that order, with the old
    code's cold and hit after modelpeerd's (before them if old_first); the digest."""
    t, digest = timed_get(f"{hub.url}/{REPO}/resolve/main/{FILE}")
    times["direct"].append(t)
    if shutil.which("nginx"):
        location = cdn_location(f"{hub.url}/{REPO}/resolve/main/{FILE}")
        path = location[location.index("/repos/"):]
        proc, url = nginx_caching(hub.cdn_url, work / "nginx-cache")
        try:
            t, got, c = timed_get_cpu(url + path, proc.pid)
        finally:
            stop(proc)
            shutil.rmtree(work / "nginx-cache", ignore_errors=True)
        assert got == digest, "nginx proxy_cache answered other bytes"
        times["nginx_cold"].append(t)
        cpu["nginx_cold"].append(c)
    daemons: list[tuple[str, dict[str, str]]] = [("", {})]
    if old_code is not None:
        daemons.insert(0 if old_first else 1, ("old_", {"PYTHONPATH": old_code}))
    for prefix, env in daemons:
        daemon_cold_and_hit(hub, work, digest, prefix, env, times, cpu)
    return digest


def daemon_cold_and_hit(hub: FakeHub, work: Path, digest: str, prefix: str,
                        env: dict[str, str], times: dict[str, list[float]],
                        cpu: dict[str, list[float]]) -> None:
    """A fresh daemon (with that environment): the file cold, then again (a cache hit)."""
    d = Modelpeerd(work / "cache", hub.url, env=env)
    d.extra = ["--log-level", "warning"]
    d.start()
    try:
        assert d.proc is not None
        for kind in (prefix + "cold", prefix + "hit"):
            t, got, c = timed_get_cpu(f"{d.url}/{REPO}/resolve/main/{FILE}", d.proc.pid)
            assert got == digest, f"{kind} download through the proxy differs"
            times[kind].append(t)
            cpu[kind].append(c)
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
    times: dict[str, list[float]] = {k: [] for k in ROWS}
    cpu: dict[str, list[float]] = {k: [] for k in ROWS}
    try:
        for run in range(args.runs):  # the old code first in every other run
            digest = one_run(hub, work, times, cpu, args.old_code, old_first=run % 2 == 1)
        if shutil.which("nginx"):
            www = work / "www"
            www.mkdir()
            (www / FILE).symlink_to(_big_file(work / "hub", size))
            proc, url = nginx_serving(www, work / "nginx")
            try:
                for _ in range(args.runs):
                    t, got, c = timed_get_cpu(f"{url}/{FILE}", proc.pid)
                    assert got == digest
                    times["nginx"].append(t)
                    cpu["nginx"].append(c)
            finally:
                stop(proc)
    finally:
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(size, times, cpu)


def _big_file(root: Path, size: int) -> Path:
    return next(p for p in root.rglob("*") if p.is_file() and p.stat().st_size == size)


def report(size: int, times: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
    gib = size / 2**30
    print(f"\n{gib:.2f} GiB file, {len(times['cold'])} runs, loopback; worst run, then median "
          "and all runs\n")
    print("| what | worst s | MB/s (worst) | median s | runs s | server CPU s/GiB (worst) "
          "| server CPU s/GiB, runs |")
    print("|---|---|---|---|---|---|---|")
    for k, label in ROWS.items():
        if times[k]:
            runs = " ".join(f"{t:.2f}" for t in times[k])
            cpu_worst = f"{max(cpu[k]) / gib:.2f}" if cpu[k] else ""
            cpu_runs = " ".join(f"{c / gib:.2f}" for c in cpu[k])
            print(f"| {label} | {max(times[k]):.2f} | {size / 1e6 / max(times[k]):.0f} | "
                  f"{statistics.median(times[k]):.2f} | {runs} | {cpu_worst} | {cpu_runs} |")
    print("\n| ratio of times, within each run | worst | runs |\n|---|---|---|")
    for a, b, label in (("cold", "direct", "cold through modelpeerd / direct"),
                        ("cold", "nginx_cold", "cold through modelpeerd / nginx proxy_cache cold"),
                        ("hit", "nginx", "cache hit / nginx serving"),
                        ("cold", "old_cold", "cold through modelpeerd / the same, old code"),
                        ("hit", "old_hit", "cache hit / the same, old code")):
        if times[a] and times[b]:
            ratios = [x / y for x, y in zip(times[a], times[b], strict=False)]
            print(f"| {label} | {max(ratios):.2f} | {' '.join(f'{r:.2f}' for r in ratios)} |")


if __name__ == "__main__":
    main()

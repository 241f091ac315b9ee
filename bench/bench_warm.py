"""Cluster warm-up vs its lower bound and two baselines, in the network lab of
tests/netlab.py (root):

    python bench/bench_warm.py --size 1GiB --wan 400mbit --lan 1gbit --nodes 2 4 6

- lower bound: one node downloads the file from the upstream alone over the shaped WAN;
- modelpeer: `modelpeer warm --nodes all --wait` from one node of N;
- direct: all N nodes download from the upstream at once (no cache);
- nginx: one central nginx `proxy_cache` (with proxy_cache_lock) in front of the CDN, all N
  nodes downloading through it at once.
Prints a Markdown table and writes an SVG plot (default docs/warmup.svg).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_lan import shutdown  # noqa: E402
from bench.svgplot import Chart, Scale  # noqa: E402
from modelpeer.daemon.config import parse_size  # noqa: E402
from tests.fakehub import FakeHub  # noqa: E402
from tests.harness import http_json  # noqa: E402
from tests.netlab import Cluster, Lab, netlab_available  # noqa: E402

FILE = "/acme/big/resolve/main/big.bin"


def cdn_path(lab: Lab, hub: FakeHub) -> str:
    code = ("import sys, urllib.request\n"
            "class N(urllib.request.HTTPRedirectHandler):\n"
            "    def redirect_request(self, *a, **k): return None\n"
            "o = urllib.request.build_opener(N)\n"
            "try:\n    o.open(urllib.request.Request(sys.argv[1], method='HEAD'))\n"
            "except urllib.error.HTTPError as e:\n    print(e.headers['Location'])\n")
    out = lab.run("up", sys.executable, "-c", code, hub.url + FILE)
    location = out.stdout.strip()
    return location[location.index("/repos/"):]


def nginx_cache(lab: Lab, host: str, work: Path, cdn: str) -> subprocess.Popen[bytes]:
    conf = work / "nginx-cache.conf"
    (work / "cache").mkdir(exist_ok=True)
    conf.write_text(f"""
user root root; worker_processes 2; daemon off; pid {work}/nginx-cache.pid;
error_log {work}/nginx-cache.err;
events {{ worker_connections 256; }}
http {{
  access_log off; sendfile on;
  proxy_cache_path {work}/cache levels=1:2 keys_zone=models:10m max_size=20g inactive=1h;
  proxy_temp_path {work}/proxy-tmp;
  client_body_temp_path {work}/body; fastcgi_temp_path {work}/fcgi;
  uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  server {{
    listen {lab.ip(host)}:8090;
    location / {{
      proxy_pass {cdn}; proxy_cache models; proxy_cache_valid 200 1h;
      proxy_cache_lock on; proxy_cache_lock_timeout 600s; proxy_cache_lock_age 600s;
      proxy_buffering on; proxy_max_temp_file_size 0;
    }}
  }}
}}""")
    proc = subprocess.Popen([*lab.ns(host), "nginx", "-c", str(conf)], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def all_at_once(lab: Lab, hosts: list[str], urls: list[str]) -> float:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(hosts)) as pool:
        list(pool.map(lambda hu: lab.timed_get(hu[0], hu[1]), zip(hosts, urls, strict=True)))
    return time.perf_counter() - started


def start_nodes(cluster: Cluster, hosts: list[str], timeout: float = 30) -> None:
    """A daemon on each host (info logs, or $BENCH_LOG_LEVEL: debug shows each node's
    transfer plan decisions), then wait until each sees all the others."""
    level = os.environ.get("BENCH_LOG_LEVEL", "info")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda h: cluster.start(h, None, "--log-level", level), hosts))
    cluster.wait_connected(*hosts, timeout=timeout)


def warm_all(cluster: Cluster, host: str, repo: str, timeout: float = 1200) -> float:
    """Seconds for `modelpeer warm REPO --nodes all --wait` run on `host` (CLI start-up,
    resolve and listing included); raises unless every node got the repo."""
    started = time.perf_counter()
    out = cluster.lab.run(host, sys.executable, "-m", "modelpeer.client.cli", "--daemon",
                          cluster.nodes[host].url, "warm", repo, "--nodes", "all", "--wait",
                          "--json", timeout=timeout)
    seconds = time.perf_counter() - started
    if out.returncode != 0 or json.loads(out.stdout)["state"] != "done":
        raise RuntimeError(f"warm {repo} failed ({out.returncode}): {out.stderr[-2000:]}")
    return seconds


def run_size(n: int, size: int, wan: str, lan: str, work: Path) -> dict[str, float]:
    lab = Lab(n + 1, prefix=f"mpw{os.getpid() % 1000}{n}", lan=lan, wan=wan)
    hub = FakeHub(work / "hub", host=lab.ip("up"), cdn_host=lab.ip("up"), port=8080,
                  cdn_port=8081, prefix_cmd=lab.ns("up"), big_size=size)
    cluster = Cluster(lab, hub, work / f"n{n}")
    hosts = [f"h{i}" for i in range(1, n + 1)]
    nginx = None
    result: dict[str, float] = {}
    try:
        lab.up()
        hub.start(timeout=600)
        cdn = f"http://{lab.ip('up')}:8081"
        path = cdn_path(lab, hub)
        result["lower_bound"], _ = lab.timed_get("h1", cdn + path)
        result["direct"] = all_at_once(lab, hosts, [cdn + path] * n)
        nginx = nginx_cache(lab, f"h{n + 1}", work, cdn)
        result["nginx"] = all_at_once(lab, hosts, [f"http://{lab.ip(f'h{n + 1}')}:8090{path}"] * n)
        start_nodes(cluster, hosts)
        http_json("POST", hub.url + "/_fake/reset", {}, lab.ns("up"))
        result["modelpeer"] = warm_all(cluster, "h1", "acme/big")
        stats = http_json("GET", hub.url + "/_fake/stats", None, lab.ns("up"))
        result["cdn_ratio"] = stats["cdn_bytes"] / size
    finally:
        shutdown(nginx, cluster, hub, lab)
        shutil.rmtree(work / "cache", ignore_errors=True)
    return result


SERIES = [("lower_bound", "lower bound (one node alone)", "#8b949e"),
          ("modelpeer", "modelpeer warm", "#3fb950"), ("nginx", "nginx proxy_cache", "#58a6ff"),
          ("direct", "direct from upstream", "#d29922")]


def svg(results: dict[int, dict[str, float]], path: Path) -> None:
    """Grouped bars: per cluster size, the seconds of each way to warm it up."""
    left, right, top, bottom = 64, 624, 44, 316
    chart = Chart(640, 380, "warm-up time by cluster size")
    scale = Scale.fitted(0, max(r[k] for r in results.values() for k, _, _ in SERIES), bottom,
                         top)
    chart.y_axis(scale, left, right, "seconds")
    group = (right - left) / len(results)
    bar = group / (len(SERIES) + 1)
    for gi, (n, r) in enumerate(sorted(results.items())):
        x0 = left + gi * group + bar / 2
        chart.text(x0 + len(SERIES) * bar / 2, bottom + 18, f"{n} nodes", anchor="middle")
        for si, (key, name, color) in enumerate(SERIES):
            chart.bar(x0 + si * bar, bar - 2, scale, r[key], color=color, label=f"{r[key]:.0f}",
                      kind=key, tip=f"{n} nodes, {name}: {r[key]:.1f} s")
    chart.legend(16, bottom + 48, [("box", color, name) for _, name, color in SERIES])
    chart.write(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--wan", default="400mbit")
    ap.add_argument("--lan", default="1gbit")
    ap.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--plot", default=str(Path(__file__).resolve().parent.parent / "docs" /
                                          "warmup.svg"))
    args = ap.parse_args()
    if reason := netlab_available():
        sys.exit(f"bench_warm: {reason}")
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="mp-benchwarm-"))
    os.chmod(work, 0o755)
    results = {}
    try:
        for n in args.nodes:
            results[n] = run_size(n, size, args.wan, args.lan, work)
            print(n, results[n], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{size / 2**20:.0f} MiB file, WAN {args.wan}, LAN {args.lan} per host\n")
    print("| nodes | lower bound s | modelpeer warm s | ratio to bound | upstream bytes / size "
          "| nginx proxy_cache s | direct s |\n|---|---|---|---|---|---|---|")
    for n, r in sorted(results.items()):
        print(f"| {n} | {r['lower_bound']:.1f} | {r['modelpeer']:.1f} | "
              f"{r['modelpeer'] / r['lower_bound']:.2f} | {r['cdn_ratio']:.3f} | "
              f"{r['nginx']:.1f} | {r['direct']:.1f} |")
    svg(results, Path(args.plot))
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()

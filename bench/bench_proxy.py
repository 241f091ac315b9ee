"""Single-node benchmark: a cold download through modelpeerd vs the same download straight from
the (fake) Hub and its CDN, and a cache hit vs nginx serving the same file, in one run.

    python bench/bench_proxy.py --size 2GiB [--runs 3]

Prints a Markdown table of times, rates and ratios (what goes into docs/benchmarks.md).
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
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelpeer.daemon.config import parse_size  # noqa: E402
from tests.fakehub import FakeHub  # noqa: E402
from tests.harness import Modelpeerd, free_port  # noqa: E402

REPO = "acme/big"
FILE = "big.bin"
BLOCK = 1024 * 1024


def timed_get(url: str) -> tuple[float, str]:
    """Seconds to read the whole body, and its sha256 (the reader hashes, like a client)."""
    h = hashlib.sha256()
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as resp:
        while data := resp.read(BLOCK):
            h.update(data)
    return time.perf_counter() - started, h.hexdigest()


def nginx_serving(root: Path, work: Path, prefix_cmd: list[str] | None = None,
                  host: str = "127.0.0.1") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    conf = work / "nginx.conf"
    user = "user root root;" if os.geteuid() == 0 else ""  # workers must read our temp dir
    conf.write_text(f"""
{user} worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 64; }}
http {{
  access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  server {{ listen {host}:{port}; root {root}; }}
}}""")
    proc = subprocess.Popen([*(prefix_cmd or []), "nginx", "-c", str(conf)],
                            stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"http://{host}:{port}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="mp-bench-"))
    hub = FakeHub(work / "hub", big_size=size)
    hub.start()
    rows: dict[str, list[float]] = {k: [] for k in ("direct", "cold", "hit", "nginx")}
    digest = ""
    try:
        for run in range(args.runs):
            d = Modelpeerd(work / f"cache{run}", hub.url)
            d.extra = ["--log-level", "warning"]
            d.start()
            try:
                t, digest = timed_get(f"{hub.url}/{REPO}/resolve/main/{FILE}")
                rows["direct"].append(t)
                t, got = timed_get(f"{d.url}/{REPO}/resolve/main/{FILE}")
                assert got == digest, "cold download through the proxy differs"
                rows["cold"].append(t)
                t, got = timed_get(f"{d.url}/{REPO}/resolve/main/{FILE}")
                assert got == digest
                rows["hit"].append(t)
            finally:
                d.stop()
            shutil.rmtree(work / f"cache{run}", ignore_errors=True)
        if shutil.which("nginx"):
            src = _big_file(work / "hub", size)
            www = work / "www"
            www.mkdir()
            (www / FILE).symlink_to(src)
            proc, url = nginx_serving(www, work)
            try:
                for _ in range(args.runs):
                    t, got = timed_get(f"{url}/{FILE}")
                    assert got == digest
                    rows["nginx"].append(t)
            finally:
                proc.terminate()
                proc.wait()
    finally:
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(size, rows)


def _big_file(root: Path, size: int) -> Path:
    return next(p for p in root.rglob("*") if p.is_file() and p.stat().st_size == size)


def report(size: int, rows: dict[str, list[float]]) -> None:
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    mb = size / 1e6
    print(f"\n{size / 2**30:.2f} GiB file, median of {len(rows['cold'])} runs, loopback\n")
    print("| what | seconds | MB/s |\n|---|---|---|")
    for k, label in (("direct", "direct from the fake Hub + CDN (baseline)"),
                     ("cold", "cold, through modelpeerd"),
                     ("hit", "cache hit, through modelpeerd"),
                     ("nginx", "nginx serving the same file (baseline)")):
        if k in med:
            print(f"| {label} | {med[k]:.2f} | {mb / med[k]:.0f} |")
    print("\n| ratio | value |\n|---|---|")
    print(f"| cold through proxy / direct (time) | {med['cold'] / med['direct']:.2f} |")
    if "nginx" in med:
        print(f"| cache hit / nginx (time) | {med['hit'] / med['nginx']:.2f} |")


if __name__ == "__main__":
    main()

"""Peer-to-peer throughput between two nodes on a shaped LAN link, against a plain HTTP
transfer (nginx) of the same bytes over the same link, in the same run. Needs root (the lab
in tests/netlab.py).

    python bench/bench_lan.py --size 1GiB --lan 1gbit    (--lan none: veth at full speed)

Node h1 first gets the file from the (unshaped) upstream; then h2's client reads it through
h2's modelpeerd, which gets it from h1 over BitTorrent. The daemons' CPU time is read from /proc.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_proxy import cpu_seconds, nginx_serving  # noqa: E402
from modelpeer.daemon.config import parse_size  # noqa: E402
from tests.fakehub import FakeHub  # noqa: E402
from tests.harness import wait_for  # noqa: E402
from tests.netlab import Cluster, Lab, netlab_available  # noqa: E402


def shutdown(nginx: subprocess.Popen[bytes] | None, cluster: Cluster, hub: FakeHub,
             lab: Lab) -> None:
    """Stop everything a lab benchmark started, the lab itself last."""
    if nginx is not None:
        nginx.terminate()
        nginx.wait()
    cluster.stop()
    hub.stop()
    lab.down()


def rate_bits(text: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, f in units.items():
        if text.endswith(u):
            return float(text[: -len(u)]) * f
    return float(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--lan", default="1gbit", help="egress rate per host, or none")
    args = ap.parse_args()
    lan = "" if args.lan == "none" else args.lan
    if reason := netlab_available():
        sys.exit(f"bench_lan: {reason}")
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="mp-benchlan-"))
    os.chmod(work, 0o755)
    lab = Lab(2, prefix=f"mpb{os.getpid() % 10000}", lan=lan)
    hub = FakeHub(work / "hub", host=lab.ip("up"), cdn_host=lab.ip("up"), port=8080,
                  cdn_port=8081, prefix_cmd=lab.ns("up"), big_size=size)
    cluster = Cluster(lab, hub, work)
    nginx = None
    try:
        lab.up()
        hub.start(timeout=600)
        for h in ("h1", "h2"):
            cluster.start(h, None, "--chunk-size", "64MiB", "--log-level", "info")
        cluster.wait_connected("h1", "h2")
        url = "/acme/big/resolve/main/big.bin"
        pids = {h: d.proc.pid for h, d in cluster.nodes.items() if d.proc is not None}
        cpu_before = cpu_seconds(pids["h1"])
        t_up, digest = lab.timed_get("h1", cluster.nodes["h1"].url + url)
        cpu_up = cpu_seconds(pids["h1"]) - cpu_before
        chunks = -(-size // (64 * 1024 * 1024))
        wait_for(lambda: any(
            p["name"] == "h1" and p["chunks_held"] >= chunks for p in cluster.peers("h2")),
                 "h1 seeds every chunk", timeout=120)
        cpu_before = cpu_seconds(pids["h2"])
        t_p2p, got = lab.timed_get("h2", cluster.nodes["h2"].url + url)
        cpu_p2p = cpu_seconds(pids["h2"]) - cpu_before
        assert got == digest, "h2 got different bytes"
        served = cluster.nodes["h2"].status()["served_bytes"]
        blob = next(p for p in (work / "hub" / "blobs").iterdir() if p.stat().st_size == size)
        www = work / "www"
        www.mkdir()
        os.link(blob, www / "big.bin")
        nginx, base = nginx_serving(www, work, lab.ns("h1"), lab.ip("h1"))
        t_http, got = lab.timed_get("h2", base + "/big.bin")
        assert got == digest
    finally:
        shutdown(nginx, cluster, hub, lab)
        shutil.rmtree(work, ignore_errors=True)
    gib = size / 2**30
    print(f"\n{gib:.2f} GiB, LAN {f'shaped to {lan}' if lan else 'unshaped'} per host "
          "egress\n")
    print("| what | seconds | MB/s | of link rate | receiving daemon CPU s/GiB |\n"
          "|---|---|---|---|---|")
    for label, t, cpu in (("h1 from upstream (unshaped WAN), through modelpeerd", t_up, cpu_up),
                          ("h2 from h1 over BitTorrent, through modelpeerd", t_p2p, cpu_p2p),
                          ("plain HTTP h1 → h2 (nginx, baseline)", t_http, None)):
        share = f"{size / t / (rate_bits(lan) / 8):.0%}" if lan else ""
        cpu_text = f"{cpu / gib:.2f}" if cpu is not None else ""
        print(f"| {label} | {t:.2f} | {size / t / 1e6:.0f} | {share} | {cpu_text} |")
    print(f"\n| ratio | value |\n|---|---|\n| P2P / plain HTTP (rate) | {t_http / t_p2p:.2f} |")
    print(f"| bytes h2 served from peers | {served['peer']} of {size} |")


if __name__ == "__main__":
    main()

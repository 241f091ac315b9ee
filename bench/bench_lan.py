"""Peer-to-peer throughput between two nodes on a shaped LAN link, against a plain HTTP
transfer (nginx) of the same bytes over the same link, in the same run. Needs root (the lab
in tests/netlab.py).

    python bench/bench_lan.py --size 1GiB --lan 1gbit    (--lan none: veth at full speed)
    python bench/bench_lan.py --mode relay --lan none --runs 3 [--old-code DIR]

`--mode bt` (the default): node h1 first gets the file from the (unshaped) upstream; then h2's
client reads it through h2's modelpeerd, which gets it from h1 over BitTorrent.

`--mode relay`: h1 gets the file from the upstream (its CDN paced to AHEAD_RATE per
connection); once it holds RELAY_AHEAD of it, the CDN slows to a trickle (h1 stays a transfer
in progress) and h2's client asks h2 for it: h2 relays
what h1 holds from h1 over the peer API, at the relay's own speed. Reported: the rate at which
h2's client gets the bytes h1 held (from RELAY_FROM on: the first bytes may come from h2's
probe of the upstream), and h2's daemon CPU over them. The chunk size is the blob's size, so
no complete chunk goes over BitTorrent instead. `--old-code DIR` runs both daemons from
DIR/modelpeer/daemon in every other run (as bench_proxy.py), alternately first.

The daemons' CPU time is read from /proc.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_proxy import cpu_seconds, nginx_serving  # noqa: E402
from modelpeer.daemon.config import parse_size  # noqa: E402
from tests.fakehub import FakeHub  # noqa: E402
from tests.harness import ROOT, wait_for  # noqa: E402
from tests.netlab import Cluster, Lab, netlab_available  # noqa: E402

URL = "/acme/big/resolve/main/big.bin"
MIB = 1024 * 1024
RELAY_AHEAD = 0.8  # h2 starts once h1 holds this share of the blob
RELAY_FROM = 64 * MIB  # the relay's rate is measured from this byte of h2's client on
AHEAD_RATE = 25_000_000  # B/s per CDN connection while h1 gets ahead: h2 asks before h1 is done
TRICKLE = 1_000_000  # B/s per CDN connection while h2 relays: h1 stays ahead, in progress
MARK_EVERY = 16 * MIB
PY_SPY = Path(sys.executable).with_name("py-spy")

# A GET timed inside a host, the body hashed as a client would; every MARK_EVERY bytes the
# time and the CPU seconds of process PID. "reached" on stdout once UNTIL bytes came, JSON at
# the end.
TIMELINE_GET = """
import hashlib, json, sys, time, urllib.request
from bench.bench_proxy import cpu_seconds
url, pid, every, until = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
started, digest, got, marks = time.perf_counter(), hashlib.sha256(), 0, []
with opener.open(url, timeout=900) as resp:
    while data := resp.read(1 << 20):
        digest.update(data)
        got += len(data)
        if got % every < len(data):
            marks.append((got, time.perf_counter() - started, cpu_seconds(pid)))
        if got >= until > got - len(data):
            print("reached", flush=True)
print(json.dumps({"seconds": time.perf_counter() - started, "digest": digest.hexdigest(),
                  "marks": marks}))
"""


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


@dataclasses.dataclass
class RelayRun:
    code: str  # "new", or "old" for --old-code
    relayed: int  # bytes h2's client got from RELAY_FROM to what h1 held when it asked
    seconds: float  # ... and how long they took
    cpu: float  # h2's daemon CPU seconds meanwhile
    upstream: int  # bytes h2 read from the upstream itself
    relays: list[str]  # h2's log lines about relays from h1

    @property
    def rate(self) -> float:
        return self.relayed / self.seconds

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu / (self.relayed / 2**30)


def timeline_get(lab: Lab, host: str, url: str, pid: int, until: int,
                 reached: Callable[[], None]) -> dict[str, object]:
    """TIMELINE_GET run inside `host`; reached() once `until` bytes came. Nothing polls the
    daemon meanwhile (its status answer costs it CPU)."""
    proc = subprocess.Popen([*lab.ns(host), sys.executable, "-c", TIMELINE_GET, url, str(pid),
                             str(MARK_EVERY), str(until)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() == "reached":
            reached()
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"GET {url} from {host} failed: {err[-2000:]}")
    result: dict[str, object] = json.loads(out)
    return result


def available(cluster: Cluster, host: str) -> int:
    """How much of the blob `host`'s running transfer holds (0: none running)."""
    transfers = cluster.nodes[host].status()["transfers"]
    return max((int(t["available"]) for t in transfers), default=0)


def relay_run(lab: Lab, hub: FakeHub, work: Path, size: int, code: str,
              env: dict[str, str] | None, profile: Path | None) -> tuple[RelayRun, str]:
    """One relay measurement with fresh daemons; the run and the digest h2's client got.
    With `profile`, py-spy samples h2's daemon while it relays, into that file (collapsed
    stacks)."""
    # what the runs before wrote is on disk before this one begins, and their caches are gone
    # (below): with them the runs after the first relayed at half the rate (docs/benchmarks.md,
    # issue 15, session 11)
    os.sync()
    cluster = Cluster(lab, hub, work)
    try:
        for h in ("h1", "h2"):
            cluster.start(h, None, "--chunk-size", f"{-(-size // MIB)}MiB", "--log-level",
                          "info", env=env)
        cluster.wait_connected("h1", "h2")
        h1, h2 = cluster.nodes["h1"], cluster.nodes["h2"]
        assert h2.proc is not None
        hub.faults(cdn_rate=AHEAD_RATE)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(lab.timed_get, "h1", h1.url + URL)
            wait_for(lambda: available(cluster, "h1") >= size * RELAY_AHEAD,
                     "h1 holds most of the blob", timeout=300)
            hub.faults(cdn_rate=TRICKLE)
            held = available(cluster, "h1")
            assert held < size, "h1 got the whole blob before h2 asked: lower AHEAD_RATE"
            with sampled(h2.proc.pid, profile) as stop_sampling:
                def reached() -> None:  # h2 relayed what h1 held: let h1 finish
                    stop_sampling()
                    hub.faults(cdn_rate=0)

                got = timeline_get(lab, "h2", h2.url + URL, h2.proc.pid, held, reached)
            _, digest = first.result()
        assert got["digest"] == digest, "h2 got different bytes"
        marks = got["marks"]
        assert isinstance(marks, list)
        lo = next(m for m in marks if m[0] >= RELAY_FROM)
        hi = max((m for m in marks if m[0] <= held), key=lambda m: m[0])
        run = RelayRun(code, hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2],
                       int(h2.status()["upstream_bytes"]),
                       [line for line in h2.logged().splitlines() if "relayed " in line])
        return run, digest
    except BaseException:
        for h, d in cluster.nodes.items():
            print(f"--- {h}'s log, the end:\n{d.log()}", file=sys.stderr)
        raise
    finally:
        cluster.stop()
        hub.faults(cdn_rate=0)
        shutil.rmtree(work, ignore_errors=True)  # the two caches: 2 GiB


@contextlib.contextmanager
def sampled(pid: int, profile: Path | None) -> Iterator[Callable[[], None]]:
    """py-spy recording process `pid` (threads apart, native frames) into `profile` until
    the function given is called, or at the end; nothing without a profile."""
    if profile is None:
        yield lambda: None
        return
    spy = subprocess.Popen([str(PY_SPY), "record", "-r", "250",
                            "-f", "raw", "-t", "-n", "-p", str(pid), "-o", str(profile)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)

    try:
        yield stop
    finally:
        stop()


def relay_main(lab: Lab, hub: FakeHub, work: Path, size: int, runs: int,
               old_code: str | None, profile: Path | None) -> None:
    """--mode relay: `runs` runs (of old and new code, alternately first, with --old-code),
    then the nginx baseline over the same link."""
    results: list[RelayRun] = []
    digest = ""
    for i in range(runs):
        codes = [("new", None)]
        if old_code is not None:
            codes.insert(i % 2, ("old", {"PYTHONPATH": old_code}))
        for code, env in codes:
            run, digest = relay_run(
                lab, hub, work / f"run{i}-{code}", size, code, env,
                None if profile is None else profile.with_name(f"{profile.name}-{i}-{code}"))
            print(f"run {i + 1} {code}: {run.relayed / MIB:.0f} MiB relayed in "
                  f"{run.seconds:.2f}s, {run.rate / 1e6:.0f} MB/s, h2 CPU "
                  f"{run.cpu_per_gib:.2f} s/GiB, h2 from upstream {run.upstream} bytes, "
                  f"{len(run.relays)} relay log lines", flush=True)
            print("\n".join(run.relays), file=sys.stderr)
            results.append(run)
    t_http = nginx_baseline(lab, hub, work, size, digest)
    print(f"\n{size / 2**30:.2f} GiB, LAN {lab.lan or 'unshaped'}, h2 starts when h1 holds "
          f"{RELAY_AHEAD:.0%}; the relay's rate over h2's bytes {RELAY_FROM // MIB} MiB to "
          "what h1 held\n")
    print("| what | runs | MB/s worst (median) | MB/s each | h2 daemon CPU s/GiB worst "
          "(each) |\n|---|---|---|---|---|")
    for code in ("old", "new"):
        mine = [r for r in results if r.code == code]
        if mine:
            rates = [r.rate / 1e6 for r in mine]
            cpus = [r.cpu_per_gib for r in mine]
            print(f"| relay h1 → h2, {code} code | {len(mine)} | {min(rates):.0f} "
                  f"({statistics.median(rates):.0f}) | {' '.join(f'{x:.0f}' for x in rates)} "
                  f"| {max(cpus):.2f} ({' '.join(f'{x:.2f}' for x in cpus)}) |")
    print(f"| plain HTTP h1 → h2 (nginx, baseline) | 1 | {size / t_http / 1e6:.0f} | | |")
    old = [r for r in results if r.code == "old"]
    if old:
        new = [r for r in results if r.code == "new"]
        pairs = list(zip(new, old, strict=True))
        rates = " ".join(f"{n.rate / o.rate:.2f}" for n, o in pairs)
        cpus = " ".join(f"{n.cpu_per_gib / o.cpu_per_gib:.2f}" for n, o in pairs)
        print(f"\nwithin each run, new / old: rate {rates}; CPU per GiB {cpus}")


def nginx_baseline(lab: Lab, hub: FakeHub, work: Path, size: int, digest: str) -> float:
    """Seconds for h2 to GET the file from nginx on h1, over the same link."""
    blob = next(p for p in (hub.data_dir / "blobs").iterdir() if p.stat().st_size == size)
    www = work / "www"
    www.mkdir()
    os.link(blob, www / "big.bin")
    nginx, base = nginx_serving(www, work, lab.ns("h1"), lab.ip("h1"))
    try:
        t_http, got = lab.timed_get("h2", base + "/big.bin")
    finally:
        nginx.terminate()
        nginx.wait()
    assert got == digest, "nginx's bytes differ from the daemons'"
    return t_http


def bt_main(lab: Lab, hub: FakeHub, work: Path, size: int) -> None:
    """--mode bt: h2 gets the file h1 holds whole over BitTorrent; nginx over the same link."""
    cluster = Cluster(lab, hub, work)
    try:
        for h in ("h1", "h2"):
            cluster.start(h, None, "--chunk-size", "64MiB", "--log-level", "info")
        cluster.wait_connected("h1", "h2")
        pids = {h: d.proc.pid for h, d in cluster.nodes.items() if d.proc is not None}
        cpu_before = cpu_seconds(pids["h1"])
        t_up, digest = lab.timed_get("h1", cluster.nodes["h1"].url + URL)
        cpu_up = cpu_seconds(pids["h1"]) - cpu_before
        chunks = -(-size // (64 * MIB))
        wait_for(lambda: any(
            p["name"] == "h1" and p["chunks_held"] >= chunks for p in cluster.peers("h2")),
                 "h1 seeds every chunk", timeout=120)
        cpu_before = cpu_seconds(pids["h2"])
        t_p2p, got = lab.timed_get("h2", cluster.nodes["h2"].url + URL)
        cpu_p2p = cpu_seconds(pids["h2"]) - cpu_before
        assert got == digest, "h2 got different bytes"
        served = cluster.nodes["h2"].status()["served_bytes"]
    finally:
        cluster.stop()
    t_http = nginx_baseline(lab, hub, work, size, digest)
    lan = lab.lan
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--lan", default="1gbit", help="egress rate per host, or none")
    ap.add_argument("--mode", choices=("bt", "relay"), default="bt")
    ap.add_argument("--runs", type=int, default=1, help="relay runs (--mode relay)")
    ap.add_argument("--old-code", metavar="DIR",
                    help="--mode relay: also run the daemons from DIR/modelpeer/daemon in each "
                         "run, alternately first (see bench_proxy.py)")
    ap.add_argument("--profile", type=Path, metavar="PATH",
                    help="--mode relay: py-spy samples h2's daemon while it relays, into "
                         "PATH-RUN-CODE (collapsed stacks; py-spy next to this Python)")
    args = ap.parse_args()
    if reason := netlab_available():
        sys.exit(f"bench_lan: {reason}")
    if args.profile is not None and not PY_SPY.exists():
        sys.exit(f"bench_lan: --profile needs {PY_SPY} (pip install py-spy into this venv)")
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="mp-benchlan-"))
    os.chmod(work, 0o755)
    lab = Lab(2, prefix=f"mpb{os.getpid() % 10000}", lan="" if args.lan == "none" else args.lan)
    hub = FakeHub(work / "hub", host=lab.ip("up"), cdn_host=lab.ip("up"), port=8080,
                  cdn_port=8081, prefix_cmd=lab.ns("up"), big_size=size)
    try:
        lab.up()
        hub.start(timeout=600)
        if args.mode == "relay":
            relay_main(lab, hub, work, size, args.runs, args.old_code, args.profile)
        else:
            bt_main(lab, hub, work, size)
    finally:
        hub.stop()
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The project's network lab: a LAN of network namespaces for multi-node tests and benchmarks,
built with iproute2 (root only), and ways to reach the hosts in it.

Hosts h1..hN at 198.18.0.1..N/24 and the upstream host "up" at 198.18.0.254, each in namespace
<prefix>-<host> with one veth (eth0) whose other end is a port of bridge br0 in namespace
<prefix>-sw. The bridge lives in its own namespace, so every request to a host runs inside one
of the lab's namespaces. 198.18.0.0/15 is reserved for network benchmarks (RFC 2544).

    python3 -m tests.netlab up 4 --prefix mp --lan 1gbit --wan 400mbit
    python3 -m tests.netlab exec --prefix mp h1 ip addr
    python3 -m tests.netlab down --prefix mp
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.fakehub import MODEL, FakeHub
from tests.harness import ROOT, Modelpeerd, download, http_json, snapshot, wait_for
from tests.netlab_capture import BRIDGE

SUBNET = "198.18.0"
UPSTREAM = "up"
SWITCH = "sw"
MAX_HOSTS = 253  # .254 is the upstream host
PCAP_HEADER = struct.Struct("<IHHiIII")
PCAP_RECORD = struct.Struct("<IIII")

# A GET timed inside a host, the body hashed as a client would: "SECONDS SHA256" on stdout.
TIMED_GET = """
import hashlib, sys, time, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
started, digest = time.perf_counter(), hashlib.sha256()
with opener.open(sys.argv[1], timeout=float(sys.argv[2])) as resp:
    while data := resp.read(1 << 20):
        digest.update(data)
print(time.perf_counter() - started, digest.hexdigest())
"""


def netlab_available() -> str:
    """'' when multi-node tests can run here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True)
    if probe.returncode != 0:
        return "ip netns does not work here"
    return ""


class LabError(RuntimeError):
    pass


def run_checked(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")


def host_namespace(prefix: str, host: str) -> str:
    return f"{prefix}-{host}"


def lab_namespaces(prefix: str) -> list[str]:
    """The namespaces of the lab `prefix` (not those of a lab whose prefix merely starts so)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = (line.split()[0] for line in listing.stdout.splitlines() if line.strip())
    own = re.compile(rf"{re.escape(prefix)}-({SWITCH}|{UPSTREAM}|h\d+)")
    return sorted(n for n in names if own.fullmatch(n))


def remove_lab(prefix: str) -> None:
    for namespace in lab_namespaces(prefix):
        run_checked("ip", "netns", "del", namespace)


def limit_egress(namespace: str, dev: str, rate: str) -> None:
    run_checked("tc", "-n", namespace, "qdisc", "replace", "dev", dev, "root",
                "tbf", "rate", rate, "burst", "1mb", "latency", "100ms")


@dataclass
class Capture:
    """The frames that entered the bridge while `Lab.capture()` was open (pcap at `path`)."""

    path: Path
    frames: int = 0
    data: bytes = b""  # the frames, concatenated
    dropped: int = 0  # frames the kernel could not queue for the capture: data is incomplete


def read_pcap(path: Path) -> list[bytes]:
    raw = path.read_bytes()
    frames: list[bytes] = []
    at = PCAP_HEADER.size
    while at < len(raw):
        *_, caplen, _ = PCAP_RECORD.unpack_from(raw, at)
        at += PCAP_RECORD.size
        frames.append(raw[at:at + caplen])
        at += caplen
    return frames


class Lab:
    def __init__(self, hosts: int, prefix: str, lan: str = "", wan: str = "") -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be 1..{MAX_HOSTS}, not {hosts}")
        self.hosts = hosts
        self.prefix = prefix
        self.lan = lan
        self.wan = wan

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    def up(self) -> Lab:
        """Build the lab, replacing a leftover one of the same prefix; all or nothing."""
        self.down()
        try:
            self.add_switch()
            for i in range(1, self.hosts + 1):
                self.add_host(f"h{i}", self.lan)
            self.add_host(UPSTREAM, self.wan)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        remove_lab(self.prefix)

    def namespace(self, host: str) -> str:
        return host_namespace(self.prefix, host)

    def add_switch(self) -> None:
        sw = self.namespace(SWITCH)
        run_checked("ip", "netns", "add", sw)
        run_checked("ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
        run_checked("ip", "-n", sw, "link", "set", BRIDGE, "up")

    def add_host(self, host: str, rate: str) -> None:
        """A namespace whose eth0 is wired to the bridge port named after the host."""
        ns, sw = self.namespace(host), self.namespace(SWITCH)
        run_checked("ip", "netns", "add", ns)
        # "dev"/"name" spelled out: the port of host "up" would otherwise read as a keyword.
        run_checked("ip", "-n", sw, "link", "add", "name", host, "type", "veth",
                    "peer", "name", "eth0", "netns", ns)
        run_checked("ip", "-n", sw, "link", "set", "dev", host, "master", BRIDGE, "up")
        run_checked("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
        run_checked("ip", "-n", ns, "link", "set", "eth0", "up")
        run_checked("ip", "-n", ns, "link", "set", "lo", "up")
        # Multicast (mDNS) has no route of its own on a host without a default route.
        run_checked("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        if rate:
            limit_egress(ns, "eth0", rate)

    def shape(self, host: str, rate: str) -> None:
        """Limit what `host` sends (its eth0) and what it receives (its port's egress)."""
        limit_egress(self.namespace(host), "eth0", rate)
        limit_egress(self.namespace(SWITCH), host, rate)

    @contextlib.contextmanager
    def capture(self, pcap: Path | None = None) -> Iterator[Capture]:
        """Record every frame entering the bridge while open; the Capture is filled on exit.
        The pcap file is kept only when `pcap` is given."""
        with tempfile.TemporaryDirectory(prefix="netlab-capture-") as tmp:
            cap = Capture(pcap or Path(tmp) / "capture.pcap")
            proc = self.start_capture(cap.path)
            try:
                yield cap
            finally:
                proc.send_signal(signal.SIGTERM)
                out, err = proc.communicate(timeout=30)
            if proc.returncode != 0:
                raise LabError(f"capture failed ({proc.returncode}): {err.strip()}")
            frames = read_pcap(cap.path)
            cap.frames, cap.data = len(frames), b"".join(frames)
            cap.dropped = int(out.split()[-1])

    def start_capture(self, path: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*self.ns(SWITCH), sys.executable, "-m", "tests.netlab_capture", str(path)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stderr is not None
        if proc.stdout.readline().strip() != "ready":
            proc.kill()
            proc.wait()
            raise LabError(f"capture did not start: {proc.stderr.read().strip()}")
        return proc

    def ns(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(host)]

    @staticmethod
    def ip(host: str) -> str:
        if host == UPSTREAM:
            return f"{SUBNET}.254"
        if not re.fullmatch(r"h\d+", host):
            raise ValueError(f"unknown host {host!r} (h1, h2, ..., {UPSTREAM})")
        return f"{SUBNET}.{host.removeprefix('h')}"

    def get_json(self, host: str, url: str, timeout: float = 10) -> Any:
        return http_json("GET", url, prefix_cmd=self.ns(host), timeout=timeout)

    def run(self, host: str, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.ns(host), *cmd], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def timed_get(self, host: str, url: str, timeout: float = 900) -> tuple[float, str]:
        """(seconds, sha256) of a GET of `url` from inside `host`."""
        out = self.run(host, sys.executable, "-c", TIMED_GET, url, str(timeout),
                       timeout=timeout + 30)
        if out.returncode != 0:
            raise LabError(f"GET {url} from {host} failed: {out.stderr[-2000:]}")
        seconds, digest = out.stdout.split()
        return float(seconds), digest


def write_key(path: Path) -> Path:
    from modelpeer.daemon.keyfile import new_key_file

    new_key_file(path)
    return path


class Cluster:
    def __init__(self, lab: Lab, hub: FakeHub, tmp: Path) -> None:
        self.lab = lab
        self.hub = hub
        self.tmp = tmp
        self.key = write_key(tmp / "cluster.key")
        self.nodes: dict[str, Modelpeerd] = {}

    def start(self, host: str, key: Path | None = None, *extra: str,
              env: dict[str, str] | None = None) -> Modelpeerd:
        ip = self.lab.ip(host)
        d = Modelpeerd(self.tmp / f"cache-{host}", self.hub.url, host=ip, port=6580,
                       prefix_cmd=self.lab.ns(host), env=env,
                       getter=lambda url: self.lab.get_json(host, url),
                       extra=["--chunk-size", "8MiB", "--interface", ip,
                              "--cluster-key-file", str(key or self.key),
                              "--peer-listen", f"{ip}:6581", "--bt-listen", f"{ip}:6582",
                              "--node-name", host, *extra], peers=True)
        self.nodes[host] = d
        return d.start()

    def start_all(self, *hosts: str) -> None:
        """A daemon with the defaults on each host, then wait until each sees the others."""
        for h in hosts:
            self.start(h)
        self.wait_connected(*hosts)

    def wait_connected(self, *hosts: str, timeout: float = 30) -> None:
        """Until each of `hosts` sees every other one live."""
        for h in hosts:
            others = set(hosts) - {h}
            wait_for(lambda h=h, o=others: self.live_names(h) >= o,
                     f"{h} sees {', '.join(sorted(others))}", timeout=timeout)

    def peers(self, host: str) -> list[dict[str, object]]:
        d = self.nodes[host]
        return self.lab.get_json(host, d.url + "/_modelpeer/v1/peers")["peers"]

    def live_names(self, host: str) -> set[str]:
        return {str(p["name"]) for p in self.peers(host) if p["alive"]}

    def snapshot(self, host: str, repo: str = MODEL) -> dict[str, bytes]:
        """The repo as the real Hub client on `host` gets it, into a fresh HF cache."""
        return snapshot(self.nodes[host], self._new_hf_home(host), repo,
                        prefix_cmd=self.lab.ns(host))

    def download(self, host: str, repo: str, filename: str, timeout: float = 180) -> bytes:
        """One file as the real Hub client on `host` gets it, into a fresh HF cache."""
        return download(self.nodes[host], self._new_hf_home(host), repo, filename,
                        prefix_cmd=self.lab.ns(host), timeout=timeout)

    def _new_hf_home(self, host: str) -> Path:
        home = self.tmp / f"hf-{host}-{time.monotonic_ns()}"
        home.mkdir()
        return home

    def cli(self, host: str, *args: str) -> subprocess.CompletedProcess[str]:
        """The `modelpeer` CLI on `host`, talking to that host's daemon."""
        return self.lab.run(host, sys.executable, "-m", "modelpeer.client.cli", "--daemon",
                            self.nodes[host].url, *args, timeout=300)

    def stop(self) -> None:
        for d in self.nodes.values():
            d.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m tests.netlab",
                                     description="The project's network lab (root).")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a lab of N hosts plus the upstream host")
    up.add_argument("hosts", type=int)
    up.add_argument("--lan", default="", help="shape each host's egress, e.g. 1gbit")
    up.add_argument("--wan", default="", help="shape the upstream host's egress, e.g. 400mbit")
    down = sub.add_parser("down", help="remove every namespace of the lab")
    run = sub.add_parser("exec", help="run a command inside a host (h1, h2, ..., up)")
    run.add_argument("host")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    for p in (up, down, run):
        p.add_argument("--prefix", default="mp")
    args = parser.parse_args(argv)
    if args.command == "up":
        try:
            Lab(args.hosts, args.prefix, lan=args.lan, wan=args.wan).up()
        except LabError as e:
            sys.exit(f"netlab: {e}")
        print(f"netlab: {args.hosts} hosts up (prefix {args.prefix}), "
              f"upstream at {Lab.ip(UPSTREAM)}")
    elif args.command == "down":
        remove_lab(args.prefix)
    else:
        cmd = ["ip", "netns", "exec", host_namespace(args.prefix, args.host),
               *(args.cmd or ["bash"])]
        os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()

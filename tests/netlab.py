"""A LAN of network namespaces for multi-node tests (../shared/netlab/netlab), and ways to
reach the hosts in it: the bridge lives in its own namespace, so every request to a host runs
inside one of the lab's namespaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.fakehub import FakeHub, http_json
from tests.harness import ROOT, Modelpeerd, hf_client, tree_bytes

NETLAB = ROOT.parent / "shared" / "netlab" / "netlab"


def netlab_available() -> str:
    """'' when multi-node tests can run here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not NETLAB.exists():
        return f"{NETLAB} is missing"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True)
    if probe.returncode != 0:
        return "ip netns does not work here"
    return ""


class Lab:
    def __init__(self, hosts: int, prefix: str, lan: str = "", wan: str = "") -> None:
        self.hosts = hosts
        self.prefix = prefix
        self.lan = lan
        self.wan = wan

    def up(self) -> Lab:
        self.down()
        cmd = [str(NETLAB), "up", str(self.hosts), "--prefix", self.prefix]
        if self.lan:
            cmd += ["--lan", self.lan]
        if self.wan:
            cmd += ["--wan", self.wan]
        subprocess.run(cmd, check=True, capture_output=True)
        return self

    def down(self) -> None:
        subprocess.run([str(NETLAB), "down", "--prefix", self.prefix], capture_output=True)

    def ns(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", f"{self.prefix}-{host}"]

    @staticmethod
    def ip(host: str) -> str:
        return "198.18.0.254" if host == "up" else f"198.18.0.{host.removeprefix('h')}"

    def get_json(self, host: str, url: str, timeout: float = 10) -> Any:
        return http_json("GET", url, prefix_cmd=self.ns(host), timeout=timeout)

    def run(self, host: str, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.ns(host), *cmd], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def wait_for(self, what: str, check: Any, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
                if last:
                    return last
            except OSError as e:
                last = e
            time.sleep(0.3)
        raise TimeoutError(f"{what}: not true after {timeout}s (last: {last})")


def write_key(path: Path) -> Path:
    from modelpeer.daemon.cluster import new_key_file

    new_key_file(path)
    return path


class Cluster:
    def __init__(self, lab: Lab, hub: FakeHub, tmp: Path) -> None:
        self.lab = lab
        self.hub = hub
        self.tmp = tmp
        self.key = write_key(tmp / "cluster.key")
        self.nodes: dict[str, Modelpeerd] = {}

    def start(self, host: str, key: Path | None = None, *extra: str) -> Modelpeerd:
        ip = self.lab.ip(host)
        d = Modelpeerd(self.tmp / f"cache-{host}", self.hub.url, host=ip, port=6580,
                       prefix_cmd=self.lab.ns(host),
                       getter=lambda url: self.lab.get_json(host, url),
                       extra=["--chunk-size", "8MiB", "--interface", ip,
                              "--cluster-key-file", str(key or self.key),
                              "--peer-listen", f"{ip}:6581", "--bt-listen", f"{ip}:6582",
                              "--node-name", host, *extra], peers=True)
        self.nodes[host] = d
        return d.start()

    def peers(self, host: str) -> list[dict[str, object]]:
        d = self.nodes[host]
        return self.lab.get_json(host, d.url + "/_modelpeer/v1/peers")["peers"]

    def live_names(self, host: str) -> set[str]:
        return {str(p["name"]) for p in self.peers(host) if p["alive"]}

    def snapshot(self, host: str, repo: str = "acme/tiny-tts") -> dict[str, bytes]:
        home = self.tmp / f"hf-{host}-{time.monotonic_ns()}"
        home.mkdir()
        out = hf_client(self.nodes[host].url, home, "snapshot_download", repo,
                        prefix_cmd=self.lab.ns(host))
        assert "result" in out, out
        return tree_bytes(Path(out["result"]))

    def stop(self) -> None:
        for d in self.nodes.values():
            d.stop()

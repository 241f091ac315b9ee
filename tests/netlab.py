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

from tests.fakehub import http_json
from tests.harness import ROOT

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

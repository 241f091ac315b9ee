"""Only the cluster gets in, across real hosts: a keyless host that imitates a node on mDNS and
on every peer route is never a member, never sent a job, a token or a relay request, and cannot
take a real node's address; the token of a gated warm never crosses the LAN in clear."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT, wait_for
from tests.netlab import Cluster, read_pcap

pytestmark = pytest.mark.netlab

TOKEN = "hf_good_token"
REAL = ("h1", "h2", "h3")


def lan_payload(pcap: Path, upstream: str) -> bytes:
    """The frames between the lab's hosts, less those to or from the upstream host (the Hub
    is reached over HTTPS in real life; in the lab it is plain HTTP by design)."""
    up = socket.inet_aton(upstream)
    kept = [f for f in read_pcap(pcap)
            if not (f[12:14] == b"\x08\x00" and up in (f[26:30], f[30:34]))]
    return b"".join(kept)


def start_impostor(cluster: Cluster, log: Path) -> subprocess.Popen[bytes]:
    real = cluster.nodes["h1"].status()["peers"]
    proc = subprocess.Popen([*cluster.lab.ns("h4"), sys.executable, "-m", "tests.impostor",
                             cluster.lab.ip("h4"), real["cluster_id"], real["node_id"],
                             str(log)], stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"announced"
    return proc


def test_a_keyless_impostor_gets_nothing_and_the_token_never_crosses_the_lan(
        cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_all(*REAL)
    log = tmp_path / "impostor.jsonl"
    impostor = start_impostor(cluster, log)
    try:
        wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3,
                 "the nodes try the impostor", timeout=30)
        pcap = tmp_path / "warm.pcap"
        with cluster.lab.capture(pcap) as cap:
            out = cluster.cli("h1", "warm", "acme/gated-model", "--nodes", "all", "--wait",
                              "--json", "--token", TOKEN)
        assert out.returncode == 0, out.stdout + out.stderr
        states = {n: s["state"] for n, s in json.loads(out.stdout)["nodes"].items()}
        assert states == dict.fromkeys(REAL, "done"), states
        # the impostor was asked to prove the key and nothing else
        requests = [json.loads(line) for line in log.read_text().splitlines()]
        assert {r["path"] for r in requests} == {"/_modelpeer/peer/v1/status"}, requests
        assert TOKEN not in log.read_text()
        for h in REAL:
            peers = cluster.peers(h)
            assert {p["name"] for p in peers} == set(REAL) - {h}, peers
            assert all(p["address"] == cluster.lab.ip(str(p["name"])) for p in peers), peers
        # the warm went over the LAN, sealed
        assert cap.frames > 0 and cap.dropped == 0
        lan = lan_payload(pcap, cluster.lab.ip("up"))
        assert b"/_modelpeer/peer/v1/warm" in lan and b"acme/gated-model" in lan
        assert TOKEN.encode() not in lan
    finally:
        impostor.terminate()
        impostor.wait(10)

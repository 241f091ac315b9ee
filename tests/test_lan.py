"""LAN peers across real hosts (network namespaces): mDNS discovery, the cluster key, and
verified chunks shared over BitTorrent, driven by the real huggingface_hub client."""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehub import FakeHub, expected_files
from tests.harness import Modelpeerd, hf_client, tree_bytes
from tests.netlab import Lab, netlab_available, write_key

pytestmark = [pytest.mark.netlab,
              pytest.mark.skipif(bool(netlab_available()), reason=netlab_available() or "ok")]

MODEL = "acme/tiny-tts"
MiB = 1024 * 1024


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

    def snapshot(self, host: str, repo: str = MODEL) -> dict[str, bytes]:
        home = self.tmp / f"hf-{host}-{time.monotonic_ns()}"
        home.mkdir()
        out = hf_client(self.nodes[host].url, home, "snapshot_download", repo,
                        prefix_cmd=self.lab.ns(host))
        assert "result" in out, out
        return tree_bytes(Path(out["result"]))

    def stop(self) -> None:
        for d in self.nodes.values():
            d.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    lab = Lab(4, prefix=f"mpt{os.getpid() % 10000}", lan="1gbit").up()
    hub = FakeHub(tmp_path / "hub", host=lab.ip("up"), cdn_host=lab.ip("up"), port=8080,
                  cdn_port=8081, prefix_cmd=lab.ns("up"))
    c = Cluster(lab, hub, tmp_path)
    try:
        hub.start()
        yield c
    finally:
        c.stop()
        hub.stop()
        lab.down()


def test_nodes_find_each_other_and_ignore_other_clusters(cluster: Cluster,
                                                         tmp_path: Path) -> None:
    for h in ("h1", "h2", "h3"):
        cluster.start(h)
    stranger = write_key(tmp_path / "other.key")
    cluster.start("h4", stranger)
    started = time.monotonic()
    for h in ("h1", "h2", "h3"):
        others = {"h1", "h2", "h3"} - {h}
        cluster.lab.wait_for(f"{h} sees {others}", lambda h=h, o=others: cluster.live_names(h) >= o,
                             timeout=10)
    assert time.monotonic() - started < 10
    time.sleep(2)
    for h in ("h1", "h2", "h3"):
        assert "h4" not in cluster.live_names(h)
    assert cluster.live_names("h4") == set()
    # calls signed with the stranger's key are refused by the others, and so are unsigned ones
    for key in (stranger, None):
        status = signed_status(cluster.lab, "h4", key, f"http://{cluster.lab.ip('h1')}:6581")
        assert status == 401, status
    assert signed_status(cluster.lab, "h2", cluster.key, f"http://{cluster.lab.ip('h1')}:6581") \
        == 200
    assert "peer API: refused" in cluster.nodes["h1"].log()


def signed_status(lab: Lab, host: str, key: Path | None, base: str) -> int:
    """GET a peer API route from `host`, signed with `key` (unsigned without one)."""
    code = (
        "import sys, urllib.request, urllib.error\n"
        "from pathlib import Path\n"
        "from modelpeer.daemon.cluster import ClusterKey, read_key_file\n"
        "path = '/_modelpeer/peer/v1/status'\n"
        "h = ClusterKey(read_key_file(Path(sys.argv[2]))).sign('GET', path, b'', 'x') "
        "if sys.argv[2] else {}\n"
        "try:\n"
        "    print(urllib.request.urlopen(urllib.request.Request(sys.argv[1] + path, "
        "headers=h), timeout=5).status)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n")
    out = lab.run(host, sys.executable, "-c", code, base, str(key or ""))
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_second_and_third_node_get_the_model_from_the_lan(cluster: Cluster) -> None:
    for h in ("h1", "h2", "h3"):
        cluster.start(h)
    for h in ("h2", "h3"):
        cluster.lab.wait_for(f"{h} sees h1", lambda h=h: "h1" in cluster.live_names(h))
    want = expected_files(MODEL)
    assert cluster.snapshot("h1") == want
    cluster.hub.reset()
    assert cluster.snapshot("h2") == want
    assert cluster.snapshot("h3") == want
    stats = cluster.hub.stats()
    assert stats["cdn_bytes"] < 1 * MiB, f"{stats['cdn_bytes']} CDN bytes went to h2/h3"
    for h in ("h2", "h3"):
        served = cluster.nodes[h].status()["served_bytes"]
        assert served["peer"] >= 48 * MiB, served


def test_a_killed_or_lying_peer_does_not_fail_the_client(cluster: Cluster) -> None:
    hosts = ("h1", "h2", "h3", "h4")
    for h in hosts:
        cluster.start(h)
    for h in hosts[1:]:
        cluster.lab.wait_for(f"{h} sees the others",
                             lambda h=h: len(cluster.live_names(h)) == 3)
    want = expected_files(MODEL)
    assert cluster.snapshot("h1") == want
    assert cluster.snapshot("h2") == want  # h1 has now served (and checked) every piece
    # h1 turns liar: its chunk files change behind its back after they were checked
    for chunk in (cluster.tmp / "cache-h1" / "chunks").rglob("*.[0-9]"):
        if chunk.stat().st_size > MiB:
            raw = bytearray(chunk.read_bytes())
            for i in range(0, len(raw), 64 * 1024):
                raw[i] ^= 0xFF
            chunk.write_bytes(bytes(raw))
    assert cluster.snapshot("h3") == want
    peers = {p["name"]: p for p in cluster.peers("h3")}
    assert peers["h1"]["banned"], peers
    assert not peers["h2"]["banned"], peers
    assert "h1" in cluster.nodes["h3"].log() or "banned" in cluster.nodes["h3"].log()
    # a peer killed while h4 downloads: h4 still gets correct bytes
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(cluster.snapshot, "h4")
        time.sleep(0.5)
        cluster.nodes["h2"].kill()
        assert pending.result() == want

"""The cache over months across real hosts: a model imported from an HF cache goes to a peer
with the Hub gone; a node's peer upload cap holds for what its peers get over BitTorrent and
over a relay, and not for its local clients; `warm --pin` pins on every node of the job."""

from __future__ import annotations

import concurrent.futures
import json
import signal
from pathlib import Path

import pytest

from tests.fakehub import GATED, GOOD_TOKEN, expected_files, file_sha256
from tests.harness import MiB, hf_client, wait_for
from tests.netlab import Cluster

pytestmark = pytest.mark.netlab

def timed_get(cluster: Cluster, host: str, path: str) -> tuple[float, str]:
    """(seconds, sha256) of a GET of `path` from `host`'s daemon, timed inside the host."""
    return cluster.lab.timed_get(host, cluster.nodes[host].url + path, timeout=120)


def test_a_peer_gets_a_repo_imported_from_an_hf_cache_with_the_hub_gone(cluster: Cluster,
                                                                       tmp_path: Path) -> None:
    for h in ("h1", "h2"):
        cluster.start(h)
    public = {}
    for repo, token in (("gpt2", []), (GATED, ["--token", GOOD_TOKEN])):
        home = tmp_path / f"hf-before-modelpeer-{repo.replace('/', '-')}"
        home.mkdir()
        out = hf_client(cluster.hub.url, home, "snapshot_download", repo, token=GOOD_TOKEN,
                        prefix_cmd=cluster.lab.ns("h1"))
        assert "result" in out, out
        imported = cluster.cli("h1", "import-hf-cache", str(home / "hub"), "--json", *token)
        assert imported.returncode == 0, imported.stderr
        public[repo] = json.loads(imported.stdout)["imports"][0]["public"]
    assert public == {"gpt2": True, GATED: False}
    wait_for(lambda: "h1" in cluster.live_names("h2"), "h2 sees h1", timeout=30)
    cluster.hub.stop()
    want = expected_files("gpt2")
    assert cluster.snapshot("h1", "gpt2") == want
    assert cluster.snapshot("h2", "gpt2") == want
    assert cluster.nodes["h2"].status()["served_bytes"]["peer"] > 0
    assert "from peer h1" in cluster.nodes["h2"].log()
    # a gated repo's listing does not cross the LAN, whatever token the peer's client has
    gated = hf_client(cluster.nodes["h2"].url, tmp_path / "hf-h2-gated", "snapshot_download",
                      GATED, token=GOOD_TOKEN, prefix_cmd=cluster.lab.ns("h2"))
    assert "error" in gated and "unreachable" in gated["message"], gated


def test_peer_upload_rate_caps_what_peers_get_not_local_clients(cluster: Cluster,
                                                                tmp_path: Path) -> None:
    config = tmp_path / "h1.toml"
    config.write_text('peer_upload_rate = "64mbit"\n')
    capped = cluster.start("h1", None, "--config", str(config))
    cluster.start("h2")
    cluster.wait_connected("h1", "h2")
    repo, size = "caps/weights", 32 * MiB
    cluster.hub.add_repo(repo, {"w.bin": {"size": size, "lfs": True}})
    path, want = f"/{repo}/resolve/main/w.bin", file_sha256(repo, "w.bin")
    assert timed_get(cluster, "h1", path)[1] == want
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        from_peer = pool.submit(timed_get, cluster, "h2", path)
        local_seconds, local_digest = timed_get(cluster, "h1", path)
        peer_seconds, peer_digest = from_peer.result()
    assert peer_digest == want and local_digest == want
    assert cluster.nodes["h2"].status()["served_bytes"]["peer"] >= size
    cap_seconds = size / (64e6 / 8)
    assert peer_seconds >= 0.9 * cap_seconds, (peer_seconds, cap_seconds)
    assert local_seconds < cap_seconds / 2, (local_seconds, cap_seconds)
    assert "peer upload 8.0 MB/s" in cluster.cli("h1", "status").stdout
    # SIGHUP applies a new cap, to libtorrent's session too
    config.write_text('peer_upload_rate = "200mbit"\n')
    assert capped.proc is not None
    capped.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: ((s := capped.status())["peer_upload_rate"] == 25_000_000
                      and s["peers"]["upload_split"]["bittorrent"] == 25_000_000),
             "h1 applies the new cap", timeout=30)


def test_warm_pin_pins_the_revision_on_every_node_of_the_job(cluster: Cluster) -> None:
    hosts = ("h1", "h2", "h3")
    cluster.start_all(*hosts)
    repo = "pins/everywhere"
    cluster.hub.add_repo(repo, {"a.bin": {"size": 3 * MiB, "lfs": True},
                                "config.json": {"size": 200, "lfs": False}})
    warmed = cluster.cli("h1", "warm", repo, "--nodes", "all", "--pin", "--wait")
    assert warmed.returncode == 0, warmed.stderr
    for h in hosts:
        listed = {r["repo_id"]: r for r in json.loads(cluster.cli(h, "ls", "--json").stdout)}
        pins = [(p["revision"], p["files"], p["cached_files"]) for p in listed[repo]["pins"]]
        assert pins == [("main", 2, 2)], (h, pins)
        assert cluster.nodes[h].status()["pinned_bytes"] == listed[repo]["bytes"] > 3 * MiB


@pytest.mark.parametrize("cluster", ["200mbit"], indirect=True)
def test_a_capped_node_relays_a_blob_it_is_still_downloading_within_its_cap(
        cluster: Cluster) -> None:
    # h2 relays from h1 while h1 downloads: the blob is one chunk, so h1 has no complete chunk
    # to share before the end; nobody knows yet what the upstream gives, and the blob is below
    # the size a relaying node probes the upstream at, so nobody overtakes h1
    one_chunk = ("--chunk-size", "64MiB")
    cluster.start("h1", None, *one_chunk, "--peer-upload-rate", "80mbit")
    cluster.start("h2", None, *one_chunk)
    cluster.wait_connected("h1", "h2")
    repo, size = "caps/relayed", 48 * MiB
    cluster.hub.add_repo(repo, {"w.bin": {"size": size, "lfs": True}})
    path, want = f"/{repo}/resolve/main/w.bin", file_sha256(repo, "w.bin")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(timed_get, cluster, "h1", path)
        wait_for(lambda: any(t["source"] == "upstream"
                             for t in cluster.nodes["h1"].status()["transfers"]),
                 "h1 fetches from the upstream", timeout=10)
        peer_seconds, peer_digest = timed_get(cluster, "h2", path)
        assert first.result()[1] == want
    assert peer_digest == want
    assert cluster.hub.stats()["cdn_bytes"] < size + MiB  # h2 had every byte from h1
    assert peer_seconds >= 0.9 * size / (80e6 / 8), peer_seconds

"""LAN peers across real hosts (network namespaces): mDNS discovery, the cluster key, and
verified chunks shared over BitTorrent, driven by the real huggingface_hub client."""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fakehub import MODEL, expected_files
from tests.harness import MiB, transferring, wait_for
from tests.netlab import Cluster, Lab, write_key

pytestmark = pytest.mark.netlab


def test_nodes_find_each_other_and_ignore_other_clusters(cluster: Cluster,
                                                         tmp_path: Path) -> None:
    for h in ("h1", "h2", "h3"):
        cluster.start(h)
    stranger = write_key(tmp_path / "other.key")
    cluster.start("h4", stranger)
    started = time.monotonic()
    cluster.wait_connected("h1", "h2", "h3", timeout=10)
    assert time.monotonic() - started < 10
    for h in ("h1", "h2", "h3", "h4"):  # each has seen the other cluster's mDNS records
        wait_for(lambda h=h: "of another cluster" in cluster.nodes[h].logged(),
                 f"{h} ignores the other cluster's record")
    for h in ("h1", "h2", "h3"):
        assert "h4" not in cluster.live_names(h)
    assert cluster.live_names("h4") == set()
    # calls signed with the stranger's key are refused by the others, and so are unsigned ones
    h1_api, h2_api = (f"http://{cluster.lab.ip(h)}:6581" for h in ("h1", "h2"))
    for key in (stranger, None):
        assert signed_status(cluster.lab, "h4", key, h1_api) == "401"
    # a signed request is good once, and only at the node it names
    h1_id = cluster.nodes["h1"].status()["peers"]["node_id"]
    assert signed_status(cluster.lab, "h3", cluster.key, h1_api, "--to", h1_id,
                         "--replay") == "200 401"
    assert signed_status(cluster.lab, "h3", cluster.key, h2_api, "--to", h1_id) == "401"
    assert "peer API: refused" in cluster.nodes["h1"].log()
    # a node that stops says goodbye on mDNS; one that is killed stops answering the probes
    cluster.nodes["h3"].stop()
    wait_for(lambda: "h3" not in cluster.live_names("h1"), "h1 forgets h3", timeout=5)
    cluster.nodes["h2"].kill()
    wait_for(lambda: "h2" not in cluster.live_names("h1"), "h1 marks the killed h2 down",
             timeout=20)


def signed_status(lab: Lab, host: str, key: Path | None, base: str, *args: str) -> str:
    """The HTTP status(es) of a peer API GET /status from `host`, signed with `key` as another
    node would sign it (unsigned without one); `args` go to tests/peerprobe.py."""
    out = lab.run(host, sys.executable, "-m", "tests.peerprobe",
                  base + "/_modelpeer/peer/v1/status", str(key or "-"), *args)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_second_and_third_node_get_the_model_from_the_lan(cluster: Cluster) -> None:
    cluster.start_all("h1", "h2", "h3")
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
    from_h1 = {p["name"]: p["bytes_from"] for p in cluster.peers("h2")}
    assert from_h1["h1"] > 0, from_h1


def wait_seeding(cluster: Cluster, seeder: str, observer: str, chunks: int = 7) -> None:
    """Until `observer` sees `seeder` hold the model's chunks (seeding follows verification)."""
    wait_for(lambda: any(p["name"] == seeder and p["chunks_held"] >= chunks
                         for p in cluster.peers(observer)),
             f"{observer} sees {seeder} seed {chunks} chunks", timeout=30)


def corrupt_chunks(cache: Path) -> None:
    for chunk in (cache / "chunks").rglob("*.[0-9]"):
        if chunk.stat().st_size > MiB:
            raw = bytearray(chunk.read_bytes())
            for i in range(0, len(raw), 64 * 1024):
                raw[i] ^= 0xFF
            chunk.write_bytes(bytes(raw))


def test_a_lying_peer_is_banned_and_a_killed_peer_does_not_fail_the_client(
        cluster: Cluster) -> None:
    hosts = ("h1", "h2", "h3", "h4")
    cluster.start_all(*hosts)
    want = expected_files(MODEL)
    assert cluster.snapshot("h1") == want
    wait_seeding(cluster, "h1", "h2")
    assert cluster.snapshot("h2") == want  # h1 has now served (and so checked) every piece
    # h1 turns liar: its chunk files change behind its back after they were checked; with h2
    # away, h1 is h3's only source
    cluster.nodes["h2"].stop()
    corrupt_chunks(cluster.tmp / "cache-h1")
    assert cluster.snapshot("h3") == want
    peers = {p["name"]: p for p in cluster.peers("h3")}
    assert peers["h1"]["banned"], peers
    assert "banned" in cluster.nodes["h3"].log()
    # h4 downloads while its only good source, h3, is killed: h4 still gets correct bytes
    wait_seeding(cluster, "h3", "h4")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(cluster.snapshot, "h4")
        wait_for(lambda: pending.done() or transferring(cluster.nodes["h4"], at_least=0),
                 "h4 starts fetching a blob", timeout=30)
        cluster.nodes["h3"].kill()
        assert pending.result() == want


@pytest.mark.parametrize("cluster", ["160mbit"], indirect=True)
def test_nodes_wanting_a_file_at_once_download_it_from_upstream_once(cluster: Cluster) -> None:
    hosts = ("h1", "h2", "h3")
    cluster.start_all(*hosts)
    want = expected_files(MODEL)["model.safetensors"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda h: cluster.download(h, MODEL, "model.safetensors"), hosts))
    assert all(r == want for r in results)
    cdn = cluster.hub.stats()["cdn_bytes"]
    print(f"CDN bytes: {cdn / len(want):.3f} x the file")
    assert cdn <= 1.1 * len(want), f"{cdn / len(want):.2f} x the file came from the CDN"
    sources = [cluster.nodes[h].status()["served_bytes"] for h in hosts]
    assert sum(s["peer"] for s in sources) >= len(want), sources


def test_a_peer_relaying_wrong_bytes_is_banned_and_the_warm_still_completes(
        cluster: Cluster) -> None:
    cluster.start_all("h1", "h2")
    cluster.hub.faults(cdn_rate=4 * MiB)
    assert cluster.cli("h1", "warm", MODEL, "--nodes", "h1").returncode == 0
    cache = cluster.tmp / "cache-h1"
    wait_for(lambda: any(
        c.stat().st_size >= 8 * MiB for c in (cache / "chunks").rglob("*.[0-9]")),
             "h1 completes a chunk", timeout=30)
    corrupt_chunks(cache)  # h1 now relays wrong bytes for what it already holds
    out = cluster.cli("h2", "warm", MODEL, "--nodes", "h2", "--wait", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    peers = {p["name"]: p for p in cluster.peers("h2")}
    assert peers["h1"]["banned"], peers
    assert "failed the blob digest" in cluster.nodes["h2"].log()
    cluster.hub.faults(cdn_status=503)
    assert cluster.snapshot("h2") == expected_files(MODEL)


@pytest.mark.parametrize("cluster", ["200mbit"], indirect=True)
def test_warm_fills_every_node_with_one_upstream_download(cluster: Cluster) -> None:
    hosts = ("h1", "h2", "h3", "h4")
    cluster.start_all(*hosts)
    want = expected_files(MODEL)
    lfs_bytes = sum(len(v) for k, v in want.items() if len(v) > 64 * 1024)
    out = cluster.cli("h1", "warm", MODEL, "--nodes", "all", "--wait", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    status = json.loads(out.stdout)
    assert {n: s["state"] for n, s in status["nodes"].items()} == dict.fromkeys(hosts, "done")
    cdn = cluster.hub.stats()["cdn_bytes"]
    print(f"warm: CDN bytes {cdn / lfs_bytes:.3f} x the repo's large files")
    assert cdn <= 1.05 * lfs_bytes, f"{cdn} CDN bytes for {lfs_bytes} bytes of LFS files"
    jobs = json.loads(cluster.cli("h2", "jobs", "--json").stdout)
    assert jobs and jobs[0]["state"] == "done"
    # the nodes relay the bytes along a chain: none sends the repo to all the others
    sent = {h: sum(int(p["bytes_to"]) for p in cluster.peers(h)) for h in hosts}
    print("warm: bytes sent to peers / LFS bytes", [round(v / lfs_bytes, 2) for v in sent.values()])
    assert max(sent.values()) < 2 * lfs_bytes, sent
    # every node now serves the repo with the CDN switched off
    cluster.hub.faults(cdn_status=503)
    for h in hosts:
        assert cluster.snapshot(h) == want, h


def test_a_client_during_a_warm_joins_its_transfer(cluster: Cluster) -> None:
    """...and the coordinator hears of each node's end: a status that waits answers then."""
    cluster.start_all("h1", "h2")
    cluster.hub.faults(cdn_rate=8 * MiB)
    started = cluster.cli("h1", "warm", MODEL, "--nodes", "all", "--json")
    assert started.returncode == 0, started.stderr
    job = json.loads(started.stdout)["job"]
    want = expected_files(MODEL)["model.safetensors"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ended = pool.submit(job_end_seen, cluster, "h1", job)
        assert cluster.download("h2", MODEL, "model.safetensors") == want
        status, asked, seen = ended.result()
    ended_at = max(asked, *(n["finished"] for n in status["nodes"].values()))
    assert status["state"] == "done", status
    assert seen - ended_at < 1.5, f"the job's end was answered {seen - ended_at:.2f} s late"
    # a second warm joins the first one's transfers and returns when both nodes hold the repo
    assert cluster.cli("h1", "warm", MODEL, "--nodes", "all", "--wait").returncode == 0
    cdn = cluster.hub.stats()["cdn_bytes"]
    lfs_bytes = sum(len(v) for v in expected_files(MODEL).values() if len(v) > 64 * 1024)
    assert cdn <= 1.05 * lfs_bytes, f"{cdn} CDN bytes for {lfs_bytes} bytes of LFS files"


def job_end_seen(cluster: Cluster, host: str, job: str) -> tuple[dict[str, Any], float, float]:
    """The job's status once it ended, asked with ?wait=5 until then; when the last question
    was asked, and when its answer came (time.time())."""
    url = f"{cluster.nodes[host].url}/_modelpeer/v1/jobs/{job}?wait=5"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        asked = time.time()
        status = cluster.lab.get_json(host, url, timeout=15)
        if status["state"] != "running":
            return status, asked, time.time()
    raise AssertionError(f"warm job {job} still running after 120 s")


@pytest.mark.parametrize("cluster", ["100mbit"], indirect=True)
def test_warm_names_a_node_killed_midway(cluster: Cluster) -> None:
    hosts = ("h1", "h2", "h3")
    cluster.start_all(*hosts)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(cluster.cli, "h1", "warm", MODEL, "--wait", "--json")
        wait_for(lambda: transferring(cluster.nodes["h3"]), "h3 fetching for the warm job")
        cluster.nodes["h3"].kill()
        out = pending.result()
    assert out.returncode == 1, out.stdout + out.stderr
    status = json.loads(out.stdout)
    assert status["nodes"]["h3"]["state"] == "failed"
    assert status["nodes"]["h1"]["state"] == "done" and status["nodes"]["h2"]["state"] == "done"
    assert "node h3 failed" in out.stderr


@pytest.mark.parametrize("cluster", ["200mbit"], indirect=True)
def test_a_restarted_node_resumes_a_gated_warm_with_the_coordinators_token(
        cluster: Cluster) -> None:
    cluster.start_all("h1", "h2")
    cluster.hub.faults(cdn_rate=MiB // 2)
    out = cluster.cli("h1", "warm", "acme/gated-model", "--nodes", "h2", "--token",
               "hf_good_token", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    job = json.loads(out.stdout)["job"]
    wait_for(lambda: transferring(cluster.nodes["h2"]), "h2 fetching for the warm job")
    assert cluster.nodes["h2"].stop() == 0
    cluster.hub.reset()
    h2 = cluster.start("h2")
    wait_for(lambda: [
        (j["job"], j["state"]) for j in json.loads(cluster.cli("h2", "jobs", "--json").stdout)
        if j["state"] != "running"], "the resumed job ends on h2", timeout=60)
    jobs = json.loads(cluster.cli("h2", "jobs", "--json").stdout)
    assert [(j["job"], j["state"]) for j in jobs] == [(job, "done")], jobs
    assert "token of acme/gated-model received from node" in h2.log()

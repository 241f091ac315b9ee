"""The transfer plan across real hosts: a slow node ends up a leaf, a frozen node is left behind
within the stall window, and nodes that start at once read the upstream once. Behaviour only;
the timings are in bench/bench_swarm.py."""

from __future__ import annotations

import concurrent.futures
import hashlib
import signal

import pytest

from modelpeer.daemon.upstreamfetch import PROBE_MAX_BYTES
from tests.fakehub import file_sha256
from tests.harness import MiB, transferring, wait_for
from tests.netlab import Cluster

pytestmark = pytest.mark.netlab

HOSTS = ("h1", "h2", "h3", "h4")


def start_every_host(cluster: Cluster) -> dict[str, str]:
    """The node id of each host, once every node sees the others."""
    cluster.start_all(*HOSTS)
    return {h: cluster.nodes[h].status()["peers"]["node_id"] for h in HOSTS}


def in_plan_order(ids: dict[str, str], digest: str) -> list[str]:
    """The hosts in the blob's rendezvous order (plan.py), first one fetches upstream."""
    return sorted(ids, key=lambda h: hashlib.sha256(f"{ids[h]}:{digest}".encode()).hexdigest())


def new_repo(cluster: Cluster, name: str, size: int) -> tuple[str, str]:
    cluster.hub.add_repo(name, {"weights.bin": {"size": size, "lfs": True}})
    return name, file_sha256(name, "weights.bin")


def pull(cluster: Cluster, host: str, repo: str) -> str:
    """The sha256 of the file the real client got through `host`'s daemon."""
    return hashlib.sha256(cluster.download(host, repo, "weights.bin", timeout=300)).hexdigest()


def pull_everywhere(cluster: Cluster, repo: str, hosts: tuple[str, ...] = HOSTS
                    ) -> dict[str, concurrent.futures.Future[str]]:
    pool = concurrent.futures.ThreadPoolExecutor(len(hosts))
    return {h: pool.submit(pull, cluster, h, repo) for h in hosts}


def sent_to_peers(cluster: Cluster, host: str) -> int:
    return sum(int(p["bytes_to"]) for p in cluster.peers(host))


def story(cluster: Cluster, repo: str) -> str:
    """What each node logged about the repo, but debug lines: for a failure's message (a
    timing-dependent failure in CI leaves nothing else to go by)."""
    return "\n".join(f"{h} {line[11:]}" for h in HOSTS
                     for line in cluster.nodes[h].logged().splitlines()
                     if repo in line and (" DEBUG " not in line or "link is its own" in line))


@pytest.mark.parametrize("cluster", ["400mbit"], indirect=True)
def test_a_slow_node_that_fetches_first_is_overtaken_and_feeds_nobody(cluster: Cluster) -> None:
    ids = start_every_host(cluster)
    size = 96 * MiB
    repo, digest = new_repo(cluster, "acme/slow-case", size)
    slow, fast = HOSTS[0], HOSTS[1:]
    cluster.lab.shape(slow, "50mbit")
    slow_pull = pull_everywhere(cluster, repo, (slow,))[slow]
    # it is the one fetching from the upstream when the others ask
    wait_for(lambda: transferring(cluster.nodes[slow]), f"{slow} fetching from the upstream")
    got = {h: f.result() for h, f in pull_everywhere(cluster, repo, fast).items()}
    assert set(got.values()) == {digest}
    assert not slow_pull.done(), "the fast nodes waited for the slow one"
    # operators see it as a leaf in the plan (status --json, the status page, the CLI)
    plan = cluster.nodes[slow].status()["plan"]
    own = [n for b in plan for n in b["nodes"] if n["node_id"] == ids[slow]]
    assert own and own[0]["leaf"] and not own[0]["probing"], plan
    assert "(leaf: feeds nobody)" in cluster.cli(slow, "status").stdout
    sent = {h: sent_to_peers(cluster, h) for h in HOSTS}
    # it fed the others only until its rate told: at 50 Mbit/s, a few seconds' worth
    assert sent[slow] < size / 2, f"{sent}\n{story(cluster, repo)}"
    assert slow_pull.result(timeout=120) == digest
    # once overtaken, the slow node stopped reading the upstream and took the rest from the
    # overtaker: the blob once, what the slow node read before (a few seconds at 50 Mbit/s),
    # and one probe of the upstream (only the first node behind the slow one probes)
    assert "relaying the rest from it" in cluster.nodes[slow].log(), story(cluster, repo)
    cdn = cluster.hub.stats()["cdn_bytes"]
    assert cdn <= 1.5 * size + PROBE_MAX_BYTES, f"{cdn / MiB:.0f} MiB\n{story(cluster, repo)}"


@pytest.mark.parametrize("cluster", ["200mbit"], indirect=True)
def test_a_frozen_node_is_left_behind_and_finishes_after_it_thaws(cluster: Cluster) -> None:
    ids = start_every_host(cluster)
    repo, digest = new_repo(cluster, "acme/frozen-case", 96 * MiB)
    frozen = in_plan_order(ids, digest)[0]  # the one the others first get the bytes from
    pulls = pull_everywhere(cluster, repo)
    wait_for(lambda: all(transferring(cluster.nodes[h]) for h in HOSTS),
             "every node has bytes of the blob")
    proc = cluster.nodes[frozen].proc
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    try:
        others = [h for h in HOSTS if h != frozen]
        done, _ = concurrent.futures.wait([pulls[h] for h in others], timeout=120)
        assert len(done) == 3, "the others are still waiting on the frozen node"
        assert {pulls[h].result() for h in others} == {digest}
    finally:
        proc.send_signal(signal.SIGCONT)
    assert pulls[frozen].result(timeout=180) == digest
    logs = "".join(cluster.nodes[h].log() for h in HOSTS if h != frozen)
    assert "left out until it answers again" in logs or "no byte for" in logs
    # thawed, it takes the rest from the peers that completed the blob, not from the upstream
    # again: the blob once, what it had read ahead before it froze, probes
    assert "peers hold the rest complete" in cluster.nodes[frozen].log(), story(cluster, repo)
    cdn = cluster.hub.stats()["cdn_bytes"]
    assert cdn <= 1.5 * 96 * MiB + PROBE_MAX_BYTES, f"{cdn / MiB:.0f} MiB\n{story(cluster, repo)}"


@pytest.mark.parametrize("cluster", ["200mbit"], indirect=True)
def test_nodes_starting_at_once_read_each_blob_from_the_upstream_once(cluster: Cluster) -> None:
    start_every_host(cluster)
    for n in range(2):
        cluster.hub.reset()
        repo, digest = new_repo(cluster, f"acme/together-{n}", 48 * MiB)
        got = {h: f.result() for h, f in pull_everywhere(cluster, repo).items()}
        assert set(got.values()) == {digest}
        cdn = cluster.hub.stats()["cdn_bytes"]
        assert cdn <= 1.01 * 48 * MiB, f"{cdn / (48 * MiB):.3f} x the blob from the CDN"


@pytest.mark.parametrize("cluster", ["200mbit"], indirect=True)
def test_nodes_reading_different_blobs_at_once_keep_to_one_connection_each(
        cluster: Cluster) -> None:
    start_every_host(cluster)
    repos = {h: new_repo(cluster, f"acme/own-{h}", 32 * MiB) for h in HOSTS[:2]}
    # 5 s a blob on one connection, more on more: the reads end together, and a node that
    # took its read for the only one would open 3 more connections
    cluster.hub.faults(cdn_rate=6 * MiB)
    pool = concurrent.futures.ThreadPoolExecutor(2)
    got = {h: pool.submit(pull, cluster, h, repo) for h, (repo, _) in repos.items()}
    assert {h: f.result() for h, f in got.items()} == {h: d for h, (_, d) in repos.items()}
    # each read shares the link with the other node's: more connections would only take
    # from it (a lone read opens upstream_connections, test_proxy.py)
    stats = cluster.hub.stats()
    told = "\n".join(story(cluster, repo) for repo, _ in repos.values())
    assert stats["cdn_sending_max"] == 2, f"{stats}\n{told}"
    assert stats["cdn_bytes"] <= 1.01 * 64 * MiB, f"{stats}\n{told}"


@pytest.mark.parametrize("cluster", ["100mbit"], indirect=True)
def test_the_status_shows_who_feeds_whom_across_the_cluster(cluster: Cluster) -> None:
    ids = start_every_host(cluster)
    names = {node_id: host for host, node_id in ids.items()}
    repo, digest = new_repo(cluster, "acme/plan-view", 96 * MiB)
    pulls = pull_everywhere(cluster, repo)

    def whole_plan() -> dict[str, object] | None:
        """The blob's entry in h1's plan once it lists every node."""
        plan = cluster.nodes["h1"].status()["plan"]
        blob = next((b for b in plan if b["digest"] == digest), None)
        return blob if blob and len(blob["nodes"]) == len(HOSTS) else None

    blob = wait_for(whole_plan, "h1 shows every node's part in the transfer", timeout=30)
    text = cluster.cli("h1", "status").stdout
    assert {f.result() for f in pulls.values()} == {digest}
    assert blob["file"] == f"{repo}/weights.bin" and blob["size"] == 96 * MiB
    nodes = blob["nodes"]
    assert {n["node_id"] for n in nodes} == set(ids.values())
    assert {n["name"] for n in nodes} == set(HOSTS)
    assert any(n["source"] == "upstream" for n in nodes)
    for n in nodes:
        if n["feeder"]:  # fed by another member, named by its node name
            assert n["source"] == "peer" and names[n["feeder"]] == n["feeder_name"], n
    assert f"plan      {repo}/weights.bin" in text, text
    assert "upstream -> h" in text, text

"""A node believes a coordinator no more than it must: a warm job from a peer holding the key is
parsed strictly and refused when malformed, and its file entries and commit are checked with
the upstream before they reach the catalog. Driven over the signed peer API on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelpeer.daemon.keyfile import read_key_file
from modelpeer.daemon.lan.cluster import ClusterKey, Credentials, NodeIdentity
from modelpeer.daemon.lan.peers import API
from tests.fakehub import FakeHub, expected_files, file_sha256
from tests.fakehub.repos import find_repo
from tests.harness import (
    Modelpeerd,
    fetch,
    free_port,
    hf_client,
    http_json,
    keyed_daemon,
    wait_for,
)
from tests.netlab import write_key

REPO = "gpt2"
COMMIT = find_repo(REPO).revisions["main"]
WEIGHTS = {"path": "model.safetensors", "digest": file_sha256(REPO, "model.safetensors"),
           "algo": "sha256", "size": len(expected_files(REPO)["model.safetensors"]),
           "lfs": True}


class Coordinator:
    """Another node of the cluster, as far as the daemon can tell: it holds the key."""

    def __init__(self, key: Path, tmp: Path, daemon: Modelpeerd, peer_port: int) -> None:
        self.credentials = Credentials(ClusterKey(read_key_file(key)),
                                       NodeIdentity.load_or_create(tmp / "coordinator.key"))
        self.daemon = daemon
        self.base = f"http://127.0.0.1:{peer_port}"
        self.node_id = daemon.status()["peers"]["node_id"]

    def send(self, job: dict[str, Any]) -> int:
        body = json.dumps(job).encode()
        signed = self.credentials.sign_request("POST", API + "/warm", body, self.node_id)
        headers = {**signed.headers, "Content-Type": "application/json"}
        return fetch(self.base + API + "/warm", headers, "POST", body)[0]


@pytest.fixture
def coordinator(tmp_path: Path, hub: FakeHub) -> Iterator[Coordinator]:
    key = write_key(tmp_path / "cluster.key")
    peer_port = free_port()
    daemon = keyed_daemon(tmp_path / "cache", hub.url, key, peer_port=peer_port)
    with daemon:
        yield Coordinator(key, tmp_path, daemon, peer_port)


def job(job_id: str, files: list[dict[str, Any]], **change: Any) -> dict[str, Any]:
    return {"id": job_id, "repo_type": "model", "repo_id": REPO, "revision": "main",
            "commit": COMMIT, "sealed_token": None, "files": files, **change}


def jobs(daemon: Modelpeerd) -> dict[str, dict[str, Any]]:
    return {j["job"]: j for j in http_json("GET", daemon.url + "/_modelpeer/v1/jobs")}


def ended(daemon: Modelpeerd, job_id: str) -> dict[str, Any]:
    def if_ended() -> dict[str, Any] | None:
        j = jobs(daemon).get(job_id)
        return j if j is not None and j["state"] != "running" else None

    return wait_for(if_ended, f"job {job_id} ends", timeout=30)


@pytest.mark.parametrize("bad", [
    job("0000000000a1", [{**WEIGHTS, "digest": "zz"}]),
    job("0000000000a2", [{**WEIGHTS, "path": "../acme/gated-model/config.json"}]),
    job("0000000000a3", [WEIGHTS], repo_id="../acme/gated-model"),
    job("0000000000a4", [{**WEIGHTS, "lfs": False}]),
    job("0000000000a5", [WEIGHTS], sealed_token="bm90IGEgc2VhbGVkIHRva2Vu"),
    job("0000000000a6", [WEIGHTS], commit="main"),
    job("../../etc", [WEIGHTS]),
])
def test_malformed_jobs_are_refused_before_anything_is_kept(coordinator: Coordinator,
                                                            bad: dict[str, Any],
                                                            hub: FakeHub) -> None:
    assert coordinator.send(bad) == 400
    daemon = coordinator.daemon
    assert jobs(daemon) == {}
    assert http_json("GET", daemon.url + "/_modelpeer/v1/repos") == []
    assert hub.stats()["cdn_bytes"] == 0
    daemon.stop()
    daemon.start()  # nothing was saved that could stop a restart
    assert jobs(daemon) == {}


def test_entries_the_upstream_contradicts_are_corrected_or_dropped(
        coordinator: Coordinator, hub: FakeHub, tmp_path: Path) -> None:
    lying = [{**WEIGHTS, "digest": "ab" * 32, "size": 7},
             {**WEIGHTS, "path": "not/in/the/repo.bin"}]
    assert coordinator.send(job("0000000000b1", lying)) == 200
    done = ended(coordinator.daemon, "0000000000b1")
    assert done["state"] == "failed" and "not/in/the/repo.bin" in done["error"], done
    assert "the coordinator said" in coordinator.daemon.log()
    hub.faults(cdn_status=503)  # what a client gets now comes from the catalog and the store
    home = tmp_path / "hf"
    home.mkdir()
    out = hf_client(coordinator.daemon.url, home, "hf_hub_download", REPO, "model.safetensors")
    assert Path(out["result"]).read_bytes() == expected_files(REPO)["model.safetensors"]


def test_a_commit_the_upstream_does_not_know_fails_the_job_and_leaves_the_refs(
        coordinator: Coordinator, tmp_path: Path) -> None:
    assert coordinator.send(job("0000000000c1", [WEIGHTS], commit="f" * 40)) == 200
    assert ended(coordinator.daemon, "0000000000c1")["state"] == "failed"
    home = tmp_path / "hf"
    home.mkdir()
    out = hf_client(coordinator.daemon.url, home, "hf_hub_download", REPO, "config.json")
    assert Path(out["result"]).read_bytes() == expected_files(REPO)["config.json"]

"""One node: the real huggingface_hub client (hf_xet installed) through a real modelpeerd in
front of the fake Hub, which sends Xet headers, xetHash, CDN redirects and pagination."""

from __future__ import annotations

import concurrent.futures
import hashlib
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fakehub import GOOD_TOKEN, MODEL, OTHER_TOKEN, FakeHub, expected_files
from tests.harness import (
    HfHome,
    MiB,
    StartDaemon,
    assert_no_leaks,
    download,
    durable_bytes,
    get_body,
    hf_client,
    snapshot,
    transferring,
    wait_for,
)

BIG_FILE = "model.safetensors"

def test_snapshot_of_a_xet_model_is_byte_identical_and_stays_on_the_proxy(
        start_daemon: StartDaemon, hf_home: HfHome, hub: FakeHub) -> None:
    d = start_daemon()
    got = snapshot(d, hf_home(), MODEL)
    assert got == expected_files(MODEL)
    assert_no_leaks(hub)
    requests = hub.stats()["requests"]
    assert not any("xet" in r for r in requests)


def test_second_client_gets_the_snapshot_with_zero_cdn_bytes(
        start_daemon: StartDaemon, hf_home: HfHome, hub: FakeHub) -> None:
    d = start_daemon()
    first = snapshot(d, hf_home(), MODEL)
    cdn_after_first = hub.stats()["cdn_bytes"]
    assert cdn_after_first >= 48 * MiB
    second = snapshot(d, hf_home(), MODEL)
    assert second == first
    assert hub.stats()["cdn_bytes"] == cdn_after_first
    status = d.status()
    assert status["served_bytes"]["store"] >= 48 * MiB


@pytest.mark.parametrize("revision", ["dev", "v1.0", "refs/pr/1", "commit", "short-commit"])
def test_revision_forms(start_daemon: StartDaemon, hf_home: HfHome, hub: FakeHub,
                        revision: str) -> None:
    d = start_daemon()
    if revision in ("commit", "short-commit"):
        sha = hf_client(d.url, hf_home(), "repo_info", MODEL, revision="v1.0")["result"]
        revision = sha if revision == "commit" else sha[:7]
        expected = expected_files(MODEL, "v1.0")
    else:
        expected = expected_files(MODEL, revision)
    assert download(d, hf_home(), MODEL, "config.json", revision=revision) == \
        expected["config.json"]
    if len(revision) != 7:  # snapshot_download wants a resolvable revision
        assert snapshot(d, hf_home(), MODEL, revision=revision) == expected
    assert_no_leaks(hub)


def test_folders_and_odd_file_names(start_daemon: StartDaemon, hf_home: HfHome,
                                    hub: FakeHub) -> None:
    d = start_daemon()
    expected = expected_files(MODEL)
    for name in ("sub/folder/weights.bin", "voices/speaker one.wav", "data/naïve file ü.txt",
                 "empty.txt"):
        assert download(d, hf_home(), MODEL, name) == expected[name], name
    assert_no_leaks(hub)


def test_dataset_with_paginated_tree_and_one_segment_repo(
        start_daemon: StartDaemon, hf_home: HfHome, hub: FakeHub) -> None:
    d = start_daemon()
    got = snapshot(d, hf_home(), "acme/speech-set", repo_type="dataset")
    assert got == expected_files("acme/speech-set", repo_type="dataset")
    assert len(got) > 100  # needed several pages
    assert snapshot(d, hf_home(), "gpt2") == expected_files("gpt2")
    tree = hf_client(d.url, hf_home(), "list_repo_tree", "acme/speech-set",
                     repo_type="dataset", recursive=True)["result"]
    assert "data/train-00000.parquet" in tree


@pytest.mark.parametrize(("repo", "kwargs", "error"), [
    ("acme/no-such-model", {"filename": "config.json"}, "RepositoryNotFoundError"),
    (MODEL, {"filename": "config.json", "revision": "no-such-branch"}, "RevisionNotFoundError"),
    (MODEL, {"filename": "no/such/file.txt"}, "RemoteEntryNotFoundError"),
    ("acme/gated-model", {"filename": "config.json"}, "GatedRepoError"),
])
def test_hub_errors_raise_the_clients_exceptions(
        start_daemon: StartDaemon, hf_home: HfHome, repo: str, kwargs: dict[str, str],
        error: str) -> None:
    d = start_daemon()
    out = hf_client(d.url, hf_home(), "hf_hub_download", repo, **kwargs)
    assert error in out.get("errors", []), out


def test_cached_snapshot_is_served_while_the_hub_is_down(
        start_daemon: StartDaemon, hf_home: HfHome, hub: FakeHub) -> None:
    d = start_daemon("--ref-ttl", "0")
    expected = snapshot(d, hf_home(), MODEL)
    hub.stop()
    try:
        assert snapshot(d, hf_home(), MODEL) == expected
        assert download(d, hf_home(), MODEL, "config.json") == expected["config.json"]
    finally:
        hub.restart()


def test_four_cold_clients_share_one_upstream_download_despite_drops(
        start_daemon: StartDaemon, hf_home: HfHome, hub: FakeHub) -> None:
    d = start_daemon()
    hub.faults(cdn_drop_after=7 * MiB, cdn_drop_count=6)
    homes = [hf_home() for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda h: download(d, h, MODEL, BIG_FILE), homes))
    want = expected_files(MODEL)[BIG_FILE]
    assert all(r == want for r in results)
    cdn = hub.stats()["cdn_bytes"]
    assert len(want) <= cdn <= 1.3 * len(want), f"{cdn} CDN bytes for a {len(want)}-byte file"


def test_a_connection_starved_beside_its_siblings_is_asked_again(
        start_daemon: StartDaemon, hf_home: HfHome, hub: FakeHub) -> None:
    d = start_daemon()
    want = expected_files(MODEL)[BIG_FILE]
    # the CDN holds one segment's connection open with nothing more on it for a minute
    hub.faults(cdn_stall_at=len(want) // 2 + 12345)
    started = time.monotonic()
    assert download(d, hf_home(), MODEL, BIG_FILE) == want
    took = time.monotonic() - started
    assert took < 10, f"{took:.1f}s: the download waited on the starved connection"
    assert "of what the others got in 1.0s; asking again" in d.log()
    assert hub.stats()["cdn_bytes"] <= len(want) + MiB


def test_a_stalled_connection_beside_another_blobs_read_is_asked_again(
        start_daemon: StartDaemon, hub: FakeHub) -> None:
    # one connection per blob, as when other nodes read the upstream too: the other blob's
    # read is the only one to compare with
    d = start_daemon("--upstream-connections", "1")
    repo = "acme/two-at-once"
    hub.add_repo(repo, {"a.bin": {"size": 32 * MiB, "lfs": True},
                        "b.bin": {"size": 32 * MiB, "lfs": True}})
    # 4 s a blob at 8 MiB/s; the first read to reach this offset sends nothing for a minute
    hub.faults(cdn_rate=8 * MiB, cdn_stall_at=12 * MiB + 12345)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bodies = dict(zip("ab", pool.map(
            lambda f: get_body(f"{d.url}/{repo}/resolve/main/{f}.bin"), "ab"), strict=True))
    took = time.monotonic() - started
    want = expected_files(repo)
    assert bodies == {f: want[f"{f}.bin"] for f in "ab"}
    assert took < 15, f"{took:.1f}s: the download waited on the stalled connection"
    assert "of what the others got in 1.0s; asking again" in d.log()


def test_first_bytes_arrive_before_the_whole_cold_file_is_in(
        start_daemon: StartDaemon, hub: FakeHub) -> None:
    d = start_daemon()
    hub.faults(cdn_rate=6 * MiB)  # per connection: 4 connections take 48 MiB in ~2 s
    with urllib.request.urlopen(f"{d.url}/{MODEL}/resolve/main/{BIG_FILE}", timeout=60) as resp:
        first = resp.read(1)
        transfers = d.status()["transfers"]
        body = first + resp.read()
    assert body == expected_files(MODEL)[BIG_FILE]
    assert transfers and transfers[0]["available"] < len(body), \
        f"the first byte came only once the file was in: {transfers}"


def test_a_read_alone_on_the_upstream_opens_its_connections(
        start_daemon: StartDaemon, hub: FakeHub) -> None:
    d = start_daemon()
    hub.faults(cdn_rate=6 * MiB)  # per connection: one alone takes 8 s for the 48 MiB
    started = time.monotonic()
    body = get_body(f"{d.url}/{MODEL}/resolve/main/{BIG_FILE}")
    took = time.monotonic() - started
    assert body == expected_files(MODEL)[BIG_FILE]
    assert hub.stats()["cdn_sending_max"] == 4  # upstream_connections
    assert took < 5, f"{took:.1f}s for 48 MiB at 6 MiB/s per connection"


def test_sigkill_mid_download_resumes_without_refetching(
        start_daemon: StartDaemon, hub: FakeHub, tmp_path: Path) -> None:
    d = start_daemon()
    hub.faults(cdn_rate=8 * MiB)  # per connection: 1.5 s for the 48 MiB
    url = f"{d.url}/{MODEL}/resolve/main/{BIG_FILE}"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(get_body, url)
        # killed once the second checkpoint (every 16 MiB) is durable
        wait_for(lambda: durable_bytes(d.cache_dir) >= 32 * MiB, "32 MiB of it durable",
                 timeout=20)
        d.kill()
        with pytest.raises(Exception):  # noqa: B017 - the connection just dies
            pending.result()
    fetched_before = hub.stats()["cdn_bytes"]
    hub.reset()
    d2 = start_daemon(cache_dir=d.cache_dir)
    body = get_body(url.replace(d.url, d2.url))
    want = expected_files(MODEL)[BIG_FILE]
    assert body == want
    refetched = hub.stats()["cdn_bytes"]
    assert refetched < len(want) - 20 * MiB, (
        f"refetched {refetched} of {len(want)} bytes after {fetched_before} were fetched")
    # the last byte goes out once the digest checks; the blob is marked complete after its fsync
    wait_for(lambda: d2.status()["store"]["complete_blobs"] >= 1, "the blob stored complete",
             timeout=10)


def test_gated_file_cached_with_a_token_is_refused_without_one(
        start_daemon: StartDaemon, hf_home: HfHome, hub: FakeHub) -> None:
    d = start_daemon()
    repo = "acme/gated-model"
    want = expected_files(repo)["model.safetensors"]
    assert download(d, hf_home(), repo, "model.safetensors", token=GOOD_TOKEN) == want
    # the repo's metadata is public (as on the Hub); that must not open its files
    assert "result" in hf_client(d.url, hf_home(), "repo_info", repo)
    out = hf_client(d.url, hf_home(), "hf_hub_download", repo, "model.safetensors")
    assert "GatedRepoError" in out.get("errors", []), out
    out = hf_client(d.url, hf_home(), "hf_hub_download", repo, "model.safetensors",
                    token=OTHER_TOKEN)
    assert "GatedRepoError" in out.get("errors", []), out
    out = hf_client(d.url, hf_home(), "hf_hub_download", "acme/private-model", "config.json")
    assert "RepositoryNotFoundError" in out.get("errors", []), out
    assert_no_leaks(hub)
    assert GOOD_TOKEN.encode() not in (d.cache_dir / "index.sqlite3").read_bytes()
    assert GOOD_TOKEN not in d.log()


def test_lying_upstream_bytes_are_never_served(start_daemon: StartDaemon,
                                               hub: FakeHub) -> None:
    d = start_daemon()
    url = f"{d.url}/acme/gated-model/resolve/main/model.safetensors"
    auth = {"Authorization": f"Bearer {GOOD_TOKEN}"}
    for fault in ({"cdn_corrupt": True}, {"cdn_short": True}):
        hub.reset()
        hub.faults(**fault)
        with pytest.raises(Exception):  # noqa: B017 - 502 or a cut connection
            get_body(url, auth)
        assert d.status()["store"]["complete_blobs"] == 0, fault
    hub.reset()
    body = get_body(url, auth)
    assert hashlib.sha256(body).digest() == hashlib.sha256(
        expected_files("acme/gated-model")["model.safetensors"]).digest()


def test_a_wrong_byte_in_a_segment_read_ahead_is_never_served(start_daemon: StartDaemon,
                                                                hub: FakeHub) -> None:
    d = start_daemon()
    url = f"{d.url}/{MODEL}/resolve/main/model.safetensors"
    want = expected_files(MODEL)["model.safetensors"]
    # in the last 8 MiB segment: put into the files while the first ones are still committed
    hub.faults(cdn_corrupt_at=len(want) - 3 * MiB)
    with pytest.raises(Exception):  # noqa: B017 - 502 or a cut connection
        get_body(url)
    assert "discarded, never served" in d.log()
    assert d.status()["store"]["complete_blobs"] == 0
    hub.reset()
    body = get_body(url)
    assert body == want


def test_sigterm_during_a_download_exits_cleanly(start_daemon: StartDaemon,
                                                 hub: FakeHub) -> None:
    d = start_daemon()
    hub.faults(cdn_rate=8 * MiB)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(get_body, f"{d.url}/{MODEL}/resolve/main/{BIG_FILE}")
        wait_for(lambda: transferring(d), "the download starts")
        started = time.monotonic()
        assert d.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 10
        with pytest.raises(Exception):  # noqa: B017
            pending.result()
    assert "stopped" in d.log()

"""The fake Hub itself, driven by the real huggingface_hub client in fresh processes."""

from __future__ import annotations

import hashlib
import http.client
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.fakehub import GOOD_TOKEN, OTHER_TOKEN, FakeHub, expected_files, file_sha256
from tests.harness import DIRECT, fetch, hf_client, tree_bytes

NO_XET = {"HF_HUB_DISABLE_XET": "1"}


def client(hub: FakeHub, tmp_path: Path, call: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    home = tmp_path / "hf"
    home.mkdir(exist_ok=True)
    return hf_client(hub.url, home, call, *args, env=NO_XET, timeout=60, **kwargs)


def cdn_location(hub: FakeHub, repo_path: str) -> str:
    """The signed CDN URL the hub redirects an LFS file to."""
    conn = http.client.HTTPConnection(hub.url.removeprefix("http://"), timeout=10)
    conn.request("HEAD", f"/{repo_path}")
    resp = conn.getresponse()
    assert resp.status == 302, resp.status
    location = resp.getheader("Location")
    conn.close()
    assert location and location.startswith(hub.cdn_url)
    return location


def test_snapshot_of_the_xet_repo_is_byte_identical(hub: FakeHub, tmp_path: Path) -> None:
    out = client(hub, tmp_path, "snapshot_download", "acme/tiny-tts")
    assert "result" in out, out
    assert tree_bytes(Path(out["result"])) == expected_files("acme/tiny-tts")
    stats = hub.stats()
    assert stats["cdn_bytes"] == 48 * 2**20 + 3 * 2**20 + 2**20
    assert stats["cdn_requests_with_auth"] == 0


@pytest.mark.parametrize("revision", ["v1.0", "dev", "refs/pr/1", "commit", "short"])
def test_hf_hub_download_at_revisions(hub: FakeHub, tmp_path: Path, revision: str) -> None:
    commit = client(hub, tmp_path, "repo_info", "acme/tiny-tts", revision="dev")["result"]
    rev = {"commit": commit, "short": commit[:7]}.get(revision, revision)
    want = expected_files("acme/tiny-tts", rev)["config.json"]
    out = client(hub, tmp_path, "hf_hub_download", "acme/tiny-tts", "config.json", revision=rev)
    assert Path(out["result"]).read_bytes() == want
    assert json.loads(want)  # a valid config
    if revision == "refs/pr/1":
        assert any("refs%2Fpr%2F1" in r for r in hub.stats()["requests"])


def test_lfs_and_odd_names_one_segment_and_gated(hub: FakeHub, tmp_path: Path) -> None:
    out = client(hub, tmp_path, "hf_hub_download", "gpt2", "model.safetensors")
    data = Path(out["result"]).read_bytes()
    assert data == expected_files("gpt2")["model.safetensors"]
    assert hashlib.sha256(data).hexdigest() == file_sha256("gpt2", "model.safetensors")
    for name in ("voices/speaker one.wav", "data/naïve file ü.txt", "empty.txt"):
        out = client(hub, tmp_path, "hf_hub_download", "acme/tiny-tts", name)
        assert Path(out["result"]).read_bytes() == expected_files("acme/tiny-tts")[name], name
    out = client(hub, tmp_path, "hf_hub_download", "acme/gated-model", "model.safetensors",
                 token=GOOD_TOKEN)
    assert Path(out["result"]).read_bytes() == expected_files("acme/gated-model")[
        "model.safetensors"]
    assert hub.stats()["cdn_requests_with_auth"] == 0


def test_dataset_snapshot_follows_pagination(hub: FakeHub, tmp_path: Path) -> None:
    out = client(hub, tmp_path, "snapshot_download", "acme/speech-set", repo_type="dataset")
    assert tree_bytes(Path(out["result"])) == expected_files("acme/speech-set",
                                                             repo_type="dataset")
    hub.reset()
    tree = client(hub, tmp_path, "list_repo_tree", "acme/speech-set", repo_type="dataset",
                  recursive=True)["result"]
    assert len(tree) == 122 + 2  # files and the two folders
    assert sum("cursor=" in r for r in hub.stats()["requests"]) == 2  # 124 entries, pages of 50


@pytest.mark.parametrize(("args", "kwargs", "error"), [
    (["acme/nope", "config.json"], {}, "RepositoryNotFoundError"),
    (["acme/private-model", "config.json"], {}, "RepositoryNotFoundError"),
    (["acme/tiny-tts", "config.json"], {"revision": "nope"}, "RevisionNotFoundError"),
    (["acme/tiny-tts", "nope.txt"], {}, "RemoteEntryNotFoundError"),
    (["acme/gated-model", "config.json"], {}, "GatedRepoError"),
    (["acme/gated-model", "config.json"], {"token": OTHER_TOKEN}, "GatedRepoError"),
    (["acme/private-model", "config.json"], {"token": OTHER_TOKEN}, "RepositoryNotFoundError"),
    (["acme/gated-model", "config.json"], {"token": "hf_invalid"}, "HfHubHTTPError"),
    (["gpt2", "config.json"], {"token": "hf_invalid"}, "HfHubHTTPError"),
])
def test_errors(hub: FakeHub, tmp_path: Path, args: list[str], kwargs: dict[str, str],
                error: str) -> None:
    out = client(hub, tmp_path, "hf_hub_download", *args, **kwargs)
    assert out.get("error") == error, out


def test_private_repo_with_the_good_token(hub: FakeHub, tmp_path: Path) -> None:
    out = client(hub, tmp_path, "hf_hub_download", "acme/private-model", "config.json",
                 token=GOOD_TOKEN)
    assert Path(out["result"]).read_bytes() == expected_files("acme/private-model")["config.json"]


GATED_METADATA = ["/api/models/acme/gated-model", "/api/models/acme/gated-model/revision/main",
                  "/api/models/acme/gated-model/tree/main?recursive=true"]


@pytest.mark.parametrize("token", [None, OTHER_TOKEN, GOOD_TOKEN])
def test_gated_metadata_goes_to_anyone_and_files_to_accounts_with_access(
        hub: FakeHub, token: str | None) -> None:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    for path in GATED_METADATA:
        assert fetch(hub.url + path, auth)[0] == 200, path
    req = urllib.request.Request(
        hub.url + "/api/models/acme/gated-model/paths-info/main", method="POST",
        data=b"paths=config.json", headers={
            **auth, "Content-Type": "application/x-www-form-urlencoded"})
    with DIRECT.open(req, timeout=10) as resp:
        assert [e["path"] for e in json.loads(resp.read())] == ["config.json"]
    status, headers, body = fetch(hub.url + "/acme/gated-model/resolve/main/config.json", auth)
    if token == GOOD_TOKEN:
        assert body == expected_files("acme/gated-model")["config.json"]
        return
    assert (status, headers.get("X-Error-Code")) == (403 if token else 401, "GatedRepo")
    assert headers["X-Error-Message"].startswith(
        "Access to model acme/gated-model is restricted. You must have access to it")


def test_the_client_reads_gated_metadata_with_another_accounts_token(
        hub: FakeHub, tmp_path: Path) -> None:
    out = client(hub, tmp_path, "model_info", "acme/gated-model", token=OTHER_TOKEN)
    assert "acme/gated-model" in out["result"], out


def test_an_invalid_token_is_refused_everywhere(hub: FakeHub) -> None:
    auth = {"Authorization": "Bearer hf_invalid"}
    for path in [*GATED_METADATA, "/api/models/gpt2", "/gpt2/resolve/main/config.json"]:
        status, headers, _ = fetch(hub.url + path, auth)
        assert (status, headers["X-Error-Message"]) == (
            401, "Invalid credentials in Authorization header"), path


def test_xet_headers_and_read_token(hub: FakeHub) -> None:
    status, headers, _ = fetch(hub.url + "/acme/tiny-tts/resolve/main/model.safetensors",
                               method="HEAD")
    assert status == 200  # urllib followed the redirect to the CDN
    conn = http.client.HTTPConnection(hub.url.removeprefix("http://"), timeout=10)
    conn.request("HEAD", "/acme/tiny-tts/resolve/main/model.safetensors")
    resp = conn.getresponse()
    assert resp.getheader("X-Xet-Hash") and 'rel="xet-auth"' in resp.getheader("Link", "")
    conn.close()
    status, _, body = fetch(hub.url + resp.getheader("X-Xet-Refresh-Route", ""))
    assert status == 200 and json.loads(body)["casUrl"]
    assert hub.stats()["xet_requests"] == 1


def test_cdn_ranges_signatures_and_counters(hub: FakeHub) -> None:
    url = cdn_location(hub, "gpt2/resolve/main/model.safetensors")
    data = expected_files("gpt2")["model.safetensors"]
    status, headers, body = fetch(url, {"Range": "bytes=100-199"})
    assert (status, body, headers["Content-Range"]) == (206, data[100:200],
                                                        f"bytes 100-199/{len(data)}")
    assert fetch(url, {"Range": f"bytes={len(data)}-"})[0] == 416
    assert fetch(url.replace("Signature=", "Signature=0"))[0] == 403
    assert fetch(url, {"Authorization": "Bearer leak"})[2] == data
    stats = hub.stats()
    assert stats["cdn_bytes"] == 100 + len(data)
    assert stats["cdn_requests_with_auth"] == 1


def test_cdn_faults(hub: FakeHub) -> None:
    url = cdn_location(hub, "gpt2/resolve/main/model.safetensors")
    data = expected_files("gpt2")["model.safetensors"]
    hub.faults(cdn_drop_after=300_000, cdn_drop_count=1)
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        fetch(url)
    assert hub.stats()["cdn_bytes"] == 300_000
    assert fetch(url)[2] == data  # only one response was cut
    hub.reset()
    hub.faults(cdn_corrupt=True)
    body = fetch(url)[2]
    assert len(body) == len(data) and body != data
    hub.faults(cdn_corrupt=False, cdn_short=True)
    with pytest.raises(http.client.IncompleteRead):
        fetch(url)
    hub.faults(cdn_short=False, cdn_status=503)
    assert fetch(url)[0] == 503


def test_hub_faults_spare_the_control_api(hub: FakeHub) -> None:
    hub.faults(hub_status=503)
    assert fetch(hub.url + "/api/models/gpt2")[0] == 503
    hub.faults(hub_status=0, hub_down=True)
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        fetch(hub.url + "/api/models/gpt2")
    assert hub.stats()["hub_requests"] == 2
    hub.reset()
    assert fetch(hub.url + "/api/models/gpt2")[0] == 200


def test_api_json(hub: FakeHub) -> None:
    info = json.loads(fetch(hub.url + "/api/models/acme/tiny-tts/revision/v1.0?blobs=true")[2])
    names = {s["rfilename"] for s in info["siblings"]}
    assert names == set(expected_files("acme/tiny-tts", "v1.0"))
    lfs = next(s for s in info["siblings"] if s["rfilename"] == "model.safetensors")["lfs"]
    assert lfs["sha256"] == file_sha256("acme/tiny-tts", "model.safetensors", "v1.0")
    top = json.loads(fetch(hub.url + "/api/models/acme/tiny-tts/tree/main")[2])
    assert {e["path"] for e in top} >= {"sub", "voices", "data", "model.safetensors"}
    assert all("/" not in e["path"] for e in top)
    sub = json.loads(fetch(hub.url + "/api/models/acme/tiny-tts/tree/main/sub%2Ffolder")[2])
    assert [e["path"] for e in sub] == ["sub/folder/weights.bin"] and sub[0]["xetHash"]
    req = urllib.request.Request(
        hub.url + "/api/models/acme/tiny-tts/paths-info/main", method="POST",
        data=b"paths=config.json&paths=sub%2Ffolder&expand=true",
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    with DIRECT.open(req, timeout=10) as resp:
        assert [e["path"] for e in json.loads(resp.read())] == ["config.json", "sub/folder"]


def test_add_repo_and_restart_on_the_same_ports(tmp_path: Path) -> None:
    with FakeHub(tmp_path / "hub") as hub:
        url, cdn = hub.url, hub.cdn_url
        commit = hub.add_repo("acme/added", {"w.bin": {"size": 70_000, "lfs": True},
                                             "a.txt": {"size": 10, "lfs": False}}, seed=3)
        hub.restart()
        assert (hub.url, hub.cdn_url) == (url, cdn)
        data = expected_files("acme/added")["w.bin"]
        assert fetch(hub.url + "/acme/added/resolve/main/w.bin")[2] == data
        status, headers, body = fetch(f"{hub.url}/acme/added/resolve/{commit}/a.txt")
        assert (status, body) == (200, expected_files("acme/added")["a.txt"])


def test_a_direct_xet_client_leaves_for_xet_and_fails_fast(hub: FakeHub, tmp_path: Path) -> None:
    out = hf_client(hub.url, tmp_path, "hf_hub_download", "acme/tiny-tts",
                    "sub/folder/weights.bin", timeout=60)
    assert "error" in out and out["seconds"] < 20, out
    stats = hub.stats()
    assert stats["xet_requests"] >= 2  # the read token, then Xet storage refused
    assert stats["cdn_requests"] == 0

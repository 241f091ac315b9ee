"""Bad input gets a clear 4xx and nothing else happens."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.fakehub import MODEL, FakeHub, expected_files
from tests.harness import StartDaemon, http_json, raw


@pytest.mark.parametrize("path", [
    f"/{MODEL}/resolve/main/..%2F..%2Fetc%2Fpasswd",
    f"/{MODEL}/resolve/main/../../index.sqlite3",
    f"/{MODEL}/resolve/main/%2Fetc%2Fpasswd",
    f"/{MODEL}/resolve/main/a%00b",
    "/acme/..%2F..%2Fx/resolve/main/config.json",
    "/../../etc/resolve/main/passwd",
    f"/{MODEL}/resolve/..%2F..%2Fmain/config.json",
    "/api/models/acme/tiny-tts/tree/..%2F..",
])
def test_hostile_paths_get_400(start_daemon: StartDaemon, hub: FakeHub, path: str) -> None:
    d = start_daemon()
    status, headers, body = raw(d, "GET", path)
    assert status in (400, 404), (status, body)
    assert "error" in json.loads(body)
    assert hub.stats()["hub_requests"] == 0
    assert http_json("GET", d.url + "/_modelpeer/v1/health")["status"] == "ok"


@pytest.mark.parametrize(("range_header", "status"), [
    ("bytes=abc", 400), ("bytes=0-1,5-6", 400), ("items=0-5", 400), ("bytes=-", 400),
    ("bytes=999999999-", 416), ("bytes=10-5", 416),
])
def test_malformed_ranges(start_daemon: StartDaemon, hub: FakeHub, range_header: str,
                          status: int) -> None:
    d = start_daemon()
    got, headers, body = raw(d, "GET", f"/{MODEL}/resolve/main/config.json",
                             {"Range": range_header})
    assert got == status, body
    assert "error" in json.loads(body)


def test_valid_ranges(start_daemon: StartDaemon, hub: FakeHub) -> None:
    d = start_daemon()
    want = expected_files(MODEL)["README.md"]
    for header, (a, b) in {"bytes=0-99": (0, 100), "bytes=100-": (100, len(want)),
                           "bytes=-50": (len(want) - 50, len(want))}.items():
        status, headers, body = raw(d, "GET", f"/{MODEL}/resolve/main/README.md",
                                    {"Range": header})
        assert status == 206
        assert body == want[a:b]
        assert headers["Content-Range"] == f"bytes {a}-{b - 1}/{len(want)}"


def test_oversized_headers_and_unknown_routes(start_daemon: StartDaemon, hub: FakeHub) -> None:
    d = start_daemon()
    status, _, _ = raw(d, "GET", f"/{MODEL}/resolve/main/config.json", {"X-Big": "a" * 40000})
    assert status in (400, 431)
    status, headers, body = raw(d, "GET", "/definitely/not/a/hub/route")
    assert status == 404 and "error" in json.loads(body)
    status, _, _ = raw(d, "DELETE", f"/{MODEL}/resolve/main/config.json")
    assert status == 405
    assert http_json("GET", d.url + "/_modelpeer/v1/health")["status"] == "ok"


def test_full_disk_gives_a_clear_5xx_and_a_consistent_store(
        start_daemon: StartDaemon, hub: FakeHub, small_disk: Path) -> None:
    d = start_daemon(cache_dir=small_disk / "cache")
    filler = small_disk / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
    path = f"/{MODEL}/resolve/main/sub/folder/weights.bin"
    status, headers, body = raw(d, "GET", path)
    assert status == 507, (status, body[:200], d.log()[-2500:])
    assert "disk is full" in json.loads(body)["error"]
    assert http_json("GET", d.url + "/_modelpeer/v1/health")["status"] == "ok"
    # space comes back: the same request works, and a restart finds a consistent store
    filler.unlink()
    status, _, body = raw(d, "GET", path)
    assert status == 200 and body == expected_files(MODEL)["sub/folder/weights.bin"]
    d.stop()
    d2 = start_daemon(cache_dir=small_disk / "cache")
    assert d2.status()["store"]["complete_blobs"] == 1
    status, _, body = raw(d2, "GET", path)
    assert status == 200 and body == expected_files(MODEL)["sub/folder/weights.bin"]

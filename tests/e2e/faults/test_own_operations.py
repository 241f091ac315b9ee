"""The daemon's own operations (rm, gc, eviction, transfers) never send a wrong or cut-off byte:
real daemons against the fake Hub, with its CDN faults."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from tests.fakehub import MODEL, FakeHub, expected_files
from tests.harness import (
    HfHome,
    MiB,
    Modelpeerd,
    StartDaemon,
    cli,
    download,
    hf_client,
    raw,
    wait_for,
)


def open_get(d: Modelpeerd, path: str) -> socket.socket:
    """A GET on a raw socket with a small receive buffer, for a reader that reads slowly."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(30)
    sock.connect((d.host, d.port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {d.host}\r\nConnection: close\r\n\r\n".encode())
    return sock


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and the body bytes that came with them."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"connection closed in the headers: {data!r}"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def read_body(sock: socket.socket, upto: int, pause: float = 0.0) -> Iterator[bytes]:
    """Up to `upto` bytes, 1 MiB at a time with a pause between reads; stops at EOF."""
    got = 0
    while got < upto:
        data = sock.recv(min(MiB, upto - got))
        if not data:
            return
        got += len(data)
        yield data
        time.sleep(pause)


def test_rm_and_gc_under_a_slow_reader_cut_nothing(start_daemon: StartDaemon,
                                                    hub: FakeHub) -> None:
    repo = "faults/read-while-removed"
    hub.add_repo(repo, {"big.bin": {"size": 96 * MiB}})
    want = expected_files(repo)["big.bin"]
    d = start_daemon()
    path = f"/{repo}/resolve/main/big.bin"
    assert raw(d, "GET", path)[2] == want  # now cached
    with open_get(d, path) as sock:
        status, headers, body = read_head(sock)
        assert status == 200 and int(headers["content-length"]) == len(want)
        body += b"".join(read_body(sock, 8 * MiB - len(body), pause=0.02))
        rm = cli(d, "rm", repo, "--json")
        gc = cli(d, "gc", "--json")
        assert rm.returncode == 0 and gc.returncode == 0, rm.stderr + gc.stderr
        body += b"".join(read_body(sock, len(want) - len(body), pause=0.005))
    assert len(body) == len(want), f"cut off after {len(body)} of {len(want)} bytes"
    assert body == want
    assert json.loads(rm.stdout)["pending_bytes"] == len(want)
    # the repo is forgotten at once; its bytes go once the last reader is done
    assert json.loads(cli(d, "ls", "--json").stdout) == []
    wait_for(lambda: d.status()["store"]["complete_blobs"] == 0, "the blob is gone", timeout=60)
    assert "after its last reader" in d.log()


def test_a_range_of_a_blob_in_transfer_gets_only_verified_bytes(start_daemon: StartDaemon,
                                                                 hub: FakeHub) -> None:
    d = start_daemon()
    path = f"/{MODEL}/resolve/main/model.safetensors"
    want = expected_files(MODEL)["model.safetensors"]
    hub.faults(cdn_corrupt_at=500, cdn_rate=8 * MiB)  # ~1.5 s over 4 connections
    status, _, body = raw(d, "GET", path, {"Range": "bytes=0-999"})
    assert status == 502, (status, body[:200])  # the digest failed: never the wrong byte
    hub.reset()
    hub.faults(cdn_rate=8 * MiB)
    status, headers, body = raw(d, "GET", path, {"Range": "bytes=0-999"})
    assert status == 206 and body == want[:1000]


def test_an_upstream_that_ignores_range_is_read_as_one_stream(
        start_daemon: StartDaemon, hub: FakeHub, hf_home: HfHome) -> None:
    repo = "faults/no-range-cdn"
    hub.add_repo(repo, {"a.bin": {"size": 20 * MiB}, "b.bin": {"size": 20 * MiB}})
    files = expected_files(repo)
    d = start_daemon()
    hub.faults(cdn_ignore_range=True)
    for name in ("a.bin", "b.bin"):
        before = hub.stats()
        out = hf_client(d.url, hf_home(), "hf_hub_download", repo, name)
        assert "result" in out, out
        assert Path(out["result"]).read_bytes() == files[name]
    after = hub.stats()
    # the second file: one request, no Range probe, and nothing read twice
    assert after["cdn_requests"] - before["cdn_requests"] == 1
    assert after["cdn_range_requests"] == before["cdn_range_requests"]
    assert after["cdn_bytes"] - before["cdn_bytes"] == len(files["b.bin"])


def test_a_stream_from_an_origin_ignoring_range_resumes_after_drops(
        start_daemon: StartDaemon, hub: FakeHub) -> None:
    repo = "faults/no-range-dropping-cdn"
    hub.add_repo(repo, {"c.bin": {"size": 20 * MiB}})
    d = start_daemon()
    # up to 4 drops go to the parallel Range requests that find out, the rest to the stream
    hub.faults(cdn_ignore_range=True, cdn_drop_after=7 * MiB, cdn_drop_count=6)
    status, _, body = raw(d, "GET", f"/{repo}/resolve/main/c.bin")
    assert status == 200 and body == expected_files(repo)["c.bin"]
    log = d.logged()
    assert "as one stream" in log and "resuming" in log


def test_max_cache_size_is_kept_while_a_blob_is_written(start_daemon: StartDaemon,
                                                         hub: FakeHub) -> None:
    repo = "faults/past-the-limit"
    hub.add_repo(repo, {"next.bin": {"size": 40 * MiB}})
    d = start_daemon("--max-cache-size", "60MiB", "--upstream-connections", "1")
    assert raw(d, "GET", f"/{MODEL}/resolve/main/model.safetensors")[0] == 200
    hub.faults(cdn_rate=8 * MiB)  # 5 s for the 40 MiB
    with open_get(d, f"/{repo}/resolve/main/next.bin"):
        wait_for(lambda: d.status()["transfers"], "the transfer starts", timeout=60)
        # the store counts bytes once they are durable, a little behind the transfer
        status = wait_for(lambda: (lambda st: st if st["store"]["complete_blobs"] == 0
                                   or not st["transfers"] else None)(d.status()),
                          "the old blob is evicted or the transfer ends", timeout=60)
        assert status["transfers"], "the 48 MiB blob went only after the transfer ended"
        assert status["store"]["bytes"] <= 60 * MiB


def test_writes_evict_old_blobs_before_the_disk_fills(start_daemon: StartDaemon, hub: FakeHub,
                                                       small_disk: Path) -> None:
    repo = "faults/after-the-big-one"
    hub.add_repo(repo, {"next.bin": {"size": 24 * MiB}})
    d = start_daemon(cache_dir=small_disk / "cache")
    old = f"/{MODEL}/resolve/main/model.safetensors"
    assert raw(d, "GET", old)[2] == expected_files(MODEL)["model.safetensors"]
    # 48 + 24 MiB do not fit in 64: the old blob must go while the new one is written
    status, _, body = raw(d, "GET", f"/{repo}/resolve/main/next.bin")
    assert status == 200, (status, body[:300])
    assert body == expected_files(repo)["next.bin"]
    assert d.status()["store"]["complete_blobs"] == 1
    assert "to make room" in d.log()


def test_the_cli_prints_network_labels_escaped(start_daemon: StartDaemon, hub: FakeHub) -> None:
    repo = "faults/odd-names"
    name = "evil\x1b[2J\x1b[31m\rname.bin"
    hub.add_repo(repo, {name: {"size": 16 * MiB}})
    d = start_daemon()
    hub.faults(cdn_rate=MiB)
    with open_get(d, f"/{repo}/resolve/main/{quote(name)}"):
        wait_for(lambda: bool(d.status()["transfers"]), "the transfer shows", timeout=60)
        text = cli(d, "status")
        assert text.returncode == 0, text.stderr
        assert "\x1b" not in text.stdout and "\r" not in text.stdout
        assert "evil\\x1b[2J\\x1b[31m\\rname.bin" in text.stdout
        as_json = json.loads(cli(d, "status", "--json").stdout)
        assert as_json["transfers"][0]["file"] == f"{repo}/{name}"


def test_a_disk_that_fills_mid_download_keeps_what_was_stored_and_resumes(
        start_daemon: StartDaemon, hub: FakeHub, hf_home: HfHome, small_disk: Path) -> None:
    before, during = "faults/stored-before-the-disk-fills", "faults/disk-fills-midway"
    hub.add_repo(before, {"kept.bin": {"size": 6 * MiB}})
    hub.add_repo(during, {"big.bin": {"size": 40 * MiB}})
    # one connection: the blob's prefix is what fills the disk (with several, the segments
    # written ahead of the prefix take the room first, and it resumes from its last checkpoint)
    d = start_daemon("--upstream-connections", "1", cache_dir=small_disk)  # log beside the mount
    assert download(d, hf_home(), before, "kept.bin") == expected_files(before)["kept.bin"]
    # leave room for 2 of the 5 chunks: the disk fills in the middle of the download
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, free - 20 * MiB)
    out = hf_client(d.url, hf_home(), "hf_hub_download", during, "big.bin")
    assert "error" in out, "the download fit on a full disk"
    assert "disk full" in d.log()
    filler.unlink()
    hub.reset()
    assert download(d, hf_home(), during, "big.bin") == expected_files(during)["big.bin"]
    assert hub.stats()["cdn_bytes"] <= 40 * MiB - 16 * MiB, "the download started over"
    hub.reset()
    assert download(d, hf_home(), before, "kept.bin") == expected_files(before)["kept.bin"]
    assert hub.stats()["cdn_bytes"] == 0, "a blob stored before the disk filled was lost"

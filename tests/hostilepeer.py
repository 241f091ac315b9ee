"""A keyed but broken cluster member, for the malformed-peer fault suite: it holds the cluster
key, signs its answers and answers GET /status well, so a daemon admits it; but for one blob it
answers a data route with one malformation. One process plays several such members, each on its
own loopback address with its own node key (a ban is per node and per address, so cases do not
spoil each other); each answers every other blob like a member that holds nothing. A member
whose malformation is on GET /status answers it well until it is first asked about its blob;
one whose malformation is on a warm-job route is asked only by a job that names it.

`python -m tests.hostilepeer CONFIG` where CONFIG is JSON: {"key": cluster key file,
"dir": where node keys go, "log": request log, "members": [{"address", "port", "mode",
"digest", "size", "blob": file with the blob's bytes}]}. It prints one JSON line mapping each
address to its node id once every member listens, and appends each request it gets to the log
as a JSON line {"address", "path", "mode"} ("mode" is "" for a well-formed answer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from modelpeer.daemon.keyfile import read_key_file
from modelpeer.daemon.lan.cluster import (
    H_MAC,
    H_NONCE,
    UNHASHED_BODY,
    ClusterKey,
    Credentials,
    NodeIdentity,
    body_digest,
)
from modelpeer.daemon.lan.peers import API, MAX_ANSWER
from modelpeer.daemon.lan.swarm import chunk_torrent

CHUNK_SIZE = 8 * 1024 * 1024  # the suite's daemons use 8 MiB chunks
DRIP_BYTES = 600  # a drip-fed answer lasts this many seconds: far past any deadline


@dataclasses.dataclass
class Member:
    address: str
    port: int
    mode: str
    digest: str
    size: int
    blob: Path
    credentials: Credentials
    log: Path
    armed: bool = False  # asked about its blob already

    def note(self, path: str, mode: str) -> None:
        with self.log.open("a") as f:
            f.write(json.dumps({"address": self.address, "path": path, "mode": mode}) + "\n")

    def signed(self, request: web.Request, status: int, body: bytes | None) -> dict[str, str]:
        """Answer headers signed for this request; `body` None: a streamed answer."""
        digest = UNHASHED_BODY if body is None else body_digest(body)
        return self.credentials.sign_answer(request.headers.get(H_NONCE, ""), status, digest)

    def json_answer(self, request: web.Request, value: object,
                    status: int = 200) -> web.Response:
        body = json.dumps(value).encode()
        return web.Response(body=body, status=status, content_type="application/json",
                            headers=self.signed(request, status, body))


# --- what a well-formed member that holds nothing of the blob says --------------------------
def status_of(m: Member) -> dict[str, object]:
    """Its BitTorrent port is its peer API port: it speaks HTTP there, not BitTorrent."""
    return {"node_id": m.credentials.node_id, "name": f"hostile-{m.mode}",
            "version": "0.1.0", "bt_port": m.port, "chunks": 0}


def empty_map(digest: str) -> dict[str, object]:
    return {"digest": digest, "chunks": [], "small": False}


def chunk_count(m: Member) -> int:
    return max(1, -(-m.size // CHUNK_SIZE))


def relaying_map(m: Member) -> dict[str, object]:
    """A member that says it gets the blob from the upstream and has all of it, at a rate
    (10 GB/s) no upstream beats: the daemon relays from it rather than overtaking it."""
    return {**empty_map(m.digest), "transfer": "upstream", "available": m.size,
            "rate": 10_000_000_000}


def holding_map(m: Member) -> dict[str, object]:
    """A member that claims every chunk of the blob."""
    info_hash = "" if m.mode == "torrent-unseeded" else "ab" * 20
    return {**empty_map(m.digest), "chunks": [{"index": i, "info_hash": info_hash}
                                              for i in range(chunk_count(m))]}


# --- raw answers: what aiohttp's Response would not send -----------------------------------
async def streamed(m: Member, request: web.Request, length: int | None,
                   digest_of: bytes | None = None) -> web.StreamResponse:
    resp = web.StreamResponse(headers=m.signed(request, 200, digest_of))
    if length is not None:
        resp.content_length = length
    await resp.prepare(request)
    return resp


async def drip(m: Member, request: web.Request, body: bytes) -> web.StreamResponse:
    """One byte a second, of a body that would be well-formed in the end."""
    resp = await streamed(m, request, len(body), body)
    for i in range(min(len(body), DRIP_BYTES)):
        await resp.write(body[i:i + 1])
        await asyncio.sleep(1.0)
    return resp


async def cut(m: Member, request: web.Request, body: bytes, keep: int) -> web.StreamResponse:
    """Announce the whole body, send `keep` bytes of it, close the connection."""
    resp = await streamed(m, request, len(body), body)
    await resp.write(body[:keep])
    if request.transport is not None:
        request.transport.close()
    return resp


async def overlong(m: Member, request: web.Request, body: bytes) -> web.StreamResponse:
    """The body its Content-Length announces, then more bytes on the kept-alive connection."""
    resp = await streamed(m, request, len(body), body)
    await resp.write(body)
    if request.transport is not None:
        request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad")
    return resp


async def frozen(m: Member, request: web.Request) -> web.StreamResponse:
    """Headers, then silence with the connection open."""
    resp = await streamed(m, request, None)
    await asyncio.sleep(DRIP_BYTES)
    return resp


async def huge(m: Member, request: web.Request, announced: bool) -> web.StreamResponse:
    """A body over the answer limit, with or without a Content-Length saying so."""
    size = MAX_ANSWER + 1024 * 1024
    resp = await streamed(m, request, size if announced else None)
    block = b" " * 65536
    for _ in range(size // len(block)):
        await resp.write(block)
    return resp


def relay_range(request: web.Request, m: Member) -> tuple[int, int]:
    return int(request.query.get("start", "0")), int(request.query.get("end", str(m.size)))


def blob_bytes(m: Member) -> bytes:
    return m.blob.read_bytes()


def flipped(data: bytes) -> bytes:
    return bytes(b ^ 0x5A for b in data)


# --- the malformations: (route, answer) ------------------------------------------------------
Answer = Callable[[Member, web.Request], Awaitable[web.StreamResponse]]


async def _ok(value: object, m: Member, request: web.Request) -> web.StreamResponse:
    return m.json_answer(request, value)


def _map(value: Callable[[Member], object]) -> Answer:
    return lambda m, request: _ok(value(m), m, request)


async def _raw_answer(m: Member, request: web.Request, body: bytes) -> web.StreamResponse:
    return web.Response(body=body, content_type="application/json",
                        headers=m.signed(request, 200, body))


async def _relay_wrong_bytes(m: Member, request: web.Request) -> web.StreamResponse:
    start, end = relay_range(request, m)
    resp = await streamed(m, request, end - start)
    await resp.write(flipped(blob_bytes(m)[start:end]))
    return resp


async def _relay_wrong_offset(m: Member, request: web.Request) -> web.StreamResponse:
    start, end = relay_range(request, m)
    data = blob_bytes(m)
    resp = await streamed(m, request, end - start)
    await resp.write((data[start + 4096:end] + data)[:end - start])
    return resp


async def _relay_too_long(m: Member, request: web.Request) -> web.StreamResponse:
    start, end = relay_range(request, m)
    resp = await streamed(m, request, None)
    await resp.write(blob_bytes(m)[start:end] + b"extra bytes past the end")
    return resp


async def _relay_cut(m: Member, request: web.Request) -> web.StreamResponse:
    start, end = relay_range(request, m)
    data = blob_bytes(m)[start:end]
    return await cut(m, request, data, len(data) // 2)


async def _relay_drip(m: Member, request: web.Request) -> web.StreamResponse:
    start, end = relay_range(request, m)
    return await drip(m, request, blob_bytes(m)[start:end])


async def _small_wrong(m: Member, request: web.Request) -> web.StreamResponse:
    body = flipped(blob_bytes(m))
    return web.Response(body=body, headers=m.signed(request, 200, body))


async def _small_cut(m: Member, request: web.Request) -> web.StreamResponse:
    data = blob_bytes(m)
    return await cut(m, request, data, len(data) // 2)


async def _signed_over_other(m: Member, request: web.Request) -> web.StreamResponse:
    body = json.dumps(empty_map(m.digest)).encode()
    other = json.dumps(holding_map(m)).encode()
    return web.Response(body=other, content_type="application/json",
                        headers=m.signed(request, 200, body))


async def _badly_signed(m: Member, request: web.Request) -> web.StreamResponse:
    body = json.dumps(holding_map(m)).encode()
    headers = m.signed(request, 200, body)
    headers[H_MAC] = "0" * 64
    return web.Response(body=body, content_type="application/json", headers=headers)


async def _real_torrent(m: Member, request: web.Request) -> web.StreamResponse:
    """The true torrent of the chunk asked for, which this member never seeds."""
    idx = int(request.match_info["tail"].rsplit("/", 1)[1])
    chunk = m.blob.parent / "chunks" / f"{m.digest}.{idx}"
    chunk.parent.mkdir(exist_ok=True)
    chunk.write_bytes(blob_bytes(m)[idx * CHUNK_SIZE:(idx + 1) * CHUNK_SIZE])
    made = await asyncio.to_thread(chunk_torrent, chunk)
    return web.Response(body=made.torrent, headers=m.signed(request, 200, made.torrent))


def _deep(depth: int) -> bytes:
    inner = b"[" * depth + b"]" * depth
    return b'{"digest": 0, "chunks": ' + inner + b"}"


STATUS, CHUNKS, RELAY, BLOB, TORRENT = "status", "chunks", "relay", "blob", "torrent"
WARM, WARM_JOB = "warm", "warm-job"  # POST /warm; GET /warm/{job} and the rest under it

MODES: dict[str, tuple[str, Answer]] = {
    # the chunk map, read by every download
    "map-list": (CHUNKS, _map(lambda m: [relaying_map(m)])),
    "map-string-for-int": (CHUNKS, _map(lambda m: {**relaying_map(m), "available": "all"})),
    "map-missing-digest": (CHUNKS, _map(lambda m: {"chunks": [], "small": True})),
    "map-negative-index": (CHUNKS, _map(lambda m: {**empty_map(m.digest),
                                                   "chunks": [{"index": -1}]})),
    "map-huge-number": (CHUNKS, _map(lambda m: {**relaying_map(m), "available": 2 ** 80})),
    "map-nan-rate": (CHUNKS, _map(lambda m: {**relaying_map(m), "rate": float("nan")})),
    "map-deep-nesting": (CHUNKS, lambda m, r: _raw_answer(m, r, _deep(200_000))),
    "map-garbage": (CHUNKS, lambda m, r: _raw_answer(m, r, b"\x00\xff<html>not json\x9c")),
    "map-huge-announced": (CHUNKS, lambda m, r: huge(m, r, announced=True)),
    "map-huge-chunked": (CHUNKS, lambda m, r: huge(m, r, announced=False)),
    "map-drip": (CHUNKS, lambda m, r: drip(m, r, json.dumps(relaying_map(m)).encode())),
    "map-frozen": (CHUNKS, frozen),
    "map-short-body": (CHUNKS, lambda m, r: cut(m, r, json.dumps(relaying_map(m)).encode(), 20)),
    "map-longer-than-length": (CHUNKS, lambda m, r: overlong(
        m, r, json.dumps({**empty_map(m.digest), "small": True}).encode())),
    "map-signed-other-body": (CHUNKS, _signed_over_other),
    "map-bad-signature": (CHUNKS, _badly_signed),
    "map-http-500": (CHUNKS, lambda m, r: _ok_status(m, r, 500, b"<h1>oops</h1>" * 100)),
    "map-redirect": (CHUNKS, lambda m, r: _redirect(m, r)),
    # complete chunks claimed: the torrent of each is asked for
    "torrent-garbage": (TORRENT, lambda m, r: _raw_answer(m, r, b"d4:infod6:lengthi-5eee")),
    "torrent-huge": (TORRENT, lambda m, r: huge(m, r, announced=False)),
    "torrent-drip": (TORRENT, lambda m, r: drip(m, r, b"d4:info" + b"x" * 1000)),
    "torrent-unseeded": (TORRENT, _real_torrent),
    # the whole small blob claimed
    "small-wrong-bytes": (BLOB, _small_wrong),
    "small-cut": (BLOB, _small_cut),
    "small-drip": (BLOB, lambda m, r: drip(m, r, blob_bytes(m))),
    "small-huge": (BLOB, lambda m, r: huge(m, r, announced=False)),
    # a transfer of the blob claimed: it is relayed from this member
    "relay-wrong-bytes": (RELAY, _relay_wrong_bytes),
    "relay-wrong-offset": (RELAY, _relay_wrong_offset),
    "relay-too-long": (RELAY, _relay_too_long),
    "relay-cut": (RELAY, _relay_cut),
    "relay-drip": (RELAY, _relay_drip),
    "relay-frozen": (RELAY, frozen),
    "relay-http-404": (RELAY, lambda m, r: _ok_status(m, r, 404, b"no such thing")),
    # warm jobs this node coordinates: the member is asked only when a job names it
    "warm-start-drip": (WARM, lambda m, r: drip(m, r, b'{"job": "0123456789ab"' + b" " * 200
                                                + b"}")),
    "warm-start-wrong-id": (WARM, _map(lambda m: {"job": 12})),
    "warm-start-other-job": (WARM, _map(lambda m: {"job": "0123456789ab"})),
    "warm-status-garbage": (WARM_JOB, lambda m, r: _raw_answer(m, r, b"\x89PNG garbage")),
    "warm-status-drip": (WARM_JOB, lambda m, r: drip(m, r, json.dumps(job_status()).encode())),
    # liveness: a member admitted long ago starts to drip its status
    "status-drip": (STATUS, lambda m, r: drip(m, r, json.dumps(status_of(m)).encode())),
}


async def _ok_status(m: Member, request: web.Request, status: int,
                     body: bytes) -> web.StreamResponse:
    return web.Response(body=body, status=status, headers=m.signed(request, status, body))


async def _redirect(m: Member, request: web.Request) -> web.StreamResponse:
    headers = {**m.signed(request, 302, b""), "Location": "http://127.0.0.1:9/elsewhere"}
    return web.Response(status=302, headers=headers)


def map_for(m: Member) -> dict[str, object]:
    """The chunk map of its blob that leads the daemon to the route under test."""
    route = MODES[m.mode][0]
    if route == RELAY:
        return relaying_map(m)
    if route == TORRENT:
        return holding_map(m)
    return {**empty_map(m.digest), "small": route == BLOB}


def job_status() -> dict[str, object]:
    return {"state": "running", "error": "", "files": 1, "done_files": 0, "bytes": 1,
            "have_bytes": 0, "repo": "", "started": 0, "finished": 0}


async def well_formed(m: Member, request: web.Request, kind: str,
                      digest: str) -> web.Response:
    if kind == STATUS:
        return m.json_answer(request, status_of(m))
    if kind == WARM:
        return m.json_answer(request, {"job": (await request.json())["id"]})
    if kind == WARM_JOB:
        return m.json_answer(request, job_status())
    if kind == CHUNKS:
        return m.json_answer(request, map_for(m) if digest == m.digest else empty_map(digest))
    return m.json_answer(request, {"error": "not held"}, status=404)


def routes(m: Member) -> web.Application:
    route, malformed = MODES[m.mode]

    async def handle(request: web.Request) -> web.StreamResponse:
        kind, _, rest = request.path.removeprefix(API + "/").partition("/")
        kind = WARM_JOB if kind == WARM and rest else kind
        digest = rest.split("/")[0]
        about_blob = kind not in (STATUS, WARM, WARM_JOB) and digest == m.digest
        m.armed = m.armed or about_blob
        if kind == route and (about_blob or kind in (WARM, WARM_JOB)
                              or (kind == STATUS and m.armed)):
            m.note(request.path_qs, m.mode)
            return await malformed(m, request)
        m.note(request.path_qs, "")
        return await well_formed(m, request, kind, digest)

    app = web.Application()
    app.router.add_route("*", API + "/{tail:.*}", handle)
    return app


async def main(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    key = ClusterKey(read_key_file(Path(config["key"])))
    runners, ids = [], {}
    for i, spec in enumerate(config["members"]):
        identity = NodeIdentity.load_or_create(Path(config["dir"]) / f"node{i}.key")
        m = Member(spec["address"], spec["port"], spec["mode"], spec["digest"], spec["size"],
                   Path(spec["blob"]), Credentials(key, identity), Path(config["log"]))
        runner = web.AppRunner(routes(m), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, m.address, m.port).start()
        runners.append(runner)
        ids[m.address] = identity.node_id
    print(json.dumps(ids), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))

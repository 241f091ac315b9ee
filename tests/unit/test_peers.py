"""Membership and the peer API in-process, over real loopback sockets: only holders of the key
that prove it are members, an answer must be the asked node's answer to that request, a request
is valid once and for one node, and headers are checked before any body is read."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from modelpeer.daemon.errors import PeerError
from modelpeer.daemon.lan.chunkmaps import BATCH_WINDOW, LATE_AFTER, ChunkMaps
from modelpeer.daemon.lan.cluster import ClusterKey, Credentials, NodeIdentity
from modelpeer.daemon.lan.peers import API, Peer, PeerApi, PeerSet
from modelpeer.daemon.peermsg import PeerTransfer, parse_status, transfer_fields
from modelpeer.daemon.store import BlobId
from modelpeer.daemon.transfer import TransferSource
from tests.harness import free_port

KEY = b"k" * 32
BIG = bytes(range(256)) * 12 * 1024  # 3 MiB: arrives in many reads


class Node:
    """A peer API with a status route, as a daemon has, on a loopback port."""

    def __init__(self, tmp: Path, name: str, key: bytes = KEY,
                 status: Callable[[Credentials], Any] | None = None) -> None:
        self.credentials = Credentials(ClusterKey(key),
                                       NodeIdentity.load_or_create(tmp / f"{name}.key"))
        self.name = name
        self.port = free_port()
        self.api = PeerApi(self.credentials)
        self.bodies: list[bytes] = []
        self.thawed = asyncio.Event()
        answer = status or (lambda c: {"node_id": c.node_id, "name": name, "bt_port": 1})

        async def handle(request: web.Request, sender: str) -> web.Response:
            return web.json_response(answer(self.credentials))

        async def echo(request: web.Request, sender: str) -> web.Response:
            self.bodies.append(await request.read())
            return web.json_response({"sender": sender})

        async def big(request: web.Request, sender: str) -> web.Response:
            return web.Response(body=BIG)

        async def cut(request: web.Request, sender: str) -> web.StreamResponse:
            """BIG announced, half of it sent, the connection closed."""
            resp = web.StreamResponse()
            resp.content_length = len(BIG)
            await resp.prepare(request)
            await resp.write(BIG[:len(BIG) // 2])
            assert request.transport is not None
            request.transport.close()
            return resp

        async def hang(request: web.Request, sender: str) -> web.Response:
            """No answer until thawed, as a frozen node (its kernel keeps the socket open)."""
            await self.thawed.wait()
            return web.json_response({})

        self.api.route("GET", "/big", big)
        self.api.route("GET", "/hang", hang)
        self.api.route("GET", "/cut", cut)
        self.api.route("GET", "/status", handle, any_receiver=True)
        self.api.route("POST", "/echo", echo)

    @property
    def node_id(self) -> str:
        return self.credentials.node_id


@pytest.fixture
async def started() -> AsyncIterator[Callable[[Node], Awaitable[Node]]]:
    nodes: list[Node] = []

    async def start(node: Node) -> Node:
        await node.api.start("127.0.0.1", node.port)
        nodes.append(node)
        return node

    yield start
    for n in nodes:
        await n.api.close()


async def impostor(port: int, node_id: str) -> web.AppRunner:
    """A keyless host answering every route with plausible JSON."""
    async def anything(request: web.Request) -> web.Response:
        return web.json_response({"node_id": node_id, "name": "evil", "bt_port": 6582,
                                  "state": "done", "job": "0123456789ab"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def eventually(check: Callable[[], bool]) -> None:
    for _ in range(100):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("not true in time")


async def test_members_prove_the_key_and_impostors_never_get_in(
        tmp_path: Path, started: Callable[[Node], Awaitable[Node]]) -> None:
    a = Node(tmp_path, "a")
    b = await started(Node(tmp_path, "b"))
    evil_port = free_port()
    evil_id = "e" * 32
    runner = await impostor(evil_port, evil_id)
    peers = PeerSet(a.credentials, static=[("127.0.0.1", evil_port)])
    await peers.start()
    try:
        peers.seen(b.node_id, "127.0.0.1", b.port)
        peers.seen(evil_id, "127.0.0.1", evil_port)
        await eventually(lambda: b.node_id in peers.peers and peers.peers[b.node_id].alive)
        peers.seen(b.node_id, "127.0.0.1", evil_port)  # claims b's id at its own address
        await asyncio.sleep(0.5)
        assert set(peers.peers) == {b.node_id}
        assert peers.peers[b.node_id].peer_port == b.port  # its address was not taken
        assert [p.node_id for p in peers.usable()] == [b.node_id]
        answer = await peers.request_json(peers.peers[b.node_id], "POST", "/echo",
                                          lambda v: v, {"x": 1})
        assert answer == {"sender": a.node_id} and b.bodies == [b'{"x": 1}']
    finally:
        await peers.close()
        await runner.cleanup()


async def test_a_keyed_peer_with_malformed_status_is_not_admitted(
        tmp_path: Path, started: Callable[[Node], Awaitable[Node]]) -> None:
    a = Node(tmp_path, "a")
    bad = await started(Node(tmp_path, "bad", status=lambda c: {"node_id": c.node_id,
                                                                  "bt_port": "many"}))
    liar = await started(Node(tmp_path, "liar", status=lambda c: {"node_id": "f" * 32}))
    peers = PeerSet(a.credentials, static=[])
    await peers.start()
    try:
        peers.seen(bad.node_id, "127.0.0.1", bad.port)
        peers.seen(liar.node_id, "127.0.0.1", liar.port)
        await asyncio.sleep(0.7)
        assert peers.peers == {}
        with pytest.raises(PeerError, match="bt_port"):
            await peers.request_json(Peer(bad.node_id, "127.0.0.1", bad.port), "GET",
                                     "/status", parse_status)
    finally:
        await peers.close()


async def raw(port: int, method: str, path: str, headers: dict[str, str],
              body: bytes = b"") -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.request(
            method, f"http://127.0.0.1:{port}{API}{path}", headers=headers,
            data=body or None) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


async def test_replays_and_requests_for_other_nodes_are_refused(
        tmp_path: Path, started: Callable[[Node], Awaitable[Node]]) -> None:
    a = Node(tmp_path, "a")
    b = await started(Node(tmp_path, "b"))
    c = await started(Node(tmp_path, "c"))
    body = json.dumps({"x": 1}).encode()
    signed = a.credentials.sign_request("POST", API + "/echo", body, b.node_id)
    headers = {**signed.headers, "Content-Type": "application/json"}
    assert (await raw(b.port, "POST", "/echo", headers, body))[0] == 200
    assert (await raw(b.port, "POST", "/echo", headers, body))[0] == 401  # same receiver
    assert (await raw(c.port, "POST", "/echo", headers, body))[0] == 401  # another receiver
    assert b.bodies == [body] and c.bodies == []


async def test_headers_are_checked_before_the_body_and_bodies_must_match(
        tmp_path: Path, started: Callable[[Node], Awaitable[Node]]) -> None:
    a = Node(tmp_path, "a")
    b = await started(Node(tmp_path, "b"))
    status, _ = await raw(b.port, "POST", "/echo", {"Content-Type": "application/json"},
                          b"x" * (6 * 1024 * 1024))
    assert status == 401 and b.bodies == []  # refused unread, not 413
    signed = a.credentials.sign_request("POST", API + "/echo", b"{}", b.node_id)
    status, _ = await raw(b.port, "POST", "/echo", signed.headers, b"{ }")
    assert status == 400 and b.bodies == []
    signed = a.credentials.sign_request("GET", API + "/status", b"", b.node_id)
    status, _ = await raw(b.port, "GET", "/status", signed.headers, b"{}")
    assert status == 400


async def test_unauthenticated_answers_are_not_signed(
        tmp_path: Path, started: Callable[[Node], Awaitable[Node]]) -> None:
    b = await started(Node(tmp_path, "b"))
    status, headers = await raw(b.port, "GET", "/status", {})
    assert status == 401
    assert not any(h.lower().startswith("x-modelpeer") for h in headers)


async def test_large_answers_arrive_whole_and_bounded(
        tmp_path: Path, started: Callable[[Node], Awaitable[Node]]) -> None:
    a = Node(tmp_path, "a")
    b = await started(Node(tmp_path, "b"))
    peers = PeerSet(a.credentials, static=[])
    await peers.start()
    try:
        target = Peer(b.node_id, "127.0.0.1", b.port)
        assert await peers.request(target, "GET", "/big") == BIG
        with pytest.raises(PeerError, match="limit"):
            await peers.request(target, "GET", "/big", limit=len(BIG) - 1)
    finally:
        await peers.close()


@contextlib.asynccontextmanager
async def peer_set(a: Node) -> AsyncIterator[PeerSet]:
    peers = PeerSet(a.credentials, static=[])
    await peers.start()
    try:
        yield peers
    finally:
        await peers.close()


@contextlib.asynccontextmanager
async def a_and_b(tmp_path: Path, started: Callable[[Node], Awaitable[Node]]
                  ) -> AsyncIterator[tuple[PeerSet, Peer]]:
    """Node a's peer set, and node b (serving the test routes) as a peer of it."""
    b = await started(Node(tmp_path, "b"))
    async with peer_set(Node(tmp_path, "a")) as peers:
        yield peers, Peer(b.node_id, "127.0.0.1", b.port)


async def test_a_silent_peer_is_left_out_and_the_questions_waiting_on_it_end_at_once(
        tmp_path: Path, started: Callable[[Node], Awaitable[Node]],
        caplog: pytest.LogCaptureFixture) -> None:
    node = await started(Node(tmp_path, "b"))
    async with peer_set(Node(tmp_path, "a")) as peers:
        b = peers.peers[node.node_id] = Peer(node.node_id, "127.0.0.1", node.port, alive=True)
        usable_when_changed: list[list[Peer]] = []  # what BitTorrent's address filter follows
        peers.changed.connect(lambda: usable_when_changed.append(peers.usable()))
        assert await peers.quick_json(b, "/status", lambda v: v, "status") is not None
        first = asyncio.create_task(peers.quick_json(b, "/hang", lambda v: v, "answer"))
        first_ended: list[float] = []
        first.add_done_callback(lambda _: first_ended.append(time.monotonic()))
        await asyncio.sleep(0.3)
        second = await peers.quick_json(b, "/hang", lambda v: v, "answer")
        second_ended = time.monotonic()
        assert await first is None and second is None
        # the second question ended when the first found the peer silent, not a whole
        # deadline (QUICK_DEADLINE_MIN at least) after it was asked
        assert abs(second_ended - first_ended[0]) < 0.1, (second_ended, first_ended)
        assert re.search(r"left out until it answers again: no answer in \d\.\d\ds",
                         caplog.text), caplog.text
        # it was only busy with that route: it answers its liveness probe, and is back
        await eventually(lambda: not b.suspect)
        assert peers.usable() == [b]
        assert usable_when_changed == [[], [b]]
        node.thawed.set()


async def streamed(peers: PeerSet, peer: Peer, path: str, size: int) -> list[bytes]:
    """The pieces of a stream, each copied before the next is asked for."""
    return [bytes(piece) async for piece in peers.stream(peer, path, size)]


async def test_a_stream_arrives_whole_in_views_of_one_buffer(
        tmp_path: Path, started: Callable[[Node], Awaitable[Node]]) -> None:
    buffers = set()
    async with a_and_b(tmp_path, started) as (peers, target):
        data = bytearray()
        async for piece in peers.stream(target, "/big", len(BIG)):
            assert isinstance(piece, memoryview)
            buffers.add(id(piece.obj))
            data += piece
        again = await streamed(peers, target, "/big", len(BIG))  # on the kept connection
    assert data == BIG and b"".join(again) == BIG and len(buffers) == 1


@pytest.mark.parametrize("size", [len(BIG) - 1, len(BIG) + 1])
async def test_a_stream_of_another_length_than_asked_fails_before_any_byte(
        tmp_path: Path, started: Callable[[Node], Awaitable[Node]], size: int) -> None:
    pieces = []
    async with a_and_b(tmp_path, started) as (peers, b):
        with pytest.raises(PeerError, match=f"peer {b.node_id[:16]} .*Content-Length"):
            async for piece in peers.stream(b, "/big", size):
                pieces.append(piece)
    assert pieces == []


async def test_a_stream_cut_short_fails_after_the_bytes_that_came(
        tmp_path: Path, started: Callable[[Node], Awaitable[Node]]) -> None:
    data = bytearray()
    async with a_and_b(tmp_path, started) as (peers, b):
        with pytest.raises(PeerError, match=f"peer {b.node_id[:16]} .*ended after "
                                            f"{len(BIG) // 2} of {len(BIG)} bytes"):
            async for piece in peers.stream(b, "/cut", len(BIG)):
                data += piece
    assert data == BIG[:len(BIG) // 2]


async def test_a_stream_whose_answer_is_not_signed_fails_before_any_byte(
        tmp_path: Path, started: Callable[[Node], Awaitable[Node]]) -> None:
    a = Node(tmp_path, "a")
    b = await started(Node(tmp_path, "b"))
    c = Node(tmp_path, "c")  # b refuses a request meant for c with an unsigned 401
    async with peer_set(a) as peers:
        with pytest.raises(PeerError, match=f"peer {c.node_id[:16]} .*unsigned answer"):
            await streamed(peers, Peer(c.node_id, "127.0.0.1", b.port), "/big", len(BIG))


async def test_a_late_chunk_map_of_a_transfer_is_stood_in_for_by_a_recent_one(
        tmp_path: Path, started: Callable[[Node], Awaitable[Node]]) -> None:
    """A plan round waits LATE_AFTER, not the peer's deadline, for a peer that answered
    recently that it transfers the blob; the late answer serves the next round. A peer that
    did not transfer the blob is waited for (it may have just started it). What stands in
    offers no complete chunk."""
    blob = BlobId("e" * 64, "sha256", 64 * 1024 * 1024)
    node = Node(tmp_path, "b")
    answers = itertools.count(1)
    delay = 0.0
    transfers = True

    async def chunk_map(request: web.Request, sender: str) -> web.Response:
        available = next(answers)
        await asyncio.sleep(delay)
        state = (transfer_fields(PeerTransfer(TransferSource.UPSTREAM, available, 0.0, since=0))
                 if transfers else {})
        return web.json_response({"digest": blob.digest, "chunks": [{"index": 0}], **state})

    node.api.route("GET", "/chunks/{digest}", chunk_map)
    await started(node)
    async with peer_set(Node(tmp_path, "a")) as peers:
        b = peers.peers[node.node_id] = Peer(node.node_id, "127.0.0.1", node.port, alive=True)
        maps = ChunkMaps(peers, 8 * 1024 * 1024)

        async def available() -> int | None:
            m = await maps.of(b, blob)
            return None if m is None or m.transfer is None else m.transfer.available

        assert await available() == 1
        delay = 0.4
        started_at = time.monotonic()
        stood_in = await maps.of(b, blob)  # late: the recent answer stands in, aged
        assert stood_in is not None and stood_in.transfer is not None
        assert stood_in.transfer.available == 1 and stood_in.transfer.since >= LATE_AFTER
        assert stood_in.chunks == []  # no torrent from a late peer: it may be frozen
        assert stood_in.stood_in  # so the round did not hear every peer now
        assert time.monotonic() - started_at < LATE_AFTER + 0.1
        assert await available() == 1  # the question under way is not asked again
        await asyncio.sleep(0.4)
        delay = 0.0
        assert await available() == 3  # the late answer (2) came, a new question is asked
        delay = 0.3
        started_at = time.monotonic()
        fresh = await maps.of(b, blob, fresh=True)  # before going to the upstream: waited for
        assert fresh is not None and fresh.transfer is not None
        assert fresh.transfer.available == 4 and time.monotonic() - started_at >= 0.3
        transfers, delay = False, 0.3
        started_at = time.monotonic()
        assert await available() == 4  # still stood in for: the last answer had a transfer
        await asyncio.sleep(0.4)
        started_at = time.monotonic()
        assert await available() is None  # it no longer transfers it: waited for
        assert time.monotonic() - started_at >= 0.3


async def test_chunk_maps_asked_of_one_peer_at_once_travel_as_one_request(
        tmp_path: Path, started: Callable[[Node], Awaitable[Node]]) -> None:
    """A warm job starts its files at once and each asks every peer for its map: one request
    per peer carries them all; a question alone keeps the one-blob route, which older nodes
    answer too. A peer that refuses the request gives no map for any of its blobs."""
    blobs = [BlobId(c * 64, "sha256", 64 * 1024 * 1024) for c in "abc"]
    asked: list[list[str]] = []
    node = Node(tmp_path, "b")

    def map_of(digest: str) -> dict[str, object]:
        return {"digest": digest, "chunks": [{"index": "abc".index(digest[0])}]}

    async def one(request: web.Request, sender: str) -> web.Response:
        asked.append([request.match_info["digest"]])
        return web.json_response(map_of(request.match_info["digest"]))

    async def several(request: web.Request, sender: str) -> web.Response:
        digests = request.query.getall("digest")
        asked.append(digests)
        if len(digests) > 2:
            return web.json_response({"error": "older node"}, status=404)
        return web.json_response({"maps": [map_of(d) for d in reversed(digests)]})

    node.api.route("GET", "/chunks/{digest}", one)
    node.api.route("GET", "/chunks", several)
    await started(node)
    async with peer_set(Node(tmp_path, "a")) as peers:
        b = peers.peers[node.node_id] = Peer(node.node_id, "127.0.0.1", node.port, alive=True)
        maps = ChunkMaps(peers, 8 * 1024 * 1024)
        first = asyncio.ensure_future(maps.of(b, blobs[0]))
        await asyncio.sleep(BATCH_WINDOW / 4)  # a few turns of the event loop later
        second = asyncio.ensure_future(maps.of(b, blobs[1]))
        together = [await first, await second]
        assert [m.chunks[0].index for m in together if m is not None] == [0, 1]
        assert asked == [[blobs[0].digest, blobs[1].digest]]
        alone = await maps.of(b, blobs[2])
        assert alone is not None and alone.chunks[0].index == 2
        assert asked[1:] == [[blobs[2].digest]]
        refused = await asyncio.gather(*(maps.of(b, blob) for blob in blobs))
        assert refused == [None, None, None] and len(asked) == 3

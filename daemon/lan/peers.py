"""LAN peers: who they are and the authenticated peer API between daemons (chunk maps, torrent
metadata, small blobs, relayed blobs, node status, warm jobs).

mDNS and static addresses only name candidates. A candidate becomes a member (listed, admitted
by the BitTorrent filter, sent jobs, chosen as a source) once it answered a fresh, signed
request with a signed answer: proof that it holds the cluster key, and that it owns the node id
it claims (see cluster.py). Members are checked the same way every few seconds. A request that
fails the check gets 401 and is logged once per source address.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
)
from typing import Any, NamedTuple, TypeVar

import aiohttp
from aiohttp import web
from yarl import URL

from .. import httpbody
from ..errors import BadMessage, PeerError, SignatureError, UpstreamError
from ..events import Signal
from ..peermsg import NODE_ID_RE, BlobTransfer, NodeStatus, parse_status
from .cluster import (
    ANY_RECEIVER,
    EMPTY_BODY,
    H_BODY,
    H_NONCE,
    UNHASHED_BODY,
    Credentials,
    SignedRequest,
    body_digest,
)

log = logging.getLogger(__name__)

API = "/_modelpeer/peer/v1"
LIVENESS_INTERVAL = 3.0
DEAD_AFTER = 10.0
REQUEST_TIMEOUT = 5.0  # silence on a connection; also the deadline of a whole status answer
ANSWER_DEADLINE = 10.0  # a whole answer (torrent, small blob, JSON) slower than this is a drip
ADMIT_RETRY = 10.0  # a candidate that failed the proof is not asked again for this long
MAX_BODY = 4 * 1024 * 1024  # a request body (a warm job's file list)
MAX_ANSWER = 8 * 1024 * 1024  # a JSON answer, a torrent or a small blob
MAX_REFUSAL = 300  # bytes of a refusal's body read to say why
HAND_ON_AFTER = 0.05  # seconds a streamed piece waits for more bytes before it is handed on
MAX_REMEMBERED = 4096  # candidates and refused addresses kept for rate limiting
BAN_SECONDS = 600.0  # how long a peer that sent wrong bytes is left out
# a quick question (a chunk map) gets QUICK_MARGIN times the peer's slowest recent answer,
# within these bounds, before the peer is left out: a frozen node keeps its sockets open
QUICK_DEADLINE_MIN = 0.75
QUICK_DEADLINE_MAX = 2.0
QUICK_MARGIN = 4.0
QUICK_REMEMBERED = 16  # answers a peer's deadline is taken from
_NONCE_KEY = web.RequestKey("nonce", str)
T = TypeVar("T")


@dataclasses.dataclass
class Peer:
    node_id: str
    address: str
    peer_port: int
    bt_port: int = 0
    name: str = ""
    version: str = ""
    static: bool = False
    last_seen: float = 0.0
    alive: bool = False
    chunks_held: int = 0
    bytes_from: int = 0
    bytes_to: int = 0
    banned_until: float = 0.0
    suspect: bool = False  # missed a deadline; left out until it answers a probe again
    transfers: tuple[BlobTransfer, ...] = ()  # as its last status said, for the plan view

    def public(self) -> dict[str, Any]:  # Any: dataclasses.asdict; read by Lan, Control
        d = dataclasses.asdict(self)
        del d["transfers"]
        d["banned"] = time.time() < self.banned_until
        return d


Handler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


class PeerRoute(NamedTuple):
    """A route of the peer API: handler(request, sender node id). `any_receiver`: it answers
    a signed first contact that does not name this node (only GET /status does)."""
    method: str
    path: str
    handler: Handler
    any_receiver: bool = False


class PeerApi:
    """The server side: routes registered by the parts that own the data. Every request is
    authenticated from its headers before its body is read; every answer is signed."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self.app = web.Application(client_max_size=MAX_BODY)
        self.app.on_response_prepare.append(self._sign_answer)
        self._refused: set[str] = set()
        self._runner: web.AppRunner | None = None

    def route(self, method: str, path: str, handler: Handler, *,
              any_receiver: bool = False) -> None:
        """`any_receiver`: the route answers a signed first contact that does not name this
        node (a static peer learning who is at an address); only GET /status does."""
        async def checked(request: web.Request) -> web.StreamResponse:
            try:
                sender = self.credentials.check_request(request.method, request.raw_path,
                                                        request.headers,
                                                        any_receiver=any_receiver)
            except SignatureError as e:
                self._log_refusal(request, str(e))
                return web.json_response({"error": f"unauthorized: {e}"}, status=401)
            request[_NONCE_KEY] = request.headers[H_NONCE]
            problem = await self._body_problem(request)
            if problem:
                return web.json_response({"error": problem}, status=400)
            return await handler(request, sender)

        self.app.router.add_route(method, API + path, checked)

    async def _body_problem(self, request: web.Request) -> str:
        signed = request.headers[H_BODY]
        if request.method in ("GET", "HEAD"):
            if request.body_exists or signed != EMPTY_BODY:
                return f"{request.method} takes no body"
            return ""
        if body_digest(await request.read()) != signed:
            return "the body does not match its signed digest"
        return ""

    def _log_refusal(self, request: web.Request, reason: str) -> None:
        remote = request.remote or "?"
        if remote in self._refused:
            return
        if len(self._refused) >= MAX_REMEMBERED:
            self._refused.clear()
        self._refused.add(remote)
        log.warning("peer API: refused %s %s from %s: %s", request.method, request.path,
                    remote, reason)

    async def _sign_answer(self, request: web.Request, resp: web.StreamResponse) -> None:
        nonce = request.get(_NONCE_KEY)
        if nonce is None:
            return  # not an authenticated request: nothing to bind the answer to
        digest = UNHASHED_BODY
        if isinstance(resp, web.Response):
            body = resp.body
            if body is None or isinstance(body, bytes | bytearray):
                digest = body_digest(bytes(body or b""))
        resp.headers.update(self.credentials.sign_answer(nonce, resp.status, digest))

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, backlog=256).start()

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


@dataclasses.dataclass
class _Answer:
    resp: aiohttp.ClientResponse
    responder: str
    digest: str


class PeerSet:
    """The members of the cluster this node knows, and the client side of the peer API."""

    def __init__(self, credentials: Credentials, static: list[tuple[str, int]]) -> None:
        self.credentials = credentials
        self.node_id = credentials.node_id
        self.static = static
        self.peers: dict[str, Peer] = {}  # members only: each proved the key and its id
        self._banned_addresses: dict[str, float] = {}
        self._refused: dict[tuple[str, str, int], float] = {}  # candidate -> retry after
        self._admitting: set[tuple[str, str, int]] = set()
        self._session: aiohttp.ClientSession | None = None  # JSON, torrents, small blobs
        self._bodies = httpbody.Pool(timeout=REQUEST_TIMEOUT, user_agent="modelpeer")  # streams
        self._task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self._answer_times: dict[str, collections.deque[float]] = {}  # quick answers, s
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}  # quick questions, by node
        self.changed: Signal[[]] = Signal("peer set changed")

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT,
                                          sock_read=REQUEST_TIMEOUT))
        self._task = asyncio.create_task(self._liveness_loop(), name="peer liveness")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._probes) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._bodies.close()
        if self._session is not None:
            await self._session.close()

    def usable(self) -> list[Peer]:
        now = time.time()
        return [p for p in self.peers.values() if p.alive and not p.suspect
                and now >= p.banned_until and now >= self._banned_addresses.get(p.address, 0.0)]

    def suspect(self, node_id: str, reason: str) -> None:
        """A member too slow to answer (frozen, overloaded) is left out of transfers until it
        answers a liveness probe again, which it is sent at once (one that was only busy for
        a moment is back within a round trip). The quick questions waiting on it end now."""
        peer = self.peers.get(node_id)
        if peer is not None and not peer.suspect:
            peer.suspect = True
            log.warning("peer %s at %s left out until it answers again: %s", node_id,
                        peer.address, reason)
            self.changed.emit()  # BitTorrent lets go of it too: a torrent held on to it 10 s
            for waiting in self._waiting.get(node_id, ()):
                if not waiting.done():
                    waiting.set_result(None)
            self._spawn(self._check_alive(peer))

    def by_address(self, address: str) -> Peer | None:
        return next((p for p in self.peers.values() if p.address == address), None)

    # --- candidates (unauthenticated hints) -------------------------------------------------
    def seen(self, node_id: str, address: str, peer_port: int) -> None:
        """mDNS names a node at an address: it is admitted once it proves both."""
        if node_id == self.node_id or not NODE_ID_RE.fullmatch(node_id):
            return
        known = self.peers.get(node_id)
        if known is None or (known.address, known.peer_port) != (address, peer_port):
            self._spawn(self._admit(node_id, address, peer_port, static=False))

    def gone(self, node_id: str) -> None:
        """mDNS says the node left. Anyone can say so, so it is asked first."""
        peer = self.peers.get(node_id)
        if peer is not None:
            self._spawn(self._confirm_gone(peer))

    def ban(self, node_id: str, seconds: float, reason: str) -> None:
        """Leave out a member that sent wrong bytes, and whatever claims its address (a new
        node id is cheap to make)."""
        peer = self.peers.get(node_id)
        if peer is not None:
            peer.banned_until = time.time() + seconds
            self._banned_addresses[peer.address] = peer.banned_until
            log.warning("peer %s at %s banned for %.0fs: %s", node_id, peer.address, seconds,
                        reason)
            self.changed.emit()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:  # Any: as create_task takes
        task = asyncio.get_running_loop().create_task(coro)
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _admit(self, expected: str, address: str, port: int, *, static: bool) -> None:
        candidate = (expected, address, port)
        now = time.monotonic()
        if candidate in self._admitting or self._refused.get(candidate, 0.0) > now:
            return
        self._admitting.add(candidate)
        try:
            status = await self._hello(address, port, expected or ANY_RECEIVER)
        except PeerError as e:
            if len(self._refused) >= MAX_REMEMBERED:
                self._refused = {c: t for c, t in self._refused.items() if t > now}
            self._refused[candidate] = now + ADMIT_RETRY
            log.info("candidate %s at %s:%d not admitted: %s", expected or "(static)",
                     address, port, e)
            return
        finally:
            self._admitting.discard(candidate)
        if status.node_id != self.node_id:
            self._add_member(status, address, port, static)

    def _add_member(self, status: NodeStatus, address: str, port: int, static: bool) -> None:
        peer = self.peers.get(status.node_id)
        if peer is None:
            peer = self.peers[status.node_id] = Peer(status.node_id, address, port,
                                                     static=static)
            log.info("peer %s at %s:%d proved the cluster key", status.node_id, address, port)
        elif (peer.address, peer.peer_port) != (address, port):
            log.info("peer %s moved from %s:%d to %s:%d (proved by its key)", status.node_id,
                     peer.address, peer.peer_port, address, port)
            peer.address, peer.peer_port = address, port
            self.changed.emit()
        self._update(peer, status)

    async def _hello(self, address: str, port: int, expected: str) -> NodeStatus:
        """The node's status, in a signed answer to a fresh signed request."""
        target = Peer(expected, address, port)
        data, responder = await self._answer(target, "GET", "/status", None, MAX_ANSWER,
                                             REQUEST_TIMEOUT)
        status = _parsed(target, "/status", parse_status, data)
        if status.node_id != responder:
            raise PeerError(f"{address}:{port} signed as {responder[:16]} but says it is "
                            f"{status.node_id[:16]}")
        return status

    async def _confirm_gone(self, peer: Peer) -> None:
        try:
            self._update(peer, await self._hello(peer.address, peer.peer_port, peer.node_id))
        except PeerError:
            if self.peers.pop(peer.node_id, None) is not None:
                log.info("peer %s at %s left", peer.node_id, peer.address)
                self.changed.emit()

    # --- liveness -------------------------------------------------------------------------
    async def _liveness_loop(self) -> None:
        while True:
            try:
                await self._check_everyone()
            except Exception:  # noqa: BLE001 - one bad round must not end peer tracking
                log.exception("peer liveness round failed; trying again")
            await asyncio.sleep(LIVENESS_INTERVAL)

    async def _check_everyone(self) -> None:
        checks = [self._check_alive(p) for p in list(self.peers.values())]
        for host, port in self.static:
            if not any((p.address, p.peer_port) == (host, port) for p in self.peers.values()):
                checks.append(self._admit("", host, port, static=True))
        await asyncio.gather(*checks)

    async def _check_alive(self, peer: Peer) -> None:
        try:
            status = await self._hello(peer.address, peer.peer_port, peer.node_id)
        except PeerError as e:
            if peer.alive and time.time() - peer.last_seen > DEAD_AFTER:
                peer.alive = False
                log.warning("peer %s at %s stopped answering: %s", peer.node_id, peer.address, e)
                self.changed.emit()
            return
        self._update(peer, status)

    def _update(self, peer: Peer, status: NodeStatus) -> None:
        was_alive, was_suspect = peer.alive, peer.suspect
        peer.alive, peer.last_seen, peer.suspect = True, time.time(), False
        peer.name, peer.version = status.name, status.version
        peer.bt_port, peer.chunks_held = status.bt_port, status.chunks
        peer.transfers = status.transfers
        if not was_alive:
            log.info("peer %s (%s) at %s:%d is live", peer.node_id, peer.name, peer.address,
                     peer.peer_port)
        elif was_suspect:
            log.info("peer %s at %s answers again", peer.node_id, peer.address)
        if not was_alive or was_suspect:
            self.changed.emit()

    # --- the client side of the peer API ----------------------------------------------------
    @contextlib.asynccontextmanager
    async def _call(self, peer: Peer, method: str, path: str,
                    body: object = None) -> AsyncIterator[_Answer]:
        """A signed request to a peer, its answer checked to be the peer's answer to it; an
        answer other than 200, or a broken connection at any point inside the block, is a
        PeerError."""
        if self._session is None:
            raise PeerError("the peer client is not started")
        data = json.dumps(body).encode() if body is not None else b""
        signed = self.credentials.sign_request(method, API + path, data, peer.node_id)
        headers = {**signed.headers, **({"Content-Type": "application/json"} if data else {})}
        try:
            async with self._session.request(
                    method, _url(peer, path), data=data or None, headers=headers,
                    allow_redirects=False) as resp:
                responder, digest = self._authentic(peer, method, path, signed, resp.status,
                                                    resp.headers)
                if resp.status != 200:
                    raise _refused(peer, method, path, resp.status,
                                   await resp.content.read(MAX_REFUSAL))
                yield _Answer(resp, responder, digest)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise PeerError(f"{_where(peer)}: {method} {path}: {e!r}") from e

    def _authentic(self, peer: Peer, method: str, path: str, signed: SignedRequest,
                   status: int, headers: Mapping[str, str]) -> tuple[str, str]:
        """(responder, signed body digest) of the peer's answer to the signed request, read
        from its head before any of its body is used; PeerError when it is not that."""
        try:
            return self.credentials.check_answer(signed.nonce, status, headers, peer.node_id)
        except SignatureError as e:
            raise PeerError(f"{_where(peer)}: {method} {path}: {e}") from e

    async def _body(self, peer: Peer, answer: _Answer, limit: int = MAX_ANSWER) -> bytes:
        """The whole answer, at most `limit` bytes, matching the digest its signature names."""
        where = _where(peer)
        if (answer.resp.content_length or 0) > limit:
            raise PeerError(f"{where}: an answer of {answer.resp.content_length} bytes is over "
                            f"the {limit}-byte limit")
        data = bytearray()
        async for block in answer.resp.content.iter_any():
            data += block
            if len(data) > limit:
                raise PeerError(f"{where}: the answer is over the {limit}-byte limit")
        if answer.digest != body_digest(data):
            raise PeerError(f"{where}: the answer does not match its signed digest")
        return bytes(data)

    async def _answer(self, peer: Peer, method: str, path: str, body: object, limit: int,
                      deadline: float) -> tuple[bytes, str]:
        """The whole answer and the node that signed it, within `deadline` seconds: the
        session's read timeout only catches silence, and a peer that sends a byte a second
        would hold the caller (and the liveness round) for as long as it likes."""
        try:
            async with asyncio.timeout(deadline):
                async with self._call(peer, method, path, body) as answer:
                    return await self._body(peer, answer, limit), answer.responder
        except TimeoutError as e:
            raise PeerError(f"peer {peer.node_id[:16]} at {peer.address}: {method} {path}: no "
                            f"whole answer in {deadline:.0f}s") from e

    async def request(self, peer: Peer, method: str, path: str, body: object = None, *,
                      limit: int = MAX_ANSWER) -> bytes:
        return (await self._answer(peer, method, path, body, limit, ANSWER_DEADLINE))[0]

    async def request_json(self, peer: Peer, method: str, path: str,
                           parse: Callable[[object], T], body: object = None) -> T:
        """A JSON answer, parsed by `parse` (one of peermsg's); any deviation is a PeerError."""
        data = await self.request(peer, method, path, body)
        return _parsed(peer, path, parse, data)

    async def quick_json(self, peer: Peer, path: str, parse: Callable[[object], T],
                         what: str) -> T | None:
        """The JSON answer to a GET that a live peer answers at once (`what` it is, for the
        log), or None when it does not within its deadline (QUICK_MARGIN times its slowest
        recent answer): then the peer is suspected (suspect()). Before, each round that asked
        a frozen node waited 2 s for it, even after another round had found it silent."""
        deadline = self._quick_deadline(peer.node_id)
        started = time.monotonic()
        left_out: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(peer.node_id, set())
        waiting.add(left_out)
        ask = asyncio.ensure_future(self.request_json(peer, "GET", path, parse))
        try:
            await asyncio.wait((ask, left_out), timeout=deadline,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.discard(left_out)
            if not ask.done():
                ask.cancel()
                ask.add_done_callback(_retrieved)
        if not ask.done() or ask.cancelled():
            if not left_out.done():
                self.suspect(peer.node_id, f"no {what} in {deadline:.2f}s")
            return None
        answer = ask.result()  # a PeerError is the caller's
        self._answer_times.setdefault(
            peer.node_id, collections.deque(maxlen=QUICK_REMEMBERED)).append(
                time.monotonic() - started)
        return answer

    def _quick_deadline(self, node_id: str) -> float:
        recent = self._answer_times.get(node_id)
        slowest = max(recent) if recent else math.inf
        return min(QUICK_DEADLINE_MAX, max(QUICK_DEADLINE_MIN, QUICK_MARGIN * slowest))

    async def stream(self, peer: Peer, path: str, size: int) -> AsyncGenerator[memoryview, None]:
        """The body of a GET, which must be `size` bytes long, as it arrives (checked by the
        caller against a blob digest), received by httpbody straight into one buffer: the
        pieces are views of it, each good until the next is asked for. A piece is handed on
        when the buffer is full, or HAND_ON_AFTER seconds after it was asked for with the
        bytes that came by then (a slow source's bytes are not held back). Any deviation
        (an answer not signed by the peer, not 200, more or fewer bytes, silence for
        REQUEST_TIMEOUT) is a PeerError naming the peer."""
        signed = self.credentials.sign_request("GET", API + path, b"", peer.node_id)
        try:
            async with self._bodies.get(URL(_url(peer, path), encoded=True),
                                        signed.headers) as answer:
                self._authentic(peer, "GET", path, signed, answer.status, answer.headers)
                if answer.status != 200:
                    raise _refused(peer, "GET", path, answer.status, await _refusal(answer))
                async for piece in answer.body(size, HAND_ON_AFTER):
                    yield piece
        except (UpstreamError, httpbody.Unsupported, TimeoutError, OSError) as e:
            raise PeerError(f"{_where(peer)}: GET {path}: {e}") from e


def _retrieved(task: asyncio.Future[Any]) -> None:  # Any: whatever the question returns
    """A question given up on may still fail; its error is not wanted."""
    if not task.cancelled():
        task.exception()


def _url(peer: Peer, path: str) -> str:
    return f"http://{peer.address}:{peer.peer_port}{API}{path}"


def _where(peer: Peer) -> str:
    return f"peer {peer.node_id[:16]} at {peer.address}"


def _refused(peer: Peer, method: str, path: str, status: int, payload: bytes) -> PeerError:
    return PeerError(f"{_where(peer)}: {method} {path}: HTTP {status} {payload[:200]!r}")


async def _refusal(answer: httpbody.Answer) -> bytes:
    """The body of a refusal, if it is short enough to say why."""
    size = answer.content_length
    if size is None or size > MAX_REFUSAL:
        return b""
    return b"".join([bytes(piece) async for piece in answer.body(size)])


def _parsed(peer: Peer, path: str, parse: Callable[[object], T], data: bytes) -> T:
    try:
        return parse(json.loads(data))
    except (ValueError, RecursionError) as e:  # BadMessage is a ValueError, like bad JSON
        what = str(e) if isinstance(e, BadMessage) else "not JSON"
        raise PeerError(f"peer {peer.node_id[:16]} at {peer.address}: bad answer to {path}: "
                        f"{what}") from e

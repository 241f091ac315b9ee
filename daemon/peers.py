"""LAN peers: who they are (mDNS + static addresses, checked for liveness) and the signed peer
API between daemons (chunk maps, torrent metadata, small blobs, relayed blobs, node status).

Every request is signed with the cluster key; a request that fails the check gets 401 and is
logged once per source address. Peers of another cluster never pass the check, so they are
never listed, whatever mDNS shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from .cluster import ClusterKey

log = logging.getLogger(__name__)

API = "/_modelpeer/peer/v1"
LIVENESS_INTERVAL = 3.0
DEAD_AFTER = 10.0
REQUEST_TIMEOUT = 5.0
MAX_JSON = 4 * 1024 * 1024
BAN_SECONDS = 600.0  # how long a peer that sent wrong bytes is left out


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

    @property
    def base_url(self) -> str:
        return f"http://{self.address}:{self.peer_port}{API}"

    @property
    def usable(self) -> bool:
        return self.alive and time.time() >= self.banned_until

    def public(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["banned"] = time.time() < self.banned_until
        return d


class PeerError(Exception):
    pass


Handler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


class PeerApi:
    """The server side: routes registered by the parts that own the data, all signed."""

    def __init__(self, key: ClusterKey, node_id: str) -> None:
        self.key = key
        self.node_id = node_id
        self.app = web.Application(client_max_size=MAX_JSON)
        self._refused: set[str] = set()
        self._runner: web.AppRunner | None = None

    def route(self, method: str, path: str, handler: Handler) -> None:
        async def checked(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            try:
                sender = self.key.check(request.method, request.raw_path, body,
                                        dict(request.headers))
            except PermissionError as e:
                if request.remote not in self._refused:
                    self._refused.add(request.remote or "?")
                    log.warning("peer API: refused %s %s from %s: %s", request.method,
                                request.path, request.remote, e)
                return web.json_response({"error": f"unauthorized: {e}"}, status=401)
            return await handler(request, sender)

        self.app.router.add_route(method, API + path, checked)

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, backlog=256).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class PeerSet:
    """The peers this node knows: from mDNS, static addresses, and their liveness."""

    def __init__(self, key: ClusterKey, node_id: str, static: list[tuple[str, int]]) -> None:
        self.key = key
        self.node_id = node_id
        self.static = static
        self.peers: dict[str, Peer] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.on_change: Callable[[], None] = lambda: None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT,
                                          sock_read=REQUEST_TIMEOUT))
        self._task = asyncio.create_task(self._liveness_loop(), name="peer liveness")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    def usable(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.usable]

    def seen(self, node_id: str, address: str, peer_port: int, bt_port: int,
             version: str) -> None:
        """A peer announced itself on mDNS."""
        if node_id == self.node_id:
            return
        peer = self.peers.get(node_id)
        if peer is None:
            peer = self.peers[node_id] = Peer(node_id, address, peer_port, bt_port,
                                              version=version)
            log.info("peer %s found at %s:%d", node_id, address, peer_port)
        peer.address, peer.peer_port, peer.bt_port = address, peer_port, bt_port
        asyncio.get_running_loop().create_task(self._probe(peer))

    def gone(self, node_id: str) -> None:
        peer = self.peers.pop(node_id, None)
        if peer is not None:
            log.info("peer %s at %s said goodbye", node_id, peer.address)
            self.on_change()

    def ban(self, node_id: str, seconds: float, reason: str) -> None:
        peer = self.peers.get(node_id)
        if peer is not None:
            peer.banned_until = time.time() + seconds
            log.warning("peer %s at %s banned for %.0fs: %s", node_id, peer.address, seconds,
                        reason)
            self.on_change()

    def by_address(self, address: str) -> Peer | None:
        return next((p for p in self.peers.values() if p.address == address), None)

    async def _liveness_loop(self) -> None:
        while True:
            for host, port in self.static:
                if not any(p.address == host and p.peer_port == port
                           for p in self.peers.values()):
                    await self._probe_static(host, port)
            await asyncio.gather(*(self._probe(p) for p in list(self.peers.values())))
            await asyncio.sleep(LIVENESS_INTERVAL)

    async def _probe_static(self, host: str, port: int) -> None:
        probe = Peer("?", host, port, static=True)
        try:
            status = await self.request_json(probe, "GET", "/status")
        except PeerError:
            return
        if status["node_id"] == self.node_id:
            return
        peer = self.peers.setdefault(status["node_id"], Peer(status["node_id"], host, port,
                                                             static=True))
        self._update(peer, status)

    async def _probe(self, peer: Peer) -> None:
        try:
            status = await self.request_json(peer, "GET", "/status")
        except PeerError as e:
            if peer.alive and time.time() - peer.last_seen > DEAD_AFTER:
                peer.alive = False
                log.warning("peer %s at %s stopped answering: %s", peer.node_id, peer.address, e)
                self.on_change()
            return
        if status.get("node_id") != peer.node_id:
            self.peers.pop(peer.node_id, None)
            return
        self._update(peer, status)

    def _update(self, peer: Peer, status: dict[str, Any]) -> None:
        was_alive = peer.alive
        peer.alive, peer.last_seen = True, time.time()
        peer.name = status.get("name", "")
        peer.version = status.get("version", "")
        peer.bt_port = int(status.get("bt_port", peer.bt_port))
        peer.chunks_held = int(status.get("chunks", 0))
        if not was_alive:
            log.info("peer %s (%s) at %s:%d is live", peer.node_id, peer.name, peer.address,
                     peer.peer_port)
            self.on_change()

    @contextlib.asynccontextmanager
    async def _call(self, peer: Peer, method: str, path: str,
                    body: Any = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """A signed request to a peer; an answer other than 200, or a broken connection at any
        point inside the block, is a PeerError."""
        assert self._session is not None
        data = json.dumps(body).encode() if body is not None else b""
        headers = self.key.sign(method, API + path, data, self.node_id)
        headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(method, f"http://{peer.address}:{peer.peer_port}"
                                             f"{API}{path}", data=data or None,
                                             headers=headers) as resp:
                if resp.status != 200:
                    payload = await resp.read()
                    raise PeerError(f"peer {peer.node_id} at {peer.address}: HTTP {resp.status}"
                                    f" {payload[:200]!r}")
                yield resp
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise PeerError(f"peer {peer.node_id} at {peer.address}: {e!r}") from e

    async def request(self, peer: Peer, method: str, path: str,
                      body: Any = None) -> bytes:
        async with self._call(peer, method, path, body) as resp:
            return await resp.read()

    async def stream(self, peer: Peer, path: str) -> AsyncIterator[bytes]:
        """The body of a GET, as it arrives."""
        async with self._call(peer, "GET", path) as resp:
            async for data in resp.content.iter_any():
                yield data

    async def request_json(self, peer: Peer, method: str, path: str, body: Any = None) -> Any:
        payload = await self.request(peer, method, path, body)
        try:
            return json.loads(payload)
        except ValueError as e:
            raise PeerError(f"peer {peer.node_id}: answered something that is not JSON") from e

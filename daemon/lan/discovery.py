"""mDNS with python-zeroconf's asyncio API: announce this node as _modelpeer._tcp.local. and
follow the others of the same cluster (by the cluster id in TXT; the key never leaves the node).
Anyone can announce anything on mDNS: what is found here is only a candidate, which the peer
set admits once it proves the key (peers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ..events import Signal

log = logging.getLogger(__name__)

SERVICE = "_modelpeer._tcp.local."
RESOLVE_MS = 3000
MAX_SERVICES = 1024  # mDNS is unauthenticated: a flood of announcements stays bounded


@dataclasses.dataclass
class PeerInfo:
    """A candidate as announced; everything else about it comes from its signed status."""
    node_id: str
    address: str
    peer_port: int


class Discovery:
    def __init__(self, node_id: str, cluster_id: str, peer_port: int, bt_port: int,
                 version: str, interface: str = "") -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.peer_port = peer_port
        self.bt_port = bt_port
        self.version = version
        self.interface = interface
        self.changed: Signal[[]] = Signal("peers discovered or gone")
        self._peers: dict[str, PeerInfo] = {}  # by service name
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def peers(self) -> dict[str, PeerInfo]:
        return {p.node_id: p for p in self._peers.values()}

    async def start(self) -> None:
        interfaces = [self.interface] if self.interface else None
        self._zc = (AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
                    if interfaces else AsyncZeroconf(ip_version=IPVersion.V4Only))
        self._info = AsyncServiceInfo(
            SERVICE, f"modelpeer-{self.node_id}.{SERVICE}",
            addresses=[socket.inet_aton(a) for a in self._addresses()],
            port=self.peer_port,
            properties={"node": self.node_id, "cluster": self.cluster_id,
                        "peer_port": str(self.peer_port), "bt_port": str(self.bt_port),
                        "version": self.version},
            server=f"modelpeer-{self.node_id}.local.")
        await (await self._zc.async_register_service(self._info))
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE],
                                            handlers=[self._on_service])
        log.info("mDNS: announced node %s on %s", self.node_id,
                 ", ".join(self._addresses()))

    def _addresses(self) -> list[str]:
        if self.interface:
            return [self.interface]
        from zeroconf._utils.net import get_all_addresses  # noqa: PLC0415

        return [a for a in get_all_addresses() if not a.startswith("127.")] or ["127.0.0.1"]

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            if self._info is not None:
                with contextlib.suppress(Exception):
                    await (await self._zc.async_unregister_service(self._info))
            await self._zc.async_close()

    def _on_service(self, zeroconf: Zeroconf, service_type: str, name: str,
                    state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            if self._peers.pop(name, None) is not None:
                log.info("mDNS: %s left", name)
                self.changed.emit()
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(SERVICE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_MS):
            return
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
                 for k, v in info.properties.items()}
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or props.get("node") == self.node_id:
            return
        if props.get("cluster") != self.cluster_id:
            log.debug("mDNS: ignoring %s of another cluster", name)
            return
        try:
            peer = PeerInfo(props["node"], addresses[0], int(props["peer_port"]))
        except (KeyError, ValueError):
            log.warning("mDNS: %s announced malformed TXT %s", name, props)
            return
        known = self._peers.get(name)
        if known is None and len(self._peers) >= MAX_SERVICES:
            log.warning("mDNS: ignoring %s: already following %d services", name, MAX_SERVICES)
            return
        self._peers[name] = peer
        if known is None or (known.address, known.peer_port) != (peer.address, peer.peer_port):
            log.info("mDNS: found node %s at %s:%d", peer.node_id, peer.address, peer.peer_port)
            self.changed.emit()

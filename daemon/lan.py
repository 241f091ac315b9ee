"""The node's place on the LAN: cluster key, node id, peer API, mDNS, BitTorrent, sharing,
relay.
Built only with a cluster key and without --no-peers; otherwise the daemon is a local cache and
says why."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .cluster import ClusterKey, Credentials, NodeIdentity
from .config import Config
from .peermsg import BlobTransfer
from .peers import PeerApi, PeerSet
from .ratelimit import PeerUploadCap
from .store import Store

if TYPE_CHECKING:
    from .discovery import Discovery
    from .relay import Relay
    from .sharing import Sharing
    from .swarm import Swarm

log = logging.getLogger(__name__)


class _Part(Protocol):
    """What the LAN is made of (swarm, peer API, peer set, discovery): closed in turn."""

    async def close(self) -> None: ...


class Lan:
    def __init__(self, reason: str = "") -> None:
        self.reason = reason
        self.sharing: Sharing | None = None
        self.relay: Relay | None = None
        self.peers: PeerSet | None = None
        self.swarm: Swarm | None = None
        self.api: PeerApi | None = None
        self.credentials: Credentials | None = None
        self.upload: PeerUploadCap | None = None  # peer_upload_rate
        self.node_id = ""
        self._opening: list[Callable[[], Awaitable[None]]] = []
        self.cluster_id = ""
        self._parts: list[_Part] = []

    def summary(self) -> dict[str, object]:
        if self.peers is None:
            return {"enabled": False, "reason": self.reason, "count": 0}
        return {"enabled": True, "reason": "", "node_id": self.node_id,
                "cluster_id": self.cluster_id, "count": len(self.peers.usable()),
                "upload_split": self._upload_split()}

    def _upload_split(self) -> dict[str, int]:
        """How peer_upload_rate is shared now; BitTorrent's as the session applies it."""
        if self.upload is None or self.swarm is None:
            return {}
        return {**self.upload.split(), "bittorrent": self.swarm.upload_limit()}

    def set_peer_upload_rate(self, rate: int) -> None:
        if self.upload is not None:
            self.upload.set_rate(rate)

    def peer_list(self) -> list[dict[str, Any]]:  # Any: Peer.public
        """Each peer with the bytes exchanged: over the peer API plus over BitTorrent."""
        if self.peers is None or self.swarm is None:
            return []
        by_ip = self.swarm.stats().peers
        out = []
        for p in self.peers.peers.values():
            d = p.public()
            bt = by_ip.get(p.address)
            if bt is not None:
                d["bytes_from"] += bt.downloaded
                d["bytes_to"] += bt.uploaded
            out.append(d)
        return out

    def peer_transfers(self) -> list[tuple[str, str, Sequence[BlobTransfer]]]:
        """(node id, name, transfers) of every live peer, as its last status said."""
        if self.peers is None:
            return []
        return [(p.node_id, p.name, p.transfers) for p in self.peers.peers.values() if p.alive]

    async def open(self) -> None:
        """Start answering peers and announce this node (after every peer route is added)."""
        for start in self._opening:
            await start()

    async def close(self) -> None:
        # the peer API goes first: peers that hear the mDNS goodbye check it, and must fail
        parts = sorted(reversed(self._parts), key=lambda part: part is not self.api)
        for part in parts:
            try:
                await part.close()
            except Exception:  # noqa: BLE001 - close everything even if one part fails
                log.exception("closing %s failed", type(part).__name__)


async def start_lan(cfg: Config, store: Store, node_name: str, version: str) -> Lan:
    if cfg.no_peers:
        return Lan("disabled by --no-peers")
    if cfg.cluster_key is None:
        return Lan("no cluster key (--cluster-key-file; make one with `modelpeer cluster-key "
                   "new FILE`): running as a local cache only")
    key = ClusterKey(cfg.cluster_key)
    identity = NodeIdentity.load_or_create(cfg.cache_dir / "node.key")
    lan = Lan()
    lan.node_id, lan.cluster_id = identity.node_id, key.cluster_id
    lan.credentials = Credentials(key, identity)
    try:
        await _start_parts(lan, cfg, store, lan.credentials, node_name, version)
    except BaseException:
        await lan.close()
        raise
    return lan


async def _start_parts(lan: Lan, cfg: Config, store: Store, credentials: Credentials,
                       node_name: str, version: str) -> None:
    # libtorrent and zeroconf are loaded only when the node joins a LAN
    from .discovery import Discovery
    from .relay import Relay
    from .sharing import Sharing
    from .swarm import Swarm

    peer_host, peer_port = cfg.peer_listen
    bt_host, bt_port = cfg.bt_listen
    if cfg.interface:
        peer_host = bt_host = cfg.interface
    api = PeerApi(credentials)
    swarm = Swarm((bt_host, bt_port), cfg.cache_dir / "swarm", interface=cfg.interface)
    await swarm.start()
    lan._parts.append(swarm)
    lan.swarm = swarm
    peers = PeerSet(credentials, cfg.peer)
    lan.upload = PeerUploadCap(swarm.limit_upload)
    lan.upload.set_rate(cfg.peer_upload_rate)
    lan.sharing = Sharing(store, swarm, peers, api, lan.upload, node_name=node_name,
                          version=version, bt_port=bt_port)
    store.on_removed = lan.sharing.forget_blob
    lan.relay = Relay(peers, api, lan.upload)
    lan.api, lan.peers = api, peers
    await lan.sharing.seed_all()
    discovery = Discovery(lan.node_id, lan.cluster_id, peer_port, bt_port, version,
                          interface=cfg.interface)
    discovery.on_change = lambda: _sync_discovered(discovery, peers)

    async def serve_api() -> None:
        await api.start(peer_host, peer_port)
        lan._parts.append(api)

    async def join() -> None:
        await peers.start()
        lan._parts.append(peers)
        await discovery.start()
        lan._parts.append(discovery)

    lan._opening = [serve_api, join]
    log.info("peers on: node %s in cluster %s, peer API %s:%d, BitTorrent %s:%d", lan.node_id,
             lan.cluster_id, peer_host, peer_port, bt_host, bt_port)


def _sync_discovered(discovery: Discovery, peers: PeerSet) -> None:
    found = discovery.peers()
    for info in found.values():
        peers.seen(info.node_id, info.address, info.peer_port)
    for node_id, peer in list(peers.peers.items()):
        if not peer.static and node_id not in found:
            peers.gone(node_id)

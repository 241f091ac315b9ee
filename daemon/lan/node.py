"""The node's place on the LAN: cluster key, node id, peer API, mDNS, BitTorrent, sharing,
relay.
Built only with a cluster key and without --no-peers; otherwise the daemon is a local cache and
says why."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ..catalog import Catalog
from ..config import Config
from ..fetch import NoPeers, PeerSource
from ..peermsg import BlobTransfer
from ..ratelimit import PeerUploadCap
from ..registry import Transfers
from ..store import Store
from ..upstreamfetch import UpstreamFetch
from .cluster import ClusterKey, Credentials, NodeIdentity
from .peercatalog import PeerCatalog
from .peers import PeerApi, PeerRoute, PeerSet

if TYPE_CHECKING:
    from .discovery import Discovery
    from .relay import Relay
    from .sharing import Sharing
    from .swarm import Swarm

log = logging.getLogger(__name__)


class Lan:
    """The node's LAN parts, or none of them (`reason` says why). What was started is closed
    in reverse order, whatever failed; the peer API first, so that peers that hear the mDNS
    goodbye and check it find it gone."""

    def __init__(self, reason: str = "") -> None:
        self.reason = reason
        self.peer_source: PeerSource = NoPeers()
        self.sharing: Sharing | None = None
        self.relay: Relay | None = None
        self.peers: PeerSet | None = None
        self.swarm: Swarm | None = None
        self.api: PeerApi | None = None
        self.credentials: Credentials | None = None
        self.upload: PeerUploadCap | None = None  # peer_upload_rate
        self.node_id = ""
        self.cluster_id = ""
        self._opening: list[Callable[[], Awaitable[None]]] = []
        self._catalog: PeerCatalog | None = None
        self._stack = contextlib.AsyncExitStack()

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

    def ask_peers_for_repos(self, catalog: Catalog) -> None:
        """With the upstream down, the catalog asks peers for a repo's file list."""
        if self.peers is not None:
            self._catalog = PeerCatalog(catalog, self.peers)
            catalog.ask_peers = self._catalog.learn

    async def open(self, routes: Sequence[PeerRoute] = ()) -> None:
        """Start answering peers and announce this node: the one place the peer API's routes
        are added (the LAN's own parts', and `routes` of the core: warm jobs)."""
        if self.api is None:
            return
        parts = (self.sharing, self.relay, self._catalog)
        for route in [*routes, *(r for p in parts if p is not None for r in p.peer_routes())]:
            self.api.route(route.method, route.path, route.handler,
                           any_receiver=route.any_receiver)
        for start in self._opening:
            await start()

    async def close(self) -> None:
        try:
            if self.api is not None:
                await self.api.close()
        finally:
            try:
                await self._stack.aclose()
            except Exception:  # noqa: BLE001 - the rest closed; stopping goes on
                log.exception("closing the LAN parts failed")


async def start_lan(cfg: Config, store: Store, transfers: Transfers, upstream: UpstreamFetch,
                    may_share: Callable[[str], bool], node_name: str, version: str) -> Lan:
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
        await _start_parts(lan, cfg, store, _Shared(transfers, upstream, may_share),
                           node_name, version)
    except BaseException:
        await lan.close()
        raise
    return lan


class _Shared(NamedTuple):
    """What the LAN gets from the core: the running transfers, the upstream (for its rate
    and probes), and which blobs peers may get (signatures.py's policy)."""
    transfers: Transfers
    upstream: UpstreamFetch
    may_share: Callable[[str], bool]


async def _start_parts(lan: Lan, cfg: Config, store: Store, shared: _Shared, node_name: str,
                       version: str) -> None:
    # libtorrent and zeroconf are loaded only when the node joins a LAN
    from .discovery import Discovery
    from .peerfetch import PeerFetch
    from .relay import Relay
    from .sharing import Sharing
    from .swarm import Swarm

    peer_host, peer_port = cfg.peer_listen
    bt_host, bt_port = cfg.bt_listen
    if cfg.interface:
        peer_host = bt_host = cfg.interface
    assert lan.credentials is not None  # start_lan made them
    api = PeerApi(lan.credentials)
    swarm = Swarm((bt_host, bt_port), cfg.cache_dir / "swarm", interface=cfg.interface)
    await swarm.start()
    lan._stack.push_async_callback(swarm.close)
    lan.swarm = swarm
    peers = PeerSet(lan.credentials, cfg.peer)
    lan.upload = PeerUploadCap(swarm.limit_upload)
    lan.upload.set_rate(cfg.peer_upload_rate)
    lan.sharing = Sharing(store, swarm, peers, lan.upload, shared.transfers,
                          shared.upstream, shared.may_share, node_name=node_name,
                          version=version, bt_port=bt_port)
    store.removed.connect(lan.sharing.forget_blob)
    lan.relay = Relay(peers, lan.upload, shared.transfers, shared.may_share)
    lan.api, lan.peers = api, peers
    lan.peer_source = PeerFetch(store, lan.sharing, lan.relay, shared.upstream)
    await lan.sharing.seed_all()
    discovery = Discovery(lan.node_id, lan.cluster_id, peer_port, bt_port, version,
                          interface=cfg.interface)
    discovery.changed.connect(lambda: _sync_discovered(discovery, peers))

    async def serve_api() -> None:
        lan._stack.push_async_callback(api.close)
        await api.start(peer_host, peer_port)

    async def join() -> None:
        lan._stack.push_async_callback(peers.close)
        await peers.start()
        lan._stack.push_async_callback(discovery.close)
        await discovery.start()

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

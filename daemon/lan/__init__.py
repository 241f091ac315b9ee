"""The node's place on the LAN: the cluster key and the signed peer API (cluster, peers,
peermsg), finding the other nodes (discovery), sharing complete chunks over BitTorrent (swarm,
sharing), relaying blobs as they land (relay), where the next bytes come from while other nodes
transfer the same blob (plan, peerfetch), and a repo's file list from peers when the upstream
is down (peercatalog). `node` builds it all from the config. The core (store, fetcher, proxy)
never imports this package: it sees the LAN through the `PeerSource` seam of fetch.py."""

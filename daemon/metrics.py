"""Prometheus metrics of one daemon, with the official client library. Labels are bounded:
sources, route kinds, error kinds and signature results, never repo or file names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

SOURCES = ("store", "peer", "upstream")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.served_bytes = Counter(
            "modelpeer_served_bytes", "Bytes of files served to clients, by where they came from",
            ["source"], registry=r)
        self.upstream_bytes = Counter(
            "modelpeer_upstream_bytes", "Bytes read from the upstream Hub and its CDNs",
            registry=r)
        self.upstream_errors = Counter(
            "modelpeer_upstream_errors", "Failed upstream reads, by kind", ["kind"], registry=r)
        self.requests = Histogram(
            "modelpeer_request_seconds", "Time to answer a Hub API request, by route",
            ["route"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.active_transfers = Gauge(
            "modelpeer_active_transfers", "Blobs being fetched right now", registry=r)
        self.store_bytes = Gauge("modelpeer_store_bytes", "Bytes in the chunk store", registry=r)
        self.store_chunks = Gauge("modelpeer_store_chunks", "Chunks in the store", registry=r)
        self.cache_hits = Counter(
            "modelpeer_cache_hits", "File requests answered wholly from the store", registry=r)
        self.cache_misses = Counter(
            "modelpeer_cache_misses", "File requests that needed peers or the upstream",
            registry=r)
        self.peers = Gauge("modelpeer_peers", "Live LAN peers of this node's cluster",
                           registry=r)
        self.peer_bytes = Gauge(
            "modelpeer_peer_bytes", "Bytes exchanged with each peer so far (label: its node id)",
            ["peer", "direction"], registry=r)
        self.warm_jobs = Gauge("modelpeer_warm_jobs", "Warm jobs on this node, by state",
                               ["state"], registry=r)
        self.verify_failures = Counter(
            "modelpeer_verification_failures", "Chunks or blobs that failed a digest check",
            registry=r)
        self.signatures = Counter(
            "modelpeer_signatures", "Publisher signatures (model.sig at a commit) checked, by "
            "result", ["result"], registry=r)
        self.signature_refusals = Counter(
            "modelpeer_signature_refused_files", "File requests refused by a require_signature "
            "rule", registry=r)
        for result in ("verified", "refused"):
            self.signatures.labels(result)
        for state in ("running", "done", "failed"):
            self.warm_jobs.labels(state)
        self.served_totals = dict.fromkeys(SOURCES, 0)
        self.upstream_total = 0
        for s in SOURCES:
            self.served_bytes.labels(s)

    def served(self, source: str, n: int) -> None:
        self.served_bytes.labels(source).inc(n)
        self.served_totals[source] += n

    def file_request(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()

    def upstream_failed(self, kind: str) -> None:
        self.upstream_errors.labels(kind).inc()

    def upstream_read(self, n: int) -> None:
        self.upstream_bytes.inc(n)
        self.upstream_total += n

    def signature_checked(self, verified: bool) -> None:
        self.signatures.labels("verified" if verified else "refused").inc()

    def signature_refused_file(self) -> None:
        self.signature_refusals.inc()

    def observe_request(self, route: str, seconds: float) -> None:
        self.requests.labels(route).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

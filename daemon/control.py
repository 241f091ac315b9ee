"""The daemon's own API under /_modelpeer/v1/ on the local listener (a prefix no Hub repo path
can take), used by the `modelpeer` CLI, plus /metrics for Prometheus."""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from .catalog import Catalog, Repo
from .errors import HubError
from .fetch import Fetcher
from .guard import PREFIX
from .hubnames import REPO_TYPES
from .lan.node import Lan
from .lan.plan import PlanBlob, blob_transfers, cluster_plan
from .metrics import Metrics
from .signatures import Signatures
from .store import Store
from .warmup import MAX_STATUS_WAIT, Warmup

STATIC = Path(__file__).parent / "static"

log = logging.getLogger(__name__)


class RecentErrors(logging.Handler):
    """The last warnings and errors, for the status page."""

    def __init__(self, size: int = 50) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[dict[str, object]] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"time": record.created, "level": record.levelname.lower(),
                             "logger": record.name, "message": record.getMessage()[:500]})


class Control:
    def __init__(self, store: Store, catalog: Catalog, fetcher: Fetcher, metrics: Metrics,
                 describe: Callable[[], dict[str, object]], lan: Lan, warmup: Warmup,
                 signatures: Signatures) -> None:
        self.store = store
        self.catalog = catalog
        self.fetcher = fetcher
        self.metrics = metrics
        self.describe = describe
        self.lan = lan
        self.warmup = warmup
        self.signatures = signatures
        self.ready = False
        self.started = time.time()
        self.recent_errors = RecentErrors()
        logging.getLogger().addHandler(self.recent_errors)

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get(f"{PREFIX}/health", self.health)
        r.add_get(f"{PREFIX}/status", self.status)
        r.add_get(f"{PREFIX}/repos", self.repos)
        r.add_get(f"{PREFIX}/peers", self.peers)
        r.add_post(f"{PREFIX}/warm", self.warm)
        r.add_get(f"{PREFIX}/jobs", self.jobs)
        r.add_get(f"{PREFIX}/jobs/{{job}}", self.job)
        r.add_post(f"{PREFIX}/jobs/{{job}}/cancel", self.cancel_job)
        r.add_delete(f"{PREFIX}/repos/{{repo_type}}/{{repo_id:.+}}", self.remove_repo)
        r.add_post(f"{PREFIX}/gc", self.gc)
        r.add_post(f"{PREFIX}/verify", self.verify)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/_modelpeer", self.page_redirect)
        r.add_get("/_modelpeer/", self.page)
        r.add_static("/_modelpeer/static/", STATIC)

    async def health(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "stopping"}, status=503)
        return web.json_response({"status": "ok"})

    def _refresh_gauges(self) -> dict[str, int]:
        usage = self.store.usage()
        self.metrics.store_bytes.set(usage.bytes)
        self.metrics.store_chunks.set(usage.chunks)
        self.metrics.active_transfers.set(len(self.fetcher.transfers.running))
        for state in ("running", "done", "failed"):
            self.metrics.warm_jobs.labels(state).set(
                sum(1 for j in self.warmup.jobs.values() if j.state == state))
        peers = self.lan.peer_list()
        self.metrics.peers.set(sum(1 for p in peers if p["alive"]))
        for p in peers:
            self.metrics.peer_bytes.labels(p["node_id"], "from").set(p["bytes_from"])
            self.metrics.peer_bytes.labels(p["node_id"], "to").set(p["bytes_to"])
        return {"bytes": usage.bytes, "blobs": usage.blobs,
                "complete_blobs": usage.complete_blobs, "chunks": usage.chunks}

    async def status(self, request: web.Request) -> web.Response:
        body = {
            **self.describe(),
            "uptime": round(time.time() - self.started, 1),
            "store": self._refresh_gauges(),
            "served_bytes": dict(self.metrics.served_totals),
            "upstream_bytes": self.metrics.upstream_total,
            "transfers": [t.snapshot() for t in self.fetcher.transfers.running.values()],
            "plan": [dataclasses.asdict(b) for b in self._cluster_plan()],
            "peer_list": self.lan.peer_list(),
            "jobs": self.warmup.summary(),
            "recent_errors": list(self.recent_errors.records)[::-1],
        }
        return web.json_response(body)

    def _cluster_plan(self) -> list[PlanBlob]:
        own = (self.lan.node_id or "local", str(self.describe()["node"]),
               blob_transfers(self.fetcher.transfers))
        return cluster_plan([own, *self.lan.peer_transfers()])

    async def peers(self, request: web.Request) -> web.Response:
        return web.json_response({**self.lan.summary(), "peers": self.lan.peer_list()})

    async def warm(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("repo"), str):
                raise ValueError("a JSON object with at least 'repo'")
        except ValueError as e:
            return web.json_response({"error": f"bad warm request: {e}"}, status=400)
        if "token" in body:
            return web.json_response({"error": "bad warm request: a Hub token does not go in the "
                                      "body; send it as 'Authorization: Bearer hf_...'"},
                                     status=400)
        try:
            return web.json_response(await self.warmup.create(
                body, request.headers.get("Authorization") or None))
        except HubError as e:
            return web.json_response({"error": e.message, "code": e.code}, status=e.status)

    async def jobs(self, request: web.Request) -> web.Response:
        return web.json_response(self.warmup.summary())

    async def job(self, request: web.Request) -> web.Response:
        """`?wait=S`: answer once a node's part of a running job ends, or after S seconds (5
        at most)."""
        try:
            wait = float(request.query.get("wait", "0"))
        except ValueError:
            wait = math.nan
        if not 0 <= wait <= MAX_STATUS_WAIT:
            return web.json_response({"error": f"wait: 0 to {MAX_STATUS_WAIT:g} seconds, "
                                               "please"}, status=400)
        return web.json_response(await self.warmup.status(request.match_info["job"], wait))

    async def cancel_job(self, request: web.Request) -> web.Response:
        await self.warmup.cancel(request.match_info["job"])
        return web.json_response({"cancelled": request.match_info["job"]})

    async def repos(self, request: web.Request) -> web.Response:
        repos = self.catalog.repos()
        for r in repos:
            r["revisions"] = await self.signatures.revisions(Repo(r["repo_type"], r["repo_id"]))
        return web.json_response(repos)

    async def remove_repo(self, request: web.Request) -> web.Response:
        repo_type = request.match_info["repo_type"]
        if repo_type not in REPO_TYPES:
            return web.json_response({"error": f"unknown repo type {repo_type!r}"}, status=400)
        repo = Repo(repo_type, request.match_info["repo_id"])
        known = {(r["repo_type"], r["repo_id"]) for r in self.catalog.repos()}
        if (repo.type, repo.id) not in known:
            return web.json_response({"error": f"{repo} is not in the cache"}, status=404)
        digests = self.catalog.forget(repo)
        in_use = [d for d in digests if self.store.is_pinned(d)]
        pending = self.store.bytes_on_disk(in_use)
        freed = sum(self.store.retire(d) for d in digests)
        if in_use:
            log.info("rm %s: %d blobs in use are removed after their last reader (%d bytes)",
                     repo, len(in_use), pending)
        return web.json_response({"removed": str(repo), "freed_bytes": freed,
                                  "pending_bytes": pending})

    async def gc(self, request: web.Request) -> web.Response:
        """Drop blobs no file entry refers to, then evict down to max_cache_size; blobs being
        read or written (pinned) are left alone."""
        referenced = self.catalog.referenced_digests()
        freed = 0
        removed = []
        for row in self.store.db.execute("SELECT digest FROM blobs").fetchall():
            if row[0] not in referenced and not self.store.is_pinned(row[0]):
                freed += self.store.remove(row[0])
                removed.append(row[0])
        before = self.store.usage().bytes
        evicted = self.store.evict(self.store.max_bytes)
        freed += before - self.store.usage().bytes
        return web.json_response({"removed": removed, "evicted": evicted, "freed_bytes": freed})

    async def verify(self, request: web.Request) -> web.Response:
        full = request.query.get("full", "") in ("1", "true", "yes")
        problems = await self.store.verify(full=full)
        self.metrics.verify_failures.inc(len(problems))
        answer = {"full": full, "problems": problems, "checked": self._refresh_gauges()}
        if request.query.get("signatures", "") in ("1", "true", "yes"):
            answer["signature_problems"] = await self.signatures.recheck()
        return web.json_response(answer)

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def page_redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/_modelpeer/")

    async def prometheus(self, request: web.Request) -> web.Response:
        self._refresh_gauges()
        body, content_type = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

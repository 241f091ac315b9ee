"""Warm jobs: put a repo on chosen nodes of the cluster before anyone asks for it.

The node the CLI talks to is the job's coordinator: it resolves the revision once, lists the
files, and hands the same job to every chosen node over the signed peer API. Each node fetches
the files through its ordinary Fetcher, so the cooperative rules of fetch.py apply: one node
goes to the upstream for each blob, the others relay it along a chain of nodes. The client's
token travels with the job in memory only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import json
import logging
import secrets
import time
from typing import Any
from urllib.parse import quote

from aiohttp import web

from .catalog import Catalog, FileEntry, HubError, Repo
from .fetch import Fetcher, Origin
from .peers import PeerApi, PeerError, PeerSet
from .store import BlobId, DigestMismatch
from .upstream import UpstreamRefused

log = logging.getLogger(__name__)

PARALLEL_FILES = 2
TOKEN_KEPT = 24 * 3600.0
TOKEN_WAIT = 15.0  # how long a resumed job looks for a peer holding its token


@dataclasses.dataclass
class WarmFile:
    path: str
    digest: str
    algo: str
    size: int
    lfs: bool


@dataclasses.dataclass
class Job:
    id: str
    repo_type: str
    repo_id: str
    revision: str
    commit: str
    files: list[WarmFile]
    token: str | None = None  # memory only
    state: str = "running"  # running, done, failed, cancelled
    error: str = ""
    done_files: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.time)
    finished: float = 0.0
    task: asyncio.Task[None] | None = None
    shutting_down: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def spec(self) -> dict[str, Any]:
        """What is sent to the other nodes (with the token, over the signed peer API)."""
        return {"id": self.id, "repo_type": self.repo_type, "repo_id": self.repo_id,
                "revision": self.revision, "commit": self.commit, "token": self.token,
                "files": [dataclasses.asdict(f) for f in self.files]}


class Warmup:
    def __init__(self, catalog: Catalog, fetcher: Fetcher, node_id: str, node_name: str,
                 peers: PeerSet | None, api: PeerApi | None) -> None:
        self.catalog = catalog
        self.fetcher = fetcher
        self.node_id = node_id
        self.node_name = node_name
        self.peers = peers
        self.jobs: dict[str, Job] = {}
        self.members: dict[str, list[str]] = {}  # job id -> node ids (on the coordinator)
        self._tokens: dict[str, tuple[str, float]] = {}  # job id -> token, forget-by time
        if api is not None:
            api.route("POST", "/warm", self._peer_start)
            api.route("GET", "/warm/{job}", self._peer_status)
            api.route("GET", "/warm/{job}/token", self._peer_token)
            api.route("POST", "/warm/{job}/cancel", self._peer_cancel)

    # --- the coordinator ------------------------------------------------------------------
    async def create(self, body: dict[str, Any], token: str | None) -> dict[str, Any]:
        repo = Repo(body.get("repo_type", "model"), body["repo"])
        revision = body.get("revision") or "main"
        commit = await self._resolve(repo, revision, token)
        files = await self._list(repo, commit, token, body.get("include") or [],
                                 body.get("exclude") or [])
        job = Job(secrets.token_hex(6), repo.type, repo.id, revision, commit, files, token)
        nodes = self._choose(body.get("nodes") or "all")
        self.members[job.id] = [n for n, _ in nodes]
        self._keep_token(job)
        errors = {}
        for node_id, peer in nodes:
            if peer is None:
                self._start(job)
                continue
            try:
                assert self.peers is not None
                await self.peers.request_json(peer, "POST", "/warm", job.spec())
            except PeerError as e:
                errors[node_id] = str(e)
        log.info("warm job %s: %s@%s, %d files, %d bytes, on %d nodes", job.id, repo,
                 commit[:12], len(files), job.total_bytes, len(nodes))
        return {"job": job.id, "commit": commit, "files": len(files),
                "bytes": job.total_bytes, "nodes": self.members[job.id], "errors": errors}

    def _keep_token(self, job: Job) -> None:
        """The coordinator holds the job's token in memory while the job may still run, for
        nodes that resume it after a restart."""
        now = time.time()
        self._tokens = {j: kept for j, kept in self._tokens.items() if kept[1] > now}
        if job.token is not None:
            self._tokens[job.id] = (job.token, now + TOKEN_KEPT)

    async def _resolve(self, repo: Repo, revision: str, token: str | None) -> str:
        answer = await self.catalog.api(
            repo, "GET", f"{repo.api_path}/revision/{quote(revision, safe='')}",
            revision=revision, token=token)
        if not answer.commit:
            raise HubError(502, "", f"{repo}@{revision}: the upstream named no commit")
        return answer.commit

    async def _list(self, repo: Repo, commit: str, token: str | None, include: list[str],
                    exclude: list[str]) -> list[WarmFile]:
        path = f"{repo.api_path}/tree/{commit}?recursive=true&expand=false"
        files: list[WarmFile] = []
        while path:
            answer = await self.catalog.api(repo, "GET", path, revision=commit, token=token)
            for e in json.loads(answer.body):
                if e.get("type") != "file" or not _selected(e["path"], include, exclude):
                    continue
                lfs = e.get("lfs")
                files.append(WarmFile(e["path"], lfs["oid"] if lfs else e["oid"],
                                      "sha256" if lfs else "gitsha1", int(e["size"]), bool(lfs)))
            path = answer.next_link
        return files

    def _choose(self, nodes: str) -> list[tuple[str, Any]]:
        """(node id, peer or None for this node) for `all`, `local` or NODE,NODE,..."""
        live = self.peers.usable() if self.peers is not None else []
        everyone = [(self.node_id, self.node_name, None),
                    *[(p.node_id, p.name, p) for p in live]]
        if nodes in ("all", "local"):
            return [(n, p) for n, _, p in everyone if nodes == "all" or p is None]
        wanted = {n.strip() for n in nodes.split(",") if n.strip()}
        chosen = [(n, name, p) for n, name, p in everyone if n in wanted or name in wanted]
        missing = wanted - {n for n, _, _ in chosen} - {name for _, name, _ in chosen}
        if missing:
            raise HubError(404, "", f"no live node named {', '.join(sorted(missing))} "
                                    "(see `modelpeer peers`)")
        return [(n, p) for n, _, p in chosen]

    async def status(self, job_id: str) -> dict[str, Any]:
        """The job on every node it was given to; a node that does not answer has failed."""
        nodes: dict[str, Any] = {}
        for node_id in self.members.get(job_id, [self.node_id]):
            if node_id == self.node_id:
                job = self.jobs.get(job_id)
                nodes[self.node_name or node_id] = (self.local_status(job) if job else
                                                    {"state": "failed", "error": "unknown job"})
                continue
            peer = self.peers.peers.get(node_id) if self.peers is not None else None
            name = peer.name if peer is not None and peer.name else node_id
            if peer is None or not peer.alive:
                nodes[name] = {"state": "failed", "error": "the node is gone"}
                continue
            try:
                nodes[name] = await self.peers.request_json(peer, "GET", f"/warm/{job_id}")
            except PeerError as e:
                nodes[name] = {"state": "failed", "error": f"the node does not answer: {e}"}
        states = {n["state"] for n in nodes.values()}
        state = ("running" if "running" in states else
                 "failed" if states - {"done"} else "done")
        return {"job": job_id, "state": state, "nodes": nodes}

    async def cancel(self, job_id: str) -> None:
        for node_id in self.members.get(job_id, [self.node_id]):
            if node_id == self.node_id:
                self._cancel_local(job_id)
            elif self.peers is not None and node_id in self.peers.peers:
                try:
                    await self.peers.request_json(self.peers.peers[node_id], "POST",
                                                  f"/warm/{job_id}/cancel", {})
                except PeerError as e:
                    log.warning("warm job %s: cancel on %s failed: %s", job_id, node_id, e)

    # --- every node ---------------------------------------------------------------------
    def resume(self) -> None:
        """Jobs that were running when the daemon stopped go on. Their token was not kept: a
        file the upstream refuses asks the nodes still running the job for it; when none has
        it, the file fails with a reason, and `warm --token` starts the job again."""
        for row in self.catalog.db.execute("SELECT spec FROM jobs WHERE state='running'"):
            job = _job_from_spec(json.loads(row[0]))
            log.info("resuming warm job %s: %s, %d files", job.id, job.repo_id, len(job.files))
            self._start(job)

    async def close(self) -> None:
        """Shutdown: stop the jobs but keep them 'running' in the index, to resume."""
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for job in self.jobs.values():
            job.shutting_down = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _save(self, job: Job) -> None:
        spec = {**job.spec(), "token": None}
        self.catalog.db.execute(
            "INSERT INTO jobs (id, spec, state, created) VALUES (?, ?, ?, ?) ON CONFLICT(id)"
            " DO UPDATE SET state=excluded.state", (job.id, json.dumps(spec), job.state,
                                                    job.started))

    def _start(self, job: Job) -> None:
        if job.id in self.jobs:
            return
        self.jobs[job.id] = job
        self._save(job)
        repo = Repo(job.repo_type, job.repo_id)
        self.catalog.remember(repo, job.revision, job.commit,
                              [FileEntry(repo, job.commit, f.path,
                                         BlobId(f.digest, f.algo, f.size), f.lfs)
                               for f in job.files])
        job.task = asyncio.get_running_loop().create_task(self._run(job), name=f"warm {job.id}")

    async def _run(self, job: Job) -> None:
        repo = Repo(job.repo_type, job.repo_id)
        gate = asyncio.Semaphore(PARALLEL_FILES)

        async def one(f: WarmFile) -> None:
            async with gate:
                try:
                    await self._fetch_once_more(job, repo, f)
                    job.done_files += 1
                except Exception as e:  # noqa: BLE001 - recorded per file, the job goes on
                    job.failed.append(f"{f.path}: {e}")

        try:
            await asyncio.gather(*(one(f) for f in job.files))
            job.state = "failed" if job.failed else "done"
            job.error = "; ".join(job.failed[:5])
        except asyncio.CancelledError:
            job.state = "stopped" if job.shutting_down else "cancelled"
        finally:
            job.finished = time.time()
            job.token = None
            if not job.shutting_down:
                self._save(job)
            log.info("warm job %s on this node: %s (%d of %d files)", job.id, job.state,
                     job.done_files, len(job.files))

    async def _fetch_once_more(self, job: Job, repo: Repo, f: WarmFile) -> None:
        """The file, fetched a second time when the first try can be mended: the blob failed
        its digest (the peers that sent it are banned now), or the upstream wanted the token
        that a resumed job lacks."""
        try:
            await self._fetch(job, repo, f)
            return
        except DigestMismatch as e:
            log.warning("warm job %s: %s/%s: %s; fetching it again", job.id, repo, f.path, e)
        except UpstreamRefused:
            if job.token is not None or not await self._token_from_peers(job):
                raise
        await self._fetch(job, repo, f)

    async def _fetch(self, job: Job, repo: Repo, f: WarmFile) -> None:
        entry = FileEntry(repo, job.commit, f.path, BlobId(f.digest, f.algo, f.size), f.lfs)
        transfer = self.fetcher.open(entry.blob, Origin(entry.resolve_path, job.token,
                                                        f"{repo}/{f.path}"))
        await transfer.done
        if transfer.upstream_served(entry.resolve_path, job.token):
            self.catalog.upstream_served_file(repo, job.token)

    async def _token_from_peers(self, job: Job) -> bool:
        """A job resumed after a restart has no token (it is never written down): its
        coordinator and the nodes still running it have it in memory. Right after a start the
        peers may not be found yet, so they are asked for a while."""
        deadline = time.monotonic() + TOKEN_WAIT
        while self.peers is not None:
            for peer in self.peers.usable():
                try:
                    answer = await self.peers.request_json(peer, "GET", f"/warm/{job.id}/token")
                except PeerError:
                    continue
                if answer.get("token"):
                    job.token = str(answer["token"])
                    log.info("warm job %s: token of %s received from node %s", job.id,
                             job.repo_id, peer.node_id)
                    return True
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        log.warning("warm job %s: %s needs a token and no node running the job has it; run "
                    "`modelpeer warm --token` again", job.id, job.repo_id)
        return False

    def local_status(self, job: Job) -> dict[str, Any]:
        have = 0
        for f in job.files:
            t = self.fetcher.transfers.get(f.digest)
            if t is not None:
                have += t.available
            elif self.fetcher.store.is_complete(f.digest):
                have += f.size
        return {"state": job.state, "error": job.error, "files": len(job.files),
                "done_files": job.done_files, "bytes": job.total_bytes, "have_bytes": have,
                "repo": f"{job.repo_id}@{job.commit[:12]}", "started": job.started,
                "finished": job.finished}

    def _cancel_local(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.task is not None and not job.task.done():
            job.task.cancel()

    async def _peer_start(self, request: web.Request, sender: str) -> web.Response:
        job = _job_from_spec(await request.json())
        self._start(job)
        log.info("warm job %s from node %s: %s, %d files", job.id, sender, job.repo_id,
                 len(job.files))
        return web.json_response({"job": job.id})

    async def _peer_status(self, request: web.Request, sender: str) -> web.Response:
        job = self.jobs.get(request.match_info["job"])
        if job is None:
            return web.json_response({"error": "unknown job"}, status=404)
        return web.json_response(self.local_status(job))

    async def _peer_token(self, request: web.Request, sender: str) -> web.Response:
        job_id = request.match_info["job"]
        job = self.jobs.get(job_id)
        token = job.token if job is not None else None
        if token is None:
            kept, until = self._tokens.get(job_id, ("", 0.0))
            token = kept if until > time.time() else None
        if token is None:
            return web.json_response({"error": "no token held for this job"}, status=404)
        log.info("warm job %s: token handed to node %s", job_id, sender)
        return web.json_response({"token": token})

    async def _peer_cancel(self, request: web.Request, sender: str) -> web.Response:
        self._cancel_local(request.match_info["job"])
        return web.json_response({})

    def summary(self) -> list[dict[str, Any]]:
        return [{"job": j.id, **self.local_status(j)} for j in self.jobs.values()]


def _job_from_spec(spec: dict[str, Any]) -> Job:
    return Job(spec["id"], spec["repo_type"], spec["repo_id"], spec["revision"],
               spec["commit"], [WarmFile(**f) for f in spec["files"]], spec.get("token"))


def _selected(path: str, include: list[str], exclude: list[str]) -> bool:
    if include and not any(fnmatch.fnmatch(path, g) for g in include):
        return False
    return not any(fnmatch.fnmatch(path, g) for g in exclude)

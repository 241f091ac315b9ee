"""Warm jobs: put a repo on chosen nodes of the cluster before anyone asks for it.

The node the CLI talks to is the job's coordinator: it resolves the revision once, lists the
files, and hands the same job to every chosen node over the signed peer API. Each node fetches
the files through its ordinary Fetcher, so the cooperative rules of fetch.py apply: one node
goes to the upstream for each blob, the others relay it along a chain of nodes. The client's
token travels with the job sealed for the cluster (cluster.py), and is kept in memory only.

A node believes a coordinator no more than it has to: the job is parsed strictly (peermsg.py),
and its file entries and commit are confirmed with the upstream (one tree listing) before they
go into the catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web

from . import hubnames
from .catalog import Catalog, FileEntry, Repo
from .errors import (
    DigestMismatch,
    HubError,
    InvalidName,
    PeerError,
    SignatureError,
    UpstreamRefused,
)
from .fetch import Fetcher
from .lan.cluster import ClusterKey
from .lan.peers import Peer, PeerRoute, PeerSet
from .peermsg import (
    JobState,
    JobStatus,
    WarmFile,
    WarmSpec,
    parse_job_id,
    parse_job_status,
    parse_sealed_token,
    parse_warm_file,
    parse_warm_spec,
)
from .pins import Pins
from .store import BlobId
from .transfer import Origin

log = logging.getLogger(__name__)

# files a node's part of a job fetches at once: with 2, the link idled between pairs while the
# next pair's fetchers were agreed on (0.3 s each); an upstream fetch's memory is bounded anyway
PARALLEL_FILES = 4
TOKEN_KEPT = 24 * 3600.0
TOKEN_WAIT = 15.0  # how long a resumed job looks for a peer holding its token
MAX_STATUS_WAIT = 5.0  # s a status may wait for a node's part of the job to end


@dataclasses.dataclass
class Job:
    id: str
    repo_type: str
    repo_id: str
    revision: str
    commit: str
    files: list[WarmFile]
    token: str | None = None  # memory only
    pin: bool = False  # `warm --pin`: every node of the job pins the revision
    members: tuple[str, ...] = ()  # the nodes the job was given to
    coordinator: str = ""  # the node that gave it to this one ("": this node, or not known)
    confirmed: bool = False  # the file entries came from the upstream (not from a peer)
    state: JobState = JobState.RUNNING
    error: str = ""
    done_files: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.time)
    finished: float = 0.0
    task: asyncio.Task[None] | None = None
    shutting_down: bool = False

    @property
    def repo(self) -> Repo:
        return Repo(self.repo_type, self.repo_id)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def spec(self, sealed_token: str | None) -> WarmSpec:
        return WarmSpec(self.id, self.repo_type, self.repo_id, self.revision, self.commit,
                        tuple(self.files), sealed_token, self.pin, self.members)

    @classmethod
    def from_spec(cls, spec: WarmSpec, token: str | None) -> Job:
        return cls(spec.id, spec.repo_type, spec.repo_id, spec.revision, spec.commit,
                   list(spec.files), token, spec.pin, spec.members)


class Warmup:
    def __init__(self, catalog: Catalog, fetcher: Fetcher, node_id: str, node_name: str,
                 peers: PeerSet | None,
                 cluster_key: ClusterKey | None, pins: Pins | None = None,
                 check_signature: Callable[[FileEntry, str | None], Awaitable[None]] | None = None
                 ) -> None:
        self.catalog = catalog
        self.pins = pins
        self.fetcher = fetcher
        self.node_id = node_id
        self.node_name = node_name
        self.peers = peers
        self.cluster_key = cluster_key
        self.jobs: dict[str, Job] = {}
        self.members: dict[str, list[str]] = {}  # job id -> node ids (on the coordinator)
        self._tokens: dict[str, tuple[str, float]] = {}  # job id -> token, forget-by time
        # on the coordinator: the nodes whose part of a job ended, and news of the next one
        self._ended: dict[str, set[str]] = {}
        self._news: dict[str, asyncio.Event] = {}
        self._notices: set[asyncio.Task[None]] = set()
        # signatures.py's policy: raises HubError when the file may not be served
        self.check_signature = check_signature or _no_policy

    def peer_routes(self) -> list[PeerRoute]:
        return [PeerRoute("POST", "/warm", self._peer_start),
                PeerRoute("GET", "/warm/{job}", self._peer_status),
                PeerRoute("GET", "/warm/{job}/token", self._peer_token),
                PeerRoute("POST", "/warm/{job}/cancel", self._peer_cancel),
                PeerRoute("POST", "/warm/{job}/ended", self._peer_ended)]

    # --- the coordinator ------------------------------------------------------------------
    async def create(self, body: dict[str, object], token: str | None) -> dict[str, object]:
        repo, revision, include, exclude, nodes_wanted = _warm_request(body)
        commit = await self._resolve(repo, revision, token)
        files = await self._list(repo, commit, token, include, exclude)
        nodes = self._choose(nodes_wanted)
        node_ids = [n for n, _ in nodes]
        job = Job(secrets.token_hex(6), repo.type, repo.id, revision, commit, files, token,
                  pin=body.get("pin") is True, confirmed=True,
                  members=tuple(node_ids) if self.peers is not None else ())
        self.members[job.id] = node_ids
        self._keep_token(job)
        remote = [(node_id, peer) for node_id, peer in nodes if peer is not None]
        if len(remote) < len(nodes):
            self._pin_if_asked(job)
            self._start(job)
        # all at once: one after the other, the 12th node of a job started 11 round trips late
        sent = await asyncio.gather(*(self._send_job(peer, job) for _, peer in remote),
                                    return_exceptions=True)
        errors = {}
        for (node_id, _), outcome in zip(remote, sent, strict=True):
            if isinstance(outcome, PeerError):
                log.warning("warm job %s: node %s did not take it: %s", job.id, node_id, outcome)
                errors[node_id] = str(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
        log.info("warm job %s: %s@%s, %d files, %d bytes, on %d nodes", job.id, repo,
                 commit[:12], len(files), job.total_bytes, len(nodes))
        return {"job": job.id, "commit": commit, "files": len(files),
                "bytes": job.total_bytes, "nodes": self.members[job.id], "errors": errors}

    async def _send_job(self, peer: Peer, job: Job) -> None:
        assert self.peers is not None  # a remote node was chosen, so there is a LAN
        spec = job.spec(self._seal(job.id, job.token)).to_json()
        taken = await self.peers.request_json(peer, "POST", "/warm", parse_job_id, spec)
        if taken != job.id:
            raise PeerError(f"node {peer.node_id} answered job {taken}, not {job.id}")

    def _seal(self, job_id: str, token: str | None) -> str | None:
        if token is None or self.cluster_key is None:
            return None
        return self.cluster_key.seal(token, f"warm token {job_id}")

    def _unseal(self, job_id: str, sealed: str | None) -> str | None:
        if sealed is None or self.cluster_key is None:
            return None
        return self.cluster_key.open(sealed, f"warm token {job_id}")

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
        if not answer.commit or not hubnames.COMMIT_RE.fullmatch(answer.commit):
            raise HubError(502, "", f"{repo}@{revision}: the upstream named no commit")
        return answer.commit

    async def _list(self, repo: Repo, commit: str, token: str | None, include: list[str],
                    exclude: list[str]) -> list[WarmFile]:
        path = f"{repo.api_path}/tree/{commit}?recursive=true&expand=false"
        files: list[WarmFile] = []
        while path:
            answer = await self.catalog.api(repo, "GET", path, revision=commit, token=token)
            try:
                entries = json.loads(answer.body)
                files += [_file_of_tree_entry(e) for e in entries
                          if isinstance(e, dict) and e.get("type") == "file"
                          and _selected(str(e.get("path")), include, exclude)]
            except (ValueError, TypeError) as e:
                raise HubError(502, "", f"{repo}@{commit[:12]}: the upstream listed files this "
                                        f"daemon cannot read: {e}") from e
            path = answer.next_link
        return files

    def _choose(self, nodes: str) -> list[tuple[str, Peer | None]]:
        """(node id, peer or None for this node) for `all`, `local` or NODE,NODE,..."""
        live = self.peers.usable() if self.peers is not None else []
        everyone: list[tuple[str, str, Peer | None]] = [
            (self.node_id, self.node_name, None), *[(p.node_id, p.name, p) for p in live]]
        if nodes in ("all", "local"):
            return [(n, p) for n, _, p in everyone if nodes == "all" or p is None]
        wanted = {n.strip() for n in nodes.split(",") if n.strip()}
        chosen = [(n, name, p) for n, name, p in everyone if n in wanted or name in wanted]
        missing = wanted - {n for n, _, _ in chosen} - {name for _, name, _ in chosen}
        if missing:
            raise HubError(404, "", f"no live node named {', '.join(sorted(missing))} "
                                    "(see `modelpeer peers`)")
        return [(n, p) for n, _, p in chosen]

    async def status(self, job_id: str, wait: float = 0.0) -> dict[str, object]:
        """The job on every node it was given to; a node that does not answer, or answers
        nonsense, has failed. With `wait`, first until a node's part of the job ends (each
        tells the coordinator) or `wait` seconds pass: `warm --wait` polled every 0.25 s
        and learned of the job's end 0.125 s late on average."""
        members = self.members.get(job_id, [self.node_id])
        coordinated = job_id in self.members  # a job another node gave out: no news comes here
        if wait > 0 and coordinated and not set(members) <= self._ended.get(job_id, set()):
            news = self._news.setdefault(job_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(news.wait(), min(wait, MAX_STATUS_WAIT))
        answers = await asyncio.gather(*(self._status_on(job_id, n) for n in members))
        nodes = dict(answers)
        states = {n["state"] for n in nodes.values()}
        state = (JobState.RUNNING if JobState.RUNNING in states else
                 JobState.FAILED if states - {JobState.DONE} else JobState.DONE)
        return {"job": job_id, "state": state, "nodes": nodes}

    async def _status_on(self, job_id: str, node_id: str) -> tuple[str, dict[str, object]]:
        """The job on one node, by the node's name: all are asked at once (one after the
        other, a status of a 12-node job took 11 round trips)."""
        if node_id == self.node_id:
            job = self.jobs.get(job_id)
            return self.node_name or node_id, (
                self.local_status(job).to_json() if job else
                {"state": JobState.FAILED, "error": "unknown job"})
        peer = self.peers.peers.get(node_id) if self.peers is not None else None
        name = peer.name if peer is not None and peer.name else node_id
        if self.peers is None or peer is None or not peer.alive:
            return name, {"state": JobState.FAILED, "error": "the node is gone"}
        try:
            answer = await self.peers.request_json(peer, "GET", f"/warm/{job_id}",
                                                   parse_job_status)
        except PeerError as e:
            return name, {"state": JobState.FAILED, "error": f"the node does not answer: {e}"}
        return name, answer.to_json()

    async def cancel(self, job_id: str) -> None:
        for node_id in self.members.get(job_id, [self.node_id]):
            if node_id == self.node_id:
                self._cancel_local(job_id)
            elif self.peers is not None and node_id in self.peers.peers:
                try:
                    await self.peers.request_json(self.peers.peers[node_id], "POST",
                                                  f"/warm/{job_id}/cancel", parse_job_id, {})
                except PeerError as e:
                    log.warning("warm job %s: cancel on %s failed: %s", job_id, node_id, e)

    # --- every node ---------------------------------------------------------------------
    def resume(self) -> None:
        """Jobs that were running when the daemon stopped go on. Their token was not kept: a
        file the upstream refuses asks the nodes still running the job for it; when none has
        it, the file fails with a reason, and `warm --token` starts the job again. A row that
        cannot be read is marked failed, and the daemon comes up all the same."""
        rows = self.catalog.db.execute("SELECT id, spec FROM jobs WHERE state=?",
                                       (JobState.RUNNING,)).fetchall()
        for job_id, spec in rows:
            try:
                job = Job.from_spec(parse_warm_spec(json.loads(spec)), None)
            except (ValueError, TypeError, RecursionError) as e:
                log.error("warm job %s cannot be resumed: its saved row is unreadable (%s); "
                          "marked failed", job_id, e)
                self.catalog.db.execute("UPDATE jobs SET state=? WHERE id=?",
                                        (JobState.FAILED, job_id))
                continue
            log.info("resuming warm job %s: %s, %d files", job.id, job.repo_id, len(job.files))
            self._start(job)

    async def close(self) -> None:
        """Shutdown: stop the jobs but keep them 'running' in the index, to resume."""
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for job in self.jobs.values():
            job.shutting_down = True
        tasks += self._notices
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _save(self, job: Job) -> None:
        self.catalog.db.execute(
            "INSERT INTO jobs (id, spec, state, created) VALUES (?, ?, ?, ?) ON CONFLICT(id)"
            " DO UPDATE SET state=excluded.state",
            (job.id, json.dumps(job.spec(None).to_json()), job.state, job.started))

    def _pin_if_asked(self, job: Job) -> None:
        """When a node takes a `warm --pin` job: pinned before the files land, so none of
        them is evicted on its way in (not on resume: an unpin meanwhile stands)."""
        if job.pin and self.pins is not None:
            self.pins.add(job.repo, job.revision, job.commit)

    def _part_ended(self, job_id: str, node_id: str) -> None:
        """On the coordinator: a node's part of the job ended; a status waiting learns now."""
        self._ended.setdefault(job_id, set()).add(node_id)
        news = self._news.pop(job_id, None)
        if news is not None:
            news.set()

    def _tell_coordinator(self, job: Job) -> None:
        """This node's part ended: the coordinator hears it (best effort; a status that
        waits for it ends at its own time otherwise)."""
        if job.id in self.members:
            self._part_ended(job.id, self.node_id)
            return
        if self.peers is None or (coordinator := self.peers.peers.get(job.coordinator)) is None:
            return
        notice = asyncio.get_running_loop().create_task(
            self._tell_ended(self.peers, coordinator, job.id))
        self._notices.add(notice)
        notice.add_done_callback(self._notices.discard)

    @staticmethod
    async def _tell_ended(peers: PeerSet, coordinator: Peer, job_id: str) -> None:
        try:
            await peers.request_json(coordinator, "POST", f"/warm/{job_id}/ended", parse_job_id,
                                     {})
        except PeerError as e:
            log.info("warm job %s: telling node %s this node's part ended failed: %s", job_id,
                     coordinator.node_id, e)

    def _start(self, job: Job) -> None:
        if job.id in self.jobs:
            return
        self.jobs[job.id] = job
        self._save(job)
        job.task = asyncio.get_running_loop().create_task(self._run(job), name=f"warm {job.id}")

    async def _run(self, job: Job) -> None:
        gate = asyncio.Semaphore(PARALLEL_FILES)

        async def one(f: WarmFile) -> None:
            async with gate:
                try:
                    await self._fetch_once_more(job, f)
                    job.done_files += 1
                except Exception as e:  # noqa: BLE001 - recorded per file, the job goes on
                    job.failed.append(f"{f.path}: {e}")

        try:
            await self._confirm(job)
            await asyncio.gather(*(one(f) for f in job.files))
            job.state = JobState.FAILED if job.failed else JobState.DONE
            job.error = "; ".join(job.failed[:5])
        except asyncio.CancelledError:
            job.state = JobState.STOPPED if job.shutting_down else JobState.CANCELLED
        except (HubError, sqlite3.Error) as e:
            job.state, job.error = JobState.FAILED, str(e)
        finally:
            job.finished = time.time()
            job.token = None
            if not job.shutting_down:
                self._save(job)
                self._tell_coordinator(job)
            log.info("warm job %s on this node: %s (%d of %d files)%s", job.id, job.state,
                     job.done_files, len(job.files), f": {job.error}" if job.error else "")

    async def _confirm(self, job: Job) -> None:
        """The job's file entries as the upstream lists them at the job's commit; only
        confirmed entries (and a revision the upstream resolves to that commit) go into the
        catalog, for later clients. Files the upstream does not list are dropped from the job;
        entries that disagree are corrected."""
        if not job.confirmed:
            try:
                listed = await self._upstream_listing(job)
            except HubError as e:
                if e.status < 500:
                    raise HubError(e.status, e.code, f"the upstream refuses the job's repo "
                                   f"{job.repo}@{job.commit[:12]}: {e.message}") from e
                log.warning("warm job %s: the upstream is unreachable (%s); fetching with the "
                            "coordinator's file entries, which are not kept for later "
                            "clients", job.id, e.message)
                return
            job.files = self._agree_with(job, listed)
            job.confirmed = True
        revision = job.revision
        if revision != job.commit:
            try:
                if await self._resolve(job.repo, revision, job.token) != job.commit:
                    revision = job.commit  # the branch moved on: keep only the commit's files
            except HubError:
                revision = job.commit
        self.catalog.remember(job.repo, revision, job.commit,
                              [FileEntry(job.repo, job.commit, f.path,
                                         BlobId(f.digest, f.algo, f.size), f.lfs)
                               for f in job.files])

    async def _upstream_listing(self, job: Job) -> dict[str, WarmFile]:
        try:
            files = await self._list(job.repo, job.commit, job.token, [], [])
        except HubError as e:
            if e.status not in (401, 403, 404) or job.token is not None:
                raise
            if not await self._token_from_peers(job):
                raise
            files = await self._list(job.repo, job.commit, job.token, [], [])
        return {f.path: f for f in files}

    def _agree_with(self, job: Job, listed: dict[str, WarmFile]) -> list[WarmFile]:
        agreed = []
        for f in job.files:
            upstream = listed.get(f.path)
            if upstream is None:
                log.warning("warm job %s: %s/%s is not in the repo at %s; left out", job.id,
                            job.repo, f.path, job.commit[:12])
                job.failed.append(f"{f.path}: not in {job.repo}@{job.commit[:12]}")
                continue
            if upstream != f:
                log.warning("warm job %s: %s/%s: the coordinator said %s, the upstream says "
                            "%s; using the upstream's", job.id, job.repo, f.path, f, upstream)
            agreed.append(upstream)
        return agreed

    async def _fetch_once_more(self, job: Job, f: WarmFile) -> None:
        """The file, fetched a second time when the first try can be mended: the blob failed
        its digest (the peers that sent it are banned now), or the upstream wanted the token
        that a resumed job lacks."""
        try:
            await self._fetch(job, f)
            return
        except DigestMismatch as e:
            log.warning("warm job %s: %s/%s: %s; fetching it again", job.id, job.repo, f.path, e)
        except UpstreamRefused:
            if job.token is not None or not await self._token_from_peers(job):
                raise
        await self._fetch(job, f)

    async def _fetch(self, job: Job, f: WarmFile) -> None:
        entry = FileEntry(job.repo, job.commit, f.path, BlobId(f.digest, f.algo, f.size), f.lfs)
        await self.check_signature(entry, job.token)
        transfer = self.fetcher.open(entry.blob, Origin(entry.resolve_path, job.token,
                                                        f"{job.repo}/{f.path}",
                                                        frozenset(job.members)))
        await transfer.done
        if transfer.upstream_served(entry.resolve_path, job.token):
            self.catalog.upstream_served_file(job.repo, job.token)

    async def _token_from_peers(self, job: Job) -> bool:
        """A job resumed after a restart has no token (it is never written down): its
        coordinator and the nodes still running it have it in memory. Right after a start the
        peers may not be found yet, so they are asked for a while."""
        deadline = time.monotonic() + TOKEN_WAIT
        while self.peers is not None:
            for peer in self.peers.usable():
                try:
                    sealed = await self.peers.request_json(peer, "GET", f"/warm/{job.id}/token",
                                                           parse_sealed_token)
                    job.token = self._unseal(job.id, sealed)
                except (PeerError, SignatureError) as e:
                    log.debug("warm job %s: no token from node %s: %s", job.id, peer.node_id, e)
                    continue
                log.info("warm job %s: token of %s received from node %s", job.id,
                         job.repo_id, peer.node_id)
                return True
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        log.warning("warm job %s: %s needs a token and no node running the job has it; run "
                    "`modelpeer warm --token` again", job.id, job.repo_id)
        return False

    def local_status(self, job: Job) -> JobStatus:
        have = 0
        for f in job.files:
            t = self.fetcher.transfers.running.get(f.digest)
            if t is not None:
                have += t.available
            elif self.fetcher.store.is_complete(f.digest):
                have += f.size
        return JobStatus(job.state, job.error, len(job.files), job.done_files,
                         job.total_bytes, have, f"{job.repo_id}@{job.commit[:12]}",
                         job.started, job.finished)

    def _cancel_local(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.task is not None and not job.task.done():
            job.task.cancel()

    async def _peer_start(self, request: web.Request, sender: str) -> web.Response:
        try:
            spec = parse_warm_spec(await request.json())
            job = Job.from_spec(spec, self._unseal(spec.id, spec.sealed_token))
        except (ValueError, RecursionError, SignatureError) as e:
            log.warning("warm job from node %s refused: %s", sender, e)
            return web.json_response({"error": f"bad warm job: {e}"}, status=400)
        job.coordinator = sender
        if job.id not in self.jobs:
            self._pin_if_asked(job)
        self._start(job)
        log.info("warm job %s from node %s: %s, %d files", job.id, sender, job.repo_id,
                 len(job.files))
        return web.json_response({"job": job.id})

    async def _peer_status(self, request: web.Request, sender: str) -> web.Response:
        job = self.jobs.get(request.match_info["job"])
        if job is None:
            return web.json_response({"error": "unknown job"}, status=404)
        return web.json_response(self.local_status(job).to_json())

    async def _peer_token(self, request: web.Request, sender: str) -> web.Response:
        job_id = request.match_info["job"]
        if job_id in self.members and sender not in self.members[job_id]:
            log.warning("warm job %s: node %s asked for its token but is not running it",
                        job_id, sender)
            return web.json_response({"error": "not a node of this job"}, status=403)
        job = self.jobs.get(job_id)
        token = job.token if job is not None else None
        if token is None:
            kept, until = self._tokens.get(job_id, ("", 0.0))
            token = kept if until > time.time() else None
        if token is None:
            return web.json_response({"error": "no token held for this job"}, status=404)
        log.info("warm job %s: token handed to node %s, sealed", job_id, sender)
        return web.json_response({"sealed_token": self._seal(job_id, token)})

    async def _peer_ended(self, request: web.Request, sender: str) -> web.Response:
        job_id = request.match_info["job"]
        if sender not in self.members.get(job_id, []):
            return web.json_response({"error": "not a node of a job this node coordinates"},
                                     status=404)
        self._part_ended(job_id, sender)
        return web.json_response({"job": job_id})

    async def _peer_cancel(self, request: web.Request, sender: str) -> web.Response:
        self._cancel_local(request.match_info["job"])
        return web.json_response({"job": request.match_info["job"]})

    def summary(self) -> list[dict[str, object]]:
        return [{"job": j.id, **self.local_status(j).to_json()} for j in self.jobs.values()]


async def _no_policy(entry: FileEntry, token: str | None) -> None:
    return None


# Any: the request's JSON, each field checked as it is read
def _warm_request(body: dict[str, Any]) -> tuple[Repo, str, list[str], list[str], str]:
    """What a local client asked to warm: repo, revision, include, exclude, nodes."""
    try:
        repo_type = hubnames.repo_type(body.get("repo_type") or "model")
        repo_id = hubnames.repo_id(str(body.get("repo", "")).split("/"))
        revision = hubnames.revision(body.get("revision") or "main")
    except (InvalidName, TypeError) as e:
        raise HubError(400, "", f"bad warm request: {e}") from e
    globs = {k: body.get(k) or [] for k in ("include", "exclude")}
    nodes = body.get("nodes") or "all"
    if (not all(isinstance(v, list) and all(isinstance(g, str) for g in v)
                for v in globs.values()) or not isinstance(nodes, str)):
        raise HubError(400, "", "bad warm request: include/exclude are lists of globs, nodes "
                                "is all, local or NODE,NODE,...")
    return Repo(repo_type, repo_id), revision, globs["include"], globs["exclude"], nodes


def _file_of_tree_entry(e: dict[str, object]) -> WarmFile:
    lfs = e.get("lfs")
    if isinstance(lfs, dict):
        return parse_warm_file({"path": e.get("path"), "digest": lfs.get("oid"),
                                "algo": "sha256", "size": e.get("size"), "lfs": True})
    return parse_warm_file({"path": e.get("path"), "digest": e.get("oid"), "algo": "gitsha1",
                            "size": e.get("size"), "lfs": False})


def _selected(path: str, include: list[str], exclude: list[str]) -> bool:
    if include and not any(fnmatch.fnmatch(path, g) for g in include):
        return False
    return not any(fnmatch.fnmatch(path, g) for g in exclude)

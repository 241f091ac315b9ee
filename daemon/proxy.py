"""The Hub-compatible HTTP API (aiohttp.web): routes, headers, Range, streaming, Hub errors.

It only speaks HTTP: what a file is comes from the catalog, its bytes from the fetcher.
Routing is done on the raw path, because the client percent-encodes revisions (`refs%2Fpr%2F1`)
and tree sub-paths while file paths keep their slashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from urllib.parse import unquote

from aiohttp import web

from . import hubnames
from .catalog import Catalog, FileEntry, Repo
from .errors import BadRequest, ChunkDamaged, TransferFailed
from .fetch import Fetcher
from .httperrors import answer_for, hub_error_response
from .metrics import Metrics
from .signatures import Signatures
from .transfer import Origin, Transfer

log = logging.getLogger(__name__)

FIRST_BYTES_WAIT = 5.0  # hold the headers back this long so early failures become a 5xx
_API_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
_API_VERBS = ("revision", "tree", "paths-info")


@dataclasses.dataclass(frozen=True)
class _Route:
    kind: str  # resolve, info, revision, tree, paths-info
    repo: Repo
    revision: str | None
    path: str


def _split_repo(segs: list[str], verbs: tuple[str, ...]) -> tuple[str, list[str]]:
    """Repo ids have one segment (gpt2) or two (org/name)."""
    if len(segs) >= 2 and segs[1] in verbs:
        return hubnames.repo_id(segs[:1]), segs[1:]
    return hubnames.repo_id(segs[:2]), segs[2:]


def _revision(raw: str) -> str:
    return hubnames.revision(unquote(raw))


def parse_route(raw_path: str) -> _Route | None:
    segs = raw_path.lstrip("/").split("/")
    if segs[0] == "api" and len(segs) >= 3 and segs[1] in _API_KINDS:
        repo_type = _API_KINDS[segs[1]]
        repo_id, rest = _split_repo(segs[2:], _API_VERBS)
        repo = Repo(repo_type, repo_id)
        if not rest:
            return _Route("info", repo, None, "")
        if rest[0] in _API_VERBS and len(rest) >= 2:
            sub = "/".join(rest[2:])
            return _Route(rest[0], repo, _revision(rest[1]), unquote(sub))
        return None
    repo_type = "model"
    if segs[0] in ("datasets", "spaces") and len(segs) > 1:
        repo_type, segs = _API_KINDS[segs[0]], segs[1:]
    if len(segs) >= 4 and "resolve" in segs[1:3]:
        repo_id, rest = _split_repo(segs, ("resolve",))
        if len(rest) >= 3 and rest[0] == "resolve":
            return _Route("resolve", Repo(repo_type, repo_id), _revision(rest[1]),
                          hubnames.quoted_file_path("/".join(rest[2:])))
    return None


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The [start, end) a Range header asks for; None for the whole body."""
    if header is None:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header, re.ASCII)
    if not m or (not m.group(1) and not m.group(2)) or len(header) > 100:
        raise BadRequest(f"malformed or multi-part Range header {header!r} "
                         "(use one range: bytes=START-[END] or bytes=-SUFFIX)")
    if not m.group(1):
        start, end = max(0, size - int(m.group(2))), size
    else:
        start = int(m.group(1))
        end = min(size, int(m.group(2)) + 1) if m.group(2) else size
    if start >= size or end <= start:
        raise _Unsatisfiable(size)
    return start, end


class _Unsatisfiable(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


class Proxy:
    def __init__(self, catalog: Catalog, fetcher: Fetcher, metrics: Metrics,
                 signatures: Signatures) -> None:
        self.catalog = catalog
        self.fetcher = fetcher
        self.metrics = metrics
        self.signatures = signatures

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        route_kind = "unknown"
        try:
            route = parse_route(request.raw_path.split("?", 1)[0])
            if route is None:
                return hub_error_response(404, f"no such endpoint: {request.method} "
                                          f"{request.path} (modelpeer serves the Hub API)")
            route_kind = route.kind
            return await self._dispatch(request, route)
        finally:
            self.metrics.observe_request(route_kind, time.monotonic() - started)

    async def _dispatch(self, request: web.Request, route: _Route) -> web.StreamResponse:
        token = request.headers.get("Authorization") or None
        if route.kind == "resolve":
            if request.method not in ("GET", "HEAD"):
                return hub_error_response(405, "resolve takes GET or HEAD")
            assert route.revision is not None
            entry = await self.catalog.resolve_file(route.repo, route.revision, route.path,
                                                    token)
            if request.method == "GET":
                # HEAD answers metadata only: huggingface_hub shows a refused GET's message, but
                # turns a refused HEAD into a vague "cannot find the file in the local cache"
                await self.signatures.check(entry, token)
            return await self._serve_file(request, entry, token)
        if (route.kind == "paths-info") != (request.method == "POST") or request.method not in (
                "GET", "HEAD", "POST"):
            return hub_error_response(405, f"{route.kind} does not take {request.method}")
        body = await request.read() if request.method == "POST" else b""
        answer = await self.catalog.api(
            route.repo, request.method, request.raw_path, revision=route.revision, token=token,
            body=body, content_type=request.headers.get("Content-Type", ""), kind=route.kind,
            sub_path=route.path)
        headers = {"Content-Type": answer.content_type}
        if answer.next_link:
            headers["Link"] = f'<{request.url.origin()}{answer.next_link}>; rel="next"'
        return web.Response(status=answer.status, body=answer.body, headers=headers)

    async def _serve_file(self, request: web.Request, entry: FileEntry,
                          token: str | None) -> web.StreamResponse:
        blob = entry.blob
        headers = {
            "X-Repo-Commit": entry.commit,
            "ETag": f'"{blob.digest}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{blob.digest}"'
            headers["X-Linked-Size"] = str(blob.size)
        try:
            span = parse_range(request.headers.get("Range"), blob.size)
        except _Unsatisfiable as e:
            return hub_error_response(416, f"range not satisfiable for a {e.size}-byte file",
                                      headers={"Content-Range": f"bytes */{e.size}"})
        if span and span[0] > 0 and self.fetcher.transfers.failed_digest_lately(blob.digest):
            log.warning("%s/%s: a Range is answered with the whole file: a transfer of it "
                        "failed its digest lately, so a client resuming it holds wrong bytes",
                        entry.repo, entry.path)
            span = None
        start, end = span or (0, blob.size)
        resp = web.StreamResponse(status=206 if span else 200, headers=headers)
        resp.content_length = end - start
        if span:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        with contextlib.suppress(ChunkDamaged):  # dropped: open() fetches it again
            await self.fetcher.store.check_span(blob.digest, start, min(end, start + 1))
        transfer = self.fetcher.open(blob, Origin(entry.resolve_path, token,
                                                  f"{entry.repo}/{entry.path}"))
        with self.fetcher.transfers.reading(transfer):
            self.metrics.file_request(hit=transfer.verified)
            failure = await self._first_bytes(transfer, start, end)
            if failure is not None:
                return failure
            await resp.prepare(request)
            await self._stream(request, resp, transfer, start, end)
        return resp

    async def _first_bytes(self, transfer: Transfer, start: int,
                           end: int) -> web.Response | None:
        if start >= end:
            return None
        try:
            await asyncio.wait_for(asyncio.shield(transfer.readable(start, end)),
                                   FIRST_BYTES_WAIT)
        except TimeoutError:
            return None
        except TransferFailed as e:
            return answer_for(e, transfer.label)
        return None

    async def _stream(self, request: web.Request, resp: web.StreamResponse, transfer: Transfer,
                      start: int, end: int) -> None:
        sent = start
        try:
            sending = self.fetcher.transfers.send(request.transport, transfer, start, end)
            async for pos, n in sending:
                self.metrics.served(transfer.source_at(pos), n)
                sent = pos + n
            await resp.write_eof()
        except (TransferFailed, ChunkDamaged) as e:
            log.error("aborting the response for %s at byte %d: %s", transfer.label, sent, e)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError(str(e)) from e

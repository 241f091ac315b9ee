"""Control routes for keeping a cache over months: pins, and bundles in and out
(`modelpeer pin/unpin/export/import/import-hf-cache`). Beside control.py's routes, same prefix."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from typing import Any

from aiohttp import web

from . import hubnames
from .bundle import CONTENT_TYPE, BundleError, Reader
from .catalog import Catalog, HubError, Repo
from .control import PREFIX
from .fetch import Fetcher, is_disk_full
from .ingest import READ_BLOCK, Ingest
from .pins import NotCached, Pins
from .store import Store

log = logging.getLogger(__name__)


def _repo(repo_type: object, repo_id: object) -> Repo:
    try:
        return Repo(hubnames.repo_type(str(repo_type or "model")),
                    hubnames.repo_id(str(repo_id or "").split("/")))
    except hubnames.InvalidName as e:
        raise HubError(400, "", str(e)) from e


def _revision(value: object) -> str:
    try:
        return hubnames.revision(str(value))
    except hubnames.InvalidName as e:
        raise HubError(400, "", str(e)) from e


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


class CacheApi:
    def __init__(self, store: Store, catalog: Catalog, fetcher: Fetcher, pins: Pins) -> None:
        self.pins = pins
        self.ingest = Ingest(store, catalog, fetcher)

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get(f"{PREFIX}/pins", self.list_pins)
        r.add_post(f"{PREFIX}/pins", self.pin)
        r.add_delete(f"{PREFIX}/pins/{{repo_type}}/{{repo_id:.+}}", self.unpin)
        r.add_get(f"{PREFIX}/bundles/{{repo_type}}/{{repo_id:.+}}", self.export)
        r.add_post(f"{PREFIX}/bundles", self.import_bundle)

    async def list_pins(self, request: web.Request) -> web.Response:
        return web.json_response(self.pins.list())

    async def pin(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            repo = _repo(body.get("repo_type"), body.get("repo"))
            return web.json_response(self.pins.pin(repo, _revision(body.get("revision")
                                                                   or "main")))
        except ValueError as e:
            return _error(400, f"bad pin request: {e}")
        except HubError as e:
            return _error(e.status, e.message)
        except NotCached as e:
            return _error(404, str(e))

    async def unpin(self, request: web.Request) -> web.Response:
        try:
            repo = _repo(request.match_info["repo_type"], request.match_info["repo_id"])
            revision = request.query.get("revision")
            removed = self.pins.unpin(repo, _revision(revision) if revision else None)
        except HubError as e:
            return _error(e.status, e.message)
        if not removed:
            return _error(404, f"{repo}{'@' + revision if revision else ''} is not pinned")
        return web.json_response({"repo": str(repo), "unpinned": removed})

    async def export(self, request: web.Request) -> web.StreamResponse:
        try:
            repo = _repo(request.match_info["repo_type"], request.match_info["repo_id"])
            token = request.headers.get("Authorization") or None
            manifest = await self.ingest.export_manifest(
                repo, _revision(request.query.get("revision") or "main"), token)
        except HubError as e:
            return _error(e.status, e.message)
        resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
        resp.content_length = manifest.archive_size()
        await resp.prepare(request)
        sent = 0
        try:
            async for data in self.ingest.export_stream(manifest):
                await resp.write(data)
                sent += len(data)
        except OSError as e:
            log.error("export of %s stopped at byte %d: %s", repo, sent, e)
            if request.transport is not None:
                request.transport.abort()  # the client sees a short archive, never a wrong one
            raise
        await resp.write_eof()
        log.info("exported %s@%s: %d files, %d bytes", repo, manifest.commit[:12],
                 len(manifest.files), sent)
        return resp

    async def import_bundle(self, request: web.Request) -> web.Response:
        lenient = request.query.get("lenient", "") in ("1", "true", "yes")
        reader = Reader(lambda n: _read_up_to(request.content, n))
        try:
            return web.json_response(await self.ingest.import_bundle(
                reader, request.headers.get("Authorization") or None, lenient=lenient))
        except BundleError as e:
            refusal = _error(400, f"the archive is refused, nothing of it is kept: {e}",
                             offset=e.offset)
        except HubError as e:
            refusal = _error(e.status, f"the import is refused, nothing of it is kept: "
                                       f"{e.message}")
        except (OSError, sqlite3.Error) as e:
            if not is_disk_full(e):
                raise
            refusal = _error(507, "the cache disk is full; nothing of the archive is kept: "
                                  "free space, lower max_cache_size or unpin, then retry")
        # the client sends the whole archive before it reads an answer
        while await request.content.read(READ_BLOCK):
            pass
        return refusal


async def _read_up_to(stream: web.StreamReader, n: int) -> bytes:
    try:
        return await stream.readexactly(n)
    except asyncio.IncompleteReadError as e:
        return e.partial

"""Control routes for keeping a cache over months: pins, bundles in and out, HF caches imported
(streamed, or cloned by reflink) and deduplicated against the store (`modelpeer pin/unpin/
export/import/import-hf-cache/dedupe`). Beside control.py's routes, under the same prefix."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from typing import Any

import aiohttp
from aiohttp import web

from . import hfcache, hubnames
from .bundle import CONTENT_TYPE, MAX_MANIFEST, Reader, manifest_from_json
from .catalog import Catalog, Repo
from .errors import BundleError, HubError, InvalidName, NoReflink, is_disk_full
from .fetch import Fetcher
from .guard import PREFIX
from .httperrors import DISK_FULL
from .ingest import READ_BLOCK, Ingest
from .pins import Pins
from .store import BlobId, Store

log = logging.getLogger(__name__)


def _repo(repo_type: object, repo_id: object) -> Repo:
    try:
        return Repo(hubnames.repo_type(str(repo_type or "model")),
                    hubnames.repo_id(str(repo_id or "").split("/")))
    except InvalidName as e:
        raise HubError(400, "", str(e)) from e


def _revision(value: object) -> str:
    try:
        return hubnames.revision(str(value))
    except InvalidName as e:
        raise HubError(400, "", str(e)) from e


def _error(status: int, message: str, **extra: object) -> web.Response:
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
        r.add_post(f"{PREFIX}/hf-cache/reflink", self.import_reflinked)
        r.add_post(f"{PREFIX}/hf-cache/dedupe", self.dedupe)

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

    async def unpin(self, request: web.Request) -> web.Response:
        repo = _repo(request.match_info["repo_type"], request.match_info["repo_id"])
        revision = request.query.get("revision")
        removed = self.pins.unpin(repo, _revision(revision) if revision else None)
        if not removed:
            return _error(404, f"{repo}{'@' + revision if revision else ''} is not pinned")
        return web.json_response({"repo": str(repo), "unpinned": removed})

    async def export(self, request: web.Request) -> web.StreamResponse:
        repo = _repo(request.match_info["repo_type"], request.match_info["repo_id"])
        token = request.headers.get("Authorization") or None
        manifest = await self.ingest.export_manifest(
            repo, _revision(request.query.get("revision") or "main"), token)
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
            return resp
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
            refusal = _error(507, f"nothing of the archive is kept: {DISK_FULL}")
        # the client sends the whole archive before it reads an answer
        while await request.content.read(READ_BLOCK):
            pass
        return refusal


    async def import_reflinked(self, request: web.Request) -> web.Response:
        """An HF-cache snapshot by paths the daemon clones; {"reflink": false, "reason"} when
        it cannot (then nothing changed and the CLI streams the bytes instead)."""
        try:
            body = await _json_body(request)
            manifest = manifest_from_json(body.get("manifest"))
            sources = body.get("sources")
            if not isinstance(sources, dict) or not all(
                    isinstance(sources.get(f.digest), str) for f in manifest.blobs()):
                raise ValueError("'sources' maps every blob digest to a file path")
            return web.json_response({"reflink": True, **await self.ingest.import_reflinked(
                manifest, sources, request.headers.get("Authorization") or None)})
        except ValueError as e:
            return _error(400, f"bad reflink import: {e}")
        except HubError as e:
            return _error(e.status, f"the import is refused: {e.message}")
        except OSError as e:
            if is_disk_full(e):
                return _error(507, DISK_FULL)
            reason = e.strerror if isinstance(e, NoReflink) else f"no reflink: {e}"
            log.info("import by reflink not possible, the client copies instead: %s", reason)
            return web.json_response({"reflink": False, "reason": reason})

    async def dedupe(self, request: web.Request) -> web.Response:
        try:
            body = await _json_body(request)
            files = [(_text(f, "path"), BlobId(_text(f, "digest"), _algo(f), _count(f, "size")))
                     for f in body.get("files", [])]
        except (ValueError, TypeError, AttributeError) as e:
            return _error(400, f"bad dedupe request: 'files' is a list of {{path, digest, "
                               f"size}}: {e}")
        return web.json_response(await hfcache.dedupe(self.ingest.store, files))


def _text(d: dict[str, object], key: str) -> str:
    value = d[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} is not a string")
    return value


def _count(d: dict[str, object], key: str) -> int:
    value = d[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key!r} is not a size")
    return value


def _algo(d: dict[str, object]) -> str:
    return "sha256" if len(_text(d, "digest")) == 64 else "gitsha1"


async def _json_body(request: web.Request) -> dict[str, Any]:  # Any: JSON, checked as read
    """A JSON object of up to MAX_MANIFEST bytes (beyond the app's 1 MiB for other routes)."""
    data = bytearray()
    while piece := await request.content.read(READ_BLOCK):
        data += piece
        if len(data) > MAX_MANIFEST:
            raise ValueError(f"the body is larger than {MAX_MANIFEST} bytes")
    body = json.loads(data)
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    return body


async def _read_up_to(stream: aiohttp.StreamReader, n: int) -> bytes:
    try:
        return await stream.readexactly(n)
    except asyncio.IncompleteReadError as e:
        return e.partial

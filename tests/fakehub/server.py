"""A test double of the Hugging Face Hub: a real aiohttp server answering like the Hub does,
and a separate CDN origin that LFS downloads are redirected to with signed URLs.

    python -m tests.fakehub --port 0 --cdn-port 0 --data-dir DIR

prints `FAKEHUB READY {"hub": URL, "cdn": URL}` once both listen. Faults and counters are
driven through /_fake/... on the hub listener (never affected by faults).

Accounts are tokens, as on the Hub: GOOD_TOKEN has access to the gated and private repos,
OTHER_TOKEN is a valid account without it, and any other token is invalid (401 everywhere).
A gated repo's metadata is public; its files need access.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, unquote

from aiohttp import web

from tests.fakehub.repos import (
    GOOD_TOKEN,
    OTHER_TOKEN,
    BigFile,
    FileSpec,
    Repo,
    added_repo,
    catalogue,
)

log = logging.getLogger("fakehub")
SECRET = b"fakehub-cdn-signing"
KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
PIECE = 256 * 1024
SENDFILE_PIECE = 1024 * 1024
ACCOUNTS = {GOOD_TOKEN, OTHER_TOKEN}


@dataclasses.dataclass
class Faults:
    hub_status: int = 0
    hub_down: bool = False
    cdn_status: int = 0
    cdn_drop_after: int = 0
    cdn_drop_count: int = -1
    cdn_rate: int = 0
    cdn_first_byte_delay: float = 0.0
    cdn_corrupt: bool = False
    cdn_corrupt_at: int = -1  # flip the byte at this blob offset in every answer holding it
    cdn_short: bool = False
    cdn_ignore_range: bool = False  # answer a Range request with 200 and the whole body
    # the first answer to get to this blob offset sends nothing more and holds its connection
    # open for a minute (one that TCP left waiting); later answers go past it
    cdn_stall_at: int = -1

    @property
    def cdn_streaming(self) -> bool:
        return bool(self.cdn_drop_after or self.cdn_rate or self.cdn_corrupt or self.cdn_short
                    or self.cdn_first_byte_delay or self.cdn_corrupt_at >= 0
                    or self.cdn_ignore_range or self.cdn_stall_at >= 0)


class HubError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class FakeHub:
    def __init__(self, data_dir: Path, page_size: int, big_size: int) -> None:
        self.data_dir = data_dir
        self.page_size = page_size
        self.repos = catalogue(big_size)
        self.blobs: dict[str, Path] = {}
        self.faults = Faults()
        self.stats: dict[str, Any] = {}
        self.hub_url = self.cdn_url = ""
        self.cdn_sending = 0  # CDN bodies being sent now
        self.held = asyncio.Event()  # set: connections stalled on purpose end (reset)
        self.reset()

    def reset(self) -> None:
        """No fault, no count; a connection a fault stalled ends now (the next test must not
        find it open)."""
        self.held.set()
        self.held = asyncio.Event()
        self.faults = Faults()
        # cdn_sending_max: the most CDN bodies being sent at once (connections reading)
        self.stats = {"cdn_bytes": 0, "cdn_requests": 0, "cdn_requests_with_auth": 0,
                      "cdn_range_requests": 0, "cdn_sending_max": 0, "hub_requests": 0,
                      "xet_requests": 0, "requests": []}

    def prepare(self) -> None:
        """Write every LFS blob into the data dir so the CDN can serve it from disk."""
        (self.data_dir / "blobs").mkdir(parents=True, exist_ok=True)
        for repo in self.repos.values():
            self.add_blobs(repo)

    def add_blobs(self, repo: Repo) -> None:
        for files in repo.commits.values():
            for f in files.values():
                if not f.lfs:
                    continue
                if isinstance(f, BigFile):
                    seed = hashlib.sha256(f.seed.encode()).hexdigest()[:12]
                    path = self.data_dir / "blobs" / f"big-{seed}-{f.size}"
                    f.write_to(path)
                    self.blobs[f.sha256] = path
                elif f.sha256 not in self.blobs:
                    path = self.data_dir / "blobs" / f.sha256
                    if not path.exists():
                        path.write_bytes(f.content)
                    self.blobs[f.sha256] = path

    @property
    def xet_cas(self) -> str:
        """Where Xet storage would be: on the hub listener, refusing everything (403)."""
        return f"{self.hub_url}/xet-cas"

    # --- the hub listener -----------------------------------------------------------------
    def hub_app(self) -> web.Application:
        app = web.Application(client_max_size=10 * 1024**2)
        app.router.add_get("/_fake/stats", self.get_stats)
        app.router.add_post("/_fake/faults", self.set_faults)
        app.router.add_post("/_fake/reset", self.do_reset)
        app.router.add_post("/_fake/repos", self.add_repo)
        app.router.add_route("*", "/{tail:.*}", self.hub)
        return app

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    async def set_faults(self, request: web.Request) -> web.Response:
        for k, v in (await request.json()).items():
            if not hasattr(self.faults, k):
                return web.json_response({"error": f"unknown fault {k}"}, status=400)
            setattr(self.faults, k, v)
        return web.json_response(dataclasses.asdict(self.faults))

    async def do_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({})

    async def add_repo(self, request: web.Request) -> web.Response:
        body = await request.json()
        repo = added_repo(body["repo_id"], body["files"], body.get("repo_type", "model"),
                          int(body.get("seed", 0)))
        await asyncio.to_thread(self.add_blobs, repo)
        self.repos[(repo.repo_type, repo.repo_id)] = repo
        log.info("added %s %s", repo.repo_type, repo.repo_id)
        return web.json_response({"commit": repo.revisions["main"]})

    async def hub(self, request: web.Request) -> web.StreamResponse:
        self.stats["hub_requests"] += 1
        self.stats["requests"] = [*self.stats["requests"][-199:],
                                  f"{request.method} {request.raw_path}"]
        if self.faults.hub_down:
            abort(request)
        if self.faults.hub_status:
            return web.json_response({"error": "injected"}, status=self.faults.hub_status)
        try:
            return await self.route(request)
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            return web.json_response({"error": e.message}, status=e.status, headers=headers)

    async def route(self, request: web.Request) -> web.StreamResponse:
        path, _, _ = request.raw_path.partition("?")
        segs = path.lstrip("/").split("/")
        if segs[0] == "xet-cas":  # a client that went to Xet storage: refuse, it fails fast
            self.stats["xet_requests"] += 1
            raise HubError(403, "", "this fake hub has no Xet storage")
        if token_of(request) not in (None, *ACCOUNTS):
            raise HubError(401, "", "Invalid credentials in Authorization header")
        if segs[:2] == ["api", "agent-harnesses"]:
            raise HubError(404, "", "not here")
        if segs[0] == "api" and len(segs) >= 3 and segs[1] == "resolve-cache":
            return await self.resolve_cache(request, segs[2:])
        if segs[0] == "api" and len(segs) >= 3 and segs[1] in KINDS:
            return await self.api(request, KINDS[segs[1]], segs[2:])
        repo_type = "model"
        if segs[0] in ("datasets", "spaces"):
            repo_type, segs = KINDS[segs[0]], segs[1:]
        for n in (1, 2):
            if len(segs) > n + 2 and segs[n] == "resolve":
                repo = self.repo(request, repo_type, "/".join(segs[:n]), files=True)
                return await self.resolve(request, repo, unquote(segs[n + 1]),
                                          unquote("/".join(segs[n + 2:])))
        raise HubError(404, "", f"no route {path}")

    def repo(self, request: web.Request, repo_type: str, repo_id: str, *,
             files: bool) -> Repo:
        """The repo, if this request's account may see it (its files, with `files`)."""
        repo = self.repos.get((repo_type, repo_id))
        token = token_of(request)
        access = token == GOOD_TOKEN
        if repo is None or (repo.private and not access):
            raise HubError(404 if token else 401, "RepoNotFound", "Repository Not Found for url: "
                           f"{request.path}. Please make sure you specified the correct repo id.")
        if repo.gated and files and not access:
            raise HubError(403 if token else 401, "GatedRepo",
                           f"Access to {repo_type} {repo_id} is restricted. You must have access "
                           "to it and be authenticated to access it.")
        return repo

    def commit(self, repo: Repo, revision: str) -> str:
        commit = repo.commit_of(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def file(self, repo: Repo, commit: str, path: str) -> FileSpec:
        f = repo.commits[commit].get(path)
        if f is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on this revision",
                           {"X-Repo-Commit": commit})
        return f

    async def resolve(self, request: web.Request, repo: Repo, revision: str,
                      path: str) -> web.StreamResponse:
        commit = self.commit(repo, revision)
        f = self.file(repo, commit, path)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.real_size),
                            "Location": self.signed_url(f.sha256)})
            if repo.xet:
                api = f"/api/{repo.repo_type}s/{repo.repo_id}/xet-read-token/{commit}"
                xet_hash = hashlib.sha256(b"xet" + f.sha256.encode()).hexdigest()
                headers.update({
                    "X-Xet-Hash": xet_hash, "X-Xet-Refresh-Route": api,
                    "Link": f'<{self.hub_url}{api}>; rel="xet-auth", '
                            f'<{self.xet_cas}/reconstructions/{xet_hash}>; '
                            'rel="xet-reconstruction-info"'})
            return self.redirect(request, 302, headers, f.pointer)
        if revision != commit:
            headers["Location"] = (f"/api/resolve-cache/{repo.repo_type}s/{repo.repo_id}/"
                                   f"{commit}/{quote(path)}?etag=%22{f.git_sha1}%22")
            return self.redirect(request, 307, headers, b"")
        return self.body(request, f.content, headers)

    @staticmethod
    def redirect(request: web.Request, status: int, headers: dict[str, str],
                 body: bytes) -> web.Response:
        """A redirect whose Content-Length is that of the pointer (LFS) or empty (plain)."""
        headers["Content-Length"] = str(len(body))
        return web.Response(status=status, headers=headers,
                            body=body if request.method != "HEAD" else None)

    async def resolve_cache(self, request: web.Request, segs: list[str]) -> web.StreamResponse:
        if len(segs) < 4 or segs[0] not in KINDS:
            raise HubError(404, "", "bad resolve-cache path")
        n = 2 if len(segs) >= 5 and (KINDS[segs[0]], "/".join(segs[1:3])) in self.repos else 1
        repo = self.repo(request, KINDS[segs[0]], "/".join(segs[1:1 + n]), files=True)
        commit = self.commit(repo, segs[1 + n])
        f = self.file(repo, commit, unquote("/".join(segs[2 + n:])))
        return self.body(request, f.content, {"X-Repo-Commit": commit, "ETag": f'"{f.etag}"',
                                              "Accept-Ranges": "bytes"})

    @staticmethod
    def body(request: web.Request, data: bytes, headers: dict[str, str]) -> web.Response:
        try:
            span = parse_range(request.headers.get("Range"), len(data))
        except ValueError:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        if span is None:
            return web.Response(body=data if request.method != "HEAD" else None,
                                headers={**headers, "Content-Length": str(len(data))})
        a, b = span
        headers["Content-Range"] = f"bytes {a}-{b - 1}/{len(data)}"
        headers["Content-Length"] = str(b - a)
        return web.Response(status=206, body=data[a:b] if request.method != "HEAD" else None,
                            headers=headers)

    # --- the API --------------------------------------------------------------------------
    async def api(self, request: web.Request, repo_type: str,
                  segs: list[str]) -> web.StreamResponse:
        verbs = ("revision", "tree", "paths-info", "xet-read-token")
        n = 1 if len(segs) >= 2 and segs[1] in verbs else 2
        repo_id, rest = "/".join(segs[:n]), segs[n:]
        if rest and rest[0] == "xet-read-token":
            self.stats["xet_requests"] += 1
            exp = int(time.time()) + 3600
            return web.json_response(  # the client reads the headers, not the body
                {"accessToken": "x", "exp": exp, "casUrl": self.xet_cas},
                headers={"X-Xet-Cas-Url": self.xet_cas, "X-Xet-Access-Token": "x",
                         "X-Xet-Token-Expiration": str(exp)})
        repo = self.repo(request, repo_type, repo_id, files=False)
        if not rest:
            return self.info(request, repo, "main")
        if rest[0] == "revision" and len(rest) >= 2:
            return self.info(request, repo, unquote(rest[1]))
        if rest[0] == "tree" and len(rest) >= 2:
            return self.tree(request, repo, unquote(rest[1]), unquote("/".join(rest[2:])))
        if rest[0] == "paths-info" and len(rest) >= 2:
            return await self.paths_info(request, repo, unquote(rest[1]))
        raise HubError(404, "", "no such API route")

    def info(self, request: web.Request, repo: Repo, revision: str) -> web.Response:
        commit = self.commit(repo, revision)
        blobs = request.query.get("blobs") in ("true", "1")
        siblings = []
        for f in repo.commits[commit].values():
            s: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                s.update({"size": f.real_size, "blobId": f.oid})
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": f.real_size,
                                "pointerSize": len(f.pointer)}
            siblings.append(s)
        return web.json_response({
            "id": repo.repo_id, "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "sha": commit, "private": repo.private, "gated": "auto" if repo.gated else False,
            "disabled": False, "lastModified": "2026-01-01T00:00:00.000Z", "tags": [],
            "downloads": 0, "likes": 0, "siblings": siblings})

    def entry(self, repo: Repo, f: FileSpec) -> dict[str, Any]:
        e: dict[str, Any] = {"type": "file", "oid": f.oid, "size": f.real_size, "path": f.path}
        if f.lfs:
            e["lfs"] = {"oid": f.sha256, "size": f.real_size, "pointerSize": len(f.pointer)}
            if repo.xet:
                e["xetHash"] = hashlib.sha256(b"xet" + f.sha256.encode()).hexdigest()
        return e

    def entries(self, repo: Repo, commit: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for f in sorted(repo.commits[commit].values(), key=lambda f: f.path):
            parts = f.path.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                out.setdefault(d, {"type": "directory", "size": 0, "path": d,
                                   "oid": hashlib.sha1(d.encode()).hexdigest()})
            out[f.path] = self.entry(repo, f)
        return out

    def tree(self, request: web.Request, repo: Repo, revision: str, sub: str) -> web.Response:
        commit = self.commit(repo, revision)
        everything = self.entries(repo, commit)
        if sub and sub not in everything:
            raise HubError(404, "EntryNotFound", f"{sub} does not exist", {"X-Repo-Commit": commit})
        recursive = request.query.get("recursive") in ("true", "1", "True")
        prefix = f"{sub}/" if sub else ""
        listed = [e for p, e in everything.items() if p.startswith(prefix)
                  and (recursive or "/" not in p[len(prefix):])]
        start = int(base64.urlsafe_b64decode(request.query["cursor"]) if "cursor" in request.query
                    else 0)
        page = listed[start:start + self.page_size]
        headers = {}
        if start + self.page_size < len(listed):
            cursor = base64.urlsafe_b64encode(str(start + self.page_size).encode()).decode()
            query = {**request.query, "cursor": cursor}
            qs = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in query.items())
            path = request.raw_path.partition("?")[0]
            headers["Link"] = f'<{self.hub_url}{path}?{qs}>; rel="next"'
        return web.json_response(page, headers=headers)

    async def paths_info(self, request: web.Request, repo: Repo,
                         revision: str) -> web.Response:
        commit = self.commit(repo, revision)
        if request.content_type == "application/json":
            paths = (await request.json()).get("paths", [])
        else:
            paths = (await request.post()).getall("paths", [])
        everything = self.entries(repo, commit)
        return web.json_response([everything[p] for p in paths if p in everything])

    # --- the CDN ----------------------------------------------------------------------------
    def signed_url(self, sha256: str) -> str:
        expires = int(time.time()) + 3600
        sig = hmac.new(SECRET, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()
        return f"{self.cdn_url}/repos/{sha256}?Expires={expires}&Signature={sig}"

    def cdn_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/repos/{sha256}", self.cdn)
        return app

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        self.stats["cdn_requests"] += 1
        if "Authorization" in request.headers:
            self.stats["cdn_requests_with_auth"] += 1
        if "Range" in request.headers:
            self.stats["cdn_range_requests"] += 1
        sha = request.match_info["sha256"]
        expires, sig = request.query.get("Expires", "0"), request.query.get("Signature", "")
        want = hmac.new(SECRET, f"{sha}:{expires}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, sig) or int(expires) < time.time():
            return web.Response(status=403, text="AccessDenied: bad or expired signature")
        if self.faults.cdn_status:
            return web.Response(status=self.faults.cdn_status, text="injected CDN error")
        path = self.blobs.get(sha)
        if path is None:
            return web.Response(status=404, text="NoSuchKey")
        size = path.stat().st_size
        try:
            span = parse_range(None if self.faults.cdn_ignore_range
                               else request.headers.get("Range"), size)
        except ValueError:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        a, b = span or (0, size)
        if request.method == "HEAD":
            headers = {"Content-Length": str(b - a), "Accept-Ranges": "bytes"}
            if span is not None:
                headers["Content-Range"] = f"bytes {a}-{b - 1}/{size}"
            return web.Response(status=206 if span else 200, headers=headers)
        resp = web.StreamResponse(status=206 if span else 200,
                                  headers={"Accept-Ranges": "bytes"})
        resp.content_length = b - a
        if span is not None:
            resp.headers["Content-Range"] = f"bytes {a}-{b - 1}/{size}"
        send = self.cdn_stream if self.faults.cdn_streaming else self.cdn_sendfile
        self.cdn_sending += 1
        self.stats["cdn_sending_max"] = max(self.stats["cdn_sending_max"], self.cdn_sending)
        try:
            await resp.prepare(request)
            await send(request, resp, path, a, b)
            await resp.write_eof()
            return resp
        except ConnectionError:  # the client went away
            abort(request)
        finally:
            self.cdn_sending -= 1

    async def cdn_sendfile(self, request: web.Request, resp: web.StreamResponse, path: Path,
                           a: int, b: int) -> None:
        """Bytes [a, b) with no fault: sendfile, SENDFILE_PIECE at a time, each counted once
        the socket took it. A connection the client cuts counts what went out, not its whole
        range (a probe stopped after 11 MB of 16 MiB, a segment asked again on a new
        connection, an overtaken fetcher's segments)."""
        loop = asyncio.get_running_loop()
        with open(path, "rb") as fh:
            for pos in range(a, b, SENDFILE_PIECE):
                if request.transport is None:
                    raise ConnectionResetError("the client went away")
                n = min(SENDFILE_PIECE, b - pos)
                await loop.sendfile(request.transport, fh, pos, n)
                self.stats["cdn_bytes"] += n

    async def cdn_stream(self, request: web.Request, resp: web.StreamResponse, path: Path,
                         a: int, b: int) -> None:
        """Bytes [a, b) through Python, for the faults to act on them."""
        f = self.faults
        if f.cdn_first_byte_delay:
            await asyncio.sleep(f.cdn_first_byte_delay)
        drop = f.cdn_drop_after if f.cdn_drop_after and f.cdn_drop_count != 0 else 0
        if drop and f.cdn_drop_count > 0:
            f.cdn_drop_count -= 1
        end = b - 1 if f.cdn_short else b
        flips = [(a + b) // 2] if f.cdn_corrupt else []
        if f.cdn_corrupt_at >= 0:
            flips.append(f.cdn_corrupt_at)
        sent = 0
        started = time.monotonic()
        with open(path, "rb") as fh:
            fh.seek(a)
            pos = a
            while pos < end:
                n = min(PIECE, end - pos, (drop - sent) if drop else PIECE)
                if pos <= f.cdn_stall_at < pos + n:
                    if pos == f.cdn_stall_at:
                        f.cdn_stall_at = -1
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.held.wait(), 60)
                        abort(request)
                    n = f.cdn_stall_at - pos
                data = bytearray(fh.read(n))
                for at in flips:
                    if pos <= at < pos + n:
                        data[at - pos] ^= 0xFF
                await resp.write(bytes(data))
                pos += n
                sent += n
                self.stats["cdn_bytes"] += n
                if drop and sent >= drop:
                    break
                if f.cdn_rate:
                    ahead = sent / f.cdn_rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        if pos < b:
            abort(request)


def token_of(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization")
    return None if auth is None else auth.removeprefix("Bearer ")


def abort(request: web.Request) -> NoReturn:
    """Close the connection with no (further) response, quietly for aiohttp's logger."""
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError("fault injected: connection dropped")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    if not header:
        return None
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise ValueError(header)
    if not m.group(1):
        a, b = max(0, size - int(m.group(2))), size
    else:
        a, b = int(m.group(1)), min(size, int(m.group(2)) + 1) if m.group(2) else size
    if a >= b:
        raise ValueError(header)
    return a, b


async def serve(args: argparse.Namespace) -> None:
    hub = FakeHub(Path(args.data_dir), args.page_size, args.big_size)
    await asyncio.to_thread(hub.prepare)
    runners = []
    urls = []
    for app, host, port in ((hub.hub_app(), args.host, args.port),
                            (hub.cdn_app(), args.cdn_host, args.cdn_port)):
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        urls.append(f"http://{host}:{sock.getsockname()[1]}")
        runners.append(runner)
    hub.hub_url, hub.cdn_url = urls
    print("FAKEHUB READY " + json.dumps({"hub": urls[0], "cdn": urls[1]}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for r in runners:
        await r.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(prog="fakehub")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cdn-host", default="127.0.0.1")
    p.add_argument("--cdn-port", type=int, default=0)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--page-size", type=int, default=50)
    p.add_argument("--big-size", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args))

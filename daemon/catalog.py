"""What the Hub said about repos: revisions, file entries, API answers, and who may see them.

Commits are immutable and kept forever; branch and tag answers are trusted for `ref_ttl` and
then asked again, and the last known answer is served while the upstream is unreachable. API
answers nobody used for API_CACHE_AGE are dropped, and the oldest beyond API_CACHE_ROWS.

A repo's cached data goes to a tokenless request only once the upstream served a file of that
repo without a token; otherwise to a request whose token the upstream served a file of that repo
lately (a grant, kept in memory as a hash, never on disk). API answers grant nothing: the Hub
shows a gated repo's metadata to every account, its files only to those with access.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

from . import offline_api
from .errors import HubError, UpstreamUnavailable
from .hubnames import COMMIT_RE, REPO_TYPES
from .store import BlobId
from .upstream import Answer, Upstream

log = logging.getLogger(__name__)

GRANT_TTL = 300.0  # how long an upstream "yes" to a token is trusted while the upstream is up
OFFLINE_GRACE = 24 * 3600.0  # ... and while it is down
MAX_GRANTS = 10_000  # (repo, token) grants held; beyond that the oldest go
API_CACHE_ROWS = 10_000  # cached API answers kept at most (one per distinct request)
API_CACHE_AGE = 30 * 24 * 3600.0  # an API answer nobody used this long is dropped
API_PRUNE_EVERY = 500  # the API answers cache is pruned every that many saves


@dataclasses.dataclass(frozen=True)
class Repo:
    type: str  # model, dataset, space
    id: str

    @property
    def url_prefix(self) -> str:
        return "" if self.type == "model" else REPO_TYPES[self.type] + "/"

    @property
    def api_path(self) -> str:
        return f"/api/{REPO_TYPES[self.type]}/{self.id}"

    def __str__(self) -> str:
        return f"{self.url_prefix}{self.id}"


@dataclasses.dataclass(frozen=True)
class FileEntry:
    repo: Repo
    commit: str
    path: str
    blob: BlobId
    lfs: bool

    @property
    def resolve_path(self) -> str:
        return f"/{self.repo.url_prefix}{self.repo.id}/resolve/{self.commit}/{quote(self.path)}"


@dataclasses.dataclass
class ApiAnswer:
    status: int
    body: bytes
    content_type: str
    next_link: str  # path+query of the next page, or ""
    commit: str


def _token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Catalog:
    def __init__(self, db: sqlite3.Connection, upstream: Upstream, *, ref_ttl: float,
                 offline: bool) -> None:
        self.db = db
        self.upstream = upstream
        self.ref_ttl = ref_ttl
        self.offline = offline
        self._grants: OrderedDict[tuple[Repo, str], float] = OrderedDict()  # oldest first
        self._api_saves_since_prune = API_PRUNE_EVERY  # the first save after a start prunes
        # peercatalog.py's: what peers know of a revision never seen here, recorded; whether any
        self.ask_peers: Callable[[Repo, str], Awaitable[bool]] | None = None

    # --- access -------------------------------------------------------------------------
    def is_public(self, repo: Repo) -> bool:
        row = self.db.execute("SELECT public FROM repos WHERE repo_type=? AND repo_id=?",
                              (repo.type, repo.id)).fetchone()
        return bool(row and row[0])

    def _allowed(self, repo: Repo, token: str | None, *, max_age: float) -> bool:
        if self.is_public(repo):
            return True
        if not token:
            return False
        granted = self._grants.get((repo, _token_key(token)))
        if granted is not None and time.monotonic() - granted < max_age:
            return True
        # only while the upstream cannot be asked (max_age is then OFFLINE_GRACE)
        return max_age >= OFFLINE_GRACE and self._bound(repo, token)

    def _bound(self, repo: Repo, token: str) -> bool:
        return self.db.execute(
            "SELECT 1 FROM bound_tokens WHERE repo_type=? AND repo_id=? AND token_sha256=?",
            (repo.type, repo.id, _token_key(token))).fetchone() is not None

    def imported(self, repo: Repo, *, public: bool, token: str | None) -> None:
        """A repo came from a bundle or a local HF cache, not from the upstream: public only
        when `public` (see security.md, Bundles and imported caches); a gated or private one
        goes to `token` while the upstream cannot be asked, and to upstream grants."""
        self._save_repo(repo, public=public)
        if not public and token:
            self.db.execute("INSERT OR IGNORE INTO bound_tokens VALUES (?, ?, ?)",
                            (repo.type, repo.id, _token_key(token)))

    def upstream_served_file(self, repo: Repo, token: str | None) -> None:
        """The upstream served a file of the repo to `token`: its cached files may go to that
        token now; with no token, to anyone (the repo's files are public)."""
        self._save_repo(repo, public=not token)
        if token:
            self._grant(repo, token)

    def _save_repo(self, repo: Repo, *, public: bool) -> None:
        self.db.execute(
            "INSERT INTO repos (repo_type, repo_id, public, last_access) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO UPDATE SET public=MAX(public, excluded.public),"
            " last_access=excluded.last_access", (repo.type, repo.id, int(public), time.time()))

    def _grant(self, repo: Repo, token: str) -> None:
        key = (repo, _token_key(token))
        self._grants[key] = time.monotonic()
        self._grants.move_to_end(key)
        self._prune_grants()

    def _prune_grants(self) -> None:
        """Drop grants too old to count even offline, and the oldest beyond MAX_GRANTS."""
        expired = time.monotonic() - OFFLINE_GRACE
        while self._grants:
            oldest = next(iter(self._grants.values()))
            if oldest >= expired and len(self._grants) <= MAX_GRANTS:
                return
            self._grants.popitem(last=False)

    def _touch(self, repo: Repo) -> None:
        self.db.execute("UPDATE repos SET last_access=? WHERE repo_type=? AND repo_id=?",
                        (time.time(), repo.type, repo.id))

    # --- revisions ----------------------------------------------------------------------
    def _commit_of(self, repo: Repo, revision: str, *, max_age: float) -> str | None:
        if COMMIT_RE.fullmatch(revision):
            return revision
        row = self.db.execute(
            "SELECT commit_sha, fetched_at FROM refs WHERE repo_type=? AND repo_id=? AND"
            " revision=?", (repo.type, repo.id, revision)).fetchone()
        if row and time.time() - row["fetched_at"] < max_age:
            return str(row["commit_sha"])
        return None

    def known_commit(self, repo: Repo, revision: str) -> str | None:
        """The commit the revision was last known to name, however old (None if never)."""
        return self._commit_of(repo, revision, max_age=float("inf"))

    def _save_ref(self, repo: Repo, revision: str, commit: str) -> None:
        if revision != commit and COMMIT_RE.fullmatch(commit):
            self.db.execute("INSERT OR REPLACE INTO refs VALUES (?, ?, ?, ?, ?)",
                            (repo.type, repo.id, revision, commit, time.time()))

    # --- files --------------------------------------------------------------------------
    def _cached_entry(self, repo: Repo, commit: str, path: str) -> FileEntry | None:
        row = self.db.execute(
            "SELECT digest, algo, size FROM files WHERE repo_type=? AND repo_id=? AND"
            " commit_sha=? AND path=?", (repo.type, repo.id, commit, path)).fetchone()
        return _entry_of_row(repo, commit, path, row) if row is not None else None

    def entries_at(self, repo: Repo, commit: str) -> list[FileEntry]:
        """Every file entry known at the commit, by path."""
        rows = self.db.execute(
            "SELECT path, digest, algo, size FROM files WHERE repo_type=? AND repo_id=? AND"
            " commit_sha=? ORDER BY path", (repo.type, repo.id, commit)).fetchall()
        return [_entry_of_row(repo, commit, r["path"], r) for r in rows]

    def _save_entry(self, entry: FileEntry) -> None:
        self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (entry.repo.type, entry.repo.id, entry.commit, entry.path,
                         entry.blob.digest, entry.blob.algo, entry.blob.size, entry.blob.digest))

    async def resolve_file(self, repo: Repo, revision: str, path: str,
                           token: str | None) -> FileEntry:
        """The file `path` of `repo` at `revision`: its commit, blob digest and size."""
        commit = self._commit_of(repo, revision, max_age=self.ref_ttl)
        entry = self._cached_entry(repo, commit, path) if commit else None
        if entry is not None and self._allowed(repo, token, max_age=GRANT_TTL):
            self._touch(repo)
            return entry
        if self.offline:
            return await self._stale_entry(repo, revision, path, token, "offline mode")
        resolve = f"/{repo.url_prefix}{repo.id}/resolve/{quote(revision, safe='')}/{quote(path)}"
        try:
            answer = await self.upstream.hub("HEAD", resolve, token=token,
                                             headers={"Accept-Encoding": "identity"})
        except UpstreamUnavailable as e:
            return await self._stale_entry(repo, revision, path, token, e)
        if answer.status >= 400:
            raise HubError.from_answer(answer)
        entry = _entry_from_head(repo, path, answer)
        self._save_ref(repo, revision, entry.commit)
        self._save_entry(entry)
        self.upstream_served_file(repo, token)
        return entry

    async def _stale_entry(self, repo: Repo, revision: str, path: str, token: str | None,
                           reason: object) -> FileEntry:
        commit = self.known_commit(repo, revision)
        if commit is None and await self._learned_from_peers(repo, revision):
            commit = self.known_commit(repo, revision)
        entry = self._cached_entry(repo, commit, path) if commit else None
        if entry is None:
            raise HubError.unreachable(f"{repo}@{revision}/{path}", reason)
        if not self._allowed(repo, token, max_age=OFFLINE_GRACE):
            raise HubError(502, "", f"{repo}: the upstream Hub is unreachable ({reason}), so "
                                    "access to this gated or private repo cannot be checked")
        log.info("upstream unavailable (%s); serving cached %s@%s/%s", reason, repo,
                 revision, path)
        return entry

    def remember(self, repo: Repo, revision: str, commit: str,
                 entries: list[FileEntry]) -> None:
        """What a warm job learned, so later client requests resolve without the upstream."""
        with self.db:
            self._save_ref(repo, revision, commit)
            for entry in entries:
                self._save_entry(entry)

    # --- API answers --------------------------------------------------------------------
    async def api(self, repo: Repo, method: str, path_qs: str, *, revision: str | None,
                  token: str | None, body: bytes = b"", content_type: str = "",
                  kind: str = "", sub_path: str = "") -> ApiAnswer:
        """A JSON answer of the Hub API about `repo`, Xet-free, cached by request. `kind`
        (info, revision, tree) and `sub_path` let an answer be built from the file entries
        when the upstream cannot be asked and nothing is cached."""
        key = hashlib.sha256(b"\0".join([method.encode(), path_qs.encode(), body])).hexdigest()
        immutable = revision is not None and COMMIT_RE.fullmatch(revision) is not None
        cached = self._cached_api(key)
        fresh = cached is not None and (
            immutable or time.time() - cached[1] < self.ref_ttl)
        if cached and fresh and self._may_see(repo, cached, token, max_age=GRANT_TTL):
            self._touch(repo)
            if immutable:
                self._mark_api_used(key, fetched_at=cached[1])
            return cached[0]
        if cached is None and method != "POST":
            cached = self._answer_from_entries(repo, kind, revision or "main", sub_path, path_qs)
        if self.offline:
            cached = cached or await self._answer_from_peers(repo, kind, revision or "main",
                                                             sub_path, path_qs)
            return self._stale_api(repo, cached, token, "offline mode", path_qs)
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            answer = await self.upstream.hub(method, path_qs, token=token, data=body or None,
                                             headers=headers)
        except UpstreamUnavailable as e:
            cached = cached or await self._answer_from_peers(repo, kind, revision or "main",
                                                             sub_path, path_qs)
            return self._stale_api(repo, cached, token, e, path_qs)
        if answer.status >= 400:
            raise HubError.from_answer(answer)
        result = _sanitized_api_answer(answer)
        self._save_repo(repo, public=False)
        if result.status == 200:
            self._save_api(key, repo, result, anonymous=not token)
            if revision and result.commit:
                self._save_ref(repo, revision, result.commit)
        return result

    def _may_see(self, repo: Repo, cached: tuple[ApiAnswer, float, bool], token: str | None,
                 *, max_age: float) -> bool:
        return cached[2] or self._allowed(repo, token, max_age=max_age)

    def _stale_api(self, repo: Repo, cached: tuple[ApiAnswer, float, bool] | None,
                   token: str | None, reason: object, what: str) -> ApiAnswer:
        if cached is None:
            raise HubError.unreachable(what, reason)
        if not self._may_see(repo, cached, token, max_age=OFFLINE_GRACE):
            raise HubError(502, "", f"{repo}: the upstream Hub is unreachable ({reason}), so "
                                    "access to this gated or private repo cannot be checked")
        return cached[0]

    def _answer_from_entries(self, repo: Repo, kind: str, revision: str, sub_path: str,
                             path_qs: str) -> tuple[ApiAnswer, float, bool] | None:
        """An answer built from the file entries at the commit the revision last named (never
        anonymous: it goes only to those who may read the repo's files)."""
        if kind not in ("info", "revision", "tree"):
            return None
        commit = self.known_commit(repo, revision)
        entries = self.entries_at(repo, commit) if commit else []
        if commit is None or not entries:
            return None
        if kind == "tree":
            data: object = offline_api.tree_answer(entries, sub_path, urlsplit(path_qs).query)
            if data is None:
                return None
        else:
            data = offline_api.revision_answer(repo, commit, entries)
        body = json.dumps(data, separators=(",", ":")).encode()
        return ApiAnswer(200, body, "application/json", "", commit), 0.0, False

    async def _answer_from_peers(self, repo: Repo, kind: str, revision: str, sub_path: str,
                                 path_qs: str) -> tuple[ApiAnswer, float, bool] | None:
        """An answer built from file entries peers gave, for a revision never seen here."""
        if kind not in ("info", "revision", "tree") or self.known_commit(repo, revision):
            return None
        if not await self._learned_from_peers(repo, revision):
            return None
        return self._answer_from_entries(repo, kind, revision, sub_path, path_qs)

    async def _learned_from_peers(self, repo: Repo, revision: str) -> bool:
        return self.ask_peers is not None and await self.ask_peers(repo, revision)

    def _cached_api(self, key: str) -> tuple[ApiAnswer, float, bool] | None:
        row = self.db.execute("SELECT * FROM api_cache WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        return (ApiAnswer(row["status"], row["body"], row["content_type"], row["link"],
                          row["commit_sha"]), row["fetched_at"], bool(row["anonymous"]))

    def _save_api(self, key: str, repo: Repo, a: ApiAnswer, *, anonymous: bool) -> None:
        self.db.execute("INSERT OR REPLACE INTO api_cache VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (key, repo.type, repo.id, a.status, a.content_type, a.next_link,
                         a.commit, a.body, time.time(), int(anonymous)))
        self._api_saves_since_prune += 1
        if self._api_saves_since_prune >= API_PRUNE_EVERY:
            self._prune_api_cache()
            self._api_saves_since_prune = 0

    def _mark_api_used(self, key: str, *, fetched_at: float) -> None:
        """An answer at a commit is never fetched again, so its fetched_at is moved to when it
        was last used (at most once a day), for the pruning to keep the answers in use."""
        now = time.time()
        if now - fetched_at > 24 * 3600:
            self.db.execute("UPDATE api_cache SET fetched_at=? WHERE key=?", (now, key))

    def _prune_api_cache(self) -> None:
        """Drop the answers nobody used for API_CACHE_AGE, then the oldest beyond
        API_CACHE_ROWS (an answer dropped is asked of the upstream again when needed)."""
        with self.db:
            self.db.execute("DELETE FROM api_cache WHERE fetched_at < ?",
                            (time.time() - API_CACHE_AGE,))
            self.db.execute("DELETE FROM api_cache WHERE key IN (SELECT key FROM api_cache"
                            " ORDER BY fetched_at DESC LIMIT -1 OFFSET ?)", (API_CACHE_ROWS,))

    # --- the CLI's view -----------------------------------------------------------------
    def repos(self) -> list[dict[str, Any]]:  # Any: sqlite values, read by the caller
        rows = self.db.execute(
            "SELECT r.repo_type, r.repo_id, r.last_access,"
            " (SELECT COUNT(DISTINCT f.digest) FROM files f WHERE f.repo_type=r.repo_type"
            "  AND f.repo_id=r.repo_id) AS files,"
            " (SELECT COALESCE(SUM(b.size),0) FROM blobs b WHERE b.complete=1 AND b.digest IN"
            "  (SELECT digest FROM files f WHERE f.repo_type=r.repo_type"
            "   AND f.repo_id=r.repo_id)) AS bytes"
            " FROM repos r ORDER BY r.last_access DESC").fetchall()
        return [{"repo_type": r[0], "repo_id": r[1], "last_access": r[2], "files": r[3],
                 "bytes": r[4]} for r in rows]

    def forget(self, repo: Repo) -> list[str]:
        """Drop what is known of a repo; returns the digests no other repo refers to."""
        digests = [r[0] for r in self.db.execute(
            "SELECT DISTINCT digest FROM files WHERE repo_type=? AND repo_id=? AND digest NOT IN"
            " (SELECT digest FROM files WHERE NOT (repo_type=? AND repo_id=?))",
            (repo.type, repo.id, repo.type, repo.id))]
        with self.db:
            for table in ("files", "refs", "repos", "api_cache", "pins", "bound_tokens"):
                self.db.execute(f"DELETE FROM {table} WHERE repo_type=? AND repo_id=?",
                                (repo.type, repo.id))
        return digests

    def referenced_digests(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT DISTINCT digest FROM files")}

    def cached_entries(self, digest: str | None = None) -> list[FileEntry]:
        """Every known file entry (of one blob, with `digest`)."""
        rows = self.db.execute(
            "SELECT repo_type, repo_id, commit_sha, path, digest, algo, size FROM files"
            + (" WHERE digest=?" if digest else ""), (digest,) if digest else ()).fetchall()
        return [FileEntry(Repo(r[0], r[1]), r[2], r[3], BlobId(r[4], r[5], r[6]),
                          lfs=r[5] == "sha256") for r in rows]

    def cached_commits(self, repo: Repo) -> dict[str, list[str]]:
        """The commits of the repo that files are known at, each with the revisions naming it."""
        commits: dict[str, list[str]] = {r[0]: [] for r in self.db.execute(
            "SELECT DISTINCT commit_sha FROM files WHERE repo_type=? AND repo_id=?",
            (repo.type, repo.id))}
        for revision, commit in self.db.execute(
                "SELECT revision, commit_sha FROM refs WHERE repo_type=? AND repo_id=?",
                (repo.type, repo.id)):
            if commit in commits:
                commits[commit].append(revision)
        return commits


def _entry_of_row(repo: Repo, commit: str, path: str, row: sqlite3.Row) -> FileEntry:
    blob = BlobId(row["digest"], row["algo"], row["size"])
    return FileEntry(repo, commit, path, blob, lfs=blob.algo == "sha256")


def _unquote_etag(value: str) -> str:
    return value.strip().removeprefix("W/").strip('"').lower()


def _entry_from_head(repo: Repo, path: str, answer: Answer) -> FileEntry:
    h = answer.headers
    commit = h.get("X-Repo-Commit", "")
    if not COMMIT_RE.fullmatch(commit):
        raise HubError(502, "", f"{repo}/{path}: the upstream sent no X-Repo-Commit")
    linked = _unquote_etag(h.get("X-Linked-Etag", ""))
    etag = linked or _unquote_etag(h.get("ETag", ""))
    size_header = h.get("X-Linked-Size") if linked else None
    if size_header is None and answer.status == 200:
        size_header = h.get("Content-Length")
    if size_header is None:
        size_header = h.get("X-Linked-Size")
    algo = "sha256" if len(etag) == 64 else "gitsha1"
    try:
        blob = BlobId(etag, algo, int(size_header or ""))
    except ValueError as e:
        raise HubError(502, "", f"{repo}/{path}: the upstream sent no usable ETag/size "
                                f"(etag {etag!r}, size {size_header!r})") from e
    return FileEntry(repo, commit, path, blob, lfs=bool(linked))


def _strip_xet(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip_xet(v) for k, v in value.items() if k != "xetHash"}
    if isinstance(value, list):
        return [_strip_xet(v) for v in value]
    return value


_LINK_RE = re.compile(r'<([^>]*)>\s*((?:;\s*[^,;]+)*)')


def _next_link(link_header: str) -> str:
    """The path+query of the rel="next" link; every other link (xet-*) is dropped."""
    for m in _LINK_RE.finditer(link_header):
        if re.search(r'rel="?next"?', m.group(2)):
            url = m.group(1)
            return re.sub(r"^[a-z]+://[^/]+", "", url)
    return ""


def _sanitized_api_answer(answer: Answer) -> ApiAnswer:
    content_type = answer.headers.get("Content-Type", "application/json")
    body = answer.body
    commit = ""
    if "json" in content_type:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if data is not None:
            data = _strip_xet(data)
            if isinstance(data, dict) and isinstance(data.get("sha"), str):
                commit = data["sha"]
            body = json.dumps(data, separators=(",", ":")).encode()
    return ApiAnswer(answer.status, body, content_type,
                     _next_link(answer.headers.get("Link", "")), commit)

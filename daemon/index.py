"""The SQLite index beside the chunk files: blobs, chunks, refs, file entries, cached API answers.

One connection, used from the event loop only (queries are sub-millisecond with WAL); the
tables are grouped by the module that owns them, and only that module writes them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

-- store.py: bytes and digests
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,      -- sha256 (LFS) or git blob sha1, lower-case hex
    algo TEXT NOT NULL,           -- 'sha256' or 'gitsha1'
    size INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,   -- 1 once the whole blob matched its digest
    created REAL NOT NULL,
    last_access REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    digest TEXT NOT NULL REFERENCES blobs(digest) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    length INTEGER NOT NULL,      -- the chunk's full length
    durable INTEGER NOT NULL,     -- bytes known to be on disk (fsynced); = length when complete
    xxh3 TEXT NOT NULL,           -- xxh3-128 of the first `durable` bytes
    complete INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (digest, idx)
);

-- catalog.py: what the Hub said
CREATE TABLE IF NOT EXISTS refs (
    repo_type TEXT NOT NULL, repo_id TEXT NOT NULL, revision TEXT NOT NULL,
    commit_sha TEXT NOT NULL, fetched_at REAL NOT NULL,
    PRIMARY KEY (repo_type, repo_id, revision)
);
CREATE TABLE IF NOT EXISTS files (
    repo_type TEXT NOT NULL, repo_id TEXT NOT NULL, commit_sha TEXT NOT NULL, path TEXT NOT NULL,
    digest TEXT NOT NULL, algo TEXT NOT NULL, size INTEGER NOT NULL, etag TEXT NOT NULL,
    PRIMARY KEY (repo_type, repo_id, commit_sha, path)
);
CREATE TABLE IF NOT EXISTS repos (
    repo_type TEXT NOT NULL, repo_id TEXT NOT NULL,
    public INTEGER NOT NULL DEFAULT 0,     -- 1 once the upstream served it without a token
    last_access REAL NOT NULL,
    PRIMARY KEY (repo_type, repo_id)
);
CREATE TABLE IF NOT EXISTS api_cache (
    key TEXT PRIMARY KEY,
    repo_type TEXT NOT NULL, repo_id TEXT NOT NULL,
    status INTEGER NOT NULL, content_type TEXT NOT NULL, link TEXT NOT NULL,
    commit_sha TEXT NOT NULL, body BLOB NOT NULL,
    fetched_at REAL NOT NULL,   -- at a commit (never fetched again): when last used, to the day
    anonymous INTEGER NOT NULL  -- 1 when the upstream gave it without a token: anyone may see it
);
-- warmup.py: warm jobs this node runs, so a restarted daemon resumes them (never the token)
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, created REAL NOT NULL
);
-- signatures.py: the sha256 of small (gitsha1-named) blobs, to compare with signed manifests
CREATE TABLE IF NOT EXISTS blob_sha256 (
    digest TEXT PRIMARY KEY REFERENCES blobs(digest) ON DELETE CASCADE,
    sha256 TEXT NOT NULL
);
-- pins.py: revisions kept whatever the size limit (revision as given; commit at pin time)
CREATE TABLE IF NOT EXISTS pins (
    repo_type TEXT NOT NULL, repo_id TEXT NOT NULL, revision TEXT NOT NULL,
    commit_sha TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (repo_type, repo_id, revision)
);
-- catalog.py: imported gated or private repos, readable offline by the importer's token
CREATE TABLE IF NOT EXISTS bound_tokens (
    repo_type TEXT NOT NULL, repo_id TEXT NOT NULL, token_sha256 TEXT NOT NULL,
    PRIMARY KEY (repo_type, repo_id, token_sha256)
);
CREATE INDEX IF NOT EXISTS api_cache_repo ON api_cache (repo_type, repo_id);
CREATE INDEX IF NOT EXISTS api_cache_fetched ON api_cache (fetched_at);  -- pruning
CREATE INDEX IF NOT EXISTS files_digest ON files (digest);
"""


def open_index(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the index; WAL so a killed daemon loses at most the last commit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(_SCHEMA)
    row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if row is None:
        db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    elif int(row[0]) != SCHEMA_VERSION:
        raise RuntimeError(
            f"{path}: index schema {row[0]} is not {SCHEMA_VERSION}; "
            "move the cache directory away or run a matching modelpeer version")
    return db

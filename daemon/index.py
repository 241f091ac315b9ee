"""The SQLite index beside the chunk files: blobs, chunks, refs, file entries, cached API answers.

One connection, used from the event loop only (queries are sub-millisecond with WAL); the
tables are grouped by the module that owns them, and only that module writes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path

log = logging.getLogger(__name__)

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
    """Open (creating if needed) the index; WAL so a killed daemon loses at most the last commit.
    A damaged index is set aside and rebuilt from the rows still readable; rows holding values
    of the wrong type are dropped (each is logged, naming the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    damage = _damage(path)
    if damage is not None:
        _rebuild(path, damage)
    db = _connect(path)
    _check_schema_version(db, path)
    _drop_rows_of_wrong_type(db, path)
    return db


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(_SCHEMA)
    return db


def _check_schema_version(db: sqlite3.Connection, path: Path) -> None:
    row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if row is None:
        db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    elif str(row[0]) != str(SCHEMA_VERSION):
        raise RuntimeError(
            f"{path}: index schema {row[0]} is not {SCHEMA_VERSION}; "
            "move the cache directory away or run a matching modelpeer version")


def _damage(path: Path) -> str | None:
    """What sqlite's quick_check finds wrong with the index file (None: nothing, or no file)."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(path)
    except sqlite3.DatabaseError as e:
        return str(e)
    try:
        found = [str(r[0]) for r in db.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as e:
        return str(e)
    finally:
        db.close()
    return None if found == ["ok"] else "; ".join(found)


def _rebuild(path: Path, damage: str) -> None:
    """Move the damaged index (and its WAL) aside and copy what can still be read from it into
    a new one. Chunk files whose rows are lost are checked again by the store at start."""
    damaged = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", f"{damaged}{suffix}")
    log.error("index %s is damaged (%s): moved to %s and rebuilt from the rows still readable",
              path, damage, damaged)
    fresh = _connect(path)
    try:
        kept = _copy_readable_rows(damaged, fresh)
    finally:
        fresh.close()
    log.warning("index %s rebuilt: kept %s", path,
                ", ".join(f"{n} {table} rows" for table, n in kept.items() if n) or "nothing")


def _copy_readable_rows(source: Path, into: sqlite3.Connection) -> dict[str, int]:
    old = sqlite3.connect(source)
    try:
        try:
            old.execute("SELECT name FROM sqlite_master").fetchall()
        except sqlite3.DatabaseError as e:
            log.warning("index: nothing can be read from the damaged copy %s (%s)", source, e)
            return {}
        return {table: _copy_table(old, into, table) for table in _tables(into)}
    finally:
        old.close()


def _copy_table(old: sqlite3.Connection, into: sqlite3.Connection, table: str) -> int:
    """Copy the rows of `table` up to the first unreadable page; returns how many went in."""
    columns = ", ".join(c for c, _ in _columns(into, table))
    marks = ", ".join("?" for _ in _columns(into, table))
    copied = 0
    with into:
        try:
            for row in old.execute(f"SELECT {columns} FROM {table}"):  # noqa: S608 - our names
                with contextlib.suppress(sqlite3.IntegrityError):
                    into.execute(f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({marks})",
                                 tuple(row))
                    copied += 1
        except sqlite3.DatabaseError as e:
            log.warning("index: table %s of the damaged copy is unreadable after %d rows (%s)",
                        table, copied, e)
    return copied


def _tables(db: sqlite3.Connection) -> list[str]:
    """The index's tables in the order they were created (a referenced table first)."""
    return [r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type='table' ORDER BY rowid")]


def _columns(db: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    """(name, declared type) of each column of a table."""
    return [(r[1], r[2].upper()) for r in db.execute(f"PRAGMA table_info({table})")]


_TYPEOF = {"TEXT": "'text'", "INTEGER": "'integer'", "REAL": "'real', 'integer'",
           "BLOB": "'blob', 'text'"}


def _drop_rows_of_wrong_type(db: sqlite3.Connection, path: Path) -> None:
    """sqlite keeps any value in any column: a row whose values are not of the declared types
    (a damaged or hand-edited index) is dropped rather than crash whoever reads it."""
    with db:
        for table in _tables(db):
            typed = [f"typeof({name}) IN ({_TYPEOF[kind]})"
                     for name, kind in _columns(db, table) if kind in _TYPEOF]
            dropped = db.execute(
                f"DELETE FROM {table} WHERE NOT ({' AND '.join(typed)})").rowcount  # noqa: S608
            if dropped:
                log.warning("index %s: dropped %d %s rows holding values of the wrong type",
                            path, dropped, table)

"""Pins: repo revisions kept in the cache whatever the size limit.

A pin names a revision (a branch, tag or commit) and holds the commit it resolved to when it was
made; every file entry the catalog knows at that commit is pinned. The store's eviction (after
each download and in `gc`) skips pinned blobs; when pins alone keep the cache above
`max_cache_size`, the store says so in the log and the status, and downloads go on.
"""

from __future__ import annotations

import logging
import sqlite3
import time

from .catalog import Catalog, Repo
from .errors import NotCached

log = logging.getLogger(__name__)

_PINNED_FILES = (
    "SELECT DISTINCT f.digest, f.size FROM pins p JOIN files f ON f.repo_type=p.repo_type"
    " AND f.repo_id=p.repo_id AND f.commit_sha=p.commit_sha")


class Pins:
    def __init__(self, db: sqlite3.Connection, catalog: Catalog) -> None:
        self.db = db
        self.catalog = catalog

    def pin(self, repo: Repo, revision: str) -> dict[str, object]:
        """Pin a revision the cache knows; NotCached when it knows no file of it."""
        commit = self.catalog.known_commit(repo, revision)
        if commit is None or not self.catalog.entries_at(repo, commit):
            raise NotCached(f"{repo}@{revision} is not cached; `modelpeer warm --pin {repo.id}"
                            f" --revision {revision}` fetches it and pins it")
        self.add(repo, revision, commit)
        return self._describe(repo.type, repo.id, revision, commit)

    def add(self, repo: Repo, revision: str, commit: str) -> None:
        """Pin `commit` under the name `revision` (a warm job pins before its files are in)."""
        self.db.execute("INSERT OR REPLACE INTO pins VALUES (?, ?, ?, ?, ?)",
                        (repo.type, repo.id, revision, commit, time.time()))
        log.info("pinned %s@%s (commit %s)", repo, revision, commit[:12])

    def unpin(self, repo: Repo, revision: str | None) -> int:
        """Remove the pins of the repo (of one revision, by name or commit); how many."""
        cur = self.db.execute(
            "DELETE FROM pins WHERE repo_type=? AND repo_id=? AND (? IS NULL OR revision=?"
            " OR commit_sha=?)", (repo.type, repo.id, revision, revision, revision))
        if cur.rowcount:
            log.info("unpinned %s%s (%d pins)", repo, f"@{revision}" if revision else "",
                     cur.rowcount)
        return cur.rowcount

    def list(self) -> list[dict[str, object]]:
        rows = self.db.execute("SELECT repo_type, repo_id, revision, commit_sha FROM pins"
                               " ORDER BY repo_id, revision").fetchall()
        return [self._describe(*r) for r in rows]

    def digests(self) -> set[str]:
        return {r[0] for r in self.db.execute(_PINNED_FILES)}

    def summary(self) -> dict[str, int]:
        """How many pins, and the bytes of their complete blobs (counted once)."""
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(b.size), 0) FROM (" + _PINNED_FILES + ") p"
            " JOIN blobs b ON b.digest=p.digest AND b.complete=1").fetchone()
        count = self.db.execute("SELECT COUNT(*) FROM pins").fetchone()[0]
        return {"pins": count, "pinned_files": row[0], "pinned_bytes": row[1]}

    def _describe(self, repo_type: str, repo_id: str, revision: str,
                  commit: str) -> dict[str, object]:
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(b.complete), 0), COALESCE(SUM(f.size), 0),"
            " COALESCE(SUM(CASE WHEN b.complete=1 THEN f.size ELSE 0 END), 0)"
            " FROM files f LEFT JOIN blobs b ON b.digest=f.digest"
            " WHERE f.repo_type=? AND f.repo_id=? AND f.commit_sha=?",
            (repo_type, repo_id, commit)).fetchone()
        return {"repo_type": repo_type, "repo_id": repo_id, "revision": revision,
                "commit": commit, "files": row[0], "cached_files": row[1], "bytes": row[2],
                "cached_bytes": row[3]}

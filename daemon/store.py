"""Content-addressed chunk store: bytes and digests, nothing about repos or where bytes come from.

A blob (a file's content, named by its sha256 or git blob sha1) is cut into fixed-size chunks,
each its own file `chunks/<d[:2]>/<digest>.<index>`. A chunk is written sequentially into
`<name>.part`; every CHECKPOINT bytes the data is fsynced and the index records how much is
durable with the xxh3-128 of that prefix, so a killed daemon resumes where it stopped. A full
chunk is fsynced and renamed into place. A blob counts as complete only after the whole of it
matched its digest; a mismatch removes every chunk of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import logging
import os
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, Concatenate, NamedTuple, ParamSpec, Protocol, TypeVar

import xxhash

from .errors import ChunkDamaged, DigestMismatch, StoreFull, is_disk_full
from .events import Signal

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

CHECKPOINT = 16 * 1024 * 1024
READ_BLOCK = 1024 * 1024
MIN_FREE = 1024**3  # free space kept on the cache's filesystem while writing ...
MIN_FREE_SHARE = 20  # ... or 1/20 of the filesystem when that is smaller
ROOM_RETRY = 1.0  # seconds between asks for room that fell short (the blobs to evict were read)
# bytes received are written (and, in order, hashed) on the event loop's thread, the core that
# received them, INLINE_MAX at a time at most, unless a write lately took longer than
# SLOW_WRITE: then in threads for SLOW_DISK_KEPT. Bytes read back to be hashed (commit), and
# smaller pieces than OFFLOAD whatever the disk does, the same as ever.
INLINE_MAX = 4 * 1024 * 1024
OFFLOAD = 256 * 1024
SLOW_WRITE = 0.02
SLOW_DISK_KEPT = 30.0
ALGOS = ("sha256", "gitsha1")
_CHUNK_NAME = re.compile(r"([0-9a-f]{40,64})\.([0-9]+)(\.part)?")
_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "gitsha1": re.compile(r"[0-9a-f]{40}")}


@dataclasses.dataclass(frozen=True)
class BlobId:
    digest: str
    algo: str
    size: int

    def __post_init__(self) -> None:
        if self.algo not in ALGOS or not _HEX[self.algo].fullmatch(self.digest):
            raise ValueError(f"not a {self.algo} digest: {self.digest!r}")
        if self.size < 0:
            raise ValueError(f"negative blob size {self.size}")


class Hasher(Protocol):
    """What hashlib's and xxhash's hash objects share, as used here."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def blob_hasher(blob: BlobId) -> Hasher:
    """A hashlib object that, fed the blob's bytes, yields blob.digest."""
    if blob.algo == "sha256":
        return hashlib.sha256()
    h = hashlib.sha1()
    h.update(b"blob %d\0" % blob.size)
    return h


@dataclasses.dataclass
class ChunkState:
    idx: int
    offset: int
    length: int
    durable: int
    complete: bool
    xxh3: str


class CompleteChunk(NamedTuple):
    digest: str
    idx: int
    length: int
    xxh3: str


@dataclasses.dataclass
class Usage:
    bytes: int
    blobs: int
    complete_blobs: int
    chunks: int


class Store:
    def __init__(self, root: Path, db: sqlite3.Connection, chunk_size: int, *,
                 max_bytes: int = 0, kept: Callable[[], set[str]] = set) -> None:
        self.root = root
        self.db = db
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes  # max_cache_size; 0 = no limit
        self.removed: Signal[[str]] = Signal("blob removed")  # digest
        self._pins: collections.Counter[str] = collections.Counter()
        self._doomed: set[str] = set()  # retired while pinned: removed at the last unpin
        self.kept = kept  # digests the user pinned (pins.py)
        self.over_limit = 0  # bytes above max_cache_size that eviction could not free
        # complete chunks not hashed since start, (digest, index) -> (length, xxh3): each is
        # checked before its first read, and by check_unchecked() behind the start
        self.unchecked: dict[tuple[str, int], tuple[int, str]] = {}
        self._slow_disk_until = 0.0  # writes go to threads until then (inline_write)
        (root / "chunks").mkdir(parents=True, exist_ok=True)

    def inline_write(self, write: Callable[[], None]) -> bool:
        """Run `write` (bytes into the page cache, perhaps hashed) on the calling thread, the
        event loop's, while the disk keeps up: the bytes are in this core's cache, and reading
        them on another core cost 10–25 % more CPU (docs/benchmarks.md, issue 15, session
        11). False, running nothing, while the disk is slow lately: a write the kernel
        throttles must not hold the event loop."""
        if time.monotonic() < self._slow_disk_until:
            return False
        started = time.monotonic()
        write()
        took = time.monotonic() - started
        if took > SLOW_WRITE:
            self._slow_disk_until = time.monotonic() + SLOW_DISK_KEPT
            log.info("a write under %s took %.0f ms: the disk is behind; writing in threads "
                     "for %.0f s", self.root, took * 1000, SLOW_DISK_KEPT)
        return True

    # --- pins -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def pinned(self, digest: str) -> Iterator[None]:
        """Keep the blob's bytes while a reader or writer uses them: eviction, gc and retire
        leave a pinned blob alone."""
        self._pins[digest] += 1
        try:
            yield
        finally:
            self._pins[digest] -= 1
            if not self._pins[digest]:
                del self._pins[digest]
                if digest in self._doomed:
                    self._doomed.discard(digest)
                    log.info("removed blob %s after its last reader (%d bytes)", digest,
                             self.remove(digest))

    def is_pinned(self, digest: str) -> bool:
        return digest in self._pins

    def retire(self, digest: str) -> int:
        """Remove a blob nobody wants any more: now when unpinned (returns the bytes freed),
        else once its last reader is done (returns 0)."""
        if self.is_pinned(digest):
            self._doomed.add(digest)
            return 0
        return self.remove(digest)

    # --- layout -------------------------------------------------------------------------
    def chunk_spans(self, size: int) -> Iterator[tuple[int, int, int]]:
        """(index, offset, length) of each chunk of a blob of `size` bytes (one for size 0)."""
        count = max(1, -(-size // self.chunk_size))
        for idx in range(count):
            offset = idx * self.chunk_size
            yield idx, offset, min(self.chunk_size, size - offset)

    def chunk_path(self, digest: str, idx: int, *, partial: bool = False) -> Path:
        name = f"{digest}.{idx}" + (".part" if partial else "")
        return self.root / "chunks" / digest[:2] / name

    # --- index --------------------------------------------------------------------------
    def register(self, blob: BlobId) -> None:
        """Make the blob and its chunk rows known (idempotent)."""
        now = time.time()
        with self.db:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO blobs (digest, algo, size, complete, created, last_access)"
                " VALUES (?, ?, ?, 0, ?, ?)", (blob.digest, blob.algo, blob.size, now, now))
            if cur.rowcount:
                self.db.executemany(
                    "INSERT OR IGNORE INTO chunks (digest, idx, length, durable, xxh3, complete)"
                    " VALUES (?, ?, ?, 0, ?, 0)",
                    [(blob.digest, i, n, _xxh3_empty()) for i, _, n in self.chunk_spans(blob.size)])

    def is_complete(self, digest: str) -> bool:
        row = self.db.execute("SELECT complete FROM blobs WHERE digest=?", (digest,)).fetchone()
        return bool(row and row[0])

    def complete_blob(self, digest: str) -> BlobId | None:
        row = self.db.execute("SELECT algo, size FROM blobs WHERE digest=? AND complete=1",
                              (digest,)).fetchone()
        return BlobId(digest, row["algo"], row["size"]) if row is not None else None

    def complete_chunks(self, *, digest: str | None = None,
                        min_blob_size: int = 0) -> list[CompleteChunk]:
        """The complete chunks of blobs of at least `min_blob_size` bytes (of one blob, or of
        all)."""
        rows = self.db.execute(
            "SELECT c.digest, c.idx, c.length, c.xxh3 FROM chunks c JOIN blobs b USING (digest)"
            " WHERE c.complete=1 AND b.size>=? AND (? IS NULL OR c.digest=?) ORDER BY c.idx",
            (min_blob_size, digest, digest))
        return [CompleteChunk(r[0], r[1], r[2], r[3]) for r in rows]

    def count_complete_chunks(self, min_blob_size: int = 0) -> int:
        return int(self.db.execute(
            "SELECT COUNT(*) FROM chunks c JOIN blobs b USING (digest)"
            " WHERE c.complete=1 AND b.size>=?", (min_blob_size,)).fetchone()[0])

    def chunks(self, blob: BlobId) -> list[ChunkState]:
        rows = {r["idx"]: r for r in self.db.execute(
            "SELECT idx, durable, complete, xxh3 FROM chunks WHERE digest=?", (blob.digest,))}
        out = []
        for idx, offset, length in self.chunk_spans(blob.size):
            r = rows.get(idx)
            out.append(ChunkState(idx, offset, length, r["durable"] if r else 0,
                                  bool(r and r["complete"]), r["xxh3"] if r else _xxh3_empty()))
        return out

    def contiguous_prefix(self, blob: BlobId) -> int:
        """How many bytes from the start of the blob are on disk, durable."""
        done = 0
        for c in self.chunks(blob):
            if c.complete:
                done += c.length
                continue
            return done + c.durable
        return done

    def adopt_chunk(self, digest: str, idx: int, length: int, xxh3: str) -> None:
        """A complete chunk file in place, written by a BlobWriter or cloned (reflink.py)."""
        self.db.execute("UPDATE chunks SET durable=?, xxh3=?, complete=1 WHERE digest=? AND idx=?",
                        (length, xxh3, digest, idx))

    def mark_complete(self, digest: str) -> None:
        """Every chunk of the blob is durable and the whole matched its digest."""
        self.db.execute("UPDATE blobs SET complete=1, last_access=? WHERE digest=?",
                        (time.time(), digest))

    def touch(self, digest: str) -> None:
        self.db.execute("UPDATE blobs SET last_access=? WHERE digest=?", (time.time(), digest))

    def usage(self) -> Usage:
        row = self.db.execute(
            "SELECT COALESCE(SUM(durable),0), COUNT(*) FROM chunks WHERE durable>0").fetchone()
        blobs = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(complete),0) FROM blobs").fetchone()
        return Usage(bytes=row[0], blobs=blobs[0], complete_blobs=blobs[1], chunks=row[1])

    def bytes_on_disk(self, digests: list[str]) -> int:
        """What the chunks of these blobs take on disk, together."""
        return sum(int(self.db.execute(
            "SELECT COALESCE(SUM(durable),0) FROM chunks WHERE digest=?", (d,)).fetchone()[0])
            for d in digests)

    # --- bytes --------------------------------------------------------------------------
    def read(self, blob: BlobId, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the blob; the caller knows they are on disk."""
        parts = []
        end = offset + length
        while offset < end:
            idx = offset // self.chunk_size
            within = offset - idx * self.chunk_size
            n = min(end - offset, self.chunk_size - within)
            self._check_once(blob.digest, idx)
            data = self._read_chunk(blob.digest, idx, within, n)
            if len(data) != n:
                raise OSError(f"chunk {blob.digest}.{idx} is shorter than the index says")
            parts.append(data)
            offset += n
        return b"".join(parts)

    def _read_chunk(self, digest: str, idx: int, offset: int, n: int) -> bytes:
        fd = self._open_chunk(digest, idx)
        try:
            return os.pread(fd, n, offset)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def chunk_file(self, blob: BlobId, idx: int) -> Iterator[io.FileIO]:
        """Chunk `idx` of the blob, open for reading (also while it is still being written:
        the file stays the same when it is renamed into place)."""
        with io.FileIO(self._open_chunk(blob.digest, idx), "rb") as f:
            yield f

    def _open_chunk(self, digest: str, idx: int) -> int:
        # A writer may rename .part into place between our two attempts: try both names.
        for partial in (False, True, False):
            try:
                return os.open(self.chunk_path(digest, idx, partial=partial), os.O_RDONLY)
            except FileNotFoundError:
                continue
        raise FileNotFoundError(f"chunk {digest}.{idx} is missing from {self.root}")

    async def adopt_unrecorded_chunks(self, digest: str | None = None) -> int:
        """Chunks in place under their final name whose completion never reached the index
        (its write failed: a full disk holds the index too) are marked complete (of one blob,
        or of all); the blob's digest, checked before it counts as complete, vouches for their
        bytes. Returns how many."""
        rows = [(r[0], r[1], r[2]) for r in self.db.execute(
            "SELECT digest, idx, length FROM chunks WHERE complete=0 AND (? IS NULL OR digest=?)",
            (digest, digest))]
        found = await asyncio.to_thread(self._whole_in_place, rows)
        with self.db:
            for d, idx, length, xxh3 in found:
                self.adopt_chunk(d, idx, length, xxh3)
                log.warning("chunk %s was written whole but the index had not recorded it "
                            "(a full disk?): kept", self.chunk_path(d, idx))
        return len(found)

    def _whole_in_place(self, rows: list[tuple[str, int, int]]) -> list[tuple[str, int, int, str]]:
        found = []
        for digest, idx, length in rows:
            path = self.chunk_path(digest, idx)
            with contextlib.suppress(OSError):
                if path.stat().st_size == length:
                    found.append((digest, idx, length, xxh3_of_file(path, length)))
        return found

    def open_writer(self, blob: BlobId) -> BlobWriter:
        """A sequential writer that continues at the blob's durable prefix."""
        self.register(blob)
        return BlobWriter(self, blob, self.contiguous_prefix(blob))

    def remove(self, digest: str) -> int:
        """Delete a blob's chunks and rows; returns the bytes freed."""
        self.removed.emit(digest)
        freed = 0
        rows = self.db.execute("SELECT idx, durable FROM chunks WHERE digest=?",
                               (digest,)).fetchall()
        for r in rows:
            for partial in (False, True):
                with _ignore_missing():
                    self.chunk_path(digest, r["idx"], partial=partial).unlink()
            freed += r["durable"]
            self.unchecked.pop((digest, r["idx"]), None)
        with self.db:
            self.db.execute("DELETE FROM chunks WHERE digest=?", (digest,))
            self.db.execute("DELETE FROM blobs WHERE digest=?", (digest,))
        return freed

    def evict(self, max_bytes: int) -> list[str]:
        """Remove least-recently-used complete blobs nobody reads and nobody pinned until
        usage <= max_bytes; what cannot be freed is reported, never raised."""
        if max_bytes <= 0:
            return []
        removed, _ = self._evict_lru(self.usage().bytes - max_bytes, "to stay under max_cache_size")
        self._report_over_limit(max(0, self.usage().bytes - max_bytes), max_bytes)
        return removed

    def make_room(self, incoming: int) -> bool:
        """Before `incoming` bytes are written: evict least-recently-used complete, unpinned
        blobs while the cache would pass max_bytes or the filesystem's free space would fall
        below the watermark. Blobs are not thrown away for a write that would fail anyway:
        then the disk fills and the write fails (ENOSPC, a clear 507) with all kept.
        False when the cache stays above max_bytes (what is left is read or pinned)."""
        over = self.usage().bytes + incoming - self.max_bytes if self.max_bytes else 0
        short = self._free_space_shortfall(incoming)
        if short > 0 and short > sum(size for _, size in self._eviction_candidates()):
            short = 0
        if over <= 0 and short <= 0:
            return True
        need = max(over, short)
        _, still = self._evict_lru(need, f"to make room for {incoming} bytes being written")
        return need - still >= over

    def _free_space_shortfall(self, incoming: int) -> int:
        fs = os.statvfs(self.root)
        watermark = min(MIN_FREE, fs.f_blocks * fs.f_frsize // MIN_FREE_SHARE)
        return watermark + incoming - fs.f_bavail * fs.f_frsize

    def _eviction_candidates(self) -> list[tuple[str, int]]:
        """(digest, bytes on disk) of complete blobs that nobody reads or writes and nobody
        pinned, least recently used first."""
        rows = self.db.execute(
            "SELECT b.digest, (SELECT COALESCE(SUM(durable), 0) FROM chunks c"
            " WHERE c.digest=b.digest) FROM blobs b WHERE b.complete=1 ORDER BY b.last_access"
        ).fetchall()
        kept = self.kept()
        return [(r[0], r[1]) for r in rows if not self.is_pinned(r[0]) and r[0] not in kept]

    def _evict_lru(self, need: int, why: str) -> tuple[list[str], int]:
        """Evict until `need` bytes are freed: the blobs removed, and how many bytes are still
        needed (<= 0 when done)."""
        removed: list[str] = []
        for digest, _ in self._eviction_candidates():
            if need <= 0:
                break
            need -= self.remove(digest)
            removed.append(digest)
            log.info("evicted blob %s %s", digest, why)
        return removed, need

    def _report_over_limit(self, over: int, max_bytes: int) -> None:
        if over and not self.over_limit:
            log.warning("the cache stays %d bytes above max_cache_size (%d): the rest is pinned"
                        " or being transferred; `modelpeer unpin` or raise max_cache_size",
                        over, max_bytes)
        self.over_limit = over

    # --- checks -------------------------------------------------------------------------
    async def recover(self) -> dict[str, int]:
        """At start: keep what is good, in seconds whatever the store's size. Blobs whose
        index rows disagree with each other are forgotten; complete chunks must have their
        length (their xxh3 is checked later: `unchecked`), partial chunks are cut back to their
        last checkpoint and must match its xxh3; the rest is dropped. Complete chunk files the
        index does not know are kept when together they hash to their blob's name."""
        self._forget_inconsistent_blobs()
        await self.adopt_unrecorded_chunks()
        rows = [dict(r) for r in self.db.execute("SELECT * FROM chunks")]
        verdicts = await asyncio.to_thread(self._check_chunks, rows, deep=False)
        stats = {"good": 0, "dropped": 0, "partial": 0, "adopted": 0}
        with self.db:
            for row, ok in zip(rows, verdicts, strict=True):
                if ok:
                    stats["partial" if not row["complete"] else "good"] += 1
                    if row["complete"] and row["length"]:
                        self.unchecked[row["digest"], row["idx"]] = (row["length"], row["xxh3"])
                    continue
                stats["dropped"] += 1
                log.warning("chunk %s failed its check at start; it will be fetched again",
                            self.chunk_path(row["digest"], row["idx"],
                                            partial=not row["complete"]))
                self._reset_chunk(row["digest"], row["idx"])
        known = {r[0] for r in self.db.execute("SELECT digest FROM blobs")}
        for blob, chunks in await asyncio.to_thread(self._orphan_blobs, known):
            self._adopt_blob(blob, chunks)
            stats["adopted"] += 1
        await asyncio.to_thread(self._remove_strays)
        return stats

    def _forget_inconsistent_blobs(self) -> None:
        """Drop the rows (not the files) of blobs whose rows break the store's invariants, and
        chunk rows of no blob; their chunk files are then orphans, kept if they hash right."""
        chunks: dict[str, list[sqlite3.Row]] = collections.defaultdict(list)
        for r in self.db.execute("SELECT * FROM chunks ORDER BY idx"):
            chunks[r["digest"]].append(r)
        blobs = {r["digest"]: r for r in self.db.execute("SELECT * FROM blobs")}
        with self.db:
            for digest in blobs.keys() | chunks.keys():
                fault = self._row_fault(blobs.get(digest), chunks.get(digest, []))
                if fault:
                    log.warning("blob %s: its index rows are inconsistent (%s); its chunk "
                                "files are checked again", digest, fault)
                    self.db.execute("DELETE FROM chunks WHERE digest=?", (digest,))
                    self.db.execute("DELETE FROM blobs WHERE digest=?", (digest,))

    def _row_fault(self, blob: sqlite3.Row | None, chunks: list[sqlite3.Row]) -> str:
        """What is wrong with a blob's rows ("" when nothing)."""
        if blob is None:
            return "chunk rows of no blob"
        try:
            b = BlobId(blob["digest"], blob["algo"], blob["size"])
        except ValueError as e:
            return str(e)
        spans = [(i, n) for i, _, n in self.chunk_spans(b.size)]
        if [(c["idx"], c["length"]) for c in chunks] != spans:
            return f"chunk rows do not cut {b.size} bytes into chunks of {self.chunk_size}"
        for c in chunks:
            if not 0 <= c["durable"] <= c["length"] or c["complete"] not in (0, 1) or (
                    c["complete"] and c["durable"] != c["length"]):
                return f"chunk {c['idx']} says {c['durable']} of {c['length']} bytes durable"
        if blob["complete"] not in (0, 1) or (blob["complete"] and not all(
                c["complete"] for c in chunks)):
            return "a complete blob with incomplete chunks"
        return ""

    def _orphan_blobs(self, known: set[str]) -> list[tuple[BlobId, list[str]]]:
        """Blobs not `known` to the index (it was damaged) whose complete chunk files are all
        on disk and hash to the blob's name: (blob, xxh3 of each chunk)."""
        found: dict[str, dict[int, Path]] = collections.defaultdict(dict)
        for path in (self.root / "chunks").glob("*/*"):
            m = _CHUNK_NAME.fullmatch(path.name)
            if m and not m.group(3) and m.group(1) not in known:
                found[m.group(1)][int(m.group(2))] = path
        orphans = []
        for digest, paths in found.items():
            try:
                blob = self._blob_of_files(digest, paths)
                chunks = self._chunk_hashes_if_blob_matches(blob) if blob else None
            except OSError:
                continue  # left to _remove_strays
            if blob is not None and chunks is not None:
                orphans.append((blob, chunks))
        return orphans

    def _blob_of_files(self, digest: str, paths: dict[int, Path]) -> BlobId | None:
        """The blob these chunk files would make: every index from 0, every chunk but the
        last full."""
        sizes = [paths[i].stat().st_size if i in paths else -1 for i in range(len(paths))]
        if -1 in sizes or any(n != self.chunk_size for n in sizes[:-1]) or not (
                0 <= sizes[-1] <= self.chunk_size) or (len(sizes) > 1 and sizes[-1] == 0):
            return None
        algo = "sha256" if len(digest) == 64 else "gitsha1"
        try:
            return BlobId(digest, algo, sum(sizes))
        except ValueError:
            return None

    def _chunk_hashes_if_blob_matches(self, blob: BlobId) -> list[str] | None:
        whole = blob_hasher(blob)
        hashes = []
        for idx, _, _ in self.chunk_spans(blob.size):
            chunk = xxhash.xxh3_128()
            with open(self.chunk_path(blob.digest, idx), "rb") as f:
                while data := f.read(READ_BLOCK * 8):
                    chunk.update(data)
                    whole.update(data)
            hashes.append(chunk.hexdigest())
        return hashes if whole.hexdigest() == blob.digest else None

    def _adopt_blob(self, blob: BlobId, chunk_hashes: list[str]) -> None:
        self.register(blob)
        with self.db:
            for (idx, _, length), xxh3 in zip(self.chunk_spans(blob.size), chunk_hashes,
                                              strict=True):
                self.adopt_chunk(blob.digest, idx, length, xxh3)
            self.mark_complete(blob.digest)
        log.warning("blob %s (%d bytes): kept from its chunk files, which the index had lost",
                    blob.digest, blob.size)

    def _check_chunks(self, rows: list[dict[str, Any]],  # Any: sqlite values
                      deep: bool = True) -> list[bool]:
        return [self._check_chunk(r, deep=deep) for r in rows]

    def _check_chunk(self, row: dict[str, Any], *, deep: bool) -> bool:  # Any: a sqlite row
        """Is the chunk's file as its row says: a complete one of its length (and with `deep`,
        of its xxh3), a partial one cut back to its checkpoint and of its xxh3."""
        path = self.chunk_path(row["digest"], row["idx"], partial=not row["complete"])
        if row["durable"] == 0:
            with _ignore_missing():
                os.truncate(path, 0)
            return True
        try:
            if not row["complete"]:
                os.truncate(path, row["durable"])
            elif path.stat().st_size != row["length"]:
                return False
            elif not deep:
                return True
            return xxh3_of_file(path, row["durable"]) == str(row["xxh3"])
        except OSError:
            return False

    def _check_once(self, digest: str, idx: int) -> None:
        """Hash a complete chunk not yet checked since start (thread-safe: no index access);
        ChunkDamaged when it no longer matches, and then it stays unchecked."""
        want = self.unchecked.get((digest, idx))
        if want is None:
            return
        path = self.chunk_path(digest, idx)
        try:
            ok = xxh3_of_file(path, want[0]) == want[1]
        except OSError:
            ok = False
        if not ok:
            raise ChunkDamaged(errno.EIO, "the chunk no longer matches its xxh3", str(path))
        self.unchecked.pop((digest, idx), None)

    async def check_chunk(self, digest: str, idx: int) -> None:
        """Before a chunk's first read since start: hash it off the event loop; a damaged one
        is dropped (to be fetched again) and ChunkDamaged raised."""
        if (digest, idx) not in self.unchecked:
            return
        try:
            await asyncio.to_thread(self._check_once, digest, idx)
        except ChunkDamaged:
            if (digest, idx) in self.unchecked:  # not already dropped by a concurrent check
                log.error("chunk %s no longer matches its xxh3 (damaged on disk); dropped, it "
                          "will be fetched again", self.chunk_path(digest, idx))
                with self.db:
                    self._reset_chunk(digest, idx)
            raise

    async def check_span(self, digest: str, start: int, end: int) -> None:
        """check_chunk for every chunk holding a byte of [start, end)."""
        for idx in range(start // self.chunk_size, (end - 1) // self.chunk_size + 1):
            await self.check_chunk(digest, idx)

    async def check_blob(self, blob: BlobId) -> None:
        """Every chunk of the blob not yet checked since start; damaged ones are dropped."""
        for idx, _, _ in self.chunk_spans(blob.size):
            with contextlib.suppress(ChunkDamaged):
                await self.check_chunk(blob.digest, idx)

    async def check_unchecked(self) -> int:
        """Behind the start: hash every complete chunk no read has checked yet, one at a time;
        returns how many were damaged."""
        started, damaged, count = time.monotonic(), 0, len(self.unchecked)
        for digest, idx in list(self.unchecked):
            try:
                await self.check_chunk(digest, idx)
            except ChunkDamaged:
                damaged += 1
        log.info("store: the %d complete chunks found at start are checked (%d damaged, "
                 "%.1f s)", count, damaged, time.monotonic() - started)
        return damaged

    def _reset_chunk(self, digest: str, idx: int) -> None:
        self.removed.emit(digest)
        self.unchecked.pop((digest, idx), None)
        for partial in (False, True):
            with _ignore_missing():
                self.chunk_path(digest, idx, partial=partial).unlink()
        self.db.execute("UPDATE chunks SET durable=0, complete=0, xxh3=? WHERE digest=? AND idx=?",
                        (_xxh3_empty(), digest, idx))
        self.db.execute("UPDATE blobs SET complete=0 WHERE digest=?", (digest,))

    def _remove_strays(self) -> None:
        """Files under chunks/ that the index does not name: a crash before the insert, a
        temp file left beside a complete chunk, chunks of a blob that did not hash right."""
        wanted = {(r[0], r[1], "" if r[2] else ".part")
                  for r in self.db.execute("SELECT digest, idx, complete FROM chunks")}
        for path in (self.root / "chunks").glob("*/*"):
            m = _CHUNK_NAME.fullmatch(path.name)
            if not m or (m.group(1), int(m.group(2)), m.group(3) or "") not in wanted:
                log.warning("removing stray file %s", path)
                with _ignore_missing():
                    path.unlink()

    async def verify(self, *, full: bool) -> list[dict[str, object]]:
        """Check every complete chunk's xxh3 (and with full, every complete blob's digest);
        drop what fails. Returns one record per problem found."""
        rows = [dict(r) for r in self.db.execute("SELECT * FROM chunks WHERE complete=1")]
        verdicts = await asyncio.to_thread(self._check_chunks, rows)
        problems = []
        for row, ok in zip(rows, verdicts, strict=True):
            if ok:
                self.unchecked.pop((row["digest"], row["idx"]), None)
            else:
                problems.append({"digest": row["digest"], "chunk": row["idx"], "error": "xxh3"})
                self._reset_chunk(row["digest"], row["idx"])
        if full:
            for r in self.db.execute("SELECT digest, algo, size FROM blobs WHERE complete=1"
                                     ).fetchall():
                blob = BlobId(r["digest"], r["algo"], r["size"])
                if not await asyncio.to_thread(self._blob_matches, blob):
                    problems.append({"digest": blob.digest, "chunk": None, "error": blob.algo})
                    self.remove(blob.digest)
        for p in problems:
            log.error("verify: blob %s chunk %s failed its %s check; dropped",
                      p["digest"], p["chunk"], p["error"])
        return problems

    def _blob_matches(self, blob: BlobId) -> bool:
        h = blob_hasher(blob)
        for pos in range(0, blob.size, READ_BLOCK):
            h.update(self.read(blob, pos, min(READ_BLOCK, blob.size - pos)))
        return h.hexdigest() == blob.digest


def _full_disk_is_store_full(
        method: Callable[Concatenate[BlobWriter, P], Awaitable[R]]
) -> Callable[Concatenate[BlobWriter, P], Coroutine[Any, Any, R]]:
    """A write or index update of the writer that fails for want of disk space raises
    StoreFull, naming the blob."""
    @functools.wraps(method)
    async def checked(self: BlobWriter, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except (OSError, sqlite3.Error) as e:
            if is_disk_full(e) and not isinstance(e, StoreFull):
                raise StoreFull(f"writing blob {self.blob.digest[:12]}") from e
            raise
    return checked


class BlobWriter:
    """Appends a blob's bytes in order from `offset`, checkpointing and verifying as it goes.

    Bytes may also be put into the chunk files ahead of that order (put), as they arrive from
    several connections; commit() then takes them in order, hashing them as read back from
    the page cache. Only bytes taken in order count as written.

    Written bytes can be read at once (from the page cache); making them durable (fsync, then
    the index) runs behind, one step after the other, so a chunk's fsync never holds up the
    bytes that follow it, nor a peer relaying them. A failed step fails the next write."""

    def __init__(self, store: Store, blob: BlobId, offset: int) -> None:
        self.store = store
        self.blob = blob
        self.offset = offset
        self._hasher: Hasher | None = None
        self._fds: dict[int, int] = {}  # chunk index -> its open .part file
        self._fd: int | None = None  # that of the chunk being written in order
        self._chunk: ChunkState | None = None
        self._chunk_hash: Hasher | None = None
        self._since_checkpoint = 0
        self._durable: asyncio.Future[None] | None = None  # the last durability step
        self._in_threads: set[asyncio.Future[None]] = set()  # file work close() waits for
        self._block: memoryview | None = None  # commit() reads bytes back into it
        self._reserved_end = offset  # make_room was asked for the bytes up to here
        self._room_retry_at: float | None = None  # when to ask again, if it fell short

    async def prepare(self) -> None:
        """Hash the prefix already on disk so the blob digest and chunk xxh3 can continue."""
        await self.store.check_blob(self.blob)
        await self.store.adopt_unrecorded_chunks(self.blob.digest)
        self.offset = self.store.contiguous_prefix(self.blob)
        self._hasher = await asyncio.to_thread(self._hash_prefix)

    def _hash_prefix(self) -> Hasher:
        h = blob_hasher(self.blob)
        for pos in range(0, self.offset, READ_BLOCK):
            h.update(self.store.read(self.blob, pos, min(READ_BLOCK, self.offset - pos)))
        return h

    def _chunk_fd(self, idx: int) -> int:
        """The chunk's .part file, opened the first time with what it holds in order kept."""
        fd = self._fds.get(idx)
        if fd is None:
            start = idx * self.store.chunk_size
            length = min(self.store.chunk_size, self.blob.size - start)
            kept = min(max(0, self.offset - start), length)
            # room for all bytes up to this chunk's end: chunks opened ahead are not full yet
            self._reserved_end = max(self._reserved_end, start + length)
            self._room_retry_at = None
            self._retry_room()
            path = self.store.chunk_path(self.blob.digest, idx, partial=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            self._fds[idx] = fd
            os.ftruncate(fd, kept)
        return fd

    def _retry_room(self) -> None:
        """Ask the store for room for the bytes still to come; when blobs it would evict are
        being read, ask again every ROOM_RETRY seconds while writing, so the cache goes back
        under its limit once the reader leaves rather than when this blob is done."""
        now = time.monotonic()
        if self._room_retry_at is not None and now < self._room_retry_at:
            return
        fits = self.store.make_room(self._reserved_end - self.offset)
        self._room_retry_at = None if fits else now + ROOM_RETRY

    def _open_chunk(self) -> None:
        idx = self.offset // self.store.chunk_size
        chunk = self.store.chunks(self.blob)[idx]
        fd = self._chunk_fd(idx)
        within = self.offset - chunk.offset
        self._chunk_hash = xxhash.xxh3_128()
        if within:
            self._chunk_hash.update(self.store.read(self.blob, chunk.offset, within))
        self._fd, self._chunk = fd, chunk

    @_full_disk_is_store_full
    async def write(self, data: bytes | memoryview) -> None:
        """Bytes in order, at `offset`, written and hashed where they were received (see
        Store.inline_write)."""
        view = memoryview(data)
        await self._in_order(len(view), lambda fd, at, done, n: self._append(
            fd, at, view[done:done + n]), received_here=True)

    @_full_disk_is_store_full
    async def put(self, offset: int, pieces: Sequence[bytes | memoryview]) -> None:
        """Bytes at `offset`, at or past what is written in order, into the chunk files now
        (while they are in the CPU cache: Store.inline_write); commit() takes them in order
        later."""
        self._raise_durability_failure()
        if self._room_retry_at is not None:
            self._retry_room()
        size = sum(len(p) for p in pieces)
        if offset < self.offset or offset + size > self.blob.size:
            raise ValueError(f"blob {self.blob.digest}: bytes [{offset}, {offset + size}) are "
                             f"not between the written {self.offset} and the size")
        writes = []  # (fd, offset in the chunk file, bytes), files opened here: make_room
        for piece in pieces:
            view = memoryview(piece)
            while view:
                idx, at = divmod(offset, self.store.chunk_size)
                n = min(len(view), self.store.chunk_size - at)
                writes.append((self._chunk_fd(idx), at, view[:n]))
                view, offset = view[n:], offset + n
        if size > INLINE_MAX or not self.store.inline_write(lambda: _pwrite_all(writes)):
            await self._in_thread(_pwrite_all, writes)

    @_full_disk_is_store_full
    async def commit(self, n: int) -> None:
        """The next n bytes in order, put() before: hash them and count them as written."""
        await self._in_order(n, self._hash_back)

    async def _in_order(self, total: int, step: Callable[[int, int, int, int], None], *,
                        received_here: bool = False) -> None:
        """Take `total` bytes in order, chunk by chunk: step(fd, offset in the chunk file,
        bytes taken before, length) writes and hashes, or hashes what was put. Bytes
        `received_here` are taken on this thread while the disk keeps up."""
        self._raise_durability_failure()
        if self._room_retry_at is not None:
            self._retry_room()
        if self.offset + total > self.blob.size:
            raise DigestMismatch(f"blob {self.blob.digest}: more bytes than its size")
        done = 0
        while done < total:
            if self._fd is None:
                self._open_chunk()
            assert self._chunk is not None and self._fd is not None
            at = self.offset - self._chunk.offset
            n = min(total - done, self._chunk.length - at)
            take = functools.partial(step, self._fd, at, done, n)
            if n < OFFLOAD:
                take()
            elif not (received_here and n <= INLINE_MAX and self.store.inline_write(take)):
                await self._in_thread(take)
            self.offset += n
            self._since_checkpoint += n
            done += n
            if self.offset == self._chunk.offset + self._chunk.length:
                self._complete_chunk()
            elif self._since_checkpoint >= CHECKPOINT and not self._durability_pending():
                self._checkpoint()

    async def quiesce(self) -> None:
        """Wait for file work still in threads (puts whose awaits were cancelled), so none
        lands behind the writes that follow."""
        await asyncio.gather(*self._in_threads, return_exceptions=True)

    async def _in_thread(self, fn: Callable[..., None], *args: object) -> None:
        """fn off the event loop; close() waits for it even if this await is cancelled, so
        no thread uses a file descriptor after it is closed."""
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._in_threads.add(work)
        work.add_done_callback(self._in_threads.discard)
        await asyncio.shield(work)

    def _append(self, fd: int, at: int, piece: memoryview) -> None:
        # block by block, so the hashes read each block from the CPU cache the write left it in
        for pos in range(0, len(piece), READ_BLOCK):
            block = piece[pos:pos + READ_BLOCK]
            _pwrite_all([(fd, at + pos, block)])
            self._hash(block)

    def _hash_back(self, fd: int, at: int, _done: int, n: int) -> None:
        if self._block is None:
            self._block = memoryview(bytearray(READ_BLOCK))
        for pos in range(at, at + n, READ_BLOCK):
            block = self._block[:min(READ_BLOCK, at + n - pos)]
            if os.preadv(fd, [block], pos) != len(block):
                raise OSError(f"chunk {self.blob.digest}.{self.offset // self.store.chunk_size}"
                              f" holds less than was put into it (at {pos})")
            self._hash(block)

    def _hash(self, block: memoryview) -> None:
        assert self._chunk_hash is not None and self._hasher is not None  # _open_chunk, prepare
        self._chunk_hash.update(block)
        self._hasher.update(block)

    def _then(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run a durability step after the ones before it, off the writing path."""
        previous = self._durable

        async def run() -> None:
            if previous is not None:
                await previous
            await step()

        self._durable = asyncio.ensure_future(run())

    def _durability_pending(self) -> bool:
        return self._durable is not None and not self._durable.done()

    def _raise_durability_failure(self) -> None:
        d = self._durable
        if d is not None and d.done() and not d.cancelled():
            error = d.exception()
            if error is not None:
                raise error

    @_full_disk_is_store_full
    async def settle(self) -> None:
        """Wait for the durability steps; raise the first that failed."""
        if self._durable is not None:
            await self._durable

    def _checkpoint(self) -> None:
        assert self._fd is not None and self._chunk is not None and self._chunk_hash is not None
        fd, idx = self._fd, self._chunk.idx
        durable, digest = self.offset - self._chunk.offset, self._chunk_hash.hexdigest()

        async def step() -> None:
            await asyncio.to_thread(os.fsync, fd)
            self.store.db.execute("UPDATE chunks SET durable=?, xxh3=? WHERE digest=? AND idx=?",
                                  (durable, digest, self.blob.digest, idx))

        self._then(step)
        self._since_checkpoint = 0

    def _complete_chunk(self) -> None:
        assert self._fd is not None and self._chunk is not None and self._chunk_hash is not None
        fd, chunk, digest = self._fd, self._chunk, self._chunk_hash.hexdigest()
        del self._fds[chunk.idx]
        self._fd = self._chunk = None

        async def step() -> None:
            try:
                await asyncio.to_thread(os.fsync, fd)
            finally:
                os.close(fd)
            part = self.store.chunk_path(self.blob.digest, chunk.idx, partial=True)
            os.replace(part, self.store.chunk_path(self.blob.digest, chunk.idx))
            self.store.adopt_chunk(self.blob.digest, chunk.idx, chunk.length, digest)

        self._then(step)
        self._since_checkpoint = 0

    @_full_disk_is_store_full
    async def verify(self) -> None:
        """All bytes written: check them against the digest; discard the blob and raise if
        they do not match. Once this passes, the bytes may be served whole."""
        if self.blob.size == 0:
            self._write_empty()
        if self.offset != self.blob.size:
            raise DigestMismatch(
                f"blob {self.blob.digest}: got {self.offset} bytes, expected {self.blob.size}")
        assert self._hasher is not None  # set by prepare
        got = self._hasher.hexdigest()
        if got != self.blob.digest:
            with contextlib.suppress(OSError, sqlite3.Error):
                await self.settle()
            self.store.remove(self.blob.digest)
            raise DigestMismatch(
                f"blob {self.blob.digest}: content hashes to {got}; discarded, never served")

    @_full_disk_is_store_full
    async def finish(self) -> None:
        """After verify(): once every chunk is durable, mark the blob complete."""
        await self.settle()
        self.store.mark_complete(self.blob.digest)

    def _write_empty(self) -> None:
        path = self.store.chunk_path(self.blob.digest, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        self.store.db.execute(
            "UPDATE chunks SET complete=1, durable=0, xxh3=? WHERE digest=? AND idx=0",
            (_xxh3_empty(), self.blob.digest))

    async def close(self) -> None:
        """Stop writing (error or shutdown): make what was written durable for a resume."""
        try:
            await self.quiesce()
            await self.settle()
        finally:
            try:
                if self._fd is not None and self._since_checkpoint:
                    self._checkpoint()
                    await self.settle()
            finally:
                for fd in self._fds.values():
                    os.close(fd)
                self._fds.clear()
                self._fd = self._chunk = None


def _pwrite_all(writes: list[tuple[int, int, memoryview]]) -> None:
    """Each (file, offset, bytes) written whole."""
    for fd, at, data in writes:
        while data:
            n = os.pwrite(fd, data, at)
            data, at = data[n:], at + n


def xxh3_of_file(path: Path, length: int) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        remaining = length
        while remaining:
            data = f.read(min(READ_BLOCK * 8, remaining))
            if not data:
                raise OSError(f"{path} is shorter than {length} bytes")
            h.update(data)
            remaining -= len(data)
    return h.hexdigest()


def _xxh3_empty() -> str:
    return xxhash.xxh3_128().hexdigest()


def _ignore_missing() -> contextlib.suppress:
    return contextlib.suppress(FileNotFoundError)

"""The peer API's JSON messages, parsed strictly where they arrive: a field that is missing, of
another type or out of range is a BadMessage naming it. A peer that holds the cluster key can
still be broken, so nothing a peer says is used before it went through here."""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

from . import hubnames
from .errors import BadMessage, InvalidName
from .transfer import TransferSource

MAX_NAME = 256
MAX_FILES = 100_000
MAX_MEMBERS = 4096  # nodes of one warm job
MAX_SIZE = 1 << 50  # 1 PiB: larger is a lie
MAX_LABEL = 1024  # repo/path of a transfer
MAX_SINCE = 1e9  # seconds: a transfer's age in a message
MAX_READS = 4096  # blobs one node reads from the upstream at once
MAX_STATUS_TRANSFERS = 64  # a node lists at most this many of its transfers in its status
MAX_MAPS = 32  # chunk maps asked of one peer in one request (the URL stays under 4 KB)
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
NODE_ID_RE = _HEX32
JOB_ID_RE = re.compile(r"[0-9a-f]{12}")

T = TypeVar("T")


class JobState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    STOPPED = "stopped"  # the daemon stopped; it resumes at the next start


def _obj(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise BadMessage(f"{what}: expected an object, got {type(value).__name__}")
    return value


def _get(d: dict[str, object], key: str, kind: type[T], default: T | None = None) -> T:
    value = d.get(key, default)
    # bool is an int in Python; a peer sending true for a count is still wrong
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadMessage(f"field {key!r}: expected {kind.__name__}, got {value!r:.60}")
    return value


def _text(d: dict[str, object], key: str, default: str | None = None,
          pattern: re.Pattern[str] | None = None, max_len: int = MAX_NAME) -> str:
    value = _get(d, key, str, default)
    if len(value) > max_len or (pattern is not None and not pattern.fullmatch(value)):
        raise BadMessage(f"field {key!r}: {value!r:.60} is not a valid value")
    return value


def _count(d: dict[str, object], key: str, default: int | None = None, hi: int = MAX_SIZE) -> int:
    value = _get(d, key, int, default)
    if not 0 <= value <= hi:
        raise BadMessage(f"field {key!r}: {value} is out of range")
    return value


def _number(d: dict[str, object], key: str, default: float = 0.0) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise BadMessage(f"field {key!r}: expected a number, got {value!r:.60}")
    return float(value)


def _seconds(d: dict[str, object], key: str, default: float) -> float:
    value = _number(d, key, default)
    if not 0 <= value <= MAX_SINCE:
        raise BadMessage(f"field {key!r}: {value} is out of range")
    return value


def _choice(d: dict[str, object], key: str, kind: Callable[[str], T], default: str | None = None
            ) -> T:
    value = _get(d, key, str, default)
    try:
        return kind(value)
    except ValueError as e:
        raise BadMessage(f"field {key!r}: {value!r:.60} is not one of the known values") from e


def _named(parse: Callable[[str], str], value: str, key: str) -> str:
    try:
        return parse(value)
    except InvalidName as e:
        raise BadMessage(f"field {key!r}: {e}") from e


# --- transfers, in chunk maps and in status -----------------------------------------------
@dataclasses.dataclass(frozen=True)
class PeerTransfer:
    """What a peer says about its own transfer of a blob."""
    source: TransferSource  # where it gets the bytes now
    available: int  # bytes of the blob's prefix it can serve
    rate: float  # bytes/s its prefix grows by (0 until it has been measured a while)
    feeder: str = ""  # the node it relays from now ("" for none)
    # bytes/s arriving from its source, in order or not (an upstream fetcher's segments; 0:
    # not measured, or a node that does not say)
    received: float = 0.0
    probing: bool = False  # reading a few MiB from the upstream to measure it
    leaf: bool = False  # a slow node, overtaken: it relays to no peer
    # seconds since it took its source (its rates ramp up for a while); a node that does not
    # say counts as long ago
    since: float = MAX_SINCE


def transfer_fields(state: PeerTransfer) -> dict[str, object]:
    """A transfer as peers send it (read back by _peer_transfer)."""
    return {"transfer": state.source.value, "available": state.available,
            "rate": round(state.rate), "feeder": state.feeder, "received": round(state.received),
            "probing": state.probing, "leaf": state.leaf, "since": round(state.since, 2)}


def _peer_transfer(d: dict[str, object]) -> PeerTransfer | None:
    source = _choice(d, "transfer", TransferSource, "")
    if source is TransferSource.NONE:
        return None
    feeder = _text(d, "feeder", "")
    if feeder and not NODE_ID_RE.fullmatch(feeder):
        raise BadMessage(f"field 'feeder': {feeder!r:.60} is not a node id")
    return PeerTransfer(source, _count(d, "available", 0), float(_count(d, "rate", 0)), feeder,
                        float(_count(d, "received", 0)), _get(d, "probing", bool, False),
                        _get(d, "leaf", bool, False), _seconds(d, "since", MAX_SINCE))


@dataclasses.dataclass(frozen=True)
class BlobTransfer:
    """One blob a node is transferring, as its status tells the cluster (to show the plan)."""
    digest: str
    label: str  # repo/path, for people
    size: int
    state: PeerTransfer

    def to_json(self) -> dict[str, object]:
        return {"digest": self.digest, "label": self.label, "size": self.size,
                **transfer_fields(self.state)}


def parse_blob_transfer(value: object) -> BlobTransfer:
    d = _obj(value, "transfer")
    digest = _named(hubnames.any_digest, _text(d, "digest"), "digest")
    size = _count(d, "size")
    state = _peer_transfer(d)
    if state is None:
        raise BadMessage("field 'transfer': a listed transfer needs a source")
    if state.available > size:
        raise BadMessage(f"field 'available': {state.available} is past the blob's {size} bytes")
    return BlobTransfer(digest, _text(d, "label", "", max_len=MAX_LABEL), size, state)


# --- GET /status --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NodeStatus:
    node_id: str
    name: str
    version: str
    bt_port: int
    chunks: int
    transfers: tuple[BlobTransfer, ...] = ()


def parse_status(value: object) -> NodeStatus:
    d = _obj(value, "status")
    items = _get(d, "transfers", list, [])
    if len(items) > MAX_STATUS_TRANSFERS:
        raise BadMessage(f"field 'transfers': {len(items)} transfers, at most "
                         f"{MAX_STATUS_TRANSFERS} are listed")
    return NodeStatus(_text(d, "node_id", pattern=NODE_ID_RE), _text(d, "name", ""),
                      _text(d, "version", ""), _count(d, "bt_port", 0, hi=65535),
                      _count(d, "chunks", 0), tuple(parse_blob_transfer(t) for t in items))


# --- GET /chunks/{digest} -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HeldChunk:
    index: int
    info_hash: str  # "" when its torrent is not made yet


@dataclasses.dataclass(frozen=True)
class ChunkMap:
    chunks: list[HeldChunk]
    small: bool  # the whole blob, small enough to travel over the peer API
    transfer: PeerTransfer | None  # None: the peer does not transfer the blob
    upstream_rate: float  # what the upstream gave that node lately, bytes/s (0: not known)
    upstream_intake: float = 0.0  # what that node reads from the upstream now, all blobs, B/s
    upstream_reads: int = 0  # how many blobs that node reads from the upstream now
    stood_in: bool = False  # never sent: an earlier answer given for a late one (chunkmaps.py)


def parse_chunk_map(value: object, digest: str, max_chunks: int) -> ChunkMap:
    d = _obj(value, "chunk map")
    if d.get("digest") != digest:
        raise BadMessage(f"field 'digest': a map of {str(d.get('digest'))[:64]!r}, not of "
                         f"{digest}")
    items = _get(d, "chunks", list, [])
    if len(items) > max_chunks:
        raise BadMessage(f"field 'chunks': {len(items)} chunks, the blob has {max_chunks}")
    chunks = []
    for item in items:
        c = _obj(item, "chunk")
        index = _count(c, "index", hi=max_chunks - 1)
        info_hash = _text(c, "info_hash", "")
        if info_hash and not _HEX40.fullmatch(info_hash):
            raise BadMessage(f"field 'info_hash': {info_hash!r:.60} is not an info-hash")
        chunks.append(HeldChunk(index, info_hash))
    return ChunkMap(chunks, _get(d, "small", bool, False), _peer_transfer(d),
                    float(_count(d, "upstream_rate", 0)), float(_count(d, "upstream_intake", 0)),
                    _count(d, "upstream_reads", 0, hi=MAX_READS))


def parse_map_query(digests: list[str]) -> list[str]:
    """The blobs a peer asks the chunk maps of in one request: 1 to MAX_MAPS distinct digests."""
    if not 0 < len(digests) <= MAX_MAPS:
        raise BadMessage(f"{len(digests)} blobs asked at once; 1 to {MAX_MAPS}, please")
    if len(set(digests)) < len(digests):
        raise BadMessage("a blob was asked twice")
    for d in digests:
        _named(hubnames.any_digest, d, "digest")
    return digests


def parse_chunk_maps(value: object, chunks: Mapping[str, int]) -> dict[str, ChunkMap]:
    """The chunk maps of exactly the blobs asked for, by digest (`chunks`: digest -> how
    many chunks the blob has), in one answer: {"maps": [map, ...]}."""
    items = _get(_obj(value, "chunk maps"), "maps", list)
    if len(items) != len(chunks):
        raise BadMessage(f"field 'maps': {len(items)} maps for {len(chunks)} blobs asked")
    maps: dict[str, ChunkMap] = {}
    for item in items:
        digest = _obj(item, "chunk map").get("digest")
        if not isinstance(digest, str) or digest not in chunks or digest in maps:
            raise BadMessage(f"field 'digest': {str(digest)[:64]!r} was not asked for, or "
                             "came twice")
        maps[digest] = parse_chunk_map(item, digest, chunks[digest])
    return maps


# --- warm jobs ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WarmFile:
    path: str
    digest: str
    algo: str  # sha256 (LFS) or gitsha1
    size: int
    lfs: bool


@dataclasses.dataclass(frozen=True)
class WarmSpec:
    """A warm job as the coordinator hands it out; the token travels sealed."""
    id: str
    repo_type: str
    repo_id: str
    revision: str
    commit: str
    files: tuple[WarmFile, ...]
    sealed_token: str | None
    pin: bool = False  # each node pins the revision before its files arrive
    members: tuple[str, ...] = ()  # the node ids the job was given to, the coordinator's first

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "repo_type": self.repo_type, "repo_id": self.repo_id,
                "revision": self.revision, "commit": self.commit,
                "sealed_token": self.sealed_token, "pin": self.pin,
                "files": [dataclasses.asdict(f) for f in self.files],
                "members": list(self.members)}


def parse_warm_file(value: object) -> WarmFile:
    d = _obj(value, "file")
    algo = _text(d, "algo")
    lfs = _get(d, "lfs", bool)
    if lfs != (algo == "sha256"):
        raise BadMessage(f"field 'lfs': {lfs} does not go with a {algo!r} digest")
    return WarmFile(_named(hubnames.file_path, _text(d, "path", max_len=hubnames.MAX_PATH),
                           "path"),
                    _named(lambda v: hubnames.digest(v, algo), _text(d, "digest"), "digest"),
                    algo, _count(d, "size"), lfs)


def _files(d: dict[str, object]) -> tuple[WarmFile, ...]:
    items = _get(d, "files", list)
    if len(items) > MAX_FILES:
        raise BadMessage(f"field 'files': {len(items)} files is more than {MAX_FILES}")
    files = tuple(parse_warm_file(f) for f in items)
    if len({f.path for f in files}) != len(files):
        raise BadMessage("field 'files': a path is listed twice")
    return files


def parse_warm_spec(value: object) -> WarmSpec:
    d = _obj(value, "warm job")
    files = _files(d)
    sealed = d.get("sealed_token")
    if sealed is not None:
        sealed = _text(d, "sealed_token", max_len=8192)
    repo_type = _named(hubnames.repo_type, _text(d, "repo_type"), "repo_type")
    repo_id = _named(lambda v: hubnames.repo_id(v.split("/")), _text(d, "repo_id"), "repo_id")
    return WarmSpec(_text(d, "id", pattern=JOB_ID_RE), repo_type, repo_id,
                    _named(hubnames.revision, _text(d, "revision"), "revision"),
                    _named(hubnames.commit, _text(d, "commit"), "commit"), files, sealed,
                    _get(d, "pin", bool, False), _members(d))


def _members(d: dict[str, object]) -> tuple[str, ...]:
    items = _get(d, "members", list, [])
    if len(items) > MAX_MEMBERS:
        raise BadMessage(f"field 'members': {len(items)} nodes is more than {MAX_MEMBERS}")
    if not all(isinstance(n, str) and NODE_ID_RE.fullmatch(n) for n in items):
        raise BadMessage("field 'members': a member that is not a node id")
    if len(set(items)) != len(items):
        raise BadMessage("field 'members': a node is listed twice")
    return tuple(items)


# --- GET /repo/{type}/{id}?revision= ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RepoListing:
    """The files of a public repo at the commit a revision names, as a peer knows them."""
    commit: str
    files: tuple[WarmFile, ...]

    def to_json(self) -> dict[str, object]:
        return {"commit": self.commit, "files": [dataclasses.asdict(f) for f in self.files]}


def parse_repo_listing(value: object) -> RepoListing:
    d = _obj(value, "repo listing")
    files = _files(d)
    if not files:
        raise BadMessage("field 'files': a listing without files")
    return RepoListing(_named(hubnames.commit, _text(d, "commit"), "commit"), files)


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """A node's view of a warm job (GET /warm/{job})."""
    state: JobState
    error: str
    files: int
    done_files: int
    bytes: int
    have_bytes: int
    repo: str
    started: float
    finished: float

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def parse_job_status(value: object) -> JobStatus:
    d = _obj(value, "job status")
    return JobStatus(_choice(d, "state", JobState), _text(d, "error", "", max_len=4096),
                     _count(d, "files", hi=MAX_FILES), _count(d, "done_files", hi=MAX_FILES),
                     _count(d, "bytes"), _count(d, "have_bytes"), _text(d, "repo", ""),
                     _number(d, "started"), _number(d, "finished"))


def parse_job_id(value: object) -> str:
    """The answer to POST /warm and POST /warm/{job}/cancel."""
    return _text(_obj(value, "job answer"), "job", pattern=JOB_ID_RE)


def parse_sealed_token(value: object) -> str:
    return _text(_obj(value, "token answer"), "sealed_token", max_len=8192)

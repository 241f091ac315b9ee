"""The bundle format: one revision of one repo as a plain tar, checkable byte by byte.

Members, in this order (ustar, mtime 0, no owner names):

    modelpeer-bundle.json         the manifest (canonical JSON): format, repo type and id, the
                                  revisions naming the commit, the commit, whether the exporting
                                  node served the repo to everyone, and every file: path, digest
                                  (sha256 for LFS, git blob sha1 otherwise), algo, size, lfs
    modelpeer-bundle.json.sha256  "<sha256 of the manifest>  modelpeer-bundle.json" (sha256sum -c)
    blobs/<digest>                each distinct blob once, in the manifest's order
    two zero blocks               the end of the archive (nothing but zeros may follow)

So `tar tf` lists it, and a reader can check everything as it streams: the manifest against its
sha256 before any bytes, every tar header against its checksum and the manifest, every blob
against its digest, every padding byte. This module knows only the format; the daemon's import
and export are in ingest.py, the CLI builds bundles from HF caches with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable

from . import hubnames
from .errors import BundleError
from .peermsg import MAX_FILES, WarmFile, parse_warm_file

FORMAT = "modelpeer-bundle/1"
MANIFEST = "modelpeer-bundle.json"
MANIFEST_SUM = MANIFEST + ".sha256"
BLOCK = 512
MAX_MANIFEST = 64 * 1024 * 1024
CONTENT_TYPE = "application/x-tar"


@dataclasses.dataclass(frozen=True)
class Manifest:
    repo_type: str
    repo_id: str
    revisions: tuple[str, ...]  # branch or tag names that pointed at the commit
    commit: str
    public: bool  # the exporting node served it without a token (a claim, see security.md)
    files: tuple[WarmFile, ...]

    def blobs(self) -> list[WarmFile]:
        """One file per distinct digest, in the manifest's order: the blob members."""
        seen: dict[str, WarmFile] = {}
        for f in self.files:
            seen.setdefault(f.digest, f)
        return list(seen.values())

    def to_json(self) -> dict[str, object]:
        return {"format": FORMAT, "repo_type": self.repo_type, "repo_id": self.repo_id,
                "revisions": list(self.revisions), "commit": self.commit, "public": self.public,
                "files": [dataclasses.asdict(f) for f in self.files]}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()

    def archive_size(self) -> int:
        """The bundle's length in bytes, known before any of it is written."""
        members = [len(self.to_bytes()), len(_sum_line(self.to_bytes()))]
        members += [f.size for f in self.blobs()]
        return sum(BLOCK + _padded(n) for n in members) + 2 * BLOCK


def parse_manifest(data: bytes) -> Manifest:
    """The manifest, checked field by field (names as the Hub allows them); ValueError if not."""
    try:
        d = json.loads(data)
    except ValueError as e:
        raise ValueError(f"the manifest is not JSON: {e}") from e
    return manifest_from_json(d)


def manifest_from_json(d: object) -> Manifest:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} manifest")
    files, revisions = d.get("files"), d.get("revisions")
    if not isinstance(files, list) or len(files) > MAX_FILES:
        raise ValueError(f"field 'files': a list of at most {MAX_FILES} files")
    if not isinstance(revisions, list) or not all(isinstance(r, str) for r in revisions):
        raise ValueError("field 'revisions': a list of names")
    if not isinstance(d.get("public"), bool):
        raise ValueError("field 'public': true or false")
    parsed = tuple(parse_warm_file(f) for f in files)
    if len({f.path for f in parsed}) != len(parsed):
        raise ValueError("field 'files': a path is listed twice")
    return Manifest(
        hubnames.repo_type(_str(d, "repo_type")),
        hubnames.repo_id(_str(d, "repo_id").split("/")),
        tuple(hubnames.revision(r) for r in revisions),
        hubnames.commit(_str(d, "commit")), d["public"], parsed)


def _str(d: dict[str, object], key: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r}: expected a string")
    return value


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _sum_line(manifest: bytes) -> bytes:
    return f"{hashlib.sha256(manifest).hexdigest()}  {MANIFEST}\n".encode()


def member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def padding(size: int) -> bytes:
    return b"\0" * (_padded(size) - size)


def blob_member(digest: str) -> str:
    return f"blobs/{digest}"


def head(manifest: Manifest) -> bytes:
    """The archive up to the first blob member: the manifest and its checksum."""
    data = manifest.to_bytes()
    line = _sum_line(data)
    return (member_header(MANIFEST, len(data)) + data + padding(len(data))
            + member_header(MANIFEST_SUM, len(line)) + line + padding(len(line)))


def end() -> bytes:
    return b"\0" * (2 * BLOCK)


class Reader:
    """Reads a bundle from a stream, in order, checking each byte's place in the format.
    `read(n)` returns up to n bytes, fewer only at the end of the stream."""

    def __init__(self, read: Callable[[int], Awaitable[bytes]]) -> None:
        self._read = read
        self.offset = 0

    async def _exactly(self, n: int, what: str) -> bytes:
        data = await self._read(n)
        if len(data) != n:
            raise BundleError(f"the archive ends inside {what}: it is truncated",
                              self.offset + len(data))
        self.offset += n
        return data

    async def header(self, name: str, size: int | None = None) -> int:
        """The next member's header, which must name `name` (and `size`); its size."""
        at = self.offset
        raw = await self._exactly(BLOCK, f"the header of {name}")
        try:
            info = tarfile.TarInfo.frombuf(raw, "utf-8", "strict")
        except tarfile.HeaderError as e:
            raise BundleError(f"the header of {name} is damaged ({e})", at) from e
        if raw != member_header(info.name, info.size):
            raise BundleError(f"the header of {name} is not a bundle header", at)
        if info.name != name or (size is not None and info.size != size):
            raise BundleError(f"expected member {name} ({size} bytes), found {info.name} "
                              f"({info.size} bytes)", at)
        return info.size

    async def data(self, name: str, size: int, block: int) -> AsyncIterator[bytes]:
        """The member's bytes in pieces of up to `block`, then its padding (zeros)."""
        left = size
        while left:
            piece = await self._exactly(min(block, left), name)
            left -= len(piece)
            yield piece
        await self._zeros(_padded(size) - size, f"the padding of {name}")

    async def member(self, name: str, max_size: int) -> bytes:
        size = await self.header(name)
        if size > max_size:
            raise BundleError(f"{name} is {size} bytes, more than {max_size}", self.offset)
        return b"".join([piece async for piece in self.data(name, size, size or 1)])

    async def manifest(self) -> Manifest:
        data = await self.member(MANIFEST, MAX_MANIFEST)
        at = self.offset
        line = await self.member(MANIFEST_SUM, 1024)
        if line != _sum_line(data):
            raise BundleError(f"{MANIFEST} does not match its sha256 in {MANIFEST_SUM}", at)
        try:
            return parse_manifest(data)
        except ValueError as e:
            raise BundleError(f"bad manifest: {e}", BLOCK) from e

    async def end(self) -> None:
        """Two zero blocks, then nothing but zeros (tar pads to whole records)."""
        await self._zeros(2 * BLOCK, "the end-of-archive blocks")
        while rest := await self._read(64 * 1024):
            if rest.count(0) != len(rest):
                raise BundleError("data after the end of the archive", self.offset)
            self.offset += len(rest)

    async def _zeros(self, n: int, what: str) -> None:
        at = self.offset
        if n and (await self._exactly(n, what)).count(0) != n:
            raise BundleError(f"non-zero bytes in {what}", at)

"""The bundle format read strictly: every single-bit flip and every truncation of a bundle is
refused, by the reader or by a blob's digest, exhaustively over a small bundle."""

from __future__ import annotations

import hashlib

import pytest

from modelpeer.daemon.bundle import Manifest, Reader, blob_member, end, head, member_header, padding
from modelpeer.daemon.errors import BundleError
from modelpeer.daemon.peermsg import WarmFile
from modelpeer.daemon.store import BlobId, blob_hasher

CONTENT = {"config.json": b'{"a": 1}\n', "w.bin": bytes(range(256)) * 3 + b"tail"}


def _file(path: str, data: bytes) -> WarmFile:
    if path.endswith(".bin"):
        return WarmFile(path, hashlib.sha256(data).hexdigest(), "sha256", len(data), True)
    digest = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return WarmFile(path, digest, "gitsha1", len(data), False)


MANIFEST = Manifest("model", "acme/tiny", ("main",), "c" * 40, True,
                    tuple(_file(p, d) for p, d in CONTENT.items()))
BY_DIGEST = {f.digest: CONTENT[f.path] for f in MANIFEST.files}


def bundle() -> bytes:
    parts = [head(MANIFEST)]
    for f in MANIFEST.blobs():
        parts += [member_header(blob_member(f.digest), f.size), BY_DIGEST[f.digest],
                  padding(f.size)]
    return b"".join([*parts, end()])


async def read_and_check(data: bytes) -> Manifest:
    """What ingest.py does with a bundle, minus the store: every blob against its digest."""
    pos = 0

    async def read(n: int) -> bytes:
        nonlocal pos
        pos += n
        return data[pos - n:pos]

    reader = Reader(read)
    manifest = await reader.manifest()
    for f in manifest.blobs():
        await reader.header(blob_member(f.digest), f.size)
        h = blob_hasher(BlobId(f.digest, f.algo, f.size))
        async for piece in reader.data(f.path, f.size, 100):
            h.update(piece)
        if h.hexdigest() != f.digest:
            raise BundleError(f"{f.path} does not match its digest", reader.offset)
    await reader.end()
    return manifest


async def test_a_bundle_reads_back_and_has_the_size_it_announces() -> None:
    data = bundle()
    assert len(data) == MANIFEST.archive_size()
    assert await read_and_check(data) == MANIFEST
    assert await read_and_check(data + b"\0" * 9216) == MANIFEST  # tar's record padding


async def test_every_bit_flip_is_refused() -> None:
    data = bundle()
    for at in range(len(data)):
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[at] ^= bit
            with pytest.raises(BundleError):
                await read_and_check(bytes(damaged))


async def test_every_truncation_and_trailing_data_is_refused() -> None:
    data = bundle()
    for length in range(len(data)):
        with pytest.raises(BundleError, match="truncated"):
            await read_and_check(data[:length])
    with pytest.raises(BundleError, match="after the end"):
        await read_and_check(data + b"x")

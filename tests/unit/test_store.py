"""The chunk store on a real disk: atomic chunks, digests, checkpoints, recovery, verify."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from pathlib import Path

import pytest

from modelpeer.daemon import store as store_module
from modelpeer.daemon.errors import ChunkDamaged, DigestMismatch
from modelpeer.daemon.index import open_index
from modelpeer.daemon.store import CHECKPOINT, SLOW_WRITE, BlobId, Store
from tests.harness import MiB


def make_store(root: Path) -> Store:
    return Store(root, open_index(root / "index.sqlite3"), chunk_size=4 * MiB)


def blob_of(data: bytes) -> BlobId:
    return BlobId(hashlib.sha256(data).hexdigest(), "sha256", len(data))


async def write(store: Store, blob: BlobId, data: bytes, upto: int | None = None) -> None:
    writer = store.open_writer(blob)
    await writer.prepare()
    end = len(data) if upto is None else upto
    for pos in range(writer.offset, end, 1_000_003):
        await writer.write(data[pos:min(end, pos + 1_000_003)])
    if upto is None:
        await writer.verify()
        await writer.finish()
    await writer.close()


@pytest.fixture
def data() -> bytes:
    return random.Random(7).randbytes(10 * MiB + 12345)


async def test_blob_round_trip_across_chunks(tmp_path: Path, data: bytes) -> None:
    store = make_store(tmp_path)
    blob = blob_of(data)
    await write(store, blob, data)
    assert store.is_complete(blob.digest)
    assert [c.complete for c in store.chunks(blob)] == [True, True, True]
    assert store.read(blob, 0, len(data)) == data
    assert store.read(blob, 4 * MiB - 10, 20) == data[4 * MiB - 10:4 * MiB + 10]
    assert not list(tmp_path.glob("chunks/*/*.part"))


async def test_git_blob_digest_and_empty_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    for content in (b"hello\n", b""):
        digest = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        blob = BlobId(digest, "gitsha1", len(content))
        await write(store, blob, content)
        assert store.is_complete(digest)
        assert store.read(blob, 0, len(content)) == content


async def test_wrong_bytes_are_discarded(tmp_path: Path, data: bytes) -> None:
    store = make_store(tmp_path)
    blob = blob_of(data)
    bad = bytearray(data)
    bad[5 * MiB] ^= 0xFF
    with pytest.raises(DigestMismatch):
        await write(store, blob, bytes(bad))
    assert not store.is_complete(blob.digest)
    assert not list(tmp_path.glob("chunks/*/*"))


async def test_killed_writer_resumes_at_last_checkpoint(tmp_path: Path, data: bytes) -> None:
    store = make_store(tmp_path)
    blob = blob_of(data)
    await write(store, blob, data, upto=6 * MiB + 777)
    store.db.close()
    # garbage past the durable point (as after a crash) must be cut off at start
    part = next(tmp_path.glob("chunks/*/*.part"))
    with open(part, "ab") as f:
        f.write(b"garbage")

    store = make_store(tmp_path)
    stats = await store.recover()
    assert stats == {"good": 1, "dropped": 0, "partial": 2, "adopted": 0}
    assert store.contiguous_prefix(blob) == 6 * MiB + 777
    await write(store, blob, data)
    assert store.is_complete(blob.digest)
    assert store.read(blob, 0, len(data)) == data


async def test_bytes_put_ahead_count_once_committed_in_order(tmp_path: Path,
                                                             data: bytes) -> None:
    store = make_store(tmp_path)
    blob = blob_of(data)
    writer = store.open_writer(blob)
    await writer.prepare()
    # segments as several connections deliver them: later ones first, across chunk ends
    cuts = [0, 3 * MiB, 5 * MiB, 9 * MiB, len(data)]
    for a, b in reversed(list(zip(cuts, cuts[1:], strict=False))):
        await writer.put(a, [data[a:a + MiB], data[a + MiB:b]])
    assert writer.offset == 0
    await writer.commit(len(data))
    await writer.verify()
    await writer.finish()
    await writer.close()
    assert store.is_complete(blob.digest)
    assert store.read(blob, 0, len(data)) == data
    assert not list(tmp_path.glob("chunks/*/*.part"))


@pytest.mark.parametrize("how", ["put ahead", "in order"])
async def test_writes_leave_the_event_loop_once_one_was_slow(
        tmp_path: Path, data: bytes, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Bytes received are written (in order: and hashed) on the event loop's thread, the core
    that received them, while the disk keeps up; once a write took longer than SLOW_WRITE (a
    disk the kernel throttles), in threads, so the event loop is not held by the disk."""
    loop_thread = threading.get_ident()
    on_loop: list[bool] = []
    pwrite_all = store_module._pwrite_all

    def slow_second(writes: list[tuple[int, int, memoryview]]) -> None:
        on_loop.append(threading.get_ident() == loop_thread)
        if len(on_loop) == 2:
            time.sleep(2 * SLOW_WRITE)
        pwrite_all(writes)

    monkeypatch.setattr(store_module, "_pwrite_all", slow_second)
    store = make_store(tmp_path)
    data = data[:4 * MiB]  # 1 MiB pieces: one pwrite each
    blob = blob_of(data)
    writer = store.open_writer(blob)
    await writer.prepare()
    for a in range(0, len(data), MiB):
        if how == "put ahead":
            await writer.put(a, [data[a:a + MiB]])
        else:
            await writer.write(data[a:a + MiB])
    if how == "put ahead":
        await writer.commit(len(data))
    await writer.verify()
    await writer.finish()
    await writer.close()
    assert on_loop == [True, True, False, False]
    assert store.read(blob, 0, len(data)) == data


async def test_bytes_put_ahead_are_lost_unless_committed(tmp_path: Path, data: bytes) -> None:
    store = make_store(tmp_path)
    blob = blob_of(data)
    writer = store.open_writer(blob)
    await writer.prepare()
    await writer.put(0, [data[:MiB]])
    await writer.put(5 * MiB, [b"x" * MiB])  # wrong bytes, never committed
    await writer.commit(MiB)
    await writer.close()
    store.db.close()

    store = make_store(tmp_path)
    await store.recover()
    assert store.contiguous_prefix(blob) == MiB
    await write(store, blob, data)
    assert store.read(blob, 0, len(data)) == data


async def test_checkpoints_make_partial_chunks_durable(tmp_path: Path) -> None:
    store = Store(tmp_path, open_index(tmp_path / "index.sqlite3"), chunk_size=64 * MiB)
    data = random.Random(3).randbytes(CHECKPOINT * 2 + 5)
    blob = blob_of(data)
    writer = store.open_writer(blob)
    await writer.prepare()
    await writer.write(data[: CHECKPOINT + 100])
    await writer.settle()  # the checkpoint's fsync runs behind the writes
    # no close(): as if killed right now
    assert store.contiguous_prefix(blob) == CHECKPOINT + 100


async def test_a_chunk_damaged_while_down_is_never_read_and_is_dropped(tmp_path: Path,
                                                                     data: bytes) -> None:
    store = make_store(tmp_path)
    blob = blob_of(data)
    await write(store, blob, data)
    chunk1 = store.chunk_path(blob.digest, 1)
    raw = bytearray(chunk1.read_bytes())
    raw[100] ^= 1
    chunk1.write_bytes(bytes(raw))
    store.db.close()

    store = make_store(tmp_path)
    stats = await store.recover()  # lengths only: the hashing comes after the start
    assert stats["good"] == 3 and len(store.unchecked) == 3
    assert store.read(blob, 0, 100) == data[:100]
    with pytest.raises(ChunkDamaged):
        store.read(blob, 4 * MiB, 200)
    with pytest.raises(ChunkDamaged):
        await store.check_span(blob.digest, 4 * MiB - 10, 4 * MiB + 10)
    assert not store.is_complete(blob.digest)
    assert store.contiguous_prefix(blob) == 4 * MiB
    assert await store.check_unchecked() == 0  # the rest was good
    assert store.unchecked == {}


async def test_the_check_behind_the_start_drops_damaged_chunks(tmp_path: Path,
                                                               data: bytes) -> None:
    store = make_store(tmp_path)
    blob = blob_of(data)
    await write(store, blob, data)
    with open(store.chunk_path(blob.digest, 2), "r+b") as f:
        f.write(b"X")
    store.db.close()

    store = make_store(tmp_path)
    await store.recover()
    assert store.is_complete(blob.digest)
    assert await store.check_unchecked() == 1
    assert not store.is_complete(blob.digest)
    assert store.contiguous_prefix(blob) == 8 * MiB


async def test_verify_finds_and_drops_bad_chunks(tmp_path: Path, data: bytes) -> None:
    store = make_store(tmp_path)
    blob = blob_of(data)
    await write(store, blob, data)
    assert await store.verify(full=True) == []
    path = store.chunk_path(blob.digest, 2)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    problems = await store.verify(full=False)
    assert [(p["chunk"], p["error"]) for p in problems] == [(2, "xxh3")]
    assert not store.is_complete(blob.digest)


async def test_eviction_is_least_recently_used(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    blobs = []
    for seed in range(3):
        d = random.Random(seed).randbytes(MiB)
        blobs.append(blob_of(d))
        await write(store, blobs[-1], d)
    store.db.execute("UPDATE blobs SET last_access=? WHERE digest=?", (1, blobs[1].digest))
    removed = store.evict(int(2.5 * MiB))
    assert removed == [blobs[1].digest]
    assert store.usage().complete_blobs == 2


async def test_a_store_reopened_with_another_chunk_size_forgets_its_blobs(
        tmp_path: Path, data: bytes) -> None:
    store = make_store(tmp_path)
    blob = blob_of(data)
    await write(store, blob, data)
    store.db.close()

    store = Store(tmp_path, open_index(tmp_path / "index.sqlite3"), chunk_size=8 * MiB)
    await store.recover()
    assert not store.is_complete(blob.digest)  # never read through the wrong chunk layout
    assert not list(tmp_path.glob("chunks/*/*"))
    await write(store, blob, data)
    assert store.read(blob, 0, len(data)) == data

"""Pins keep a blob's bytes while they are used: eviction, gc and retire wait for the last one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from modelpeer.daemon.index import open_index
from modelpeer.daemon.store import BlobId, Store
from tests.harness import MiB


async def stored(store: Store, seed: int, size: int = MiB) -> BlobId:
    data = bytes([seed]) * size
    blob = BlobId(hashlib.sha256(data).hexdigest(), "sha256", size)
    writer = store.open_writer(blob)
    await writer.prepare()
    await writer.write(data)
    await writer.verify()
    await writer.finish()
    await writer.close()
    return blob


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path, open_index(tmp_path / "index.sqlite3"), chunk_size=MiB)


async def test_retire_waits_for_the_last_reader(store: Store) -> None:
    blob = await stored(store, 1)
    with store.pinned(blob.digest):
        with store.pinned(blob.digest):
            assert store.retire(blob.digest) == 0
        assert store.read(blob, 0, 10) == bytes([1]) * 10
        assert store.is_complete(blob.digest)
    assert not store.is_complete(blob.digest)
    assert not list(store.root.glob("chunks/*/*"))


async def test_retire_of_an_unpinned_blob_removes_it_at_once(store: Store) -> None:
    blob = await stored(store, 2)
    assert store.retire(blob.digest) == MiB
    assert not store.is_complete(blob.digest)


async def test_eviction_skips_pinned_blobs(store: Store) -> None:
    old, new = await stored(store, 3), await stored(store, 4)
    with store.pinned(old.digest):
        assert store.evict(MiB) == [new.digest]
    assert store.is_complete(old.digest)


async def test_writing_past_max_bytes_evicts_first(store: Store) -> None:
    old = await stored(store, 5)
    store.max_bytes = int(1.5 * MiB)
    new = await stored(store, 6)
    assert not store.is_complete(old.digest) and store.is_complete(new.digest)


async def test_a_write_evicts_a_read_blob_once_its_reader_leaves(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelpeer.daemon.store.ROOM_RETRY", 0.0)
    store.chunk_size = 4 * MiB
    old = await stored(store, 7)
    store.max_bytes = int(1.5 * MiB)
    data = bytes([8]) * MiB
    blob = BlobId(hashlib.sha256(data).hexdigest(), "sha256", MiB)
    writer = store.open_writer(blob)
    await writer.prepare()
    with store.pinned(old.digest):
        await writer.write(data[:1024])  # the chunk is opened: no room while old is read
    assert store.is_complete(old.digest)
    await writer.write(data[1024:])  # asks again: old goes before the blob is done
    assert not store.is_complete(old.digest)
    await writer.verify()
    await writer.finish()
    await writer.close()
    assert store.is_complete(blob.digest)

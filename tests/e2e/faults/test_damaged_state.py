"""State damaged while the daemon is down: it comes up, says what it found, never serves a wrong
byte, and keeps everything else it stored. Real daemons, the real Hub client, the fake Hub."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakehub import FakeHub, expected_files, file_sha256
from tests.harness import (
    HfHome,
    MiB,
    Modelpeerd,
    StartDaemon,
    cli,
    download,
    keyed_daemon,
    wait_for,
)
from tests.netlab import write_key

CHUNK = 8 * MiB  # the start_daemon fixture's --chunk-size
VICTIM, KEEPER = "faults/damaged", "faults/kept-whole"
Damage = Callable[[Path, str], str]  # (cache dir, victim digest) -> what the log must name


def chunk_file(cache: Path, digest: str, idx: int, suffix: str = "") -> Path:
    return cache / "chunks" / digest[:2] / f"{digest}.{idx}{suffix}"


def truncate_chunk(cache: Path, digest: str) -> str:
    path = chunk_file(cache, digest, 1)
    os.truncate(path, CHUNK // 2)
    return path.name


def flip_a_bit(idx: int) -> Damage:
    def damage(cache: Path, digest: str) -> str:
        path = chunk_file(cache, digest, idx)
        with open(path, "r+b") as f:
            f.seek(12345)
            byte = f.read(1)[0]
            f.seek(12345)
            f.write(bytes([byte ^ 0x10]))
        return path.name

    damage.__name__ = f"flip_a_bit_of_chunk_{idx}"
    return damage


def remove_chunk(cache: Path, digest: str) -> str:
    path = chunk_file(cache, digest, 1)
    path.unlink()
    return path.name


def half_written_temp_file(cache: Path, digest: str) -> str:
    """A torn `.part` left beside the complete chunk of the same name."""
    torn = chunk_file(cache, digest, 1, ".part")
    torn.write_bytes(chunk_file(cache, digest, 1).read_bytes()[:CHUNK // 3] + os.urandom(4096))
    return torn.name


def index_rows(cache: Path, *statements: str) -> None:
    db = sqlite3.connect(cache / "index.sqlite3")
    with db:
        for sql in statements:
            db.execute(sql)
    db.close()


def wrong_types_in_rows(cache: Path, digest: str) -> str:
    index_rows(cache, f"UPDATE chunks SET durable='lots' WHERE digest='{digest}' AND idx=1",
               f"UPDATE blobs SET size='big' WHERE digest='{digest}'",
               f"UPDATE files SET size=x'00ff' WHERE digest='{digest}'")
    return "index.sqlite3"


def unreadable_jobs_row(cache: Path, digest: str) -> str:
    index_rows(cache, "INSERT INTO jobs VALUES ('0000000000e1', '{\"id\": [1, 2', 'running', 0)",
               "INSERT INTO jobs VALUES ('0000000000e2', 42, 'running', 0)")
    return "0000000000e1"


def root_page(cache: Path, table: str) -> tuple[int, int]:
    """(root page number, page size) of a table of the index."""
    db = sqlite3.connect(cache / "index.sqlite3")
    try:
        page = db.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()
        return int(page[0]), int(db.execute("PRAGMA page_size").fetchone()[0])
    finally:
        db.close()


def garbage_page(table: str) -> Damage:
    def damage(cache: Path, digest: str) -> str:
        page, size = root_page(cache, table)
        with open(cache / "index.sqlite3", "r+b") as f:
            f.seek((page - 1) * size)
            f.write(os.urandom(size))
        return "index.sqlite3"

    damage.__name__ = f"garbage_page_of_{table}"
    return damage


def truncated_index(cache: Path, digest: str) -> str:
    path = cache / "index.sqlite3"
    os.truncate(path, path.stat().st_size // 2 + 100)
    return "index.sqlite3"


def garbage_index(cache: Path, digest: str) -> str:
    (cache / "index.sqlite3").write_bytes(os.urandom(64 * 1024))
    return "index.sqlite3"


@pytest.fixture(scope="module")
def repos(fakehub: FakeHub) -> None:
    fakehub.add_repo(VICTIM, {"weights.bin": {"size": 20 * MiB}})
    fakehub.add_repo(KEEPER, {"kept.bin": {"size": 12 * MiB}})


@pytest.mark.parametrize("damage", [
    truncate_chunk, flip_a_bit(0), flip_a_bit(1), remove_chunk, half_written_temp_file,
    wrong_types_in_rows, unreadable_jobs_row, garbage_page("files"), garbage_page("chunks"),
    garbage_page("blobs"), truncated_index, garbage_index,
], ids=lambda f: f.__name__)
def test_damage_while_down_is_found_and_nothing_else_is_lost(
        repos: None, start_daemon: StartDaemon, hub: FakeHub, hf_home: HfHome,
        damage: Damage) -> None:
    d = start_daemon()
    for repo, name in ((VICTIM, "weights.bin"), (KEEPER, "kept.bin")):
        assert download(d, hf_home(), repo, name) == expected_files(repo)[name]
    d.stop()
    named = damage(d.cache_dir, file_sha256(VICTIM, "weights.bin"))
    hub.reset()
    logged_before = d.log_size()
    restart(d)
    # the chunks' hashes are checked just behind the start
    wait_for(lambda: named in d.logged(since=logged_before), f"the log names {named}")
    assert d.status()["startup"]["problems"], "status says nothing of the damage"
    assert "problems found in the cache at start" in cli(d, "status").stdout

    assert download(d, hf_home(), KEEPER, "kept.bin") == expected_files(KEEPER)["kept.bin"]
    assert hub.stats()["cdn_bytes"] == 0, "a blob that was not damaged was fetched again"
    assert download(d, hf_home(), VICTIM, "weights.bin") == expected_files(VICTIM)["weights.bin"]


def restart(d: Modelpeerd) -> None:
    """Start the stopped daemon on its cache dir; it must answer within seconds."""
    d.start(wait=False)
    d.wait_healthy(timeout=10)


def test_a_damaged_torrent_file_is_dropped_and_the_rest_is_shared(
        repos: None, hub: FakeHub, hf_home: HfHome, tmp_path: Path) -> None:
    key = write_key(tmp_path / "cluster.key")
    d = keyed_daemon(tmp_path / "cache", hub.url, key)
    with d:
        assert download(d, hf_home(), KEEPER, "kept.bin") == expected_files(KEEPER)["kept.bin"]
    # a torrent made for a peer, cut short on disk while the daemon is down
    torrent = d.cache_dir / "torrents" / f"{file_sha256(KEEPER, 'kept.bin')}.0.torrent"
    torrent.write_bytes(b"d8:announce3:udp4:infod6:length")
    half_written = torrent.with_suffix(".tmp")
    half_written.write_bytes(b"d8:announce")
    hub.reset()
    logged_before = d.log_size()
    with d:
        assert torrent.name in d.logged(since=logged_before)
        assert not half_written.exists()
        assert download(d, hf_home(), KEEPER, "kept.bin") == expected_files(KEEPER)["kept.bin"]
        assert hub.stats()["cdn_bytes"] == 0

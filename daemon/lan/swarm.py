"""The libtorrent session: one deterministic torrent per chunk, seeded in place once verified,
downloaded piece by piece in order. It only knows torrents, files and peer addresses.

Facts this relies on (measured, ../shared/LIBTORRENT-NOTES.md): uTP is ~30x slower than TCP
here, so it is off; alerts are read through an fd on the event loop, never a callback thread;
partial files are never read directly, only through read_piece; the default add flags include
paused and auto_managed, which must be cleared.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import libtorrent as lt

from ..errors import SwarmError, SwarmStalled
from ..events import Signal

log = logging.getLogger(__name__)

MIN_PIECE = 16 * 1024
MAX_PIECE = 4 * 1024 * 1024
PIECES_PER_CHUNK = 16
# s without a byte before a chunk's fetch is given up (its caller goes on another way): a
# connection locked out by a full queue waits out its retransmission timeouts, 1 s, 2 s...
STALL_TIMEOUT = 5.0
_FLAGS = lt.create_torrent.no_attributes | lt.create_torrent.v1_only


@dataclasses.dataclass(frozen=True)
class ChunkTorrent:
    info_hash: str
    torrent: bytes
    piece_size: int
    length: int


def piece_size_for(length: int) -> int:
    """A power of two giving about PIECES_PER_CHUNK pieces, within [16 KiB, 4 MiB]."""
    size = MIN_PIECE
    while size < MAX_PIECE and size * PIECES_PER_CHUNK < length:
        size *= 2
    return size


def chunk_torrent(path: Path, piece_size: int | None = None) -> ChunkTorrent:
    """The deterministic torrent of one chunk file: same bytes and name, same info-hash."""
    length = path.stat().st_size
    piece_size = piece_size or piece_size_for(length)
    ct = lt.create_torrent(lt.list_files(str(path), flags=_FLAGS), piece_size, _FLAGS)
    ct.set_creator("")
    ct.set_creation_date(0)
    lt.set_piece_hashes(ct, str(path.parent))
    data = lt.bencode(ct.generate())
    return ChunkTorrent(info_hash_of(data), data, piece_size, length)


def _decoded(torrent: bytes) -> lt.TorrentFileDict:
    """The bdecoded torrent, for torrent_info (which re-encodes it: the info-hash is of the
    canonical form, as before). Not a dictionary: TypeError, as torrent_info raised."""
    decoded = lt.bdecode(torrent)
    if not isinstance(decoded, dict):
        raise TypeError(f"a torrent is a bencoded dictionary, not {type(decoded).__name__}")
    # the stubs name the decoded torrent TorrentFileDict only when create_torrent made it
    return cast("lt.TorrentFileDict", decoded)


def info_hash_of(torrent: bytes) -> str:
    return str(lt.torrent_info(_decoded(torrent)).info_hashes().v1)


def torrent_file(torrent: bytes) -> tuple[str, int]:
    """(name, length) of a one-file torrent."""
    ti = lt.torrent_info(_decoded(torrent))
    return ti.name(), ti.total_size()


@dataclasses.dataclass
class PeerStats:
    downloaded: int = 0
    uploaded: int = 0


@dataclasses.dataclass
class SwarmStats:
    torrents: int = 0
    downloaded: int = 0
    uploaded: int = 0
    peers: dict[str, PeerStats] = dataclasses.field(default_factory=dict)


class _Fetch:
    def __init__(self, num_pieces: int) -> None:
        self.pieces: dict[int, bytes] = {}
        self.error: str = ""
        self.last_progress = time.monotonic()
        self.changed = asyncio.Event()
        self.num_pieces = num_pieces
        self.received = 0  # payload bytes the torrent got from its peers

    def progress(self) -> None:
        self.last_progress = time.monotonic()
        self.changed.set()

    def note_received(self, total: int) -> None:
        """Bytes arriving count as progress, not only whole pieces: on a slow node's full
        link a 4 MiB piece takes seconds, so a stall timeout by pieces must be long, and
        torrents whose connections the link's queue locked out waited it out (10 s, three
        times in one slow-middle run: the slow node took 1.4x what its link allows)."""
        if total > self.received:
            self.received = total
            self.last_progress = time.monotonic()


class Swarm:
    def __init__(self, listen: tuple[str, int], state_dir: Path, interface: str = "") -> None:
        self.listen = listen
        self.state_dir = state_dir
        self.interface = interface
        self.bad_peer: Signal[[str, str]] = Signal("bad piece")  # ip, info-hash
        self._ses: lt.session | None = None
        self._handles: dict[str, lt.torrent_handle] = {}
        self._seeding: set[str] = set()
        self._fetches: dict[str, _Fetch] = {}
        self._rsock: socket.socket | None = None
        self._wsock: socket.socket | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._stats = SwarmStats()

    # --- life -----------------------------------------------------------------------------
    async def start(self) -> None:
        host, port = self.listen
        self.state_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.state_dir / "incoming", ignore_errors=True)
        settings: lt.settings_pack = {
            "listen_interfaces": f"{host}:{port}",
            "enable_dht": False, "enable_lsd": False, "enable_upnp": False,
            "enable_natpmp": False,
            "enable_outgoing_utp": False, "enable_incoming_utp": False,
            "send_buffer_watermark": 8 * 1024 * 1024,
            "send_buffer_low_watermark": 1024 * 1024,
            "send_buffer_watermark_factor": 150,
            "allow_multiple_connections_per_ip": True,
            # cluster peers are admitted by the IP filter; none of them should wait for a slot
            "unchoke_slots_limit": -1,
            "user_agent": "modelpeer",
            "alert_mask": (lt.alert_category.error | lt.alert_category.peer
                           | lt.alert_category.status | lt.alert_category.storage
                           | lt.alert_category.piece_progress),
            "alert_queue_size": 100_000,
        }
        if self.interface:
            settings["outgoing_interfaces"] = self.interface
        self._ses = lt.session(settings)
        self._ses.set_ip_filter(self._filter(set()))
        self._ses.set_peer_class_filter(self._every_peer_global())
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        self._ses.set_alert_fd(self._wsock.fileno())
        asyncio.get_running_loop().add_reader(self._rsock, self._on_alerts)
        self._ticker = asyncio.create_task(self._tick(), name="swarm stats")
        log.info("BitTorrent listening on %s:%d (TCP only)", host, port)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._rsock is not None:
            asyncio.get_running_loop().remove_reader(self._rsock)
        if self._ses is not None:
            self._ses.pause()
            self._ses = None
        for s in (self._rsock, self._wsock):
            if s is not None:
                s.close()

    @property
    def ses(self) -> lt.session:
        assert self._ses is not None, "Swarm.start() was not awaited"
        return self._ses

    # --- who may connect --------------------------------------------------------------------
    @staticmethod
    def _filter(allowed: set[str]) -> lt.ip_filter:
        f = lt.ip_filter()
        f.add_rule("0.0.0.0", "255.255.255.255", 1)  # 1 = blocked
        f.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1)
        for ip in allowed:
            f.add_rule(ip, ip, 0)
        return f

    def allow_only(self, ips: set[str]) -> None:
        self.ses.set_ip_filter(self._filter(ips))

    # --- upload rate ------------------------------------------------------------------------
    def _every_peer_global(self) -> lt.ip_filter:
        """Every address in the global peer class, which the session's rate limits apply to:
        by default LAN addresses get the local class only, which no limit applies to, and
        cluster peers are on the LAN."""
        f = lt.ip_filter()
        in_global = 1 << self.ses.global_peer_class_id
        f.add_rule("0.0.0.0", "255.255.255.255", in_global)
        f.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", in_global)
        return f

    def limit_upload(self, rate: int) -> None:
        """At most `rate` bytes per second of BitTorrent uploads, all peers together (0: none)."""
        self.ses.apply_settings({"upload_rate_limit": rate})

    def upload_limit(self) -> int:
        """The upload limit the session applies now (0: none)."""
        return int(self.ses.get_settings()["upload_rate_limit"])

    # --- seeding ----------------------------------------------------------------------------
    def seed(self, torrent: bytes, path: Path) -> None:
        ih = info_hash_of(torrent)
        if ih in self._handles:
            return
        atp = self._params(torrent, path.parent)
        atp.flags |= lt.torrent_flags.seed_mode
        self._handles[ih] = self.ses.add_torrent(atp)
        self._seeding.add(ih)
        log.debug("seeding %s (%s)", path.name, ih)

    def unseed(self, info_hash: str) -> None:
        handle = self._handles.pop(info_hash, None)
        self._seeding.discard(info_hash)
        if handle is not None:
            self.ses.remove_torrent(handle)

    @staticmethod
    def _params(torrent: bytes, save_path: Path) -> lt.add_torrent_params:
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(_decoded(torrent))
        atp.save_path = str(save_path)
        atp.flags &= ~(lt.torrent_flags.paused | lt.torrent_flags.auto_managed)
        atp.flags |= lt.torrent_flags.apply_ip_filter
        return atp

    # --- fetching -----------------------------------------------------------------------------
    async def fetch(self, torrent: bytes, peers: list[tuple[str, int]], *,
                    stall_timeout: float = STALL_TIMEOUT,
                    sources_left: Callable[[], bool] = lambda: True) -> AsyncIterator[bytes]:
        """The chunk's bytes in order, piece by piece, as soon as each piece is verified.
        Ends with SwarmStalled after stall_timeout without a byte, or as soon as
        `sources_left` says no peer that holds the chunk is left to get it from."""
        ti = lt.torrent_info(_decoded(torrent))
        ih = str(ti.info_hashes().v1)
        if ih in self._handles:
            raise SwarmError(f"torrent {ih} is already active here")
        scratch = self.state_dir / "incoming" / ih
        scratch.mkdir(parents=True, exist_ok=True)
        fetch = _Fetch(ti.num_pieces())
        self._fetches[ih] = fetch
        atp = self._params(torrent, scratch)
        atp.flags |= lt.torrent_flags.sequential_download  # the prefix a client waits on first
        handle = self.ses.add_torrent(atp)
        self._handles[ih] = handle
        try:
            for p in peers:
                if p != self.listen:
                    handle.connect_peer(p)
            for piece in range(fetch.num_pieces):
                yield await self._next_piece(handle, fetch, piece, stall_timeout,
                                             sources_left)
        finally:
            self._fetches.pop(ih, None)
            self._handles.pop(ih, None)
            if self._ses is not None:
                self._ses.remove_torrent(handle, lt.session.delete_files)
            shutil.rmtree(scratch, ignore_errors=True)

    async def _next_piece(self, handle: lt.torrent_handle, fetch: _Fetch, piece: int,
                          stall_timeout: float, sources_left: Callable[[], bool]) -> bytes:
        ih = str(handle.info_hashes().v1)
        while piece not in fetch.pieces:
            fetch.note_received(handle.status(0).total_payload_download)
            if fetch.error:
                raise SwarmError(f"torrent {ih}: {fetch.error}")
            if not sources_left():
                raise SwarmStalled(f"torrent {ih}: no peer holding it is left, at piece {piece}")
            idle = time.monotonic() - fetch.last_progress
            if idle > stall_timeout:
                raise SwarmStalled(f"torrent {ih}: no progress for {idle:.0f}s at piece {piece}")
            fetch.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fetch.changed.wait(), 1.0)
        return fetch.pieces.pop(piece)

    # --- alerts -------------------------------------------------------------------------------
    def _on_alerts(self) -> None:
        assert self._rsock is not None
        with contextlib.suppress(BlockingIOError):
            while self._rsock.recv(4096):
                pass
        if self._ses is None:
            return
        for a in self._ses.pop_alerts():
            try:
                self._dispatch(a)
            except Exception:  # one odd alert must not stop the others from being handled
                log.exception("handling %s failed", type(a).__name__)

    def _dispatch(self, a: lt.alert) -> None:
        if isinstance(a, lt.read_piece_alert):
            fetch = self._fetches.get(str(a.handle.info_hashes().v1))
            if fetch is not None:
                if a.error.value():
                    fetch.error = f"reading piece {a.piece}: {a.error.message()}"
                else:
                    fetch.pieces[a.piece] = bytes(a.buffer)
                fetch.progress()
        elif isinstance(a, lt.piece_finished_alert):
            fetch = self._fetches.get(str(a.handle.info_hashes().v1))
            if fetch is not None:
                a.handle.read_piece(a.piece_index)  # never the partial file: see the notes
                fetch.progress()
        elif isinstance(a, lt.hash_failed_alert):
            self._blame(a.handle, a.piece_index)
        elif isinstance(a, lt.peer_ban_alert):
            self._report(str(a.endpoint[0]), str(a.handle.info_hashes().v1))
        elif isinstance(a, lt.torrent_error_alert | lt.file_error_alert):
            ih = str(a.handle.info_hashes().v1)
            fetch = self._fetches.get(ih)
            if fetch is not None:
                fetch.error = a.message()
                fetch.changed.set()
            else:
                log.error("torrent %s: %s", ih, a.message())
        elif isinstance(a, lt.state_update_alert):
            self._update_stats(a.status)

    def _blame(self, handle: lt.torrent_handle, piece: int) -> None:
        """A piece failed its hash. With one sender the culprit is clear; with several,
        libtorrent's smart-ban finds it (peer_ban_alert) once the piece comes again."""
        ih = str(handle.info_hashes().v1)
        senders = [p.ip[0] for p in handle.get_peer_info() if p.total_download > 0]
        log.warning("piece %d of torrent %s failed its hash (senders: %s)", piece, ih,
                    ", ".join(senders) or "none")
        if len(senders) == 1:
            self._report(senders[0], ih)

    def _report(self, ip: str, ih: str) -> None:
        self.bad_peer.emit(ip, ih)

    # --- stats ----------------------------------------------------------------------------------
    async def _tick(self) -> None:
        while True:
            if self._ses is not None:
                self._ses.post_torrent_updates()
            await asyncio.sleep(1.0)

    def _update_stats(self, statuses: list[lt.torrent_status]) -> None:
        """Per-peer byte counts of the torrents that changed in the last second."""
        for st in statuses:
            with contextlib.suppress(RuntimeError):
                for p in st.handle.get_peer_info():
                    s = self._stats.peers.setdefault(p.ip[0], PeerStats())
                    s.downloaded += p.payload_down_speed  # bytes/s, sampled every second
                    s.uploaded += p.payload_up_speed

    def stats(self) -> SwarmStats:
        self._stats.torrents = len(self._handles)
        self._stats.downloaded = sum(p.downloaded for p in self._stats.peers.values())
        self._stats.uploaded = sum(p.uploaded for p in self._stats.peers.values())
        return self._stats

"""One daemon: builds the parts from a Config, serves until told to stop, stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sqlite3

from aiohttp import web

from . import notify
from .cacheapi import CacheApi
from .catalog import Catalog
from .config import Config, load_config
from .control import Control, RecentErrors
from .errors import ConfigError
from .fetch import Fetcher
from .guard import local_only
from .httperrors import errors_as_answers
from .index import open_index
from .lan.node import start_lan
from .logs import set_level
from .metrics import Metrics
from .pins import Pins
from .proxy import Proxy
from .registry import Transfers
from .signatures import SignaturePolicy, Signatures
from .store import Store
from .upstream import Upstream
from .upstreamfetch import UpstreamFetch
from .warmup import Warmup

log = logging.getLogger(__name__)

VERSION = "0.1.0"
MAX_HEADER_BYTES = 16 * 1024


async def _server_header(request: web.Request, resp: web.StreamResponse) -> None:
    resp.headers["Server"] = f"modelpeer/{VERSION}"


class Daemon:
    def __init__(self, cfg: Config, argv: list[str] | None = None) -> None:
        self.cfg = cfg
        self.argv = argv
        self.node_name = cfg.node_name or socket.gethostname()
        self.metrics = Metrics()
        self.db: sqlite3.Connection | None = None
        self._runner: web.AppRunner | None = None
        self._stop = asyncio.Event()
        self.startup_problems = RecentErrors()  # what start() found wrong, for the status
        self.recovered: dict[str, int] = {}
        self._checker: asyncio.Task[int] | None = None
        self._stack = contextlib.AsyncExitStack()  # what start() opened, closed in reverse

    async def start(self) -> None:
        """Start serving; the store's chunks are hashed behind it. What the start and that
        check find wrong is kept for the status."""
        logging.getLogger().addHandler(self.startup_problems)
        try:
            await self._start()
        except BaseException:
            logging.getLogger().removeHandler(self.startup_problems)
            await self._stack.aclose()
            raise
        self._checker = asyncio.create_task(self.store.check_unchecked(), name="store check")
        self._checker.add_done_callback(
            lambda _: logging.getLogger().removeHandler(self.startup_problems))

    async def _start(self) -> None:
        cfg, stack = self.cfg, self._stack
        self.db = open_index(cfg.cache_dir / "index.sqlite3")
        stack.callback(self.db.close)
        self.upstream = Upstream(cfg.upstream, timeout=cfg.upstream_timeout,
                                 user_agent=f"modelpeer/{VERSION}")
        self.upstream.rate.rate = cfg.upstream_rate
        stack.push_async_callback(self.upstream.close)
        await self.upstream.start()
        # the listener closes after the transfers: a response in flight ends with its transfer
        stack.push_async_callback(self._close_listener)
        self.catalog = Catalog(self.db, self.upstream, ref_ttl=cfg.ref_ttl, offline=cfg.offline)
        self.pins = Pins(self.db, self.catalog)
        self.store = Store(cfg.cache_dir, self.db, cfg.chunk_size,
                           max_bytes=cfg.max_cache_size, kept=self.pins.digests)
        self.recovered = await self.store.recover()
        log.info("store %s: %d complete chunks good, %d partial kept, %d dropped, %d blobs "
                 "kept from files the index had lost", cfg.cache_dir, self.recovered["good"],
                 self.recovered["partial"], self.recovered["dropped"], self.recovered["adopted"])
        self.transfers = Transfers(self.store)
        self.upstream_fetch = UpstreamFetch(
            self.upstream, connections=cfg.upstream_connections, offline=cfg.offline,
            max_transfers=cfg.max_transfers, on_bytes=self.metrics.upstream_read,
            on_error=self.metrics.upstream_failed)
        self.policy = SignaturePolicy(cfg.require_signature, self.catalog)
        self.lan = await start_lan(cfg, self.store, self.transfers, self.upstream_fetch,
                                   self.policy.may_share, self.node_name, VERSION)
        stack.push_async_callback(self.lan.close)
        self.fetcher = Fetcher(self.store, self.transfers, self.upstream_fetch,
                               self.lan.peer_source)
        stack.push_async_callback(self.fetcher.close)
        self.signatures = Signatures(self.policy, self.catalog, self.fetcher, self.metrics)
        self.warmup = Warmup(self.catalog, self.fetcher, self.lan.node_id or "local",
                             self.node_name, self.lan.peers,
                             self.lan.credentials.key if self.lan.credentials else None,
                             self.pins, self.signatures.check)
        stack.push_async_callback(self.warmup.close)
        self.lan.ask_peers_for_repos(self.catalog)
        await self.lan.open(self.warmup.peer_routes())
        self.warmup.resume()
        self.control = Control(self.store, self.catalog, self.fetcher, self.metrics,
                               self.describe, self.lan, self.warmup, self.signatures)
        self.proxy = Proxy(self.catalog, self.fetcher, self.metrics, self.signatures)
        app = web.Application(client_max_size=1024**2,
                              middlewares=[local_only(cfg.listen), errors_as_answers],
                              handler_args={"max_field_size": MAX_HEADER_BYTES,
                                            "max_line_size": MAX_HEADER_BYTES})
        app.on_response_prepare.append(_server_header)
        self.control.add_routes(app)
        CacheApi(self.store, self.catalog, self.fetcher, self.pins).add_routes(app)
        self.proxy.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = cfg.listen
        await web.TCPSite(self._runner, host, port, backlog=512).start()
        self.control.ready = True
        log.info("modelpeerd %s serving the Hub API on http://%s:%d (upstream %s%s)", VERSION,
                 host, port, ", ".join(cfg.upstream), ", offline" if cfg.offline else "")
        notify.ready()
        notify.status(self.status_line())

    def describe(self) -> dict[str, object]:
        return {"node": self.node_name, "version": VERSION, "listen": self.cfg.local_url,
                "cache_dir": str(self.cfg.cache_dir), "upstream": self.cfg.upstream,
                "offline": self.cfg.offline, "max_cache_size": self.cfg.max_cache_size,
                "upstream_rate": self.cfg.upstream_rate,
                "peer_upload_rate": self.cfg.peer_upload_rate,
                "require_signature": [str(r) for r in self.cfg.require_signature],
                "over_limit_bytes": self.store.over_limit, **self.pins.summary(),
                "peers": self.lan.summary(),
                "startup": {"chunks": self.recovered,
                            "unchecked_chunks": len(self.store.unchecked), "problems": [
                    r["message"] for r in self.startup_problems.records]}}

    def status_line(self) -> str:
        usage = self.store.usage()
        return (f"serving on {self.cfg.local_url}; cache {usage.bytes / 1e9:.2f} GB in "
                f"{usage.complete_blobs} files; {len(self.transfers.running)} transfers")

    async def _close_listener(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def stop(self) -> None:
        notify.stopping()
        self.control.ready = False
        log.info("stopping: closing listeners and checkpointing transfers")
        if self._runner is not None:
            await self._runner.shutdown()
        if self._checker is not None:
            self._checker.cancel()
            await asyncio.gather(self._checker, return_exceptions=True)
        await self._stack.aclose()
        log.info("stopped")

    def reload(self) -> None:
        """SIGHUP: re-read the settings that can change while running."""
        try:
            new = load_config(self.argv)
        except ConfigError as e:
            log.error("reload refused, keeping the running settings: %s", e)
            return
        notify.reloading()
        set_level(new.log_level)
        self.cfg.log_level = new.log_level
        self.store.max_bytes = self.cfg.max_cache_size = new.max_cache_size
        self.upstream_fetch.connections = self.cfg.upstream_connections = new.upstream_connections
        self.catalog.ref_ttl = self.cfg.ref_ttl = new.ref_ttl
        # applied even when unchanged: a key file replaced in place must be verified again
        self.signatures.set_rules(new.require_signature)
        self.cfg.require_signature = new.require_signature
        log.info("reload: require_signature is now %s",
                 ", ".join(map(str, new.require_signature)) or "empty")
        self.upstream.rate.rate = self.cfg.upstream_rate = new.upstream_rate
        self.lan.set_peer_upload_rate(new.peer_upload_rate)
        self.cfg.peer_upload_rate = new.peer_upload_rate
        needs_restart = [name for name in ("listen", "cache_dir", "upstream", "chunk_size",
                                           "offline", "peer_listen", "bt_listen", "interface",
                                           "cluster_key_file", "cluster_key", "log_format")
                         if getattr(new, name) != getattr(self.cfg, name)]
        if needs_restart:
            log.warning("reload: %s changed; restart the daemon to apply", ", ".join(needs_restart))
        log.info("reloaded settings (log_level, max_cache_size, upstream_connections, ref_ttl, "
                 "require_signature, peer_upload_rate, upstream_rate)")
        notify.ready()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        try:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), 10)
                except TimeoutError:
                    notify.status(self.status_line())
        finally:
            await self.stop()

"""Only local clients: the local listener refuses what a web page in the user's browser can send
it, so no page of another site starts a download or a job, changes the cache or reads the status.

- a Host that is not this daemon's address (a DNS-rebinding page names its own host): 421;
- a request the browser marks Sec-Fetch-Site: cross-site or same-site: 403;
- a state-changing request with an Origin other than this daemon's: 403;
- a state-changing control request (under /_modelpeer/) without Content-Type: application/json
  (or application/x-tar, a bundle), which a page can only send after a CORS preflight this
  daemon never grants: 415.

The Hub client, `hf`, transformers and the `modelpeer` CLI send none of what is refused.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .httperrors import hub_error_response

log = logging.getLogger(__name__)

PREFIX = "/_modelpeer/v1"  # the daemon's own API (control.py, cacheapi.py)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# content types a page can send only after a CORS preflight (bundles are streamed as tar)
PREFLIGHTED_TYPES = frozenset({"application/json", "application/x-tar"})
FOREIGN_SITES = frozenset({"cross-site", "same-site"})
CONTROL_PREFIX = "/_modelpeer"
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
LOGGED_KEYS_MAX = 1024
SHOWN_CHARS = 100


@dataclasses.dataclass(frozen=True)
class Refusal:
    status: int
    reason: str  # one word per rule: what the log deduplicates on
    message: str


def host_of(authority: str) -> str | None:
    """'Host:port', '[v6]:port' (a Host header or an Origin's authority) -> the lowercased host;
    None when it is malformed."""
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        host, _, port = authority.partition(":")
    if port and not (port.isascii() and port.isdigit()):
        return None
    return host.lower() or None


def shown(value: str) -> str:
    """A header value quoted for a message or the log: ASCII only, bounded."""
    return ascii(value[:SHOWN_CHARS])


class LocalGuard:
    def __init__(self, listen: tuple[str, int]) -> None:
        self.listen_host = listen[0].lower()
        host = "127.0.0.1" if self.listen_host in WILDCARD_HOSTS else listen[0]
        self.own_url = f"http://{f'[{host}]' if ':' in host else host}:{listen[1]}"
        self._logged: set[tuple[str, str]] = set()

    def is_local_host(self, host: str) -> bool:
        if host in ("localhost", self.listen_host):
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        # On a wildcard listener any address literal is one a client connected to: a
        # DNS-rebinding page always sends the name of its own site, never an address.
        return address.is_loopback or self.listen_host in WILDCARD_HOSTS

    def is_own_origin(self, origin: str) -> bool:
        scheme, sep, authority = origin.partition("://")
        host = host_of(authority) if sep and "/" not in authority else None
        return scheme == "http" and host is not None and self.is_local_host(host)

    def check(self, request: web.Request) -> Refusal | None:
        return (self.check_host(request) or self.check_fetch_site(request)
                or self.check_state_change(request))

    def check_host(self, request: web.Request) -> Refusal | None:
        value = request.headers.get("Host")
        if value is None:
            return Refusal(421, "host", "no Host header; HTTP/1.1 requires one and modelpeer "
                           f"answers only local clients (use {self.own_url})")
        host = host_of(value)
        if host is None or not self.is_local_host(host):
            return Refusal(421, "host", f"Host {shown(value)} is not this daemon's address; "
                           f"modelpeer answers only local clients (use {self.own_url})")
        return None

    def check_fetch_site(self, request: web.Request) -> Refusal | None:
        site = request.headers.get("Sec-Fetch-Site", "").lower()
        if site in FOREIGN_SITES:
            return Refusal(403, "sec-fetch-site", f"a web page of another origin sent this request "
                           f"(Sec-Fetch-Site: {site}); modelpeer answers only local clients and "
                           f"its own status page at {self.own_url}/_modelpeer/")
        return None

    def check_state_change(self, request: web.Request) -> Refusal | None:
        if request.method in SAFE_METHODS:
            return None
        origin = request.headers.get("Origin")
        if origin is not None and not self.is_own_origin(origin):
            return Refusal(403, "origin", f"a web page at Origin {shown(origin)} sent this "
                           f"{request.method}; modelpeer takes changes only from local programs "
                           f"and pages of {self.own_url}")
        is_control = request.path == CONTROL_PREFIX or request.path.startswith(
            CONTROL_PREFIX + "/")
        if is_control and request.content_type not in PREFLIGHTED_TYPES:
            got = shown(request.headers.get("Content-Type", "none"))
            return Refusal(415, "content-type", f"{request.method} {request.path} needs "
                           f"Content-Type: application/json (got {got}); send the request "
                           "with that header, as the modelpeer CLI does")
        return None

    def log_once(self, request: web.Request, refusal: Refusal) -> None:
        """One line per (rule, client address), so a page refused in a loop cannot flood the
        log; the memory of what was logged is bounded."""
        key = (refusal.reason, request.remote or "unknown")
        if key in self._logged:
            return
        if len(self._logged) >= LOGGED_KEYS_MAX:
            self._logged.clear()
        self._logged.add(key)
        log.warning("refused %s %s from %s with %d: %s (further refusals for this reason from "
                    "this address are not logged)", request.method, shown(request.path),
                    key[1], refusal.status, refusal.message)


def local_only(listen: tuple[str, int]) -> Middleware:
    """The middleware for the local listener at `listen` (host, port)."""
    guard = LocalGuard(listen)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = guard.check(request)
        if refusal is None:
            return await handler(request)
        guard.log_once(request, refusal)
        return hub_error_response(refusal.status, refusal.message)

    return middleware

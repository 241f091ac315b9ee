"""Client of the upstream Hub (and its mirrors, tried in order) and of the CDNs it redirects
to: aiohttp for the Hub API, httpbody for the Range reads of blob bytes. Knows HTTP, origins
and tokens; knows nothing about the store or the client.

The token a client sent goes to the Hub origins only: never to a CDN host, never to disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Protocol, TypeVar

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from . import httpbody
from .errors import RangeIgnored, UpstreamError, UpstreamUnavailable
from .ratelimit import RateLimit

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)


class _GetAnswer(Protocol):
    """What is read of the answer to a GET of blob bytes, from aiohttp or httpbody."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def url(self) -> URL: ...
    @property
    def content_length(self) -> int | None: ...


_A = TypeVar("_A", bound=_GetAnswer)
_Piece = TypeVar("_Piece", bytes, memoryview)
_Opener = Callable[[URL, dict[str, str]], contextlib.AbstractAsyncContextManager[_A]]


@dataclasses.dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    url: URL

    @property
    def location(self) -> URL | None:
        loc = self.headers.get("Location")
        return self.url.join(URL(loc, encoded=True)) if loc else None


class Upstream:
    def __init__(self, urls: list[str], *, timeout: float = 30.0, user_agent: str = "") -> None:
        self.origins = [URL(u) for u in urls]
        self.timeout = timeout
        self.user_agent = user_agent or "modelpeer"
        self.rate = RateLimit()  # upstream_rate: file bytes from the Hub and its CDNs together
        self._session: aiohttp.ClientSession | None = None
        # Blob bytes come through httpbody. The session takes no proxy from the environment
        # (trust_env is off), so neither needs one.
        self._bodies = httpbody.Pool(timeout=timeout, user_agent=self.user_agent)
        self._ignore_range: set[URL] = set()  # origins that answered a Range with a 200
        self._aiohttp_only: set[URL] = set()  # origins whose answers httpbody cannot read

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout,
                                          sock_read=self.timeout),
            headers={"User-Agent": self.user_agent})

    async def close(self) -> None:
        self._bodies.close()
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    def is_hub(self, url: URL) -> bool:
        return any(url.origin() == o.origin() for o in self.origins)

    def _headers(self, url: URL, token: str | None, extra: dict[str, str] | None) -> dict[str, str]:
        headers = dict(extra or {})
        if token and self.is_hub(url):
            headers["Authorization"] = token
        return headers

    async def hub(self, method: str, path_qs: str, *, token: str | None = None,
                  data: bytes | None = None, headers: dict[str, str] | None = None) -> Answer:
        """Ask each upstream origin in turn; the first that answers below 500 wins.
        Same-origin redirects are followed (the Hub's relative /api/resolve-cache/...);
        a redirect to another origin is returned for the caller to use."""
        reasons = []
        for origin in self.origins:
            url = origin.join(URL(path_qs, encoded=True))
            try:
                answer = await self._request_following(method, url, token, data, headers)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                reasons.append(f"{origin}: {type(e).__name__}: {e}")
                continue
            if answer.status >= 500:
                reasons.append(f"{origin}: HTTP {answer.status}")
                continue
            return answer
        for r in reasons:
            log.warning("upstream %s %s failed: %s", method, path_qs, r)
        raise UpstreamUnavailable("; ".join(reasons) or "no upstream configured")

    async def _request_following(self, method: str, url: URL, token: str | None,
                                 data: bytes | None, headers: dict[str, str] | None) -> Answer:
        commit = None
        for _ in range(MAX_REDIRECTS + 1):
            async with self.session.request(
                    method, url, data=data, allow_redirects=False,
                    headers=self._headers(url, token, headers)) as resp:
                body = await resp.read() if method != "HEAD" else b""
                answer = Answer(resp.status, CIMultiDict(resp.headers), body, url)
            # The Hub names the commit on the first hop; keep it if a later hop does not.
            commit = answer.headers.get("X-Repo-Commit", commit)
            if commit and "X-Repo-Commit" not in answer.headers:
                answer.headers["X-Repo-Commit"] = commit
            target = answer.location
            if answer.status not in REDIRECTS or target is None:
                return answer
            if target.origin() != url.origin():
                return answer
            url = target
        raise UpstreamError(f"too many redirects from {url}")

    def serves_ranges(self, url: URL) -> bool:
        """False once url's origin answered a Range request with the whole body."""
        return url.origin() not in self._ignore_range

    async def read_range(self, url: URL, start: int, end: int, *,
                         token: str | None = None) -> AsyncGenerator[bytes | memoryview, None]:
        """GET bytes [start, end) of url, following redirects (token only to Hub origins).
        Fails unless the server answers exactly that range; RangeIgnored (and the origin is
        remembered) when it ignores Range.

        The pieces are views of one buffer (httpbody): each is good until the next is asked
        for, so write it first. They are BUFFER bytes long but the first and the last."""
        asked = f"bytes={start}-{end - 1}"
        if url.origin() not in self._aiohttp_only:
            try:
                async with self._get(url, token, asked, self._bodies.get) as answer:
                    self._check_range(answer, start, end)
                    async for data in self._paced(answer.body(end - start)):
                        yield data
                return
            except httpbody.Unsupported as e:  # raised before any byte of the body
                self._aiohttp_only.add(url.origin())
                log.info("reading blobs from %s with aiohttp from now on: %s is not supported",
                         url.host, e)
        async with self._get(url, token, asked, self._aiohttp_get) as resp:
            self._check_range(resp, start, end)
            async for piece in self._paced(_body(resp, end - start)):
                yield piece

    def _check_range(self, answer: _GetAnswer, start: int, end: int) -> None:
        try:
            _check_range_answer(answer, start, end)
        except RangeIgnored:
            self._ignore_range.add(answer.url.origin())
            raise

    async def _paced(self, pieces: AsyncIterator[_Piece]) -> AsyncIterator[_Piece]:
        async for data in pieces:
            await self.rate.take(len(data))
            yield data

    async def read_from(self, url: URL, start: int, size: int, *,
                        token: str | None = None) -> AsyncIterator[bytes]:
        """Bytes [start, size) of url over one connection, from an origin that may ignore
        Range: from `start` when it honours the Range, else the whole body without its first
        `start` bytes."""
        async with self._get(url, token, f"bytes={start}-" if start else None,
                             self._aiohttp_get) as resp:
            if resp.status >= 500:
                raise UpstreamUnavailable(f"{resp.url.host}: HTTP {resp.status}")
            ranged = resp.status == 206 and _ranges_from(resp, start, size)
            if not ranged and resp.status != 200:
                raise UpstreamError(f"{resp.url.host}: HTTP {resp.status}")
            skip = 0 if ranged else start
            async for data in self._paced(_body(resp, size - start + skip)):
                if skip >= len(data):
                    skip -= len(data)
                    continue
                yield data[skip:]
                skip = 0

    @contextlib.asynccontextmanager
    async def _get(self, url: URL, token: str | None, range_header: str | None,
                   open_answer: _Opener[_A]) -> AsyncIterator[_A]:
        """The answer to GET url (with that Range, if any), after redirects."""
        asked = {"Accept-Encoding": "identity"}
        if range_header is not None:
            asked["Range"] = range_header
        for _ in range(MAX_REDIRECTS + 1):
            async with open_answer(url, self._headers(url, token, asked)) as resp:
                if resp.status in REDIRECTS and "Location" in resp.headers:
                    url = url.join(URL(resp.headers["Location"], encoded=True))
                    continue
                yield resp
                return
        raise UpstreamError(f"too many redirects for {url.host}")

    def _aiohttp_get(self, url: URL, headers: dict[str, str]
                     ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self.session.get(url, headers=headers, allow_redirects=False)


async def _body(resp: aiohttp.ClientResponse, expected: int) -> AsyncIterator[bytes]:
    """The response body, which must be exactly `expected` bytes long."""
    got = 0
    # each piece as the socket delivered it: no joining of pieces into larger reads (a copy)
    async for data, _ in resp.content.iter_chunks():
        if not data:
            continue  # the end of an HTTP chunk
        got += len(data)
        if got > expected:
            raise UpstreamError(f"{resp.url.host}: sent more than the {expected} bytes asked for")
        yield data
    if got != expected:
        raise UpstreamError(f"{resp.url.host}: connection ended after {got} of {expected} bytes")


def _ranges_from(resp: _GetAnswer, start: int, end: int) -> bool:
    return resp.headers.get("Content-Range", "").startswith(f"bytes {start}-{end - 1}/")


def _check_range_answer(resp: _GetAnswer, start: int, end: int) -> None:
    if resp.status >= 500:
        raise UpstreamUnavailable(f"{resp.url.host}: HTTP {resp.status}")
    if resp.status == 200 and start == 0 and resp.content_length == end:
        return
    if resp.status == 200 or (resp.status == 206 and "Content-Range" not in resp.headers):
        raise RangeIgnored(f"{resp.url.host} ignores Range requests (HTTP {resp.status} to "
                           f"bytes={start}-{end - 1})")
    if resp.status != 206:
        raise UpstreamError(f"{resp.url.host}: HTTP {resp.status} to a Range request")
    if not _ranges_from(resp, start, end):
        raise UpstreamError(f"{resp.url.host}: Content-Range "
                            f"{resp.headers.get('Content-Range')!r}, wanted "
                            f"bytes {start}-{end - 1}/…")


async def backoff(attempt: int, base: float = 0.25, cap: float = 8.0) -> None:
    await asyncio.sleep(min(cap, base * 2 ** attempt))

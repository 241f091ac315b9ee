"""The bytes of a blob from the upstream or from a peer's relay: an HTTP/1.1 GET whose body is
received straight into one buffer reused for the whole answer (`recv_into`, through
asyncio.BufferedProtocol).

aiohttp's receive path allocates a bytes object per socket read and its parser copies the body
into another: for the Hub API that does not matter, for gigabytes of blobs it was a third of
the event loop's CPU (docs/benchmarks.md, issue 15). This client does only what a GET of blob
bytes needs: one request at a time per connection, keep-alive connections pooled per (scheme,
host, port), TLS with the default verifying context, bodies framed by Content-Length or chunked.
What it does not do raises Unsupported before any byte of a body is handed out, so the caller
can ask again with aiohttp. Redirects, tokens and what a Range answer must say are the
caller's (upstream.py), and so are the signatures of the peer API (lan/peers.py, which turns
this module's UpstreamError into a PeerError naming the peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping

from multidict import CIMultiDict
from yarl import URL

from .errors import UpstreamError

BUFFER = 1024 * 1024  # a body arrives in pieces this long (the first and the last shorter)
MAX_HEAD = 64 * 1024  # an answer's status line and headers together, a chunk-size line
MAX_INTERIM = 8  # 1xx answers skipped before the real one
MAX_IDLE = 16  # idle connections kept per (scheme, host, port)
KEEPALIVE = 15.0  # an idle connection older than this is closed, not reused (as aiohttp does)
HAPPY_EYEBALLS = 0.25  # the next address of a host is tried after this long (as aiohttp does)
KEPT_BUFFERS = 8  # body buffers of finished bodies kept for the next ones

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r\n")
_BAD_IN_REQUEST = re.compile(r"[\r\n\0]")

Key = tuple[str, str, int]  # scheme, host, port

# a new 1 MiB buffer for each 8 MiB segment was zeroed and faulted in: 5 % of the event loop's
# time in a cold download
_kept_buffers: list[memoryview] = []


@contextlib.contextmanager
def _body_buffer(expected: int) -> Iterator[memoryview]:
    """A buffer for a body's pieces: one kept from a body read to its end when the body
    fills one. Only such a body gives its buffer back: its reader asked for the piece after
    the last, so it no longer uses any. A body left early (an error, a cancelled read) may
    still have a piece in use, such as a write of it gone to a thread, so its buffer is
    dropped."""
    if expected < BUFFER:
        yield memoryview(bytearray(max(1, expected)))
        return
    buf = _kept_buffers.pop() if _kept_buffers else memoryview(bytearray(BUFFER))
    yield buf
    if len(_kept_buffers) < KEPT_BUFFERS:
        _kept_buffers.append(buf)


class Unsupported(Exception):
    """The request or its answer needs what this client does not do: ask with aiohttp."""


class _NoAnswer(UpstreamError):
    """The connection ended before the first byte of an answer (a kept-alive connection the
    server had closed meanwhile: ask again on a new one)."""


class _Connection(asyncio.BufferedProtocol):
    """One TCP or TLS connection, read only while a caller waits for bytes, into the caller's
    buffer and never past its end (so never past the body it wants)."""

    def __init__(self, key: Key, timeout: float) -> None:
        self.key = key
        self.timeout = timeout
        self.idle_since = 0.0
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._target: memoryview | None = None  # None: no bytes are expected now
        self._got = 0
        self._want = 0
        self._last = 0.0  # loop time of the last byte (or of the start of the wait)
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # the check for silence, while waiting
        self._hurry: asyncio.TimerHandle | None = None  # the end of the caller's patience
        self._sink = memoryview(bytearray(1))
        self._ended = False
        self._error: BaseException | None = None

    @property
    def usable(self) -> bool:
        return (self._transport is not None and not self._transport.is_closing()
                and not self._ended and self._error is None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._sink if self._target is None else self._target[self._got:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is None:
            self._fail(UpstreamError(f"{self.key[1]} sent bytes outside of an answer"))
            return
        self._got += nbytes
        self._last = self._loop.time()
        if self._got >= self._want:
            assert self._transport is not None
            self._transport.pause_reading()
            self._wake()

    def eof_received(self) -> bool | None:
        self._ended = True
        self._wake()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        if exc is not None and self._error is None:
            self._error = exc
        self._wake()

    def send(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    async def fill(self, target: memoryview, want: int, patience: float = math.inf) -> int:
        """Bytes into target, at least `want` of them, at most len(target); fewer when the
        connection ends (why it ended is raised by the call that gets none), or when
        `patience` seconds passed (then those that came by then, at least one). TimeoutError
        when no byte comes for `timeout` seconds."""
        assert self._transport is not None and 0 < want <= len(target)
        if self._error is not None:
            raise self._error
        if self._ended:
            return 0
        self._target, self._got, self._want = target, 0, want
        self._last = self._loop.time()
        self._waiter = self._loop.create_future()
        self._timer = self._loop.call_at(self._last + self.timeout, self._check_silence)
        if patience < math.inf:
            self._hurry = self._loop.call_at(self._last + patience, self._hand_on)
        self._transport.resume_reading()
        try:
            await self._waiter
        finally:
            self._timer.cancel()
            if self._hurry is not None:
                self._hurry.cancel()
            self._target = self._waiter = self._hurry = None
        if not self._got and self._error is not None:
            raise self._error
        return self._got

    def watch(self) -> None:
        """Idle in the pool: read, to learn at once that the server closed the connection."""
        assert self._transport is not None
        self._target = None
        self.idle_since = self._loop.time()
        self._transport.resume_reading()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _hand_on(self) -> None:
        """The caller's patience ran out: the bytes that came will do, or the next one."""
        self._want = 1
        if self._got:
            assert self._transport is not None
            self._transport.pause_reading()
            self._wake()

    def _check_silence(self) -> None:
        if self._waiter is None or self._waiter.done():
            return
        quiet_until = self._last + self.timeout
        if self._loop.time() >= quiet_until:
            self._waiter.set_exception(
                TimeoutError(f"{self.key[1]}: no byte for {self.timeout:g} s"))
        else:
            self._timer = self._loop.call_at(quiet_until, self._check_silence)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self.abort()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Reader:
    """The bytes of one answer: lines (the head, chunk sizes) through a small buffer, where
    what was read past them waits to be handed out first; bodies straight into the caller's
    buffer."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self._raw = bytearray(MAX_HEAD)
        self._view = memoryview(self._raw)
        self._start = self._end = 0  # the bytes read and not handed out: _raw[_start:_end]
        self.received = 0  # bytes of the answer read so far

    @property
    def leftover(self) -> int:
        return self._end - self._start

    async def until(self, marker: bytes, what: str) -> bytes:
        """The bytes up to the end of the next `marker` (at most MAX_HEAD of them)."""
        searched = self._start
        while (found := self._raw.find(marker, searched, self._end)) < 0:
            searched = max(self._start, self._end - len(marker) + 1)
            if self._start:
                searched -= self._start
                self._raw[:self.leftover] = self._raw[self._start:self._end]
                self._start, self._end = 0, self.leftover
            if self._end == MAX_HEAD:
                raise UpstreamError(f"{self.conn.key[1]}: {what} is longer than {MAX_HEAD} "
                                    "bytes")
            got = await self.conn.fill(self._view[self._end:], 1)
            if not got:
                raise (_NoAnswer if not self.received else UpstreamError)(
                    f"{self.conn.key[1]} closed the connection in {what}")
            self._end += got
            self.received += got
        line = bytes(self._raw[self._start:found + len(marker)])
        self._start = found + len(marker)
        return line

    async def into(self, view: memoryview, want: int, patience: float = math.inf) -> int:
        """Bytes into view: first those read past the last line, then from the connection
        until there are `want` (fewer when it ends, or after `patience` seconds)."""
        n = min(len(view), self.leftover)
        if n:
            view[:n] = self._view[self._start:self._start + n]
            self._start += n
        if n < want:
            got = await self.conn.fill(view[n:], want - n, patience)
            self.received += got
            n += got
        return n


class Answer:
    """The status and headers of an answer; body() reads its body, once."""

    def __init__(self, url: URL, reader: _Reader, version: int, status: int,
                 headers: CIMultiDict[str]) -> None:
        self.url = url
        self.status = status
        self.headers = headers
        self.complete = False  # the body was read to its end
        self.connection = reader.conn
        self._reader = reader
        self._keep_alive = _keeps_alive(version, headers)

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None else None

    @property
    def reusable(self) -> bool:
        return (self.complete and self._keep_alive and not self._reader.leftover
                and self.connection.usable)

    async def body(self, expected: int, patience: float = math.inf) -> AsyncIterator[memoryview]:
        """The body, which must be `expected` bytes long, in pieces that are views of one
        buffer: each is good until the next is asked for. The first piece comes as soon as
        bytes arrive, the others fill the buffer (BUFFER bytes), but the last; with a
        `patience`, a piece that waited that many seconds for more comes with what it has
        (a slow sender's bytes are not held back until a whole buffer came)."""
        chunked = self._framing()
        with _body_buffer(expected) as buf:
            pieces = (self._chunked(buf, expected, patience) if chunked
                      else self._sized(buf, expected, patience))
            async for piece in pieces:
                yield piece
        self.complete = True

    def _framing(self) -> bool:
        """Whether the body is chunked (else it has a Content-Length)."""
        coding = self.headers.getall("Transfer-Encoding", [])
        if coding and "Content-Length" in self.headers:
            raise UpstreamError(f"{self.url.host}: both Transfer-Encoding and Content-Length "
                                "in one answer")
        if coding:
            if [c.strip().lower() for c in coding] != ["chunked"]:
                raise Unsupported(f"Transfer-Encoding {', '.join(coding)}")
            return True
        if "Content-Length" not in self.headers:
            raise Unsupported("a body that ends with the connection (no Content-Length)")
        return False

    async def _sized(self, buf: memoryview, expected: int,
                     patience: float) -> AsyncIterator[memoryview]:
        size = self.content_length
        if size != expected:
            raise UpstreamError(f"{self.url.host}: Content-Length {size}, {expected} bytes "
                                "were asked for")
        done, want = 0, 1
        while done < size:
            room = min(len(buf), size - done)
            # a piece cut short by the end of the connection is handed on: it is good
            got = await self._reader.into(buf[:room], min(want, room), patience)
            if not got:
                raise UpstreamError(f"{self.url.host}: connection ended after {done} of "
                                    f"{expected} bytes")
            done += got
            want = len(buf)
            yield buf[:got]

    async def _chunked(self, buf: memoryview, expected: int,
                       patience: float) -> AsyncIterator[memoryview]:
        loop = asyncio.get_running_loop()
        done = 0
        chunk_left = await self._chunk_size(first=True)
        want = 1
        while chunk_left:
            got = 0
            hand_on_at = loop.time() + patience  # once bytes came (looked at between reads)
            while chunk_left and got < want and not (got and loop.time() >= hand_on_at):
                if done + got + chunk_left > expected:
                    raise UpstreamError(f"{self.url.host}: sent more than the {expected} "
                                        "bytes asked for")
                n = await self._reader.into(buf[got:got + min(chunk_left, len(buf) - got)], 1)
                if not n:
                    break
                got += n
                chunk_left -= n
                if not chunk_left:
                    chunk_left = await self._chunk_size(first=False)
            done += got
            want = len(buf)
            if got:
                yield buf[:got]  # good bytes, also when the connection ended after them
            if chunk_left and not n:
                raise UpstreamError(f"{self.url.host}: connection ended after {done} of "
                                    f"{expected} bytes")
        await self._skip_trailers()
        if done != expected:
            raise UpstreamError(f"{self.url.host}: the body ended after {done} of {expected} "
                                "bytes")

    async def _chunk_size(self, first: bool) -> int:
        if not first and await self._reader.until(b"\r\n", "a chunk's end") != b"\r\n":
            raise UpstreamError(f"{self.url.host}: a chunk longer than its size")
        line = await self._reader.until(b"\r\n", "a chunk-size line")
        m = _CHUNK_SIZE_LINE.fullmatch(line)
        if m is None:
            raise UpstreamError(f"{self.url.host}: not a chunk-size line: {line[:40]!r}")
        return int(m.group(1), 16)

    async def _skip_trailers(self) -> None:
        read = 0
        while (line := await self._reader.until(b"\r\n", "the trailers")) != b"\r\n":
            read += len(line)
            if read > MAX_HEAD:
                raise UpstreamError(f"{self.url.host}: trailers longer than {MAX_HEAD} bytes")


class Pool:
    """Keep-alive connections per (scheme, host, port), for GETs of blob bytes."""

    def __init__(self, *, timeout: float, user_agent: str) -> None:
        self.timeout = timeout
        self.user_agent = user_agent
        self._idle: dict[Key, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    @contextlib.asynccontextmanager
    async def get(self, url: URL, headers: Mapping[str, str]) -> AsyncIterator[Answer]:
        """GET url with these headers (no redirect followed): the answer, its body not read.
        Its connection is kept for the next GET if the body was read to the end."""
        answer = await self._ask(url, headers)
        try:
            yield answer
        finally:
            if answer.reusable:
                self._keep(answer.connection)
            else:
                answer.connection.abort()

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()

    async def _ask(self, url: URL, headers: Mapping[str, str]) -> Answer:
        key = _key(url)
        request = self._request(url, headers)
        while True:
            conn = self._reuse(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key)
            conn.send(request)
            reader = _Reader(conn)
            try:
                return await _read_answer(url, reader)
            except (_NoAnswer, ConnectionError):
                conn.abort()
                if not reused:
                    raise
            except BaseException:
                conn.abort()
                raise

    def _request(self, url: URL, headers: Mapping[str, str]) -> bytes:
        lines = [f"GET {url.raw_path_qs} HTTP/1.1", f"Host: {url.host_port_subcomponent}",
                 f"User-Agent: {self.user_agent}", "Accept: */*"]
        for name, value in headers.items():
            if _BAD_IN_REQUEST.search(name + value):
                raise UpstreamError(f"header {name} of a request to {url.host} holds a line "
                                    "break or NUL; it was not sent")
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()  # as aiohttp encodes them

    def _reuse(self, key: Key) -> _Connection | None:
        conns = self._fresh(key)
        conn = conns.pop() if conns else None
        if conns:
            self._idle[key] = conns
        return conn

    def _keep(self, conn: _Connection) -> None:
        conns = self._fresh(conn.key)
        if len(conns) < MAX_IDLE:
            conn.watch()
            conns.append(conn)
        else:
            conn.abort()
        self._idle[conn.key] = conns

    def _fresh(self, key: Key) -> list[_Connection]:
        """The idle connections to key that may still be used, taken out of the pool; the
        others closed."""
        now = asyncio.get_running_loop().time()
        fresh = []
        for conn in self._idle.pop(key, []):
            if conn.usable and now - conn.idle_since < KEEPALIVE:
                fresh.append(conn)
            else:
                conn.abort()
        return fresh

    async def _connect(self, key: Key) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout):
            if scheme == "https":
                _, conn = await loop.create_connection(
                    lambda: _Connection(key, self.timeout), host, port, ssl=self._tls(),
                    server_hostname=host, ssl_handshake_timeout=self.timeout,
                    happy_eyeballs_delay=HAPPY_EYEBALLS)
            else:
                _, conn = await loop.create_connection(
                    lambda: _Connection(key, self.timeout), host, port,
                    happy_eyeballs_delay=HAPPY_EYEBALLS)
        return conn

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:  # made once it is needed: loading the CA certificates takes time
            self._ssl = ssl.create_default_context()
        return self._ssl


def _key(url: URL) -> Key:
    if url.scheme not in ("http", "https"):
        raise Unsupported(f"URL scheme {url.scheme!r}")
    if url.raw_user is not None or url.raw_password is not None:
        raise Unsupported("credentials in the URL")
    if url.raw_host is None or url.port is None:
        raise Unsupported(f"URL without a host or port: {url}")
    return url.scheme, url.raw_host, url.port


async def _read_answer(url: URL, reader: _Reader) -> Answer:
    """The answer's head, after any 1xx interim answers."""
    for _ in range(MAX_INTERIM + 1):
        head = await reader.until(b"\r\n\r\n", "the answer's head")
        version, status, headers = _parse_head(head, reader.conn.key[1])
        if status >= 200:
            return Answer(url, reader, version, status, headers)
        if status == 101:
            raise UpstreamError(f"{url.host} switched protocols unasked")
    raise UpstreamError(f"{url.host}: more than {MAX_INTERIM} interim (1xx) answers")


def _parse_head(head: bytes, host: str) -> tuple[int, int, CIMultiDict[str]]:
    """HTTP minor version, status and headers of an answer's head (ending in a blank line)."""
    status_line, *lines = head[:-4].split(b"\r\n")
    m = _STATUS_LINE.fullmatch(status_line)
    if m is None:
        raise UpstreamError(f"{host}: not an HTTP/1.x answer: {status_line[:40]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        h = _HEADER_LINE.fullmatch(line)
        if h is None:
            raise UpstreamError(f"{host}: a malformed header line: {line[:40]!r}")
        headers.add(h.group(1).decode("ascii"), h.group(2).decode("latin-1"))
    lengths = set(headers.getall("Content-Length", []))
    if len(lengths) > 1 or any(not v.isdigit() or not v.isascii() for v in lengths):
        raise UpstreamError(f"{host}: Content-Length {', '.join(sorted(lengths))}")
    return int(m.group(1)), int(m.group(2)), headers


def _keeps_alive(version: int, headers: CIMultiDict[str]) -> bool:
    tokens = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    return "close" not in tokens and (version == 1 or "keep-alive" in tokens)

"""Upstream.read_range through the daemon's own body reader (daemon/httpbody.py), in-process
against real servers on loopback: aiohttp servers for well-formed answers, raw asyncio servers
for the broken ones. The bytes must be exactly those asked for, or the read fails."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from yarl import URL

from modelpeer.daemon import httpbody
from modelpeer.daemon.errors import RangeIgnored, UpstreamError
from modelpeer.daemon.upstream import Upstream
from tests.fakehub.server import parse_range

MiB = 1024 * 1024
BLOB = random.Random(15).randbytes(4 * MiB + 123)
TOKEN = "Bearer hf_secret"
USER_AGENT = "modelpeer-test/1"


class BlobServer:
    """An aiohttp server of BLOB at /blob, answering a Range as `mode` says, and /moved, a
    redirect to `moved_to`; it records each request's headers and client port (one port per
    connection)."""

    def __init__(self, mode: str = "range", ssl_context: ssl.SSLContext | None = None) -> None:
        self.mode = mode
        self.ssl_context = ssl_context
        self.moved_to = ""
        self.requests: list[tuple[int, dict[str, str]]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> BlobServer:
        app = web.Application()
        app.router.add_get("/blob", self.blob)
        app.router.add_get("/moved", self.moved)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def connections(self) -> set[int]:
        return {port for port, _ in self.requests}

    async def moved(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        raise web.HTTPFound(self.moved_to)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        a, b = parse_range(request.headers.get("Range"), len(BLOB)) or (0, len(BLOB))
        if self.mode == "ignore":
            return web.Response(body=BLOB)
        shift = 1 if self.mode == "wrong" else 0
        headers = {"Content-Range": f"bytes {a + shift}-{b - 1 + shift}/{len(BLOB)}"}
        if self.mode == "range":
            return web.Response(status=206, body=BLOB[a:b], headers=headers)
        return await self.chunked(request, BLOB[a:b - 10 if self.mode == "chunked-short" else b],
                                  headers)

    @staticmethod
    async def chunked(request: web.Request, body: bytes,
                      headers: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(status=206, headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sizes = random.Random(1)
        pos = 0
        while pos < len(body):  # chunks of 1 byte to 300 KiB
            n = sizes.choice([1, 7, 4096, 65536, 300 * 1024])
            await resp.write(body[pos:pos + n])
            pos += n
        await resp.write_eof()
        return resp

    def _record(self, request: web.Request) -> None:
        assert request.transport is not None
        port = request.transport.get_extra_info("peername")[1]
        self.requests.append((port, dict(request.headers)))


@contextlib.asynccontextmanager
async def blob_server(mode: str = "range", ssl_context: ssl.SSLContext | None = None
                      ) -> AsyncIterator[BlobServer]:
    server = await BlobServer(mode, ssl_context).start()
    try:
        yield server
    finally:
        await server.stop()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(answer: Handler) -> AsyncIterator[str]:
    """A TCP server that answers each connection with `answer`: the URL of its /blob."""
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/blob"
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


def head_206(start: int, end: int, extra: str = "") -> bytes:
    return (f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{end - 1}/"
            f"{len(BLOB)}\r\nContent-Length: {end - start}\r\n{extra}\r\n").encode()


@contextlib.asynccontextmanager
async def upstream(hub: str = "http://hub.invalid", read_timeout: float = 5
                   ) -> AsyncIterator[Upstream]:
    up = Upstream([hub], timeout=read_timeout, user_agent=USER_AGENT)
    await up.start()
    try:
        yield up
    finally:
        await up.close()


async def read(up: Upstream, url: str, start: int, end: int,
               token: str | None = None) -> tuple[bytes, list[bytes | memoryview]]:
    """The bytes read_range gives, and its pieces (each used before the next is asked for)."""
    data = bytearray()
    pieces = []
    async for piece in up.read_range(URL(url), start, end, token=token):
        data += piece
        pieces.append(piece)
    return bytes(data), pieces


async def test_a_range_arrives_whole_in_pieces_of_one_reused_buffer() -> None:
    start, end = 1000, 1000 + 3 * MiB + 17
    async with blob_server() as server, upstream() as up:
        data, pieces = await read(up, f"{server.url}/blob", start, end)
    assert data == BLOB[start:end]
    buffers = {id(p.obj) for p in pieces if isinstance(p, memoryview)}
    assert len(buffers) == 1 and all(isinstance(p, memoryview) for p in pieces)
    assert [len(p) for p in pieces[1:-1]] == [httpbody.BUFFER] * (len(pieces) - 2)
    assert server.requests[0][1]["User-Agent"] == USER_AGENT


async def test_the_first_bytes_are_handed_on_before_the_buffer_fills() -> None:
    rest = asyncio.Event()

    async def slow_start(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head_206(0, MiB) + BLOB[:1000])
        await rest.wait()
        writer.write(BLOB[1000:MiB])
        await reader.read()

    async with raw_server(slow_start) as url, upstream() as up:
        pieces = aiter(up.read_range(URL(url), 0, MiB))
        first = bytes(await asyncio.wait_for(anext(pieces), 5))
        rest.set()
        data = first + b"".join([bytes(p) async for p in pieces])
    assert first == BLOB[:1000] and data == BLOB[:MiB]


async def test_with_patience_a_slow_senders_bytes_are_handed_on_before_the_buffer_fills(
        ) -> None:
    more = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head_206(0, MiB) + BLOB[:1000])
        await more.wait()
        writer.write(BLOB[1000:3000])
        await reader.read()

    pool = httpbody.Pool(timeout=5, user_agent=USER_AGENT)
    try:
        async with raw_server(slow) as url, pool.get(URL(url), {}) as answer:
            pieces = answer.body(MiB, patience=0.05)
            async with contextlib.aclosing(pieces):
                first = bytes(await asyncio.wait_for(anext(pieces), 5))
                more.set()
                second = bytes(await asyncio.wait_for(anext(pieces), 5))
    finally:
        pool.close()
    assert first == BLOB[:1000] and second and BLOB[1000:3000].startswith(second)


async def test_two_reads_share_one_kept_alive_connection() -> None:
    async with blob_server() as server, upstream() as up:
        first, _ = await read(up, f"{server.url}/blob", 0, MiB)
        second, _ = await read(up, f"{server.url}/blob", MiB, 2 * MiB + 5)
    assert first + second == BLOB[:2 * MiB + 5]
    assert len(server.requests) == 2 and len(server.connections) == 1


async def test_a_connection_idle_longer_than_keepalive_is_not_reused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpbody, "KEEPALIVE", 0.0)
    async with blob_server() as server, upstream() as up:
        await read(up, f"{server.url}/blob", 0, 10)
        await read(up, f"{server.url}/blob", 0, 10)
    assert len(server.connections) == 2


async def test_a_read_left_early_does_not_leave_its_connection_for_the_next() -> None:
    async with blob_server() as server, upstream() as up:
        pieces = cast(AsyncGenerator[bytes], up.read_range(URL(f"{server.url}/blob"), 0, 3 * MiB))
        async with contextlib.aclosing(pieces):
            await anext(pieces)
        data, _ = await read(up, f"{server.url}/blob", 5, 3 * MiB)
    assert data == BLOB[5:3 * MiB]
    assert len(server.connections) == 2


async def test_only_a_body_read_to_its_end_gives_its_buffer_to_the_next() -> None:
    """A piece of a body left early may still be in use (a write gone to a thread): its
    buffer must not receive the next body's bytes."""
    async with blob_server() as server, upstream() as up:
        pieces = cast(AsyncGenerator[memoryview], up.read_range(URL(f"{server.url}/blob"), 0,
                                                                 3 * MiB))
        async with contextlib.aclosing(pieces):
            held = await anext(pieces)
        _, after_abandoned = await read(up, f"{server.url}/blob", 0, 3 * MiB)
        _, after_whole = await read(up, f"{server.url}/blob", 0, 3 * MiB)
    first_buffer = {id(cast(memoryview, p).obj) for p in after_abandoned}
    assert id(held.obj) not in first_buffer
    assert {id(cast(memoryview, p).obj) for p in after_whole} == first_buffer


async def test_a_whole_body_for_a_range_is_range_ignored_unless_it_is_the_range() -> None:
    async with blob_server("ignore") as server, upstream() as up:
        url = f"{server.url}/blob"
        with pytest.raises(RangeIgnored):
            await read(up, url, 10, 2 * MiB)
        assert not up.serves_ranges(URL(url))
        data, _ = await read(up, url, 0, len(BLOB))  # bytes 0- to the end: the whole body
    assert data == BLOB


async def test_a_content_range_other_than_the_one_asked_for_fails() -> None:
    async with blob_server("wrong") as server, upstream() as up:
        with pytest.raises(UpstreamError, match="Content-Range 'bytes 11-"):
            await read(up, f"{server.url}/blob", 10, MiB)


async def test_a_chunked_body_is_read_without_its_framing() -> None:
    start, end = 3, 3 * MiB + 100
    async with blob_server("chunked") as server, upstream() as up:
        data, _ = await read(up, f"{server.url}/blob", start, end)
        again, _ = await read(up, f"{server.url}/blob", 0, 1000)
    assert data == BLOB[start:end] and again == BLOB[:1000]
    assert len(server.connections) == 1


async def test_a_chunked_body_shorter_than_the_range_fails() -> None:
    async with blob_server("chunked-short") as server, upstream() as up:
        with pytest.raises(UpstreamError, match=f"ended after {MiB - 10} of {MiB} bytes"):
            await read(up, f"{server.url}/blob", 0, MiB)


async def test_a_redirect_is_followed_and_the_token_goes_to_the_hub_only() -> None:
    async with blob_server() as hub, blob_server() as cdn, upstream(hub.url) as up:
        hub.moved_to = f"{cdn.url}/blob"
        data, _ = await read(up, f"{hub.url}/moved", 7, 1007, token=TOKEN)
        await read(up, f"{cdn.url}/blob", 0, 10, token=TOKEN)
    assert data == BLOB[7:1007]
    assert [h.get("Authorization") for _, h in hub.requests] == [TOKEN]
    assert [h.get("Authorization") for _, h in cdn.requests] == [None, None]
    assert {h["User-Agent"] for _, h in hub.requests + cdn.requests} == {USER_AGENT}


async def test_a_body_cut_short_is_an_error_after_the_bytes_that_came() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head_206(0, MiB) + BLOB[:MiB // 2])
        await writer.drain()

    data = bytearray()
    async with raw_server(half) as url, upstream() as up:
        with pytest.raises(UpstreamError, match=f"ended after {MiB // 2} of {MiB} bytes"):
            async for piece in up.read_range(URL(url), 0, MiB):
                data += piece
    assert data == BLOB[:MiB // 2]  # what came before the break is handed on


async def test_a_chunked_body_cut_short_is_an_error_after_the_bytes_that_came() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-1048575/"
                     + str(len(BLOB)).encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{MiB:x}\r\n".encode() + BLOB[:MiB // 2])
        await writer.drain()

    data = bytearray()
    async with raw_server(half) as url, upstream() as up:
        with pytest.raises(UpstreamError, match=f"ended after {MiB // 2} of {MiB} bytes"):
            async for piece in up.read_range(URL(url), 0, MiB):
                data += piece
    assert data == BLOB[:MiB // 2]


@pytest.mark.parametrize("sent", [0, 1000])
async def test_a_server_that_stops_sending_is_a_timeout(sent: int) -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if sent:
            writer.write(head_206(0, MiB) + BLOB[:sent])
        await asyncio.sleep(60)

    async with raw_server(stalls) as url, upstream(read_timeout=0.5) as up:
        with pytest.raises(TimeoutError, match="no byte for 0.5 s"):
            await read(up, url, 0, MiB)


async def test_garbage_instead_of_a_status_line_fails() -> None:
    async def ssh(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await asyncio.sleep(60)

    async with raw_server(ssh) as url, upstream() as up:
        with pytest.raises(UpstreamError, match="not an HTTP/1.x answer: b'SSH-2.0"):
            await read(up, url, 0, 100)


async def test_a_head_larger_than_the_bound_fails() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 206 Partial Content\r\n")
        while True:
            writer.write(b"X-Pad: " + b"a" * 1000 + b"\r\n")
            await writer.drain()

    async with raw_server(endless) as url, upstream() as up:
        with pytest.raises(UpstreamError, match=f"head is longer than {httpbody.MAX_HEAD}"):
            await read(up, url, 0, 100)


async def test_an_answer_that_ends_with_its_connection_is_read_with_aiohttp() -> None:
    requests = 0

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        await reader.readuntil(b"\r\n\r\n")
        requests += 1
        writer.write(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-99999/"
                     + str(len(BLOB)).encode() + b"\r\nConnection: close\r\n\r\n"
                     + BLOB[:100000])

    async with raw_server(until_close) as url, upstream() as up:
        data, pieces = await read(up, url, 0, 100000)
        again, _ = await read(up, url, 0, 100000)  # straight to aiohttp
    assert data == again == BLOB[:100000]
    assert requests == 3 and all(isinstance(p, bytes) for p in pieces)


async def test_a_kept_connection_the_server_closed_is_replaced() -> None:
    connections = 0

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head_206(0, 100) + BLOB[:100])
        await reader.readuntil(b"\r\n\r\n")  # the next request: closed without an answer

    async with raw_server(once) as url, upstream() as up:
        first, _ = await read(up, url, 0, 100)
        second, _ = await read(up, url, 0, 100)
    assert first == second == BLOB[:100]
    assert connections == 2


def tls_files(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate it signed for the name localhost (not for 127.0.0.1)."""
    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


async def test_tls_is_verified_against_the_default_trust_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca, cert, key = tls_files(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # what the default context trusts
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with blob_server(ssl_context=context) as server, upstream() as up:
        by_name = server.url.replace("127.0.0.1", "localhost")
        data, _ = await read(up, f"{by_name}/blob", 100, 2 * MiB)
        again, _ = await read(up, f"{by_name}/blob", 0, 10)
        with pytest.raises(ssl.SSLCertVerificationError):
            await read(up, f"{server.url}/blob", 0, 10)  # the certificate is not for this name
    assert data == BLOB[100:2 * MiB] and again == BLOB[:10]
    assert len(server.connections) == 1

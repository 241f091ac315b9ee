"""The local API answers only local clients: what a web page of another site, or a page that
DNS-rebinds its own name to 127.0.0.1, can send is refused before anything starts, and local
programs (the CLI, the Hub client, the status page) go on working."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest

from tests.fakehub import GOOD_TOKEN, MODEL, FakeHub, expected_files
from tests.harness import (
    Modelpeerd,
    StartDaemon,
    cli,
    get_body,
    hf_client,
    http_json,
    raw,
    wait_for,
)

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CACHED = f"/{MODEL}/resolve/main/config.json"
UNCACHED = f"/{MODEL}/resolve/main/sub/folder/weights.bin"
WARM_BODY = json.dumps({"repo": MODEL}).encode()
EVIL = "http://evil.example"
API = "/_modelpeer/v1"
# What Chromium adds to a request a page of another site makes, by kind of request.
NO_CORS_FETCH = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors",
                 "Sec-Fetch-Dest": "empty"}
IMAGE = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}


class Attempt(NamedTuple):
    name: str
    method: str
    path: str
    headers: dict[str, str | None]
    body: bytes | None
    status: int


# "{port}" is the daemon's port: a rebinding page reaches it under its own name and that port.
ATTEMPTS = [
    Attempt("no-cors warm from another site", "POST", f"{API}/warm",
            {"Content-Type": "text/plain;charset=UTF-8", "Origin": EVIL, **NO_CORS_FETCH},
            WARM_BODY, 403),
    Attempt("warm, text/plain, foreign Origin, no fetch metadata", "POST", f"{API}/warm",
            {"Content-Type": "text/plain", "Origin": EVIL}, WARM_BODY, 403),
    Attempt("warm, JSON, foreign Origin", "POST", f"{API}/warm",
            {"Content-Type": "application/json", "Origin": EVIL}, WARM_BODY, 403),
    Attempt("warm, text/plain, no Origin", "POST", f"{API}/warm",
            {"Content-Type": "text/plain"}, WARM_BODY, 415),
    Attempt("warm from another port of localhost (same-site)", "POST", f"{API}/warm",
            {"Content-Type": "application/json", "Origin": "http://localhost:8000",
             "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}, WARM_BODY, 403),
    Attempt("no-cors gc from another site", "POST", f"{API}/gc",
            {"Content-Type": "text/plain", "Origin": EVIL, **NO_CORS_FETCH}, b"", 403),
    Attempt("gc without a content type", "POST", f"{API}/gc", {}, None, 415),
    Attempt("no-cors verify from another site", "POST", f"{API}/verify?full=1",
            {"Content-Type": "text/plain", "Origin": EVIL, **NO_CORS_FETCH}, b"", 403),
    Attempt("verify, foreign Origin", "POST", f"{API}/verify",
            {"Content-Type": "application/json", "Origin": "null"}, b"{}", 403),
    Attempt("DELETE of the cached repo, foreign Origin", "DELETE", f"{API}/repos/model/{MODEL}",
            {"Content-Type": "application/json", "Origin": EVIL}, None, 403),
    Attempt("DELETE of the cached repo without a content type", "DELETE",
            f"{API}/repos/model/{MODEL}", {}, None, 415),
    Attempt("<img> of a resolve URL on another site", "GET", UNCACHED, IMAGE, None, 403),
    Attempt("status read by a rebinding page", "GET", f"{API}/status",
            {"Host": "evil.example:{port}"}, None, 421),
    Attempt("metrics read by a rebinding page", "GET", "/metrics",
            {"Host": "evil.example:{port}"}, None, 421),
    Attempt("resolve by a rebinding page", "GET", UNCACHED,
            {"Host": "evil.example:{port}"}, None, 421),
    Attempt("status page by a rebinding page", "GET", "/_modelpeer/",
            {"Host": "evil.example:{port}"}, None, 421),
    Attempt("status page script by a rebinding page", "GET", "/_modelpeer/static/app.js",
            {"Host": "evil.example:{port}"}, None, 421),
    Attempt("warm by a rebinding page (same-origin to the browser)", "POST", f"{API}/warm",
            {"Host": "evil.example:{port}", "Origin": "http://evil.example:{port}",
             "Content-Type": "application/json"}, WARM_BODY, 421),
    Attempt("DELETE by a rebinding page", "DELETE", f"{API}/repos/model/{MODEL}",
            {"Host": "evil.example:{port}", "Origin": "http://evil.example:{port}",
             "Content-Type": "application/json"}, None, 421),
    Attempt("a name that ends like a local one", "GET", f"{API}/status",
            {"Host": "127.0.0.1.evil.example:{port}"}, None, 421),
]


@pytest.fixture
def cached(start_daemon: StartDaemon, hub: FakeHub) -> Modelpeerd:
    """A daemon holding one file of MODEL, and a fake Hub that has seen no request since.
    A long ref TTL: reading the cached file again asks the Hub nothing."""
    d = start_daemon("--ref-ttl", "1h")
    assert get_body(d.url + CACHED) == expected_files(MODEL)["config.json"]
    wait_for(lambda: d.status()["transfers"] == [], "the download is stored")
    hub.reset()
    return d


def assert_nothing_happened(d: Modelpeerd, hub: FakeHub, what: str) -> None:
    stats = hub.stats()
    assert (stats["hub_requests"], stats["cdn_requests"], stats["xet_requests"]) == (0, 0, 0), (
        what, stats["requests"])
    assert http_json("GET", d.url + f"{API}/jobs") == [], what
    status = d.status()
    assert status["transfers"] == [], what
    assert status["store"]["complete_blobs"] == 1, what
    assert [r["repo_id"] for r in http_json("GET", d.url + f"{API}/repos")] == [MODEL], what
    assert get_body(d.url + CACHED) == expected_files(MODEL)["config.json"], what


def fill_port(headers: dict[str, str | None], port: int) -> dict[str, str | None]:
    return {k: v.format(port=port) if v is not None else None for k, v in headers.items()}


def test_requests_a_web_page_can_send_are_refused_and_change_nothing(
        cached: Modelpeerd, hub: FakeHub) -> None:
    d = cached
    for attempt in ATTEMPTS:
        status, headers, body = raw(d, attempt.method, attempt.path,
                                    fill_port(attempt.headers, d.port), attempt.body)
        assert status == attempt.status, (attempt.name, status, body)
        assert json.loads(body)["error"] == headers["X-Error-Message"], attempt.name
        assert "modelpeer" in headers["X-Error-Message"], attempt.name
        assert_nothing_happened(d, hub, attempt.name)
    refused = [line for line in d.log().splitlines() if "refused " in line]
    # one line per (rule, client address): host, sec-fetch-site, origin, content-type
    assert len(refused) == 4, refused
    assert any("Host 'evil.example:" in line for line in refused), refused


def test_a_request_without_host_is_refused(cached: Modelpeerd, hub: FakeHub) -> None:
    # aiohttp itself refuses HTTP/1.1 without Host; HTTP/1.0 gets as far as the guard
    for version, status in (("HTTP/1.1", 400), ("HTTP/1.0", 421)):
        with socket.create_connection((cached.host, cached.port), timeout=10) as s:
            s.sendall(f"GET {API}/status {version}\r\nConnection: close\r\n\r\n".encode())
            answer = s.makefile("rb").read()
        assert answer.split(b" ", 2)[1] == str(status).encode(), answer
        assert b'"store"' not in answer
    assert_nothing_happened(cached, hub, "no Host")


def test_the_error_says_what_was_refused_and_why(cached: Modelpeerd) -> None:
    status, headers, _ = raw(cached, "GET", f"{API}/status",
                             {"Host": f"evil.example:{cached.port}"})
    assert status == 421
    assert headers["X-Error-Message"].startswith(
        f"Host 'evil.example:{cached.port}' is not this daemon's address; modelpeer answers "
        "only local clients")
    _, headers, _ = raw(cached, "POST", f"{API}/gc", {"Content-Type": "text/plain"}, b"")
    assert "needs Content-Type: application/json (got 'text/plain')" in headers[
        "X-Error-Message"]


def test_local_names_and_the_status_pages_own_requests_are_served(cached: Modelpeerd) -> None:
    for host in (f"localhost:{cached.port}", "LOCALHOST", "127.0.0.1", "127.1.2.3:80",
                 f"[::1]:{cached.port}"):
        status, _, body = raw(cached, "GET", f"{API}/status", {"Host": host})
        assert status == 200, (host, body)
    own = {"Sec-Fetch-Site": "same-origin", "Origin": cached.url,
           "Content-Type": "application/json"}
    status, _, body = raw(cached, "GET", f"{API}/status", own)
    assert status == 200 and json.loads(body)["store"]["complete_blobs"] == 1
    status, _, body = raw(cached, "POST", f"{API}/gc", own, b"")
    assert status == 200, body
    status, _, _ = raw(cached, "GET", "/_modelpeer/", {"Sec-Fetch-Site": "none"})
    assert status == 200


def test_a_token_in_the_warm_body_is_refused(cached: Modelpeerd, hub: FakeHub) -> None:
    body = json.dumps({"repo": "acme/gated-model", "token": GOOD_TOKEN}).encode()
    status, _, answer = raw(cached, "POST", f"{API}/warm",
                            {"Content-Type": "application/json"}, body)
    assert status == 400
    assert "Authorization" in json.loads(answer)["error"]
    assert_nothing_happened(cached, hub, "token in the body")


def test_the_cli_still_warms_gcs_verifies_and_removes(start_daemon: StartDaemon,
                                                      hub: FakeHub) -> None:
    d = start_daemon()
    gated = ("warm", "acme/gated-model", "--nodes", "local", "--wait", "--json")
    without = cli(d, *gated)
    assert without.returncode != 0
    assert hub.stats()["cdn_requests"] == 0
    with_flag = cli(d, *gated, "--token", GOOD_TOKEN)
    assert with_flag.returncode == 0, with_flag.stdout + with_flag.stderr
    assert json.loads(with_flag.stdout)["state"] == "done"

    assert cli(d, "rm", "acme/gated-model").returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    with_env = cli(d, *gated, env={**env, "HF_TOKEN": GOOD_TOKEN})
    assert with_env.returncode == 0, with_env.stdout + with_env.stderr
    assert json.loads(with_env.stdout)["state"] == "done"

    for args in (("gc",), ("verify", "--full"), ("rm", "acme/gated-model"), ("gc",)):
        out = cli(d, *args)
        assert out.returncode == 0, (args, out.stdout + out.stderr)
    assert json.loads(cli(d, "ls", "--json").stdout) == []


def test_the_hub_client_still_downloads(start_daemon: StartDaemon, hub: FakeHub,
                                        hf_home: Callable[[], Path]) -> None:
    d = start_daemon()
    out = hf_client(d.url, hf_home(), "hf_hub_download", MODEL, "sub/folder/weights.bin")
    assert Path(out["result"]).read_bytes() == expected_files(MODEL)["sub/folder/weights.bin"]
    # paths-info is a form POST: the Host and Sec-Fetch-Site rules guard it, not a JSON rule
    out = hf_client(d.url, hf_home(), "paths_info", MODEL, ["config.json", "README.md"])
    assert sorted(out["result"]) == ["README.md", "config.json"], out


ATTACKER_PAGE = """<!doctype html><title>loading</title><script>
const daemon = "http://127.0.0.1:%(port)d";
const body = JSON.stringify({repo: "%(model)s"});
const post = (path) => fetch(daemon + path, {method: "POST", mode: "no-cors",
  headers: {"Content-Type": "text/plain"}, body});
const image = (src) => new Promise((settle) => {
  const img = new Image(); img.onload = img.onerror = settle; img.src = src; });
Promise.allSettled([post("/_modelpeer/v1/warm"), post("/_modelpeer/v1/gc"),
  post("/_modelpeer/v1/verify?full=1"), image(daemon + "%(uncached)s"),
  fetch(daemon + "/_modelpeer/v1/status").then((r) => r.text())])
  .then(() => { document.title = "done"; });
</script>"""


@contextlib.contextmanager
def serve_page(host: str, page: str) -> Iterator[str]:
    """Serve `page` at http://host:PORT/ from a thread; yields that URL."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            data = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_of_another_site_in_a_real_browser_gets_nothing(
        cached: Modelpeerd, hub: FakeHub, browser: WebDriver) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = ATTACKER_PAGE % {"port": cached.port, "model": MODEL, "uncached": UNCACHED}
    # 127.0.0.2 is another site than 127.0.0.1 to the browser, and both are this machine
    with serve_page("127.0.0.2", page) as attacker:
        browser.get(attacker)
        WebDriverWait(browser, 30).until(lambda b: b.title == "done")
    assert_nothing_happened(cached, hub, "the attacker page")
    # the page's requests did reach the daemon, and were refused for what the browser said
    assert "(Sec-Fetch-Site: cross-site)" in cached.log()
    browser.get_log("browser")  # the attacker page's console errors, not the status page's

    browser.get(cached.url + "/_modelpeer/")
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "conn").text == "live")
    assert browser.find_element(By.ID, "cache-sub").text.startswith("1 files")
    assert "Sec-Fetch-Site: cross-site" in browser.find_element(By.ID, "errors").text
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == [], errors

"""Operators can see it: Prometheus metrics move by the right amounts, and the live status page
shows a transfer growing in a real browser with no console errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from tests.fakehub import MODEL, FakeHub, expected_files
from tests.harness import (
    ROOT,
    MiB,
    Modelpeerd,
    StartDaemon,
    get_body,
    read_in_background,
    wait_for,
)

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

URL = "/acme/tiny-tts/resolve/main/model.safetensors"
SIZE = len(expected_files("acme/tiny-tts")["model.safetensors"])


Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(d: Modelpeerd) -> Metrics:
    text = get_body(d.url + "/metrics", timeout=10).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def served(m: Metrics, source: str) -> float:
    return m[("modelpeer_served_bytes_total", (("source", source),))]


def test_metrics_move_by_the_right_amounts(start_daemon: StartDaemon, hub: FakeHub) -> None:
    d = start_daemon()
    before = scrape(d)
    assert served(before, "upstream") == 0
    hub.faults(cdn_rate=4 * MiB)
    reader = read_in_background(d.url + URL)

    def once_upstream_bytes_served() -> Metrics | None:
        metrics = scrape(d)
        return metrics if served(metrics, "upstream") else None

    during = wait_for(once_upstream_bytes_served, "the first bytes served from the upstream")
    assert served(during, "upstream") < SIZE
    assert during[("modelpeer_active_transfers", ())] == 1
    reader.join(60)
    after = scrape(d)
    assert served(after, "upstream") == SIZE
    assert after[("modelpeer_upstream_bytes_total", ())] == SIZE
    assert after[("modelpeer_cache_misses_total", ())] == 1
    wait_for(lambda: d.status()["transfers"] == [], "the download is stored")
    hub.reset()
    assert len(get_body(d.url + URL)) == SIZE
    again = scrape(d)
    assert served(again, "store") == SIZE
    assert served(again, "upstream") == SIZE
    assert again[("modelpeer_cache_hits_total", ())] == 1
    assert again[("modelpeer_store_bytes", ())] >= SIZE
    assert again[("modelpeer_request_seconds_count", (("route", "resolve"),))] == 2
    for (name, labels), _ in again.items():
        assert all(k in ("source", "route", "kind", "state", "peer", "direction", "result", "le")
                   for k, _ in labels), (name, labels)


def test_status_page_shows_a_growing_transfer_without_console_errors(
        start_daemon: StartDaemon, hub: FakeHub, browser: WebDriver) -> None:
    d = start_daemon("--peer-upload-rate", "400mbit")
    hub.faults(cdn_rate=1 * MiB)  # ~12 s for the 48 MiB file over 4 connections
    read_in_background(d.url + URL)
    browser.get(d.url + "/_modelpeer/")
    first = _progress(browser)
    wait_for(lambda: _progress(browser) > first, f"the page's progress past {first}%",
             timeout=15)
    assert "acme/tiny-tts/model.safetensors" in _text(browser, "#transfers")
    assert _text(browser, "#conn") == "live"
    assert _text(browser, "#caps") == "no limit"  # upstream_rate
    assert "to peers: 50.0 MB/s" in _text(browser, "#caps-sub")
    # the plan graph: upstream -> this node
    assert browser.execute_script(
        "return document.querySelectorAll('#plan svg.plan-graph line.plan-edge').length")
    plan = _text(browser, "#plan")
    assert "upstream" in plan and d.status()["node"] in plan, plan
    browser.save_screenshot(str(ROOT / "docs" / "statuspage.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == [], errors


def _text(driver, css: str) -> str:  # type: ignore[no-untyped-def]
    """The text of the first element matching `css` ("" for none), read in the page in one
    step: the page redraws its rows, and an element found by one WebDriver call can be gone
    by the next (a stale element)."""
    return str(driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css))


def _progress(driver) -> float:  # type: ignore[no-untyped-def]
    pct = wait_for(lambda: _text(driver, "#transfers .pct"),
                   "a transfer shown on the status page")
    return float(pct.rstrip("%"))


def test_json_logs_carry_one_event_per_line(tmp_path: Path, hub: FakeHub) -> None:
    d = Modelpeerd(tmp_path / "cache", hub.url, extra=["--log-format", "json"])
    d.start()
    try:
        get_body(d.url + f"/{MODEL}/resolve/main/config.json")
    finally:
        d.stop()
    lines = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(rec) for rec in lines)
    assert any("serving the Hub API" in rec["msg"] for rec in lines)

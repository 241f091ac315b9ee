"""Fixtures of the end-to-end layer: the fake Hub, real modelpeerd processes, HF homes, the
network lab's cluster and a headless browser."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.fakehub import FakeHub
from tests.harness import HfHome, Modelpeerd, StartDaemon
from tests.netlab import Cluster, Lab, netlab_available

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `netlab` is skipped, saying why, where the network lab cannot run."""
    if item.get_closest_marker("netlab") and (reason := netlab_available()):
        pytest.skip(reason)


@pytest.fixture(scope="session")
def fakehub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """One fake Hub (with its CDN) for the session; faults and counters reset per test."""
    hub = FakeHub(tmp_path_factory.mktemp("fakehub"))
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def hub(fakehub: FakeHub) -> FakeHub:
    fakehub.reset()
    return fakehub


@pytest.fixture
def start_daemon(tmp_path: Path, hub: FakeHub) -> Iterator[StartDaemon]:
    """Start modelpeerd processes against the fake hub; all are stopped at the end."""
    started: list[Modelpeerd] = []
    counter = itertools.count()

    def start(*extra: str, cache_dir: Path | None = None, wait: bool = True) -> Modelpeerd:
        d = Modelpeerd(cache_dir or tmp_path / f"cache{next(counter)}", hub.url,
                       extra=["--chunk-size", "8MiB", *extra])
        started.append(d)
        return d.start(wait=wait)

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def hf_home(tmp_path: Path) -> HfHome:
    """A fresh, empty HF cache directory per call: a new client on a new machine."""
    counter = itertools.count()

    def make() -> Path:
        path = tmp_path / f"hf{next(counter)}"
        path.mkdir()
        return path

    return make


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, for a disk that fills up; skips without root."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        yield small
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A lab of 4 hosts on a 1 Gbit/s LAN and a fake Hub on its upstream host (the WAN rate is
    the test's parameter, if any); everything is stopped and the lab removed at the end."""
    wan = getattr(request, "param", "")
    lab = Lab(4, prefix=f"mpt{os.getpid() % 10000}", lan="1gbit", wan=wan)
    hub = FakeHub(tmp_path / "hub", host=lab.ip("up"), cdn_host=lab.ip("up"), port=8080,
                  cdn_port=8081, prefix_cmd=lab.ns("up"))
    c = Cluster(lab, hub, tmp_path)
    try:
        lab.up()
        hub.start()
        yield c
    finally:
        c.stop()
        hub.stop()
        lab.down()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """A headless Debian chromium under selenium, keeping the console log; skips without it."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1100,900",
                f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
    try:
        yield driver
    finally:
        driver.quit()

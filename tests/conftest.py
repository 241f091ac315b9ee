from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakehub import FakeHub
from tests.harness import Modelpeerd

MiB = 1024 * 1024


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
def start_daemon(tmp_path: Path, hub: FakeHub) -> Iterator[Callable[..., Modelpeerd]]:
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
def hf_home(tmp_path: Path) -> Callable[[], Path]:
    """A fresh, empty HF cache directory per call: a new client on a new machine."""
    counter = itertools.count()

    def make() -> Path:
        path = tmp_path / f"hf{next(counter)}"
        path.mkdir()
        return path

    return make

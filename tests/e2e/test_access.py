"""Who gets cached bytes of a gated repo: the real huggingface_hub client with several accounts
through a real modelpeerd in front of the fake Hub; then the grants and the API cache bounds in
process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict
from yarl import URL

from modelpeer.daemon import catalog
from modelpeer.daemon.catalog import OFFLINE_GRACE, Catalog, FileEntry, Repo
from modelpeer.daemon.errors import HubError
from modelpeer.daemon.index import open_index
from modelpeer.daemon.store import BlobId
from modelpeer.daemon.upstream import Answer
from tests.fakehub import GATED, GOOD_TOKEN, OTHER_TOKEN, FakeHub, expected_files
from tests.harness import (
    HfHome,
    Modelpeerd,
    StartDaemon,
    assert_no_leaks,
    download,
    fetch,
    hf_client,
    snapshot,
)

WEIGHTS = "model.safetensors"


def assert_gated(out: dict[str, Any]) -> None:
    assert "GatedRepoError" in out.get("errors", []), out


def read_public_metadata(d: Modelpeerd, home: Path, token: str) -> None:
    """What a client reads of a gated repo before its files; the Hub shows it to anyone."""
    assert hf_client(d.url, home, "model_info", GATED, token=token)["result"]
    files = hf_client(d.url, home, "list_repo_files", GATED, token=token)["result"]
    assert WEIGHTS in files
    tree = hf_client(d.url, home, "list_repo_tree", GATED, recursive=True, token=token)
    assert WEIGHTS in tree["result"]


def test_cached_gated_files_go_only_to_the_account_with_access(
        start_daemon: StartDaemon, hf_home: HfHome, hub: FakeHub) -> None:
    d = start_daemon()
    want = expected_files(GATED)
    assert snapshot(d, hf_home(), GATED, token=GOOD_TOKEN) == want
    cdn_bytes = hub.stats()["cdn_bytes"]

    assert_gated(hf_client(d.url, hf_home(), "hf_hub_download", GATED, WEIGHTS,
                           token=OTHER_TOKEN))
    read_public_metadata(d, hf_home(), OTHER_TOKEN)
    assert_gated(hf_client(d.url, hf_home(), "hf_hub_download", GATED, WEIGHTS,
                           token=OTHER_TOKEN))
    assert_gated(hf_client(d.url, hf_home(), "snapshot_download", GATED, token=OTHER_TOKEN))
    assert_gated(hf_client(d.url, hf_home(), "hf_hub_download", GATED, WEIGHTS))

    assert snapshot(d, hf_home(), GATED, token=GOOD_TOKEN) == want
    assert hub.stats()["cdn_bytes"] == cdn_bytes
    assert_no_leaks(hub)


def test_with_the_hub_down_the_account_without_access_is_still_refused(
        start_daemon: StartDaemon, hf_home: HfHome, hub: FakeHub) -> None:
    d = start_daemon()
    want = expected_files(GATED)[WEIGHTS]
    assert download(d, hf_home(), GATED, WEIGHTS, token=GOOD_TOKEN) == want
    read_public_metadata(d, hf_home(), OTHER_TOKEN)
    hub.faults(hub_down=True)

    # what the client gets, without its ~20 s of retries of a 5xx before LocalEntryNotFoundError
    url = f"{d.url}/{GATED}/resolve/main/{WEIGHTS}"
    for auth in ({"Authorization": f"Bearer {OTHER_TOKEN}"}, {}):
        status, _, body = fetch(url, auth)
        assert status == 502 and b"cannot be checked" in body, (auth, status, body[:200])
    assert download(d, hf_home(), GATED, WEIGHTS, token=GOOD_TOKEN) == want


# --- in process: grants and the API cache ---------------------------------------------------
class Clock:
    """Stands for the `time` module in catalog.py: one settable clock for both readings."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class CountingUpstream:
    """Answers every Hub API request with an empty JSON object, counting them."""

    def __init__(self) -> None:
        self.calls = 0

    async def hub(self, method: str, path_qs: str, **_: Any) -> Answer:
        self.calls += 1
        return Answer(200, CIMultiDict({"Content-Type": "application/json"}), b"{}",
                      URL("http://hub.invalid" + path_qs))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(catalog, "time", c)
    return c


def offline_catalog_with_one_file(tmp_path: Path) -> tuple[Catalog, FileEntry]:
    cat = Catalog(open_index(tmp_path / "index.sqlite3"), CountingUpstream(),  # type: ignore[arg-type]
                  ref_ttl=60, offline=True)
    repo = Repo("model", GATED)
    entry = FileEntry(repo, "c" * 40, WEIGHTS, BlobId("d" * 64, "sha256", 10), lfs=True)
    cat.remember(repo, "main", entry.commit, [entry])
    return cat, entry


async def served(cat: Catalog, entry: FileEntry, token: str) -> bool:
    try:
        await cat.resolve_file(entry.repo, entry.commit, entry.path, token)
    except HubError:
        return False
    return True


async def test_grants_expire_after_the_offline_grace_and_the_oldest_go_beyond_the_bound(
        tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog, "MAX_GRANTS", 3)
    cat, entry = offline_catalog_with_one_file(tmp_path)
    tokens = [f"Bearer hf_account_{i}" for i in range(5)]
    for token in tokens:
        cat.upstream_served_file(entry.repo, token)
        clock.now += 1
    assert [await served(cat, entry, t) for t in tokens] == [False, False, True, True, True]
    assert not await served(cat, entry, "Bearer hf_never_served")

    clock.now += OFFLINE_GRACE - 3
    assert await served(cat, entry, tokens[-1])
    clock.now += 3
    assert not await served(cat, entry, tokens[-1])
    cat.upstream_served_file(entry.repo, tokens[0])
    assert len(cat._grants) == 1  # the expired ones went with this insert


async def test_api_cache_drops_answers_unused_for_a_month_and_keeps_a_bounded_number(
        tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog, "API_CACHE_ROWS", 3)
    monkeypatch.setattr(catalog, "API_PRUNE_EVERY", 0)
    upstream = CountingUpstream()
    cat = Catalog(open_index(tmp_path / "index.sqlite3"), upstream,  # type: ignore[arg-type]
                  ref_ttl=60, offline=False)
    repo = Repo("model", "gpt2")
    commit = "c" * 40

    async def upstream_asked(path: str, revision: str) -> bool:
        before = upstream.calls
        await cat.api(repo, "GET", f"{repo.api_path}/{path}", revision=revision, token=None)
        clock.now += 1
        return upstream.calls > before

    def rows() -> int:
        return cat.db.execute("SELECT COUNT(*) FROM api_cache").fetchone()[0]

    assert await upstream_asked(f"revision/{commit}", commit)
    assert await upstream_asked("tree/main?page=0", "main")
    clock.now += 31 * 24 * 3600
    assert not await upstream_asked(f"revision/{commit}", commit)  # in use: kept
    assert await upstream_asked("tree/main?page=1", "main")  # a save prunes
    assert rows() == 2  # page 0 was not fetched for a month
    for page in range(2, 6):
        assert await upstream_asked(f"tree/main?page={page}", "main")
    assert rows() == 3
    assert not await upstream_asked("tree/main?page=5", "main")
    assert await upstream_asked(f"revision/{commit}", commit)  # the oldest, dropped

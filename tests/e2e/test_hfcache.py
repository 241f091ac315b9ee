"""`modelpeer import-hf-cache`: models already on disk in an HF cache join the store, checked."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.fakehub import FakeHub, expected_files
from tests.harness import HfHome, StartDaemon, cli, hf_client, snapshot

DATASET = "acme/speech-set"


def hf_cache_from_the_hub(hub: FakeHub, home: Path) -> Path:
    """What a user had before modelpeer: snapshots downloaded straight from the Hub."""
    for repo, kind in (("gpt2", "model"), (DATASET, "dataset")):
        out = hf_client(hub.url, home, "snapshot_download", repo, repo_type=kind)
        assert "result" in out, out
    return home / "hub"


def test_an_hf_cache_is_imported_and_served_with_the_hub_down(
        start_daemon: StartDaemon, hub: FakeHub, hf_home: HfHome) -> None:
    cache = hf_cache_from_the_hub(hub, hf_home())
    hub.reset()
    d = start_daemon()
    done = cli(d, "import-hf-cache", str(cache), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    wanted = len(expected_files("gpt2")) + len(expected_files(DATASET, repo_type="dataset"))
    assert (summary["repos"], summary["files"], summary["skipped"]) == (2, wanted, [])
    # pytest's tmp dirs are 0700: the daemon may not open the files, the CLI streams them
    assert summary["method"] == "copy" and "not searchable by other accounts" in \
        summary["no_reflink"]
    assert {r["confirmed_by"] for r in summary["imports"]} == {"upstream"}
    assert all(r["public"] and r["revisions"] == ["main"] for r in summary["imports"])
    assert hub.stats()["cdn_requests"] == 0  # nothing came from the Hub's CDN

    hub.stop()
    try:
        assert snapshot(d, hf_home(), "gpt2") == expected_files("gpt2")
        assert (snapshot(d, hf_home(), DATASET, repo_type="dataset")
                == expected_files(DATASET, repo_type="dataset"))
    finally:
        hub.restart()


def test_a_blob_failing_its_digest_is_reported_and_skipped(
        start_daemon: StartDaemon, hub: FakeHub, hf_home: HfHome) -> None:
    home = hf_home()
    out = hf_client(hub.url, home, "snapshot_download", "gpt2")
    assert "result" in out, out
    weights = Path(out["result"]) / "model.safetensors"
    blob = weights.resolve()
    raw = bytearray(blob.read_bytes())
    raw[12345] ^= 1
    blob.write_bytes(bytes(raw))
    d = start_daemon()
    hub.reset()
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    done = cli(d, "import-hf-cache", env={**env, "HF_HOME": str(home)})  # the default dir
    assert done.returncode == 1, done.stdout + done.stderr
    assert "skipped 1" in done.stdout and "model.safetensors" in done.stdout
    assert "imported 1 repos, 1 files" in done.stdout
    config = json.loads(cli(d, "ls", "--json").stdout)
    assert [(r["repo_id"], r["files"]) for r in config] == [("gpt2", 2)]
    # the skipped file was never stored: the daemon fetches it from the Hub when asked
    assert snapshot(d, hf_home(), "gpt2") == expected_files("gpt2")
    assert hub.stats()["cdn_requests"] > 0

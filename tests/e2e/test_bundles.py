"""Air-gapped bundles: export on one daemon, import on one without an upstream; a damaged
archive is refused and leaves the store as it was."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehub import GOOD_TOKEN, OTHER_TOKEN, FakeHub, expected_files
from tests.harness import HfHome, MiB, Modelpeerd, StartDaemon, cli, fetch, free_port, snapshot


@pytest.fixture
def airgapped(tmp_path: Path) -> Iterator[Modelpeerd]:
    """A daemon whose upstream is a port nobody listens on."""
    with Modelpeerd(tmp_path / "airgapped", f"http://127.0.0.1:{free_port()}",
                    extra=["--chunk-size", "8MiB"]) as d:
        yield d


def warm_and_export(d: Modelpeerd, repo: str, out: Path) -> bytes:
    warmed = cli(d, "warm", repo, "--nodes", "local", "--wait")
    assert warmed.returncode == 0, warmed.stderr
    exported = cli(d, "export", repo, "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    return out.read_bytes()


def store_state(d: Modelpeerd) -> tuple[object, ...]:
    status = d.status()
    files = sorted(p.name for p in (d.cache_dir / "chunks").rglob("*") if p.is_file())
    return status["store"], files, json.loads(cli(d, "ls", "--json").stdout)


def test_a_bundle_serves_the_snapshot_on_a_node_without_upstream(
        start_daemon: StartDaemon, hub: FakeHub, airgapped: Modelpeerd, hf_home: HfHome,
        tmp_path: Path) -> None:
    repo = "acme/tiny-tts"
    data = warm_and_export(start_daemon(), repo, tmp_path / "tiny.tar")
    with tarfile.open(tmp_path / "tiny.tar") as tar:  # a plain tar, manifest first
        names = tar.getnames()
        manifest = json.loads(tar.extractfile(names[0]).read())  # type: ignore[union-attr]
    assert names[:2] == ["modelpeer-bundle.json", "modelpeer-bundle.json.sha256"]
    assert manifest["revisions"] == ["main"] and manifest["public"] is True
    assert {f["path"] for f in manifest["files"]} == set(expected_files(repo))
    assert len(data) % 512 == 0

    imported = cli(airgapped, "import", str(tmp_path / "tiny.tar"), "--json")
    assert imported.returncode == 0, imported.stderr
    result = json.loads(imported.stdout)
    assert result["confirmed_by"] == "bundle" and result["files"] == len(expected_files(repo))
    assert snapshot(airgapped, hf_home(), repo) == expected_files(repo)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_bundle_is_refused_and_nothing_is_kept(
        start_daemon: StartDaemon, hub: FakeHub, airgapped: Modelpeerd, tmp_path: Path,
        damage: str) -> None:
    repo = "bundles/small"
    hub.add_repo(repo, {"a.bin": {"size": 3 * MiB, "lfs": True},
                        "b.txt": {"size": 1000, "lfs": False},
                        "c.bin": {"size": 2 * MiB, "lfs": True}})
    good = warm_and_export(start_daemon(), repo, tmp_path / "good.tar")
    before = store_state(airgapped)
    last_blob = len(good) - 1024 - 2 * MiB  # inside c.bin, after the other blobs went in
    for at in (700, 3000, len(good) // 2, last_blob, len(good) - 100, len(good) - 1):
        bad = tmp_path / f"bad-{at}.tar"
        if damage == "flip":
            raw = bytearray(good)
            raw[at] ^= 0x10
            bad.write_bytes(bytes(raw))
        else:
            bad.write_bytes(good[:at])
        refused = cli(airgapped, "import", str(bad))
        assert refused.returncode == 1, (at, refused.stdout)
        assert "refused" in refused.stderr and str(bad) in refused.stderr, refused.stderr
        assert "at byte" in refused.stderr
        assert store_state(airgapped) == before, at
    assert cli(airgapped, "import", str(tmp_path / "good.tar")).returncode == 0


def test_a_gated_repo_stays_gated_after_import(
        start_daemon: StartDaemon, hub: FakeHub, airgapped: Modelpeerd, tmp_path: Path) -> None:
    repo, path, out = "acme/gated-model", "model.safetensors", tmp_path / "gated.tar"
    d = start_daemon()
    warmed = cli(d, "warm", repo, "--nodes", "local", "--wait", "--token", GOOD_TOKEN)
    assert warmed.returncode == 0, warmed.stderr
    refused = cli(d, "export", repo, "-o", str(out))
    assert refused.returncode == 1 and "401" in refused.stderr and not out.exists()
    assert cli(d, "export", repo, "-o", str(out), "--token", GOOD_TOKEN).returncode == 0

    imported = cli(airgapped, "import", str(out), "--token", GOOD_TOKEN, "--json")
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["public"] is False
    url = f"{airgapped.url}/{repo}/resolve/main/{path}"
    assert fetch(url, {"Authorization": f"Bearer {GOOD_TOKEN}"})[2] == expected_files(repo)[path]
    for headers in ({}, {"Authorization": f"Bearer {OTHER_TOKEN}"}):
        status, _, body = fetch(url, headers)
        assert status == 502 and b"cannot be checked" in body

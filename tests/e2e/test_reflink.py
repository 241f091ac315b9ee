"""Reflinks: on XFS (reflink=1) the store and the HF cache share one copy of each blob, after
`import-hf-cache` and after `dedupe`; on a filesystem without them both say so, import copies
and dedupe changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehub import FakeHub, expected_files
from tests.harness import MiB, StartDaemon, cli, fetch, hf_client, tree_bytes

SIZE = 40 * MiB


def _open_dir(prefix: str) -> Path:
    """A directory every local account can search: the daemon opens only files anyone could
    read (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@pytest.fixture
def plain_dir() -> Iterator[Path]:
    """On the default filesystem (ext4 or tmpfs here: no reflinks)."""
    path = _open_dir("mp-plain-")
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh loop-mounted XFS with reflinks; skipped without root or mkfs.xfs, always
    unmounted."""
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        pytest.skip("needs root and mkfs.xfs (apt-get install xfsprogs)")
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(512 * MiB)
    made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True)
    if made.returncode:
        pytest.skip(f"mkfs.xfs failed: {made.stderr.decode()[-300:]}")
    mnt = _open_dir("mp-xfs-")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True)
    if mounted.returncode:
        mnt.rmdir()
        pytest.skip(f"cannot loop-mount XFS here: {mounted.stderr.decode()[-300:]}")
    mnt.chmod(0o755)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def used(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def hf_cache(endpoint: str, home: Path, repo: str) -> Path:
    out = hf_client(endpoint, home, "snapshot_download", repo)
    assert "result" in out, out
    return Path(out["result"])


def test_on_xfs_the_store_and_the_hf_cache_keep_one_copy(
        xfs: Path, start_daemon: StartDaemon, hub: FakeHub) -> None:
    hub.add_repo("reflink/one", {"w.bin": {"size": SIZE, "lfs": True},
                                 "config.json": {"size": 0, "lfs": False}})
    hub.add_repo("reflink/two", {"w.bin": {"size": SIZE, "lfs": True}})
    (xfs / "hf1").mkdir()
    first = hf_cache(hub.url, xfs / "hf1", "reflink/one")  # on disk before modelpeer
    d = start_daemon(cache_dir=xfs / "cache")
    before = used(xfs)
    done = cli(d, "import-hf-cache", str(xfs / "hf1" / "hub"), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["method"] == "reflink" and summary["stored_bytes"] > SIZE
    assert used(xfs) - before < 4 * MiB
    status, _, body = fetch(f"{d.url}/reflink/one/resolve/main/w.bin")
    assert status == 200 and body == expected_files("reflink/one")["w.bin"]
    assert tree_bytes(first) == expected_files("reflink/one")

    # a client downloads through the daemon: the store and its HF cache hold a copy each
    (xfs / "hf2").mkdir()
    second = hf_cache(d.url, xfs / "hf2", "reflink/two")
    two_copies = used(xfs)
    assert two_copies - before > 2 * SIZE - 4 * MiB
    deduped = cli(d, "dedupe", str(xfs / "hf2" / "hub"), "--json")
    assert deduped.returncode == 0, deduped.stdout + deduped.stderr
    result = json.loads(deduped.stdout)
    assert result["shared_files"] == 1 and result["freed_bytes"] > SIZE - 4 * MiB
    assert used(xfs) - before < SIZE + 4 * MiB
    assert tree_bytes(second) == expected_files("reflink/two")
    assert tree_bytes(first) == expected_files("reflink/one")
    verify = cli(d, "verify", "--full")
    assert verify.returncode == 0, verify.stdout


def test_without_reflinks_import_copies_and_dedupe_changes_nothing(
        plain_dir: Path, start_daemon: StartDaemon, hub: FakeHub) -> None:
    (plain_dir / "hf").mkdir()
    hf_cache(hub.url, plain_dir / "hf", "gpt2")
    d = start_daemon(cache_dir=plain_dir / "cache")
    done = cli(d, "import-hf-cache", str(plain_dir / "hf" / "hub"))
    assert done.returncode == 0, done.stderr
    assert "no reflink: the filesystem cannot share extents" in done.stderr
    assert "copied into the store" in done.stdout

    blobs = sorted((plain_dir / "hf" / "hub").rglob("blobs/*"))
    before = [(p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in blobs]
    deduped = cli(d, "dedupe", str(plain_dir / "hf" / "hub"))
    assert deduped.returncode == 1
    assert "no reflink" in deduped.stdout and "nothing changed" in deduped.stdout
    assert [(p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in blobs] == before

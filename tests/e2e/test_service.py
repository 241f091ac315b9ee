"""Running as a systemd service: the unit verifies, sd_notify is spoken, SIGTERM is graceful,
the config example is complete, install.sh is idempotent and uninstalls cleanly, the cluster key
comes as a systemd credential and an unusable one stops the daemon."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelpeer.daemon.config import OPTIONS, read_config_file
from modelpeer.daemon.errors import ConfigError
from modelpeer.daemon.keyfile import cluster_id_of, read_key_file
from tests.fakehub import MODEL, FakeHub, expected_files
from tests.harness import (
    ROOT,
    MiB,
    Modelpeerd,
    durable_bytes,
    free_port,
    get_body,
    http_json,
    keyed_daemon,
    read_in_background,
    transferring,
    wait_for,
)
from tests.netlab import write_key

SYSTEMD = ROOT / "systemd"


needs_systemd_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"),
                                           reason="systemd-analyze not installed")


def _systemd_analyze_verify(unit: Path, dropins: list[Path], tmp_path: Path) -> str:
    """The unit's text, after `systemd-analyze verify` passed on it with its drop-ins."""
    # verify insists that ExecStart exists: point it at this checkout's modelpeerd
    daemon = Path(sys.executable).parent / "modelpeerd"
    text = unit.read_text()
    assert "ExecStart=/opt/modelpeer/bin/modelpeerd " in text
    copy = tmp_path / "verify" / "modelpeer.service"
    (copy.parent / "modelpeer.service.d").mkdir(parents=True)
    copy.write_text(text.replace("/opt/modelpeer/bin/modelpeerd", str(daemon)))
    for dropin in dropins:
        shutil.copy(dropin, copy.parent / "modelpeer.service.d" / dropin.name)
    out = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    return text


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _systemd_analyze_verify(SYSTEMD / "modelpeer.service", [SYSTEMD / "cluster-key.conf"],
                                   tmp_path)
    for setting in ("Type=notify", "User=modelpeer", "CacheDirectory=modelpeer",
                    "StateDirectory=modelpeer", "ConfigurationDirectory=modelpeer",
                    "Restart=on-failure", "RestartPreventExitStatus=2 ", "LimitNOFILE=",
                    "MemoryMax=",
                    "ProtectSystem=strict", "NoNewPrivileges=yes", "RestrictAddressFamilies="):
        assert setting in unit


def test_config_example_has_every_key_and_parses(tmp_path: Path) -> None:
    text = (SYSTEMD / "modelpeer.toml").read_text()
    for opt in OPTIONS:
        assert re.search(rf"^# {opt.name} = ", text, re.M), opt.name
    assert read_config_file(SYSTEMD / "modelpeer.toml") == {}
    uncommented = tmp_path / "all.toml"
    uncommented.write_text(re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M))
    values = read_config_file(uncommented)
    assert set(values) == {o.name for o in OPTIONS}
    assert values["listen"] == ("127.0.0.1", 6580)
    assert values["chunk_size"] == 64 * MiB


@pytest.mark.parametrize(("content", "message"), [
    ('listen = "127.0.0.1:6580"\nlisten_port = 3\n', ":2: unknown key 'listen_port'"),
    ('\n\nmax_cache_size = "lots"\n', ":3: bad value for max_cache_size"),
    ("upstream = [\"ftp://x\"]\n", ":1: bad value for upstream"),
])
def test_bad_config_is_refused_with_file_and_line(tmp_path: Path, content: str,
                                                  message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(f"{path}{message}")):
        read_config_file(path)
    out = subprocess.run([sys.executable, "-m", "modelpeer.daemon.main", "--config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and f"{path}{message}" in out.stderr


@pytest.mark.parametrize(("content", "mode", "message"), [
    ("0123456789abcdef" * 4 + "\n", 0o644, "the cluster key is readable by others; chmod 600 it"),
    (None, 0, "no cluster key there; copy the cluster's key there or make one with"),
    ("not hex\n", 0o600, "not a hex key; make one with `modelpeer cluster-key new`"),
    ("00ff\n", 0o600, "the key is too short (2 bytes; want >= 16)"),
])
def test_an_unusable_cluster_key_stops_the_daemon_saying_what_to_do(
        tmp_path: Path, hub: FakeHub, content: str | None, mode: int, message: str) -> None:
    key = tmp_path / "cluster.key"
    if content is not None:
        key.write_text(content)
        key.chmod(mode)
    d = keyed_daemon(tmp_path / "cache", hub.url, key)
    started = time.monotonic()
    out = subprocess.run(d.command(), capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert time.monotonic() - started < 10
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.splitlines()
    assert line.startswith(f"modelpeerd: {key}: {message}"), line


class NotifySocket:
    """A datagram socket standing in for systemd's; records what the daemon says, and
    whether the daemon's health check already answered at that moment."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[str, bool]] = []
        self.health_url = ""
        self._stop = False
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            healthy = False
            if self.health_url:
                try:
                    healthy = http_json("GET", self.health_url, timeout=2)["status"] == "ok"
                except OSError:
                    healthy = False
            self.messages.extend((line, healthy) for line in data.splitlines())

    def said(self, line: str) -> bool:
        return any(m == line for m, _ in self.messages)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def test_notify_ready_then_stopping_and_a_graceful_sigterm_mid_download(
        tmp_path: Path, hub: FakeHub) -> None:
    ns = NotifySocket(tmp_path / "notify.sock")
    d = Modelpeerd(tmp_path / "cache", hub.url, extra=["--chunk-size", "8MiB"],
                   env={"NOTIFY_SOCKET": str(ns.path)})
    ns.health_url = d.url + "/_modelpeer/v1/health"
    try:
        d.start()
        wait_for(lambda: ns.said("READY=1"), "READY=1 on the notify socket", timeout=15)
        assert [h for m, h in ns.messages if m == "READY=1"] == [True], \
            "READY=1 came before the API answered"
        hub.faults(cdn_rate=2 * MiB)  # 48 MiB at 4 x 2 MiB/s: in flight for several seconds
        url = f"{d.url}/acme/tiny-tts/resolve/main/model.safetensors"
        read_in_background(url)
        wait_for(lambda: transferring(d, 4 * MiB), "4 MiB of the download in", timeout=15)
        started = time.monotonic()
        assert d.stop(signal.SIGTERM, timeout=10) == 0
        assert time.monotonic() - started < 10
        wait_for(lambda: ns.said("STOPPING=1"), "STOPPING=1 on the notify socket", timeout=1)
        assert any(m.startswith("STATUS=") for m, _ in ns.messages)
    finally:
        d.stop()
        ns.close()
    durable = durable_bytes(tmp_path / "cache")
    assert durable > 1 * MiB, "the stop should have checkpointed what was written"
    hub.reset()
    d2 = Modelpeerd(tmp_path / "cache", hub.url, extra=["--chunk-size", "8MiB"]).start()
    try:
        assert get_body(f"{d2.url}/{MODEL}/resolve/main/model.safetensors") == \
            expected_files(MODEL)["model.safetensors"]
        refetched = hub.stats()["cdn_bytes"]
        assert refetched == 48 * MiB - durable, (durable, refetched)
    finally:
        d2.stop()


def test_profile_snippet_and_modelpeer_env_agree() -> None:
    sourced = subprocess.run(["sh", "-c", f". {SYSTEMD / 'profile.d/modelpeer.sh'}; "
                                          "echo $HF_ENDPOINT"],
                             capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    env = subprocess.run([sys.executable, "-m", "modelpeer.client.cli", "env"],
                         capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "MODELPEER_URL"})
    assert env.stdout.strip() == f"export HF_ENDPOINT={sourced.stdout.strip()}"
    assert (SYSTEMD / "environment.d/60-modelpeer.conf").read_text().strip().endswith(
        f"HF_ENDPOINT={sourced.stdout.strip()}")


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not p.is_symlink() and "__pycache__" not in rel \
                and not rel.endswith((".pyc", "/RECORD")):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[rel + "/"] = ""
    return out


def test_install_twice_is_idempotent_and_uninstall_keeps_cache_and_config(
        tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = _install_sh(root)
    assert first.returncode == 0, first.stderr
    assert (root / "opt/modelpeer/bin/modelpeerd").exists()
    assert (root / "etc/systemd/system/modelpeer.service").exists()
    before = _tree(root)
    config = root / "etc/modelpeer/modelpeer.toml"
    config.write_text(config.read_text() + 'log_level = "debug"\n')  # an admin's edit
    second = _install_sh(root)
    assert second.returncode == 0, second.stderr
    after = _tree(root)
    assert 'log_level = "debug"' in config.read_text(), "an edited config was overwritten"
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {"etc/modelpeer/modelpeer.toml", "etc/modelpeer/modelpeer.toml.example"}
    (root / "var/cache/modelpeer").mkdir(parents=True)
    (root / "var/cache/modelpeer/index.sqlite3").write_text("x")
    out = _install_sh(root, "--uninstall")
    assert out.returncode == 0, out.stderr
    left = {k for k, _ in _tree(root).items() if not k.endswith("/")}
    assert left == {"etc/modelpeer/modelpeer.toml", "var/cache/modelpeer/index.sqlite3"}


def _install_sh(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """install.sh without downloading: the package goes in with --no-deps, and its commands
    (install.sh runs `modelpeer cluster-key check`) find the dependencies on PYTHONPATH, in
    the test's own environment."""
    env = {**os.environ, "MODELPEER_INSTALL_PIP_ARGS": "--no-deps",
           "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    return subprocess.run([str(SYSTEMD / "install.sh"), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=300, env=env)


@needs_systemd_analyze
def test_install_hands_the_cluster_key_to_the_unit_only_when_there_is_one(
        tmp_path: Path) -> None:
    root = tmp_path / "root"
    unit = root / "etc/systemd/system/modelpeer.service"
    dropin = unit.parent / "modelpeer.service.d/cluster-key.conf"
    key = write_key(root / "etc/modelpeer/cluster.key")
    with_key = _install_sh(root)
    assert with_key.returncode == 0, with_key.stderr
    assert "LoadCredential=cluster.key:/etc/modelpeer/cluster.key" in \
        dropin.read_text().splitlines()
    assert f"cluster key {key}: the unit hands it to modelpeerd" in with_key.stdout
    _systemd_analyze_verify(unit, [dropin], tmp_path)
    out = _install_sh(root, "--uninstall")
    assert out.returncode == 0, out.stderr
    assert not dropin.parent.exists() and key.exists()

    key.chmod(0o644)
    refused = _install_sh(root)
    assert refused.returncode == 1
    assert f"{key}: the cluster key is readable by others; chmod 600 it" in refused.stderr

    key.unlink()
    without_key = _install_sh(root)
    assert without_key.returncode == 0, without_key.stderr
    assert not dropin.parent.exists()
    assert not re.search(r"^\s*LoadCredential", unit.read_text(), re.M)
    assert f"no cluster key at {key}: a local cache only" in without_key.stdout


def test_sighup_reloads_what_it_can_and_names_what_needs_a_restart(
        tmp_path: Path, hub: FakeHub) -> None:
    config = tmp_path / "modelpeer.toml"
    config.write_text('log_level = "warning"\nref_ttl = "60s"\n')
    d = Modelpeerd(tmp_path / "cache", hub.url, extra=["--config", str(config)])
    d.start()
    try:
        config.write_text('log_level = "info"\nref_ttl = "5s"\nchunk_size = "8MiB"\n')
        d.reload("reloaded settings")
        assert "chunk_size changed; restart the daemon to apply" in d.log()
        config.write_text("log_level = 3\n")
        d.reload("reload refused")
        assert f"reload refused, keeping the running settings: {config}:1" in d.log()
        assert http_json("GET", d.url + "/_modelpeer/v1/health")["status"] == "ok"
    finally:
        d.stop()


NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]


@pytest.fixture
def nobody_cache() -> Iterator[Path]:
    """An empty cache dir owned by nobody, in a directory nobody can reach (unlike tmp_path)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to switch to an unprivileged user")
    work = Path(tempfile.mkdtemp(prefix="mp-nobody-"))
    try:
        os.chmod(work, 0o755)
        cache = work / "cache"
        cache.mkdir()
        os.chown(cache, NOBODY, NOBODY)
        yield cache
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_runs_as_an_unprivileged_user(hub: FakeHub, nobody_cache: Path) -> None:
    d = Modelpeerd(nobody_cache, hub.url, prefix_cmd=AS_NOBODY)
    d.start()
    try:
        path = f"/{MODEL}/resolve/main/sub/folder/weights.bin"
        assert get_body(d.url + path) == expected_files(MODEL)["sub/folder/weights.bin"]
        owners = {p.stat().st_uid for p in nobody_cache.rglob("*")}
        assert owners == {NOBODY}, owners
    finally:
        d.stop()


def test_the_key_systemd_hands_over_turns_peers_on(hub: FakeHub, nobody_cache: Path) -> None:
    # laid out as systemd does for LoadCredential=: dir 0500 and file 0400, owned by the user
    credentials = nobody_cache.parent / "credentials"
    credentials.mkdir()
    key = write_key(credentials / "cluster.key")
    key.chmod(0o400)
    os.chown(key, NOBODY, NOBODY)
    os.chown(credentials, NOBODY, NOBODY)
    credentials.chmod(0o500)
    d = Modelpeerd(nobody_cache, hub.url, prefix_cmd=AS_NOBODY, peers=True,
                   env={"CREDENTIALS_DIRECTORY": str(credentials)},
                   extra=["--interface", "127.0.0.1",
                          "--peer-listen", f"127.0.0.1:{free_port()}",
                          "--bt-listen", f"127.0.0.1:{free_port()}"])
    d.start()
    try:
        peers = d.status()["peers"]
        assert peers["enabled"] is True, peers
        assert peers["cluster_id"] == cluster_id_of(read_key_file(key))
    finally:
        d.stop()

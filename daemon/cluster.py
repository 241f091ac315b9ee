"""The cluster key: who belongs. Requests between peers are signed with it (HMAC-SHA256 over
method, path, body digest, time and sender), inside a replay window; the cluster id announced on
mDNS is derived from the key and reveals nothing of it."""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import pwd
import secrets
import stat
import time
from pathlib import Path

REPLAY_WINDOW = 30.0
KEY_BYTES = 32
H_NODE, H_TIME, H_SIG = "X-Modelpeer-Node", "X-Modelpeer-Time", "X-Modelpeer-Signature"


class ClusterKeyError(ValueError):
    """The key file is missing, unreadable, malformed or readable by others."""


def new_key_file(path: Path) -> None:
    """Write a fresh random key, readable by its owner only; never overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")


def read_key_file(path: Path) -> bytes:
    """The key in PATH; a key others could read, or one missing, unreadable or malformed, is
    refused with what to do about it."""
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(4096)
    except OSError as e:
        raise ClusterKeyError(_cannot_read(path, e)) from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ClusterKeyError(f"{path}: the cluster key is readable by others; chmod 600 it")
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except ValueError as e:
        raise ClusterKeyError(f"{path}: not a hex key; make one with `modelpeer cluster-key new`"
                              ) from e
    if len(key) < 16:
        raise ClusterKeyError(f"{path}: the key is too short ({len(key)} bytes; want >= 16); "
                              "make one with `modelpeer cluster-key new`")
    return key


def _cannot_read(path: Path, e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return (f"{path}: no cluster key there; copy the cluster's key there or make one with "
                f"`modelpeer cluster-key new {path}`")
    if e.errno == errno.EACCES:
        # typically the old setup: a root-only key named in the config of the systemd service
        return (f"{path}: user {_user()} cannot read the cluster key; under systemd leave "
                "cluster_key_file unset and let the unit pass /etc/modelpeer/cluster.key "
                "(systemd/install.sh)")
    return f"{path}: cannot read the cluster key: {e.strerror}"


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


class ClusterKey:
    def __init__(self, key: bytes) -> None:
        self._key = key
        self.cluster_id = hashlib.sha256(b"modelpeer cluster id\0" + key).hexdigest()[:16]
        self._seen: dict[str, float] = {}

    def _mac(self, method: str, path_qs: str, body: bytes, ts: str, node: str) -> str:
        msg = "\n".join([method.upper(), path_qs, hashlib.sha256(body).hexdigest(), ts, node])
        return hmac.new(self._key, msg.encode(), hashlib.sha256).hexdigest()

    def sign(self, method: str, path_qs: str, body: bytes, node: str) -> dict[str, str]:
        ts = f"{time.time():.3f}"
        return {H_NODE: node, H_TIME: ts, H_SIG: self._mac(method, path_qs, body, ts, node)}

    def check(self, method: str, path_qs: str, body: bytes, headers: dict[str, str]) -> str:
        """The sending node's id if the request is authentic and fresh; raises otherwise."""
        node, ts, sig = headers.get(H_NODE, ""), headers.get(H_TIME, ""), headers.get(H_SIG, "")
        if not (node and ts and sig):
            raise PermissionError("unsigned request")
        try:
            age = abs(time.time() - float(ts))
        except ValueError as e:
            raise PermissionError("bad time stamp") from e
        if age > REPLAY_WINDOW:
            raise PermissionError(f"time stamp {age:.0f}s off (clocks out of sync?)")
        if not hmac.compare_digest(sig, self._mac(method, path_qs, body, ts, node)):
            raise PermissionError("bad signature (another cluster key?)")
        self._forget_old()
        if sig in self._seen:
            raise PermissionError("replayed request")
        self._seen[sig] = time.time()
        return node

    def _forget_old(self) -> None:
        cutoff = time.time() - 2 * REPLAY_WINDOW
        if len(self._seen) > 1000 or any(t < cutoff for t in list(self._seen.values())[:1]):
            self._seen = {s: t for s, t in self._seen.items() if t >= cutoff}

"""The cluster key on disk: made once, copied to every node, readable by its owner only. Kept
apart from the protocol (cluster.py) so that checking a key file needs nothing else."""

from __future__ import annotations

import errno
import hashlib
import os
import pwd
import secrets
import stat
from pathlib import Path

from .errors import ClusterKeyError

KEY_BYTES = 32


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


def cluster_id_of(key: bytes) -> str:
    """What mDNS announces: derived from the key, revealing nothing of it."""
    return hashlib.sha256(b"modelpeer cluster id\0" + key).hexdigest()[:16]

"""The daemon's settings: defaults, then a TOML file, then MODELPEER_* variables, then flags.

Every setting has one entry in OPTIONS; the command line, the config file and the environment
are all derived from it, so a new setting is added in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from .errors import ClusterKeyError, ConfigError
from .keyfile import read_key_file
from .signatures import SignatureRule, parse_rule

DEFAULT_CONFIG_FILE = Path("/etc/modelpeer/modelpeer.toml")
DEFAULT_UPSTREAM = "https://huggingface.co"


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_size(value: str | int) -> int:
    """'64MiB', '10G', '1.5 GB' or a plain number of bytes -> bytes (exact: no float)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value), re.ASCII)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 500MiB, 20GB or a number of bytes)")
    return int(Fraction(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


_BIT_UNITS = {"bit": 1 / 8, "kbit": 1000 / 8, "mbit": 1000**2 / 8, "gbit": 1000**3 / 8}


def parse_rate(value: str | int) -> int:
    """Bytes per second from a size ('20MB', read per second; '/s' may follow) or a bit rate
    as links are sold and tc spells it ('100mbit', '1gbit')."""
    if isinstance(value, int) and not isinstance(value, bool):
        return parse_size(value)
    text = str(value).strip().lower().removesuffix("/s")
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([kmg]?bit)", text)
    if m:
        return int(float(m.group(1)) * _BIT_UNITS[m.group(2)])
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(f"not a rate: {value!r} (use e.g. 20MB, 100mbit or 0 for no limit)"
                         ) from None


def parse_duration(value: str | int | float) -> float:
    """'30s', '5m', '1h' or a number of seconds -> seconds (finite, not negative)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*", str(value), re.ASCII)
        if not m:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 1h)")
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]
        seconds = float(m.group(1)) * scale
    if not 0 <= seconds < math.inf:
        raise ValueError(f"not a duration: {value!r} (want a finite number of seconds >= 0)")
    return seconds


def parse_hostport(value: str) -> tuple[str, int]:
    """'127.0.0.1:6580', '[::1]:6580' or ':6580' -> (host, port)."""
    m = re.fullmatch(r"\[?([^\[\]]*?)\]?:([0-9]{1,5})", str(value).strip())
    if not m or not 0 <= int(m.group(2)) <= 65535:
        raise ValueError(f"not HOST:PORT: {value!r} (e.g. 127.0.0.1:6580)")
    return (m.group(1) or "0.0.0.0", int(m.group(2)))


def parse_path(value: str) -> Path:
    v = str(value)
    if not v.strip() or "\0" in v:
        raise ValueError(f"not a file path: {value!r}")
    return Path(v)


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r} (use true or false)")


def parse_url(value: str) -> str:
    v = str(value).strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", v):
        raise ValueError(f"not an http(s) URL: {value!r}")
    return v


def parse_log_level(value: str) -> str:
    v = str(value).strip().upper()
    if v not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"not a log level: {value!r} (debug, info, warning, error)")
    return v


def parse_log_format(value: str) -> str:
    v = str(value).strip().lower()
    if v not in ("text", "json"):
        raise ValueError(f"not a log format: {value!r} (text or json)")
    return v


def _default_cache_dir() -> Path:
    systemd_dir = os.environ.get("CACHE_DIRECTORY")
    if systemd_dir:
        return Path(systemd_dir.split(":")[0])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "modelpeer" if xdg else Path.home() / ".cache" / "modelpeer"


def _default_cluster_key_file() -> Path | None:
    # where the unit's LoadCredential=cluster.key:... puts the key (systemd/install.sh)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not credentials or not os.path.lexists(Path(credentials) / "cluster.key"):
        return None
    return Path(credentials) / "cluster.key"


@dataclasses.dataclass(frozen=True)
class Option:
    name: str  # the config-file key; the flag is --name with '-' for '_'
    # Any: each option parses to its own type (Config's field); parse takes a TOML value or str
    parse: Callable[[Any], Any]
    default: Callable[[], Any]
    help: str
    repeatable: bool = False
    flag_only: bool = False
    reloadable: bool = False  # SIGHUP may change it without a restart

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "MODELPEER_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("cache_dir", parse_path, _default_cache_dir,
           "where chunks and the index live (default: $CACHE_DIRECTORY, else ~/.cache/modelpeer)"),
    Option("listen", parse_hostport, lambda: ("127.0.0.1", 6580),
           "HOST:PORT of the Hub-compatible API and the control API"),
    Option("upstream", parse_url, lambda: [DEFAULT_UPSTREAM],
           "upstream Hub URL; repeat to give mirrors, tried in order", repeatable=True),
    Option("max_cache_size", parse_size, lambda: 0,
           "evict least-recently-used blobs above this size (e.g. 200GB; 0 = no limit)",
           reloadable=True),
    Option("offline", parse_bool, lambda: False,
           "never contact the upstream; serve only what is cached"),
    Option("no_peers", parse_bool, lambda: False, "do not look for or serve LAN peers"),
    Option("log_level", parse_log_level, lambda: "INFO", "debug, info, warning or error",
           reloadable=True),
    Option("log_format", parse_log_format, lambda: "text", "text or json (for log shippers)",
           reloadable=True),
    Option("chunk_size", parse_size, lambda: 64 * 1024**2,
           "bytes per chunk (a multiple of 1MiB); every node of a cluster must use the same"),
    Option("ref_ttl", parse_duration, lambda: 60.0,
           "how long a branch or tag resolution is trusted before asking upstream again",
           reloadable=True),
    Option("upstream_connections", int, lambda: 4,
           "parallel Range requests per blob to the upstream, once a blob's read has the "
           "link to itself (one while other blobs or nodes read it)", reloadable=True),
    Option("upstream_rate", parse_rate, lambda: 0,
           "at most this many bytes per second of files from the upstream, all downloads "
           "together (e.g. 20MB or 100mbit; 0 = no limit)", reloadable=True),
    Option("peer_upload_rate", parse_rate, lambda: 0,
           "at most this many bytes per second sent to peers, BitTorrent and the peer API "
           "together (e.g. 50MB or 400mbit; 0 = no limit); local clients are never held back",
           reloadable=True),
    Option("max_transfers", int, lambda: 8,
           "at most this many blobs read from the upstream at once; more wait their turn "
           "(each holds up to upstream_connections x 8 MiB in memory)"),
    Option("upstream_timeout", parse_duration, lambda: 30.0,
           "give up on an upstream connection that sends nothing for this long"),
    Option("interface", str, lambda: "",
           "restrict mDNS, the peer API and BitTorrent to this local address"),
    Option("peer_listen", parse_hostport, lambda: ("0.0.0.0", 6581), "HOST:PORT of the peer API"),
    Option("bt_listen", parse_hostport, lambda: ("0.0.0.0", 6582), "HOST:PORT of BitTorrent"),
    Option("peer", parse_hostport, lambda: [],
           "a static peer's HOST:PORT (peer API), for networks without multicast",
           repeatable=True),
    Option("cluster_key_file", parse_path, _default_cluster_key_file,
           "file with the cluster key (default: $CREDENTIALS_DIRECTORY/cluster.key if systemd "
           "passes one); without one the daemon is a local cache only"),
    Option("node_name", str, lambda: "", "a name for this node (default: the host name)"),
    Option("require_signature", parse_rule, lambda: [],
           "PATTERN=KEYFILE: serve files of repos whose id matches the glob only as the "
           "model.sig signed with that public key lists them (OpenSSF model signing)",
           repeatable=True, reloadable=True),
)
_BY_NAME = {o.name: o for o in OPTIONS}


@dataclasses.dataclass
class Config:
    cache_dir: Path
    listen: tuple[str, int]
    upstream: list[str]
    max_cache_size: int
    offline: bool
    no_peers: bool
    log_level: str
    log_format: str
    chunk_size: int
    ref_ttl: float
    upstream_connections: int
    upstream_rate: int
    peer_upload_rate: int
    max_transfers: int
    upstream_timeout: float
    interface: str
    peer_listen: tuple[str, int]
    bt_listen: tuple[str, int]
    peer: list[tuple[str, int]]
    cluster_key_file: Path | None
    node_name: str
    require_signature: list[SignatureRule]
    config_file: Path | None = None
    # read from cluster_key_file by load_config: an unusable key stops the daemon at start
    cluster_key: bytes | None = dataclasses.field(default=None, repr=False)

    @property
    def local_url(self) -> str:
        host, port = self.listen
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{port}"

    def validate(self) -> None:
        if self.chunk_size < 1024**2 or self.chunk_size % 1024**2:
            raise ConfigError(f"chunk_size must be a multiple of 1MiB, got {self.chunk_size}")
        if not 1 <= self.upstream_connections <= 64:
            raise ConfigError("upstream_connections must be between 1 and 64")
        if self.max_transfers < 1:
            raise ConfigError("max_transfers must be at least 1")


def _line_of(text: str, key: str) -> int:
    for i, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{re.escape(key)}\s*=", line):
            return i
    return 0


def read_config_file(path: Path) -> dict[str, object]:
    """Parse and check a TOML config file; errors say file, line and reason."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from e
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    values: dict[str, object] = {}
    for key, value in raw.items():
        where = f"{path}:{_line_of(text, key)}"
        opt = _BY_NAME.get(key.replace("-", "_"))
        if opt is None or opt.flag_only:
            known = ", ".join(o.name for o in OPTIONS)
            raise ConfigError(f"{where}: unknown key {key!r} (known keys: {known})")
        values[opt.name] = _parse_value(opt, value, where)
    return values


def _parse_value(opt: Option, value: object, where: str) -> Any:  # Any: as Option.parse
    try:
        if opt.repeatable:
            items = value if isinstance(value, list) else [value]
            return [opt.parse(v) for v in items]
        if isinstance(value, list | dict):
            raise ValueError("expected a single value")
        return opt.parse(value)
    except (ValueError, TypeError, OverflowError) as e:  # OverflowError: int(inf) of a TOML inf
        raise ConfigError(f"{where}: bad value for {opt.name}: {e}") from e


def read_environment(environ: Mapping[str, str]) -> dict[str, object]:
    values: dict[str, object] = {}
    for opt in OPTIONS:
        if opt.env in environ:
            raw = environ[opt.env]
            value = [v for v in re.split(r"[,\s]+", raw) if v] if opt.repeatable else raw
            values[opt.name] = _parse_value(opt, value, f"${opt.env}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modelpeerd",
        description="Hub-compatible LAN cache for ML models. "
        "Every flag can also be set in the config file (key = flag name with _) "
        "or as MODELPEER_<FLAG>.",
    )
    p.add_argument("--config", type=Path, default=None,
                   help=f"TOML config file (default: {DEFAULT_CONFIG_FILE} if it exists)")
    for opt in OPTIONS:
        if opt.parse is parse_bool:
            p.add_argument(opt.flag, dest=opt.name, action="store_const", const=True,
                           default=None, help=opt.help)
        else:
            p.add_argument(opt.flag, dest=opt.name, action="append" if opt.repeatable else "store",
                           default=None, help=opt.help, metavar=opt.name.upper())
    return p


def load_config(argv: Sequence[str] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Defaults < config file < environment < command line."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    config_file: Path | None = args.config or (
        Path(environ["MODELPEER_CONFIG"]) if environ.get("MODELPEER_CONFIG") else None)
    if config_file is None and DEFAULT_CONFIG_FILE.is_file():
        config_file = DEFAULT_CONFIG_FILE
    # Any: each value is of its option's type (OPTIONS), which Config(**values) declares
    values: dict[str, Any] = {o.name: o.default() for o in OPTIONS}
    if config_file is not None:
        values.update(read_config_file(config_file))
    values.update(read_environment(environ))
    for opt in OPTIONS:
        given = getattr(args, opt.name)
        if given is not None:
            values[opt.name] = _parse_value(opt, given, opt.flag)
    cfg = Config(**values, config_file=config_file)
    cfg.validate()
    cfg.cluster_key = _read_cluster_key(cfg)
    return cfg


def _read_cluster_key(cfg: Config) -> bytes | None:
    if cfg.no_peers or cfg.cluster_key_file is None:
        return None
    try:
        return read_key_file(cfg.cluster_key_file)
    except ClusterKeyError as e:
        raise ConfigError(str(e)) from e

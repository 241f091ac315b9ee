"""`modelpeerd`: parse the settings, set up logging, run the daemon until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys

from .app import Daemon
from .config import load_config
from .errors import ConfigError
from .logs import setup_logging

log = logging.getLogger("modelpeer.daemon")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"modelpeerd: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_format)
    try:
        cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(Daemon(cfg, argv).serve_forever())
    except OSError as e:
        log.critical("cannot run: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

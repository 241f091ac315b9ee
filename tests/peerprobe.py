"""Send one peer API request signed with a given cluster key, as another node would, and print
the HTTP status: `python -m tests.peerprobe URL KEYFILE|- [--to NODE_ID|*] [--method M]
[--replay]` (`-`: unsigned). Run inside a lab namespace by the multi-node tests."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from modelpeer.daemon.keyfile import read_key_file
from modelpeer.daemon.lan.cluster import (
    ANY_RECEIVER,
    ClusterKey,
    Credentials,
    NodeIdentity,
)
from tests.harness import fetch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("key")
    parser.add_argument("--to", default=ANY_RECEIVER)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--replay", action="store_true", help="send the same request twice")
    args = parser.parse_args()
    headers: dict[str, str] = {}
    if args.key != "-":
        with tempfile.TemporaryDirectory() as tmp:
            identity = NodeIdentity.load_or_create(Path(tmp) / "node.key")
        credentials = Credentials(ClusterKey(read_key_file(Path(args.key))), identity)
        parts = urlsplit(args.url)
        path_qs = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = credentials.sign_request(args.method, path_qs, b"", args.to).headers
    body = b"" if args.method == "POST" else None
    codes = [fetch(args.url, headers, args.method, body)[0]
             for _ in range(2 if args.replay else 1)]
    print(" ".join(map(str, codes)))


if __name__ == "__main__":
    main()

"""One node's client in bench_swarm: pulls a repo through an endpoint (a node's modelpeerd, or the
upstream Hub itself for the lower bound) when told to, so that every node starts at the same
moment whatever its interpreter's start-up cost.

    python -m bench.swarm_client '{"mode": "raw", "endpoint": URL, "repo": ID, "files": [...]}'

Prints "ready" once imported, waits for a line on stdin, pulls, then prints one JSON line:
{"seconds": time from the go line to the last byte, "sha256": {path: hex}} or {"error": ...}.

- raw: one HTTP GET per file at once (`/{repo}/resolve/main/{path}`, redirects followed),
  hashing what arrives; no Hub client start-up or API calls.
- hf: huggingface_hub `snapshot_download` into an empty HF_HOME (imported before "ready"); the
  files are hashed after the clock stops.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

BLOCK = 1 << 20
TIMEOUT = 900  # a frozen peer may hold a node's bytes back for a long while


def raw_file(endpoint: str, repo: str, path: str) -> str:
    url = f"{endpoint}/{repo}/resolve/main/{urllib.request.quote(path)}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    h = hashlib.sha256()
    with opener.open(url, timeout=TIMEOUT) as resp:
        while data := resp.read(BLOCK):
            h.update(data)
    return h.hexdigest()


def pull_raw(request: dict[str, Any]) -> dict[str, str]:
    files: list[str] = request["files"]
    with concurrent.futures.ThreadPoolExecutor(len(files)) as pool:
        digests = pool.map(lambda p: raw_file(request["endpoint"], request["repo"], p), files)
        return dict(zip(files, digests, strict=True))


def pull_hf(request: dict[str, Any]) -> Path:
    import huggingface_hub

    return Path(huggingface_hub.snapshot_download(request["repo"]))


def hash_tree(root: Path, files: list[str]) -> dict[str, str]:
    out = {}
    for path in files:
        h = hashlib.sha256()
        with open(root / path, "rb") as f:
            while data := f.read(BLOCK):
                h.update(data)
        out[path] = h.hexdigest()
    return out


def main() -> None:
    request = json.loads(sys.argv[1])
    if request["mode"] == "hf":
        os.environ["HF_ENDPOINT"] = request["endpoint"]
        import huggingface_hub  # noqa: F401 - start-up cost paid before "ready"
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    out: dict[str, Any]
    try:
        if request["mode"] == "hf":
            snapshot = pull_hf(request)
            out = {"seconds": time.perf_counter() - started}
            out["sha256"] = hash_tree(snapshot, request["files"])
        else:
            digests = pull_raw(request)
            out = {"seconds": time.perf_counter() - started, "sha256": digests}
    except Exception as e:  # noqa: BLE001 - the bench reports it
        out = {"error": f"{type(e).__name__}: {e}"[:2000],
               "seconds": time.perf_counter() - started}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

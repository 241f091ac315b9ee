"""Runs one huggingface_hub call in this process and prints its outcome as one JSON line.

`python -m tests.hfclient '{"call": "snapshot_download", "args": [...], "kwargs": {...}}'`
The endpoint comes from HF_ENDPOINT, as for any user of the library.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def run(call: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    import huggingface_hub

    if call == "list_repo_tree":
        api = huggingface_hub.HfApi()
        return [e.path for e in api.list_repo_tree(*args, **kwargs)]
    if call == "repo_info":
        return huggingface_hub.HfApi().repo_info(*args, **kwargs).sha
    if call == "paths_info":
        return [e.path for e in huggingface_hub.HfApi().get_paths_info(*args, **kwargs)]
    return str(getattr(huggingface_hub, call)(*args, **kwargs))


def main() -> None:
    request = json.loads(sys.argv[1])
    started = time.monotonic()
    try:
        result = run(request["call"], request.get("args", []), request.get("kwargs", {}))
        out: dict[str, Any] = {"result": result}
    except Exception as e:  # noqa: BLE001 - the test reads the class names
        out = {"error": type(e).__name__, "errors": [c.__name__ for c in type(e).__mro__],
               "message": str(e)[:2000]}
    out["seconds"] = time.monotonic() - started
    print(json.dumps(out))


if __name__ == "__main__":
    main()

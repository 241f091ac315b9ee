"""What a require_signature rule costs: a cold download of a large file of a signed repo through
modelpeerd with the publisher's key pinned vs without a rule, and the check's own CPU time.

    python bench/bench_signatures.py --size 1GiB [--runs 3]

The repo (the file and a config.json) is signed with model_signing's API, as
`model_signing sign key` does. Prints a Markdown table (what goes into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_proxy import cpu_seconds, timed_get  # noqa: E402
from modelpeer.daemon.config import parse_size  # noqa: E402
from modelpeer.daemon.signatures import parse_rule, verified_manifest  # noqa: E402
from tests.fakehub import FakeHub  # noqa: E402
from tests.fakehub.repos import added_repo  # noqa: E402
from tests.harness import Modelpeerd  # noqa: E402
from tests.signing import new_key, sign_directory  # noqa: E402

REPO = "acme/signed-big"
FILE = "big.bin"


def signed_repo(hub: FakeHub, size: int, work: Path) -> tuple[Path, bytes, str]:
    """Add the repo to the hub, sign it, add model.sig: (public key, model.sig, big.bin sha256)."""
    files = {FILE: {"size": size, "lfs": True, "big": True},
             "config.json": {"size": 300, "lfs": False}}
    hub.add_repo(REPO, files, timeout=600)
    model = work / "model"
    model.mkdir()
    big = next(p for p in (hub.data_dir / "blobs").glob(f"big-*-{size}"))
    os.link(big, model / FILE)
    config = added_repo(REPO, files).commits.popitem()[1]["config.json"]
    (model / "config.json").write_bytes(config.content)
    private, public = new_key(work / "keys", "publisher")
    sig = sign_directory(model, private)
    hub.add_repo(REPO, {**files, "model.sig": {"content_b64": base64.b64encode(sig).decode(),
                                               "lfs": False}}, timeout=600)
    return public, sig, big.with_name(big.name + ".sha256").read_text().strip()


def cold_download(hub: FakeHub, cache: Path, extra: list[str],
                  digest: str) -> tuple[float, float, float]:
    """(seconds to the first byte, to the last, the daemon's CPU seconds) of a cold download
    of the big file."""
    d = Modelpeerd(cache, hub.url, extra=["--log-level", "warning", *extra])
    d.start()
    assert d.proc is not None
    try:
        cpu = cpu_seconds(d.proc.pid)
        first, seconds, got = timed_get(f"{d.url}/{REPO}/resolve/main/{FILE}")
        assert got == digest, "the download differs from the signed file"
        return first, seconds, cpu_seconds(d.proc.pid) - cpu
    finally:
        d.stop()
        shutil.rmtree(cache, ignore_errors=True)
        os.sync()


_IMPORT = """import time
started = time.perf_counter()
from modelpeer.daemon.signatures import model_signing
model_signing()
print(time.perf_counter() - started)"""


def import_seconds() -> float:
    """model_signing's import in a fresh interpreter: what a daemon with a rule pays at start."""
    out = subprocess.run([sys.executable, "-c", _IMPORT], capture_output=True, text=True,
                         check=True)
    return float(out.stdout)


def verify_seconds(sig: bytes, public: Path, repeat: int = 20) -> float:
    """The median time of one verification of model.sig (parse, ECDSA, manifest)."""
    rule = parse_rule(f"{REPO}={public}")
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        verified_manifest(sig, rule)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="mp-bench-sig-"))
    rows: dict[str, list[tuple[float, float, float]]] = {"plain": [], "signed": []}
    try:
        with FakeHub(work / "hub") as hub:
            public, sig, digest = signed_repo(hub, size, work)
            rule = ["--require-signature", f"{REPO}={public}"]
            for run in range(args.runs):
                # alternate which goes first: each run also pays for the writeback of the last
                for kind in (("plain", "signed") if run % 2 == 0 else ("signed", "plain")):
                    extra = rule if kind == "signed" else []
                    rows[kind].append(cold_download(hub, work / f"{kind}{run}", extra, digest))
        verify = verify_seconds(sig, public)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(size, rows, verify, import_seconds())


def report(size: int, rows: dict[str, list[tuple[float, float, float]]], verify: float,
           imported: float) -> None:
    first, wall, cpu = ({k: statistics.median(r[i] for r in v) for k, v in rows.items()}
                        for i in range(3))
    print(f"\n{size / 2**30:.2f} GiB LFS file of a signed repo, cold, median of "
          f"{len(rows['plain'])} runs each, loopback\n")
    print("| what | first byte (ms) | last byte (s), runs | daemon CPU (s) |\n|---|---|---|---|")
    for key, label in (("plain", "cold download, no rule"),
                       ("signed", "cold download, key pinned")):
        runs = " ".join(f"{r[1]:.2f}" for r in rows[key])
        print(f"| {label} | {first[key] * 1000:.0f} | {wall[key]:.2f} ({runs}) | "
              f"{cpu[key]:.2f} |")
    check = first["signed"] - first["plain"]
    print(f"\nVerifying model.sig (parse, ECDSA, manifest), once per commit: {verify * 1000:.1f} "
          f"ms. Importing model_signing, once at the start of a daemon with a rule: "
          f"{imported:.2f} s.\n")
    print("| ratio | value |\n|---|---|")
    print(f"| the check (first-byte delay, key pinned - no rule) / cold download | "
          f"{check / wall['plain'] * 100:.2f} % |")
    print(f"| daemon CPU, key pinned / no rule | {cpu['signed'] / cpu['plain']:.3f} |")
    print(f"| download time, key pinned / no rule | {wall['signed'] / wall['plain']:.3f} |")


if __name__ == "__main__":
    main()

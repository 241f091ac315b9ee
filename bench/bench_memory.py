"""Memory under load: N clients read one cold file through modelpeerd at once, then N read it
again from the cache. Reports the daemon's peak RSS (VmHWM) against its RSS when idle, the
upstream bytes against the file size (one download), and whether every body was right.

    python bench/bench_memory.py --size 40MiB --clients 400 [--runs 3] [--cdn-rate 10MiB]

`--cdn-rate` slows each CDN connection so that the clients join the transfer while it runs
(the case that once took the daemon to 749 MiB).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelpeer.daemon.config import parse_size  # noqa: E402
from tests.fakehub import FakeHub  # noqa: E402
from tests.harness import MiB, Modelpeerd, PeakRss, proc_status_kib  # noqa: E402
from tests.loadclient import many_readers  # noqa: E402

REPO, FILE = "acme/big", "big.bin"


@dataclasses.dataclass
class Phase:
    seconds: float
    peak_rss_mib: float
    right: int
    wrong: int
    errors: list[str]


@dataclasses.dataclass
class Run:
    idle_rss_mib: float
    cold: Phase
    hit: Phase | None  # None: not measured (--cold-only)
    upstream_x: float  # upstream bytes / file size
    hwm_mib: float


def phase(d: Modelpeerd, clients: int, want: str) -> Phase:
    assert d.proc is not None
    with PeakRss(d.proc.pid) as rss:
        got = many_readers(f"{d.url}/{REPO}/resolve/main/{FILE}", clients)
    bodies: dict[str, int] = got["bodies"]
    right = bodies.get(want, 0)
    return Phase(got["seconds"], rss.peak_kib / 1024, right, sum(bodies.values()) - right,
                 got["errors"])


def one_run(work: Path, hub: FakeHub, clients: int, cdn_rate: int, want: str,
            size: int, hit_too: bool) -> Run:
    hub.reset()
    hub.faults(cdn_rate=cdn_rate)
    d = Modelpeerd(work / "cache", hub.url, extra=["--log-level", "warning"]).start()
    try:
        assert d.proc is not None
        idle = proc_status_kib(d.proc.pid, "VmRSS") / 1024
        cold = phase(d, clients, want)
        upstream = hub.stats()["cdn_bytes"] / size
        hit = phase(d, clients, want) if hit_too else None
        hwm = proc_status_kib(d.proc.pid, "VmHWM") / 1024
    finally:
        d.stop()
        shutil.rmtree(work / "cache", ignore_errors=True)
    return Run(idle, cold, hit, upstream, hwm)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="40MiB")
    ap.add_argument("--clients", type=int, default=400)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cdn-rate", default="10MiB", help="bytes/s per CDN connection (0: none)")
    ap.add_argument("--cold-only", action="store_true",
                    help="skip the cache-hit phase (at 1 GiB, 400 clients read 400 GiB a phase)")
    ap.add_argument("--json", type=Path, help="also write the runs here")
    args = ap.parse_args()
    size, cdn_rate = parse_size(args.size), parse_size(args.cdn_rate)
    work = Path(tempfile.mkdtemp(prefix="mp-bench-mem-"))
    hub = FakeHub(work / "hub", big_size=size).start()
    try:
        want = file_xxh3(next(p for p in (work / "hub").rglob("*")
                              if p.is_file() and p.stat().st_size == size))
        runs = [one_run(work, hub, args.clients, cdn_rate, want, size, not args.cold_only)
                for _ in range(args.runs)]
    finally:
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in runs], indent=1))
    report(args, size, runs)


def file_xxh3(path: Path) -> str:
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while data := f.read(8 * MiB):
            h.update(data)
    return h.hexdigest()


def spread(values: list[float], digits: int = 0) -> str:
    """The worst (highest) value, then the range over the runs."""
    return f"{max(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def report(args: argparse.Namespace, size: int, runs: list[Run]) -> None:
    phases = {"cold": [r.cold for r in runs],
              "cache hit": [r.hit for r in runs if r.hit is not None]}
    phases = {name: ps for name, ps in phases.items() if ps}
    print(f"\n{args.clients} clients, {size / MiB:.0f} MiB file, CDN {args.cdn_rate}/s per "
          f"connection, {len(runs)} runs (worst, then the spread), {os.cpu_count()} cores\n")
    print("| what | " + " | ".join(phases) + " |\n" + "|---" * (len(phases) + 1) + "|")
    print("| daemon peak RSS, MiB | " + " | ".join(
        spread([p.peak_rss_mib for p in ps]) for ps in phases.values()) + " |")
    print("| seconds until every client has the file | " + " | ".join(
        spread([p.seconds for p in ps], 1) for ps in phases.values()) + " |")
    print("| bodies right / wrong / errors | " + " | ".join(
        f"{sum(p.right for p in ps)} / {sum(p.wrong for p in ps)} / "
        f"{sum(len(p.errors) for p in ps)}" for ps in phases.values()) + " |")
    print(f"\nidle RSS {spread([r.idle_rss_mib for r in runs])} MiB; VmHWM over the run "
          f"{spread([r.hwm_mib for r in runs])} MiB; upstream bytes / file size "
          f"{spread([r.upstream_x for r in runs], 2)}")
    for ps in phases.values():
        for e in [e for p in ps for e in p.errors][:5]:
            print("error:", e)


if __name__ == "__main__":
    main()

"""Issue 12, "a slow, frozen or late node never holds the others back": every node of a cluster
pulls the same new repo at once, in the network lab of tests/netlab.py (root), against the lower
bound T1 measured in the same run (one node alone downloading the repo from the upstream over
the shaped WAN, with the same client).

    python bench/bench_swarm.py --case slow frozen together warm --json out.json
    python bench/bench_swarm.py --report out.json [more.json...] --svg docs/swarm.svg

Cases (each run builds its own lab, fake Hub and daemons, and tears them down):
- slow: one node's link shaped to --slow-rate both ways; per node time / T1, and the slow node
  against what its own link allows (repo size / slow rate). --roles places the slow node first
  in the relay chain (the upstream fetcher), in the middle, last, or at random.
- frozen: one daemon stopped (SIGSTOP) --freeze-at s into the pull, until the others finish or
  --freeze-hold s pass; then SIGCONT, and that node must finish with the right bytes too.
- together: no fault; slowest node / T1 and upstream bytes / repo size.
- warm: `modelpeer warm REPO --nodes all --wait` from h1; time / T1 and upstream bytes.
--svg draws every run as a point (worst node / T1; upstream bytes / repo) in a column per
configuration, against the issue's targets (TARGETS, UPSTREAM_TARGET) as dashed lines.

Roles are forced through the chain order of the current code (daemon/lan/plan.py): the
nodes transferring a blob at once relay it in rendezvous order of sha256(f"{node_id}:{digest}"),
upstream fetchers first. Knowing the node ids, the bench names each file of the new repo so
that the chosen node falls at the chosen position for every file's blob. The nodes that
actually went to the upstream are reported from each daemon's status (upstream_bytes).

Each node's client is bench/swarm_client.py, started and imported before the clock starts, then
released at the same moment: --client raw (default) GETs every file at once through the node's
daemon and hashes it; --client hf runs huggingface_hub snapshot_download.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import modelpeer.daemon  # noqa: E402
from bench.bench_lan import rate_bits, shutdown  # noqa: E402
from bench.bench_warm import start_nodes, warm_all  # noqa: E402
from bench.svgplot import (  # noqa: E402
    BOLD,
    COLORS,
    GRID,
    MUTED,
    TARGET,
    Chart,
    Scale,
    spread,
    text_width,
)
from modelpeer.daemon.config import parse_size  # noqa: E402
from modelpeer.daemon.lan.plan import Plan  # noqa: E402
from tests.fakehub import FakeHub, file_sha256  # noqa: E402
from tests.fakehub.repos import ADDED, added_repo  # noqa: E402
from tests.harness import ROOT  # noqa: E402
from tests.netlab import Cluster, Lab, netlab_available  # noqa: E402

CASES = ("slow", "frozen", "together", "warm")
ROLES = ("first", "middle", "last", "random")
MAX_NAME_TRIES = 200  # file names tried per file to put a node at a chain position
_RUNS = iter(range(1, 10**6))  # a fresh lab prefix (and repo name) per run


@dataclasses.dataclass(frozen=True)
class Settings:
    wan: str
    lan: str
    size: int
    files: int
    slow_rate: str
    client: str
    freeze_at: float
    freeze_hold: float
    many: int
    many_wan: str
    many_size: int
    timeout: float
    logs: str = ""  # a folder to keep each run's daemon logs in ("": not kept)

    def shape_for(self, nodes: int) -> tuple[str, int]:
        """(WAN rate, repo size) for a cluster of that many nodes."""
        return (self.many_wan, self.many_size) if nodes >= self.many else (self.wan, self.size)


# --- the lab of one run -----------------------------------------------------------------------
class SwarmLab:
    """n hosts and the upstream, the fake Hub on it, a daemon on each host; all torn down."""

    def __init__(self, nodes: int, wan: str, settings: Settings, work: Path, name: str) -> None:
        self.run = next(_RUNS)
        self.name = f"run{self.run}-{name}"
        self.logs = Path(settings.logs) if settings.logs else None
        self.work = work / f"run{self.run}"
        self.work.mkdir()
        self.lab = Lab(nodes, prefix=f"mps{os.getpid() % 1000}r{self.run}", lan=settings.lan,
                       wan=wan)
        up = self.lab.ip("up")
        self.hub = FakeHub(self.work / "hub", host=up, cdn_host=up, port=8080, cdn_port=8081,
                           prefix_cmd=self.lab.ns("up"))
        self.cluster = Cluster(self.lab, self.hub, self.work)
        self.hosts = [f"h{i}" for i in range(1, nodes + 1)]
        self.repo = f"bench/swarm-{os.getpid()}-{self.run}"

    def __enter__(self) -> SwarmLab:
        try:
            self.lab.up()
            self.hub.start()
            start_nodes(self.cluster, self.hosts, timeout=30 + 5 * len(self.hosts))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for d in self.cluster.nodes.values():  # a node left frozen would not stop
            if d.proc is not None and d.proc.poll() is None:
                os.kill(d.proc.pid, signal.SIGCONT)
        shutdown(None, self.cluster, self.hub, self.lab)
        self.keep_logs()
        ADDED.pop(("model", self.repo), None)
        shutil.rmtree(self.work, ignore_errors=True)

    def keep_logs(self) -> None:
        if self.logs is None:
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        for host, d in self.cluster.nodes.items():
            if d.log_path.exists():
                shutil.copyfile(d.log_path, self.logs / f"{self.name}-{host}.log")

    def node_ids(self) -> dict[str, str]:
        return {h: self.lab.get_json(h, d.url + "/_modelpeer/v1/peers")["node_id"]
                for h, d in self.cluster.nodes.items()}

    def daemon_pid(self, host: str) -> int:
        """The modelpeerd process itself (`ip netns exec` execs it, so it is the Popen's)."""
        proc = self.cluster.nodes[host].proc
        assert proc is not None
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"modelpeer.daemon.main" in cmdline, cmdline
        return proc.pid

    def upstream_bytes(self) -> dict[str, int]:
        return {h: int(d.status()["upstream_bytes"]) for h, d in self.cluster.nodes.items()}


# --- the repo, named so that a node falls where asked in every blob's chain -----------------
def chain_position(ids: dict[str, str], host: str, digest: str) -> int:
    """Where `host` falls in the relay chain of a blob all nodes start at once (daemon/lan/plan.py:
    rendezvous order of the nodes wanting the blob)."""
    plan = Plan("", digest)
    return sorted(ids, key=lambda h: plan.rank(ids[h])).index(host)


def blob_digest(repo: str, path: str, size: int) -> str:
    """The sha256 the fake Hub's file of that repo, path and size will have."""
    made = added_repo(repo, {path: {"size": size, "lfs": True}})
    return next(iter(made.commits.values()))[path].sha256


def role_position(role: str, nodes: int) -> int | None:
    return {"first": 0, "middle": (nodes - 1) // 2, "last": nodes - 1}.get(role)


def plan_files(repo: str, count: int, size: int, ids: dict[str, str], host: str,
               position: int | None) -> dict[str, int]:
    """{path: chain position of host} for `count` files of `size` bytes: each name chosen so
    that `host` is at `position` in its blob's chain (any position when None)."""
    plan: dict[str, int] = {}
    for k in range(count):
        for attempt in range(MAX_NAME_TRIES):
            path = f"model-{k + 1:02d}-of-{count:02d}-v{attempt}.safetensors"
            at = chain_position(ids, host, blob_digest(repo, path, size))
            if position is None or at == position:
                plan[path] = at
                break
        else:
            raise RuntimeError(f"no name puts {host} at position {position} of the chain")
    return plan


# --- the clients ------------------------------------------------------------------------------
class Client:
    """bench/swarm_client.py on one host, imported and waiting for the go line."""

    def __init__(self, lab: Lab, host: str, endpoint: str, repo: str, files: list[str],
                 mode: str, home: Path) -> None:
        request = {"mode": mode, "endpoint": endpoint, "repo": repo, "files": files}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
        env.update({"HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
                    "HF_HUB_DOWNLOAD_TIMEOUT": "900", "HF_HUB_ETAG_TIMEOUT": "60",
                    "PYTHONPATH": str(ROOT)})
        self.host = host
        self.proc = subprocess.Popen(
            [*lab.ns(host), sys.executable, "-m", "bench.swarm_client", json.dumps(request)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, cwd=ROOT, env=env)

    def ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"client on {self.host} did not start: {line!r}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()

    def outcome(self) -> dict[str, Any]:
        """The client's JSON line (blocks until it ends)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.proc.wait()
        return json.loads(line) if line.strip() else {"error": "client died"}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Pull:
    """Clients on some hosts pulling one repo, released at the same moment by go()."""

    def __init__(self, sl: SwarmLab, hosts: list[str], files: list[str], mode: str,
                 endpoint: Callable[[str], str]) -> None:
        self.clients = {h: Client(sl.lab, h, endpoint(h), sl.repo, files, mode,
                                  sl.work / f"hf-{h}-{time.monotonic_ns()}") for h in hosts}
        self.pool = concurrent.futures.ThreadPoolExecutor(len(hosts))
        self.futures: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}
        self.started = 0.0

    def go(self) -> None:
        for c in self.clients.values():
            c.ready()
        self.started = time.perf_counter()
        for c in self.clients.values():
            c.go()
        self.futures = {h: self.pool.submit(c.outcome) for h, c in self.clients.items()}

    def wait(self, host: str, until: float) -> dict[str, Any] | None:
        """The host's outcome, or None if it has not ended by `until` (perf_counter)."""
        try:
            return self.futures[host].result(max(0.0, until - time.perf_counter()))
        except concurrent.futures.TimeoutError:
            return None

    def close(self) -> None:
        for c in self.clients.values():
            c.kill()
        self.pool.shutdown(wait=True)


def pull_all(sl: SwarmLab, hosts: list[str], files: list[str], settings: Settings,
             endpoint: Callable[[str], str]) -> dict[str, dict[str, Any]]:
    """Each host's outcome when all pull at once (an unfinished one: {"error": "timeout"})."""
    pull = Pull(sl, hosts, files, settings.client, endpoint)
    try:
        pull.go()
        until = pull.started + settings.timeout
        return {h: pull.wait(h, until) or {"error": "timeout"} for h in hosts}
    finally:
        pull.close()


def through_daemon(sl: SwarmLab) -> Callable[[str], str]:
    return lambda host: sl.cluster.nodes[host].url


def lower_bound(sl: SwarmLab, files: list[str], settings: Settings) -> float:
    """T1: h1 alone pulling the repo straight from the upstream, over the shaped WAN."""
    out = pull_all(sl, ["h1"], files, settings, lambda host: sl.hub.url)["h1"]
    if "error" in out:
        raise RuntimeError(f"lower bound failed: {out['error']}")
    sl.hub.reset()  # the cases count the upstream bytes of the pull alone
    return float(out["seconds"])


# --- one run of each case ---------------------------------------------------------------------
def new_repo(sl: SwarmLab, settings: Settings, size: int, host: str,
             position: int | None) -> tuple[list[str], list[int], float]:
    """Add the run's repo to the Hub (named for the placement); (files, host's chain
    positions, T1)."""
    per_file = size // settings.files
    plan = plan_files(sl.repo, settings.files, per_file, sl.node_ids(), host, position)
    sl.hub.add_repo(sl.repo, {p: {"size": per_file, "lfs": True} for p in plan})
    files = list(plan)
    return files, list(plan.values()), lower_bound(sl, files, settings)


def node_records(sl: SwarmLab, outcomes: dict[str, dict[str, Any]], files: list[str],
                 t1: float) -> dict[str, dict[str, Any]]:
    expected = {p: file_sha256(sl.repo, p) for p in files}
    upstream = sl.upstream_bytes()
    records = {}
    for h, out in outcomes.items():
        seconds = out.get("seconds") if "error" not in out else None
        records[h] = {"seconds": seconds, "ratio": seconds / t1 if seconds else None,
                      "bytes_ok": out.get("sha256") == expected, "error": out.get("error", ""),
                      "upstream_bytes": upstream[h]}
    return records


def run_record(case: str, sl: SwarmLab, settings: Settings, size: int, wan: str, t1: float,
               load: float, **extra: Any) -> dict[str, Any]:
    return {"case": case, "nodes": len(sl.hosts), "wan": wan, "lan": sl.lab.lan,
            "repo_bytes": size - size % settings.files, "files": settings.files,
            "client": settings.client, "t1": t1, "load_before": load,
            "load_after": os.getloadavg()[0], "cdn_bytes": int(sl.hub.stats()["cdn_bytes"]),
            **extra}


def pick_host(sl: SwarmLab, role: str) -> str:
    """The node given the fault: the last host for a forced role (T1 runs on h1), else any."""
    return sl.hosts[-1] if role != "random" else random.choice(sl.hosts)


def run_slow(settings: Settings, work: Path, nodes: int, role: str) -> dict[str, Any]:
    load = os.getloadavg()[0]
    wan, size = settings.shape_for(nodes)
    with SwarmLab(nodes, wan, settings, work, f"slow-{role}") as sl:
        slow = pick_host(sl, role)
        files, positions, t1 = new_repo(sl, settings, size, slow, role_position(role, nodes))
        sl.lab.shape(slow, settings.slow_rate)
        outcomes = pull_all(sl, sl.hosts, files, settings, through_daemon(sl))
        link_bound = size * 8 / rate_bits(settings.slow_rate)
        return run_record("slow", sl, settings, size, wan, t1, load, role=role,
                          fault_host=slow, positions=positions, slow_rate=settings.slow_rate,
                          slow_link_seconds=link_bound,
                          per_node=node_records(sl, outcomes, files, t1))


def freeze_during(pull: Pull, pid: int, fault: str, settings: Settings) -> dict[str, Any]:
    """SIGSTOP the daemon `pid` freeze_at s after go; SIGCONT once the other nodes have ended
    or freeze_hold s have passed. Every host's outcome, and when the freeze began and ended."""
    pull.go()
    time.sleep(max(0.0, pull.started + settings.freeze_at - time.perf_counter()))
    os.kill(pid, signal.SIGSTOP)
    frozen_at = time.perf_counter() - pull.started
    try:
        hold = pull.started + settings.freeze_at + settings.freeze_hold
        outcomes = {h: pull.wait(h, hold) for h in pull.clients if h != fault}
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed_at = time.perf_counter() - pull.started
    until = pull.started + settings.timeout
    for h in pull.clients:
        outcomes[h] = outcomes.get(h) or pull.wait(h, until) or {"error": "timeout"}
    return {"outcomes": outcomes, "frozen_at": frozen_at, "resumed_at": resumed_at}


def run_frozen(settings: Settings, work: Path, nodes: int, role: str) -> dict[str, Any]:
    load = os.getloadavg()[0]
    wan, size = settings.shape_for(nodes)
    with SwarmLab(nodes, wan, settings, work, f"frozen-{role}") as sl:
        fault = pick_host(sl, role)
        files, positions, t1 = new_repo(sl, settings, size, fault, role_position(role, nodes))
        pull = Pull(sl, sl.hosts, files, settings.client, through_daemon(sl))
        try:
            frozen = freeze_during(pull, sl.daemon_pid(fault), fault, settings)
        finally:
            pull.close()
        per_node = node_records(sl, frozen["outcomes"], files, t1)
        for r in per_node.values():
            r["during_freeze"] = r["seconds"] is not None and r["seconds"] < frozen["resumed_at"]
        return run_record("frozen", sl, settings, size, wan, t1, load, role=role,
                          fault_host=fault, positions=positions, frozen_at=frozen["frozen_at"],
                          resumed_at=frozen["resumed_at"], per_node=per_node)


def run_together(settings: Settings, work: Path, nodes: int) -> dict[str, Any]:
    load = os.getloadavg()[0]
    wan, size = settings.shape_for(nodes)
    with SwarmLab(nodes, wan, settings, work, f"together-{nodes}") as sl:
        files, _, t1 = new_repo(sl, settings, size, "h1", None)
        outcomes = pull_all(sl, sl.hosts, files, settings, through_daemon(sl))
        return run_record("together", sl, settings, size, wan, t1, load,
                          per_node=node_records(sl, outcomes, files, t1))


def run_warm(settings: Settings, work: Path, nodes: int) -> dict[str, Any]:
    load = os.getloadavg()[0]
    wan, size = settings.shape_for(nodes)
    with SwarmLab(nodes, wan, settings, work, f"warm-{nodes}") as sl:
        _, _, t1 = new_repo(sl, settings, size, "h1", None)
        seconds = warm_all(sl.cluster, "h1", sl.repo, timeout=settings.timeout)
        return run_record("warm", sl, settings, size, wan, t1, load, seconds=seconds,
                          ratio=seconds / t1, upstream_by_node=sl.upstream_bytes())


# --- figures and tables -------------------------------------------------------------------
def ratios(run: dict[str, Any], exclude: str = "") -> list[float]:
    """Each node's time / T1 (a node that did not finish counts as infinite)."""
    return [r["ratio"] if r["ratio"] is not None else float("inf")
            for h, r in run["per_node"].items() if h != exclude]


def summarize(run: dict[str, Any]) -> None:
    """Add the run's headline figures: slowest / T1 and spread of the nodes not at fault (the
    slow or frozen node's own time is in per_node)."""
    if run["case"] == "warm":
        run["worst"] = run["ratio"]
    else:
        others = ratios(run, run.get("fault_host", ""))
        run["worst"], run["spread"] = max(others), max(others) - min(others)
    run["upstream_ratio"] = run["cdn_bytes"] / run["repo_bytes"]


def fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else ("∞" if x == float("inf") else f"{x:.{digits}f}")


def per_node_cell(run: dict[str, Any]) -> str:
    mark = run.get("fault_host", "")
    return ", ".join(f"{h}{'*' if h == mark else ''} {fmt(r['ratio'])}"
                     for h, r in run["per_node"].items())


def upstream_cell(by_node: dict[str, int], size: int) -> str:
    return ", ".join(f"{h} {b / size:.2f}" for h, b in by_node.items() if b) or "none"


def load_cell(run: dict[str, Any]) -> str:
    return f"{run['load_before']:.1f}→{run['load_after']:.1f}"


def table_slow(runs: list[dict[str, Any]]) -> list[str]:
    out = ["| slow node's role | slow host (chain position per file) | T1 s | per node time / T1 "
           "(* slow) | fast nodes: worst / T1 | slow node / T1 | slow node / its link | "
           "upstream bytes / repo (by node) | bytes ok | load 1-min |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        fast = [x for h, x in zip(r["per_node"], ratios(r), strict=True) if h != r["fault_host"]]
        slow = r["per_node"][r["fault_host"]]["seconds"]
        size = r["repo_bytes"]
        out.append(f"| {r['role']} | {r['fault_host']} {r['positions']} | {r['t1']:.1f} | "
                   f"{per_node_cell(r)} | {fmt(max(fast))} | "
                   f"{fmt(r['per_node'][r['fault_host']]['ratio'])} | "
                   f"{fmt(slow / r['slow_link_seconds'] if slow else None)} | "
                   f"{r['upstream_ratio']:.2f} ({upstream_cell(by_node(r), size)}) | "
                   f"{all_ok(r)} | {load_cell(r)} |")
    return out


def table_frozen(runs: list[dict[str, Any]]) -> list[str]:
    out = ["| frozen node's role | frozen host (chain position per file) | T1 s | per node time / "
           "T1 (* frozen) | others: worst / T1 | others done while it was frozen | frozen "
           "s (stopped at → resumed at) | frozen node done at s | bytes ok | upstream / repo | "
           "load 1-min |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        others = {h: n for h, n in r["per_node"].items() if h != r["fault_host"]}
        done = sum(1 for n in others.values() if n["during_freeze"])
        out.append(f"| {r['role']} | {r['fault_host']} {r['positions']} | {r['t1']:.1f} | "
                   f"{per_node_cell(r)} | {fmt(r['worst'])} | {done} of {len(others)} | "
                   f"{r['frozen_at']:.1f} → {r['resumed_at']:.1f} | "
                   f"{fmt(r['per_node'][r['fault_host']]['seconds'], 1)} | {all_ok(r)} | "
                   f"{r['upstream_ratio']:.2f} | {load_cell(r)} |")
    return out


def table_together(runs: list[dict[str, Any]]) -> list[str]:
    out = ["| nodes | WAN | repo MiB | T1 s | slowest / T1 | spread / T1 | per node time / T1 | "
           "upstream bytes / repo (by node) | bytes ok | load 1-min |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        out.append(f"| {r['nodes']} | {r['wan']} | {r['repo_bytes'] / 2**20:.0f} | "
                   f"{r['t1']:.1f} | {fmt(r['worst'])} | {fmt(r['spread'])} | "
                   f"{per_node_cell(r)} | {r['upstream_ratio']:.2f} "
                   f"({upstream_cell(by_node(r), r['repo_bytes'])}) | {all_ok(r)} | "
                   f"{load_cell(r)} |")
    return out


def table_warm(runs: list[dict[str, Any]]) -> list[str]:
    out = ["| nodes | WAN | repo MiB | T1 s | warm --nodes all --wait s | warm / T1 | "
           "upstream bytes / repo (by node) | load 1-min |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        out.append(f"| {r['nodes']} | {r['wan']} | {r['repo_bytes'] / 2**20:.0f} | "
                   f"{r['t1']:.1f} | {r['seconds']:.1f} | {fmt(r['ratio'])} | "
                   f"{r['upstream_ratio']:.2f} "
                   f"({upstream_cell(r['upstream_by_node'], r['repo_bytes'])}) | "
                   f"{load_cell(r)} |")
    return out


def by_node(run: dict[str, Any]) -> dict[str, int]:
    return {h: r["upstream_bytes"] for h, r in run["per_node"].items()}


def all_ok(run: dict[str, Any]) -> str:
    bad = [h for h, r in run["per_node"].items() if not r["bytes_ok"]]
    return "all" if not bad else "NOT " + ", ".join(bad)


TABLES = {"slow": table_slow, "frozen": table_frozen, "together": table_together,
          "warm": table_warm}


def sort_key(k: tuple[str, int, str]) -> tuple[int, int, int]:
    return CASES.index(k[0]), k[1], ROLES.index(k[2]) if k[2] else -1


def summary_table(runs: list[dict[str, Any]]) -> list[str]:
    """One row per configuration: worst over its runs, the range, the largest spread."""
    out = ["| nodes | role | runs | worst / T1 | range over runs | largest spread in a run | "
           "upstream / repo (max) |", "|---|---|---|---|---|---|---|"]
    for key in sorted({config_key(r) for r in runs}, key=sort_key):
        mine = [r for r in runs if config_key(r) == key]
        worst = [r["worst"] for r in mine]
        spread = [r["spread"] for r in mine if "spread" in r]
        out.append(f"| {key[1]} | {key[2] or '—'} | {len(mine)} | {fmt(max(worst))} | "
                   f"{fmt(min(worst))}–{fmt(max(worst))} | "
                   f"{fmt(max(spread)) if spread else '—'} | "
                   f"{max(r['upstream_ratio'] for r in mine):.2f} |")
    return out


def report(runs: list[dict[str, Any]]) -> str:
    """Per case: every run (runs of one configuration together), then worst and spread."""
    lines: list[str] = []
    for case in CASES:
        mine = sorted((r for r in runs if r["case"] == case), key=lambda r: sort_key(
            config_key(r)))
        if mine:
            lines += ["", f"### {case}", "", *TABLES[case](mine), "", *summary_table(mine)]
    return "\n".join(lines)


# --- the plot --------------------------------------------------------------------------------
TARGETS = {"slow": 1.2, "frozen": 1.5, "together": 1.2, "warm": 1.1}  # issue 12: worst / T1
UPSTREAM_TARGET = 1.02  # issue 12: upstream bytes / repo size
CASE_NAMES = {"slow": "one slow node", "frozen": "one frozen node", "together": "no fault",
              "warm": "modelpeer warm --wait"}
WIDTH, LEFT, RIGHT, MIN_COLUMN, GROUP_GAP = 760, 72, 24, 64, 24  # px
TIMES_PANEL, UPSTREAM_PANEL = (316, 84), (446, 356)  # (bottom, top) px

Sources = dict[str, list[dict[str, Any]]]  # runs by where they come from (a JSON file)


def column_label(key: tuple[str, int, str]) -> tuple[str, str]:
    _, nodes, role = key
    return (role, f"{nodes} nodes") if role else (f"{nodes} nodes", "")


@dataclasses.dataclass(frozen=True)
class Column:
    """Where a configuration's runs are drawn: x of its centre and its width, px."""

    centre: float
    width: float

    @property
    def left(self) -> float:
        return self.centre - self.width / 2

    @property
    def right(self) -> float:
        return self.centre + self.width / 2


Columns = dict[tuple[str, int, str], Column]


def lay_out_columns(keys: list[tuple[str, int, str]]) -> Columns:
    """A column per configuration, a gap between cases, each case's columns together as wide
    as its name."""
    cases = [c for c in CASES if any(k[0] == c for k in keys)]
    width = max(MIN_COLUMN, (WIDTH - LEFT - RIGHT - GROUP_GAP * (len(cases) - 1)) / len(keys))
    columns, x = {}, float(LEFT)
    for case in cases:
        mine = [k for k in keys if k[0] == case]
        case_width = max(width, (text_width(CASE_NAMES[case]) * BOLD + 8) / len(mine))
        for key in mine:
            columns[key] = Column(x + case_width / 2, case_width)
            x += case_width
        x += GROUP_GAP
    return columns


def case_span(columns: Columns, case: str) -> tuple[float, float] | None:
    """Left and right x of a case's columns (None: no run of that case)."""
    mine = [c for k, c in columns.items() if k[0] == case]
    return (mine[0].left, mine[-1].right) if mine else None


def run_tip(run: dict[str, Any], source: str, value: str) -> str:
    case, nodes, role = config_key(run)
    where = " ".join(part for part in (case, role, f"{nodes} nodes") if part)
    return f"{where}: {value} (T1 {run['t1']:.1f} s, {source})"


def plot_points(chart: Chart, sources: Sources, columns: Columns, scale: Scale, field: str,
                kind: str) -> None:
    """One point per run at its `field`: the runs of each source side by side in a column."""
    for i, ((name, runs), color) in enumerate(zip(sources.items(), COLORS, strict=False)):
        for key, column in columns.items():
            slot = spread(column.centre, column.width * 0.5, len(sources), gap=column.width)[i]
            mine = [r for r in runs if config_key(r) == key]
            xs = spread(slot, column.width * 0.5 / len(sources), len(mine))
            for x, r in zip(xs, mine, strict=True):
                value = r[field]
                shown = (f"{fmt(value)} × {'T1' if field == 'worst' else 'repo'}"
                         if value != float("inf") else "a node did not finish")
                chart.point(x, scale, value, color=color, kind=kind,
                            tip=run_tip(r, name, shown))


def plot_targets(chart: Chart, scale: Scale, columns: Columns) -> None:
    for case in CASES:
        if span := case_span(columns, case):
            chart.target(scale, TARGETS[case], span[0] + 4, span[1] - 4,
                         f"≤ {TARGETS[case]:g}", tip=f"{case} target: ≤ {TARGETS[case]:g} × T1")


def plot_labels(chart: Chart, columns: Columns) -> None:
    """Each column's configuration under the lower panel; each case's name above the upper
    panel, with a line between cases."""
    for key, column in columns.items():
        first, second = column_label(key)
        chart.text(column.centre, UPSTREAM_PANEL[0] + 16, first, anchor="middle")
        chart.text(column.centre, UPSTREAM_PANEL[0] + 30, second, anchor="middle", size=10,
                   color=MUTED)
    for case in CASES:
        if (span := case_span(columns, case)) is None:
            continue
        chart.text(sum(span) / 2, TIMES_PANEL[1] - 10, CASE_NAMES[case], anchor="middle",
                   weight="bold")
        if span[0] > LEFT:
            edge = span[0] - GROUP_GAP / 2
            chart.line(edge, TIMES_PANEL[1], edge, UPSTREAM_PANEL[0], color=GRID)


def fitted(values: list[float], targets: list[float], panel: tuple[float, float],
           ticks: int) -> Scale:
    """A scale from T1 (or lower) over the finite values and the targets."""
    finite = [v for v in values if v != float("inf")] + targets
    return Scale.fitted(min(1.0, *finite), max(finite), *panel, ticks=ticks)


def swarm_svg(sources: Sources) -> str:
    """Each run's worst node / T1 (the slow or frozen node left out) as a point, and below its
    upstream bytes / repo, per configuration in columns grouped by case, against issue 12's
    targets (dashed). The runs of each source are side by side, in a colour of their own."""
    runs = [r for rs in sources.values() for r in rs]
    keys = sorted({config_key(r) for r in runs}, key=sort_key)
    columns = lay_out_columns(keys)
    right = max(c.right for c in columns.values())
    chart = Chart(right + RIGHT, UPSTREAM_PANEL[0] + 74,
                  "Issue 12: every node pulls the same new repo at once")
    chart.text(16, 42, "One point per run. T1: one node alone from the upstream, in the same "
               "run. Slow, frozen: the worst of the other nodes.", size=11, color=MUTED)
    times = fitted([r["worst"] for r in runs], [TARGETS[k[0]] for k in keys], TIMES_PANEL, 5)
    upstream = fitted([r["upstream_ratio"] for r in runs], [UPSTREAM_TARGET], UPSTREAM_PANEL, 3)
    chart.y_axis(times, LEFT, right, "worst node / T1")
    chart.y_axis(upstream, LEFT, right, "upstream / repo")
    plot_labels(chart, columns)
    plot_targets(chart, times, columns)
    chart.target(upstream, UPSTREAM_TARGET, LEFT + 4, right - 4, f"≤ {UPSTREAM_TARGET:g}",
                 tip=f"upstream target: ≤ {UPSTREAM_TARGET:g} × repo")
    plot_points(chart, sources, columns, times, "worst", "run")
    plot_points(chart, sources, columns, upstream, "upstream_ratio", "upstream")
    legend = [("dot", color, f"{name} ({len(rs)} run{'s' if len(rs) != 1 else ''})")
              for (name, rs), color in zip(sources.items(), COLORS, strict=False)]
    legend.append(("dash", TARGET, "issue 12 target"))
    if any(r["worst"] == float("inf") for r in runs):
        legend.append(("triangle", MUTED, "a node did not finish"))
    chart.legend(16, UPSTREAM_PANEL[0] + 58, legend)
    return chart.svg()


def write_svg(path: Path, sources: Sources) -> None:
    if not any(sources.values()):
        print(f"plot: no run to draw, {path} not written")
        return
    path.write_text(swarm_svg(sources))
    print(f"plot: {path}")


def source_names(paths: list[Path]) -> list[str]:
    """File names, or the paths as given where two files share a name."""
    names = [p.name for p in paths]
    return [p.name if names.count(p.name) == 1 else str(p) for p in paths]


# --- main ---------------------------------------------------------------------------------
def plan_runs(args: argparse.Namespace, settings: Settings,
              work: Path) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """(label, run) for every run asked for, in order."""
    plan: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    for _ in range(args.runs):
        if "slow" in args.case:
            plan += [(f"slow {role}", lambda role=role: run_slow(settings, work, args.nodes, role))
                     for role in args.roles]
        if "frozen" in args.case:
            plan += [(f"frozen {role}",
                      lambda role=role: run_frozen(settings, work, args.nodes, role))
                     for role in args.frozen_roles]
        if "together" in args.case:
            plan += [(f"together {n}", lambda n=n: run_together(settings, work, n))
                     for n in args.together_nodes]
        if "warm" in args.case:
            plan += [(f"warm {n}", lambda n=n: run_warm(settings, work, n))
                     for n in args.warm_nodes]
    return plan


def git_commit(*path: str) -> str:
    """The checked-out commit, or the last one that changed `path` (daemon/: the code
    measured)."""
    out = subprocess.run(["git", "log", "-1", "--format=%H", "--", *path], capture_output=True,
                         text=True, cwd=ROOT)
    return out.stdout.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--runs", type=int, default=1, help="repeat every configuration N times")
    ap.add_argument("--nodes", type=int, default=4, help="nodes in the slow and frozen cases")
    ap.add_argument("--roles", nargs="+", choices=ROLES, default=["first", "middle", "last"],
                    help="where the slow node falls in the relay chain")
    ap.add_argument("--frozen-roles", nargs="+", choices=ROLES, default=["first"])
    ap.add_argument("--together-nodes", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--warm-nodes", type=int, nargs="+", default=[2, 4, 6, 12])
    ap.add_argument("--size", default="256MiB", help="repo size, split into --files files")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--wan", default="400mbit", help="the upstream host's link")
    ap.add_argument("--lan", default="1gbit", help="each node's link")
    ap.add_argument("--slow-rate", default="50mbit", help="the slow node's link, both ways")
    ap.add_argument("--many", type=int, default=8,
                    help="clusters of this many nodes or more use --many-wan and --many-size")
    ap.add_argument("--many-wan", default="200mbit")
    ap.add_argument("--many-size", default="128MiB")
    ap.add_argument("--freeze-at", type=float, default=2.0, help="s after the start")
    ap.add_argument("--freeze-hold", type=float, default=60.0,
                    help="longest s a node stays frozen while the others are not done")
    ap.add_argument("--client", choices=("raw", "hf"), default="raw")
    ap.add_argument("--timeout", type=float, default=600, help="per pull, s")
    ap.add_argument("--logs", default="", help="keep each run's daemon logs in this folder")
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    ap.add_argument("--append", action="store_true",
                    help="add this command's runs to those already in --json")
    ap.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                    help="only print the tables of saved results (two files: also compare "
                         "them, before → after)")
    ap.add_argument("--svg", type=Path, metavar="PATH",
                    help="also draw each run's worst / T1 and upstream / repo against the "
                         "targets: this command's runs, or with --report those of all its "
                         "files, a colour per file")
    return ap.parse_args(argv)


def load_results(path: Path) -> dict[str, Any]:
    """{"sessions": [one per command: its settings, commit, start], "runs": [each run's
    figures, with the index of its session]}."""
    return json.loads(path.read_text())


def save_results(path: Path | None, results: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(results, indent=1) + "\n")


def config_key(run: dict[str, Any]) -> tuple[str, int, str]:
    return run["case"], run["nodes"], run.get("role", "")


def compare(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    """Worst / T1 and upstream bytes / repo of each configuration, before and after."""
    def cell(runs: list[dict[str, Any]], key: str) -> str:
        values = [r[key] for r in runs]
        if not values:
            return "—"
        spread = f" ({fmt(min(values))}–{fmt(max(values))}, {len(values)} runs)"
        return fmt(max(values)) + (spread if len(values) > 1 else "")

    lines = ["| case | nodes | role | worst / T1 before | after | upstream / repo before | "
             "after |", "|---|---|---|---|---|---|---|"]
    keys = sorted({config_key(r) for r in before + after}, key=sort_key)
    for key in keys:
        b = [r for r in before if config_key(r) == key]
        a = [r for r in after if config_key(r) == key]
        lines.append(f"| {key[0]} | {key[1]} | {key[2] or '—'} | {cell(b, 'worst')} | "
                     f"{cell(a, 'worst')} | {cell(b, 'upstream_ratio')} | "
                     f"{cell(a, 'upstream_ratio')} |")
    return "\n".join(lines)


def print_reports(paths: list[Path]) -> None:
    """The tables of saved results; with two files, also the one comparing them."""
    results = [load_results(p) for p in paths]
    for path, r in zip(paths, results, strict=True):
        print(f"## {path}\n{report(r['runs'])}\n")
    if len(results) == 2:
        print(f"## {paths[0]} → {paths[1]}\n\n{compare(results[0]['runs'], results[1]['runs'])}")


def daemon_measured() -> str:
    """The last commit that changed this checkout's daemon, or where the daemon imported
    instead comes from (PYTHONPATH=DIR runs the code of another commit)."""
    imported = Path(modelpeer.daemon.__file__).resolve().parent
    if imported == (ROOT / "daemon").resolve():
        return git_commit("daemon", "client")
    return f"imported from {imported}"


def session(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    return {"command": " ".join(sys.argv), "commit": git_commit(),
            "daemon_commit": daemon_measured(), "cpus": os.cpu_count(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "settings": dataclasses.asdict(settings)}


def measure(args: argparse.Namespace) -> None:
    settings = Settings(args.wan, args.lan, parse_size(args.size), args.files, args.slow_rate,
                        args.client, args.freeze_at, args.freeze_hold, args.many, args.many_wan,
                        parse_size(args.many_size), args.timeout, args.logs)
    results: dict[str, Any] = {"sessions": [], "runs": []}
    if args.append and args.json is not None and args.json.exists():
        results = load_results(args.json)
    results["sessions"].append(session(args, settings))
    work = Path(tempfile.mkdtemp(prefix="mp-benchswarm-"))
    os.chmod(work, 0o755)
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for label, run in plan_runs(args, settings, work):
            try:
                record = {**run(), "session": len(results["sessions"]) - 1}
            except Exception as e:  # noqa: BLE001 - one broken run must not lose the others
                print(f"{label}: FAILED: {e!r}"[:3000], flush=True)
                results["sessions"][-1].setdefault("failed", {})[label] = repr(e)[:2000]
                save_results(args.json, results)
                continue
            summarize(record)
            runs.append(record)
            results["runs"].append(record)
            results["sessions"][-1]["seconds"] = round(time.monotonic() - started)
            save_results(args.json, results)
            print(f"{label}: worst {fmt(record['worst'])} × T1 (T1 {record['t1']:.1f} s, "
                  f"load {load_cell(record)})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(runs))
    if args.svg is not None:
        write_svg(args.svg, {args.json.name if args.json else "this command": runs})
    failed = results["sessions"][-1].get("failed", {})
    print(f"\n{len(runs)} runs in {time.monotonic() - started:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        print_reports(args.report)
        if args.svg is not None:
            write_svg(args.svg, {name: load_results(p)["runs"] for name, p in zip(
                source_names(args.report), args.report, strict=True)})
        return
    if reason := netlab_available():
        sys.exit(f"bench_swarm: {reason}")
    measure(args)


if __name__ == "__main__":
    main()

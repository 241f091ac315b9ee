"""bench/bench_swarm.py without a lab: where it places a node in the relay chain (against the
daemon's own chain), and the tables it prints from saved results."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from bench.bench_swarm import (
    chain_position,
    compare,
    plan_files,
    print_reports,
    report,
    role_position,
    summarize,
)

IDS = {f"h{i}": hashlib.sha256(f"node{i}".encode()).hexdigest()[:32] for i in range(1, 5)}


def test_chain_position_is_the_daemons_chain() -> None:
    """If this fails, the daemon orders its relay chain differently now: bench_swarm's --roles
    no longer put the slow or frozen node where they say (chain_position must follow)."""
    from modelpeer.daemon.lan.plan import GoUpstream, Plan, Relay
    from modelpeer.daemon.peermsg import PeerTransfer
    from modelpeer.daemon.transfer import TransferSource

    digest = hashlib.sha256(b"blob").hexdigest()
    order = sorted(IDS, key=lambda h: chain_position(IDS, h, digest))
    for i, host in enumerate(order):
        others = {IDS[h]: PeerTransfer(TransferSource.PEER, 0, 0.0) for h in IDS if h != host}
        decided = Plan(IDS[host], digest).decide(others, 0)
        assert decided == (Relay(IDS[order[i - 1]]) if i else GoUpstream())


@pytest.mark.parametrize("role", ["first", "middle", "last"])
def test_plan_files_puts_the_host_at_the_role(role: str) -> None:
    position = role_position(role, len(IDS))
    plan = plan_files("bench/unit", 3, 4096, IDS, "h4", position)
    assert len(plan) == 3 and set(plan.values()) == {position}


def run(case: str, ratios: dict[str, float | None], **extra: Any) -> dict[str, Any]:
    per_node = {h: {"seconds": r and r * 5, "ratio": r, "bytes_ok": True, "error": "",
                    "upstream_bytes": 100 if h == "h1" else 0, "during_freeze": True}
                for h, r in ratios.items()}
    r = {"case": case, "nodes": len(ratios), "wan": "400mbit", "lan": "1gbit",
         "repo_bytes": 100, "files": 4, "client": "raw", "t1": 5.0, "load_before": 1.0,
         "load_after": 2.0, "cdn_bytes": 100, "per_node": per_node, **extra}
    summarize(r)
    return r


def test_report_and_compare() -> None:
    slow = run("slow", {"h1": 1.1, "h2": 1.3, "h4": 9.0}, role="first", fault_host="h4",
               positions=[0, 0], slow_rate="50mbit", slow_link_seconds=40.0)
    assert slow["worst"] == pytest.approx(1.3) and slow["spread"] == pytest.approx(0.2)
    frozen = run("frozen", {"h1": 2.0, "h2": None, "h4": 4.0}, role="middle", fault_host="h4",
                 positions=[1, 1], frozen_at=2.0, resumed_at=60.0)
    assert frozen["worst"] == float("inf")
    together = run("together", {"h1": 1.5, "h2": 1.7})
    warm = run("warm", {}, seconds=7.0, ratio=1.4, upstream_by_node={"h1": 100})
    text = report([slow, frozen, together, warm])
    for case in ("### slow", "### frozen", "### together", "### warm", "h4* 9.00", "∞"):
        assert case in text
    table = compare([slow, together], [{**slow, "worst": 1.05}, warm])
    assert "| slow | 3 | first | 1.30 | 1.05 |" in table
    assert "| warm | 0 | — | — | 1.40 |" in table


def test_print_reports_of_saved_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved = tmp_path / "before.json"
    saved.write_text(json.dumps({"sessions": [{}], "runs": [run("together", {"h1": 1.2})]}))
    print_reports([saved, saved])
    assert "| together | 1 | — | 1.20 | 1.20 |" in capsys.readouterr().out

"""bench/bench_swarm.py without a lab: where it places a node in the relay chain (against the
daemon's own chain), and the tables and the plot it makes from saved results."""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from bench.bench_swarm import (
    chain_position,
    compare,
    main,
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



SVG = "{http://www.w3.org/2000/svg}"


def svg_elements(path: Path, kind: str) -> list[ET.Element]:
    return [e for e in ET.parse(path).getroot().iter() if e.get("class") == kind]


def tip(element: ET.Element) -> str:
    return element.findtext(SVG + "title") or ""


def value_in_tip(element: ET.Element) -> float:
    """The "1.25 ×" of a point's or a target's tooltip (a point without: did not finish)."""
    found = re.search(r"([\d.]+) ×", tip(element))
    return float(found[1]) if found else float("inf")


def test_svg_has_each_run_as_a_point_against_its_target(tmp_path: Path) -> None:
    """--report JSON --svg: a point per run in each panel (a node that never finished: a
    triangle at the top), each case's target a dashed line over its columns, and every point
    on the side of its target line that its value is."""
    slow = [run("slow", {"h1": 1.1, "h2": worst, "h4": 9.0}, role=role, fault_host="h4",
                positions=[0], slow_rate="50mbit", slow_link_seconds=40.0)
            for role, worst in (("first", 1.15), ("middle", 1.3), ("last", 1.6))]
    frozen = [run("frozen", {"h1": 1.4, "h2": None, "h4": 4.0}, role="first", fault_host="h4",
                  positions=[0], frozen_at=2.0, resumed_at=60.0, cdn_bytes=150)]
    together = [run("together", {"h1": 1.0, "h2": worst}) for worst in (1.1, 1.25)]
    warm = [run("warm", {}, seconds=6.0, ratio=1.2, upstream_by_node={"h1": 100})]
    runs = slow + frozen + together + warm
    saved, out = tmp_path / "runs.json", tmp_path / "swarm.svg"
    saved.write_text(json.dumps({"sessions": [{}], "runs": runs}))
    main(["--report", str(saved), "--svg", str(out)])

    targets = {tip(line).split()[0]: line for line in svg_elements(out, "target")}
    assert {case: value_in_tip(line) for case, line in targets.items()} == {
        "slow": 1.2, "frozen": 1.5, "together": 1.2, "warm": 1.1, "upstream": 1.02}
    for kind, field in (("run", "worst"), ("upstream", "upstream_ratio")):
        points = svg_elements(out, kind)
        assert sorted(map(value_in_tip, points)) == pytest.approx(sorted(r[field] for r in runs))
        for point in points:
            if point.tag == SVG + "path":
                assert "did not finish" in tip(point)
                continue
            line = targets["upstream" if kind == "upstream" else tip(point).split()[0]]
            assert float(line.get("x1", "")) < float(point.get("cx", "")) < float(
                line.get("x2", "")), tip(point)
            above = float(point.get("cy", "")) < float(line.get("y1", ""))
            assert above == (value_in_tip(point) > value_in_tip(line)), tip(point)

"""bench/svgplot.py: round scales, and bench_warm.py's bar chart drawn on it."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench.bench_warm import SERIES, svg
from bench.svgplot import Scale


@pytest.mark.parametrize(("lo", "hi", "ticks"), [
    (0, 134.9, [0, 50, 100, 150]),
    (1.0, 1.97, [1, 1.2, 1.4, 1.6, 1.8, 2]),
    (0.97, 1.02, [0.97, 0.98, 0.99, 1, 1.01, 1.02]),
    (1.0, 1.0, [1, 1.2, 1.4, 1.6, 1.8, 2]),
])
def test_scale_is_widened_to_round_ticks(lo: float, hi: float, ticks: list[float]) -> None:
    scale = Scale.fitted(lo, hi, 300, 100)
    assert scale.ticks() == pytest.approx(ticks)
    assert (scale(scale.lo), scale(scale.hi)) == pytest.approx((300, 100))


def test_warm_chart_has_a_bar_per_way_and_cluster_size(tmp_path: Path) -> None:
    results = {n: {"lower_bound": 22.4, "modelpeer": 23.0, "nginx": 16.0 * n,
                   "direct": 22.4 * n} for n in (2, 4, 6)}
    svg(results, tmp_path / "warm.svg")
    bars = [e for e in ET.parse(tmp_path / "warm.svg").getroot().iter()
            if e.get("class") in {key for key, _, _ in SERIES}]
    assert len(bars) == len(SERIES) * len(results)
    seconds_per_px = {results[int(tip.split()[0])][str(bar.get("class"))]
                      / float(bar.get("height", "")) for bar in bars
                      if (tip := bar.findtext("{http://www.w3.org/2000/svg}title"))}
    assert max(seconds_per_px) == pytest.approx(min(seconds_per_px), rel=0.01)

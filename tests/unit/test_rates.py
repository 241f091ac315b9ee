"""Rates: how rate settings are read, and how the peer upload budget is shared."""

from __future__ import annotations

import pytest

from modelpeer.daemon.config import parse_rate
from modelpeer.daemon.ratelimit import PeerUploadCap


@pytest.mark.parametrize(("value", "rate"), [
    ("100mbit", 12_500_000), ("64Mbit", 8_000_000), ("1gbit/s", 125_000_000),
    ("20MB", 20_000_000), ("2MiB", 2 * 1024 * 1024), ("8 MB/s", 8_000_000), (0, 0), ("0", 0),
])
def test_a_rate_is_a_size_per_second_or_a_bit_rate(value: str | int, rate: int) -> None:
    assert parse_rate(value) == rate


@pytest.mark.parametrize("value", ["lots", "12mbps", "-1", "10 mbit per hour"])
def test_a_bad_rate_says_how_to_write_one(value: str) -> None:
    with pytest.raises(ValueError, match="100mbit"):
        parse_rate(value)


def test_bittorrent_has_the_whole_budget_until_a_peer_api_stream_opens() -> None:
    applied: list[int] = []
    cap = PeerUploadCap(applied.append)
    cap.set_rate(8_000_000)
    assert applied[-1] == 8_000_000
    with cap.stream() as first, cap.stream() as second:
        assert first is second and first.rate == 4_000_000
        assert applied[-1] == 4_000_000
        assert cap.split() == {"bittorrent": 4_000_000, "peer_api": 4_000_000}
        cap.set_rate(25_000_000)  # SIGHUP while streams run
        assert first.rate + applied[-1] == 25_000_000
    assert applied[-1] == 25_000_000
    assert cap.split()["bittorrent"] == 25_000_000


def test_no_cap_leaves_both_sides_unlimited() -> None:
    applied: list[int] = []
    cap = PeerUploadCap(applied.append)
    cap.set_rate(0)
    with cap.stream() as pace:
        assert pace.rate == 0 and not any(applied)

"""The transfer plan's decisions, table by table, on a fake clock."""

from __future__ import annotations

import dataclasses

from modelpeer.daemon.lan.peerfetch import nearly_done
from modelpeer.daemon.lan.plan import (
    CATCH_UP,
    DROP_FOR,
    OVERTAKE_SPREAD,
    STALL_WINDOW,
    TORRENT_START,
    GoUpstream,
    Plan,
    Relay,
    cluster_plan,
    upstream_intake,
)
from modelpeer.daemon.peermsg import BlobTransfer, PeerTransfer
from modelpeer.daemon.store import BlobId
from modelpeer.daemon.transfer import RateMeter, Transfer, TransferSource

UP, PEER = TransferSource.UPSTREAM, TransferSource.PEER
MB = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def t(source: TransferSource = PEER, available: int = 0, rate: float = 0,
      feeder: str = "") -> PeerTransfer:
    return PeerTransfer(source, available, rate, feeder)


def nodes_in_rank_order(digest: str = "d" * 64, n: int = 5) -> list[str]:
    names = [f"{i:032x}" for i in range(n)]
    probe = Plan("x", digest)
    return sorted(names, key=probe.rank)


def test_alone_nothing_first_upstream_the_others_behind_the_node_ahead() -> None:
    a, b, c = nodes_in_rank_order(n=3)
    assert Plan(b, "d" * 64).decide({}, 0) is None
    assert Plan(a, "d" * 64).decide({b: t(), c: t()}, 0) == GoUpstream()
    assert Plan(b, "d" * 64).decide({a: t(), c: t()}, 0) == Relay(a)
    assert Plan(c, "d" * 64).decide({a: t(), b: t()}, 0) == Relay(b)
    # an upstream fetcher goes first whatever its rank
    assert Plan(a, "d" * 64).decide({c: t(UP), b: t()}, 0) == Relay(c)


def test_the_first_live_node_of_a_cohort_leads_without_waiting() -> None:
    a, b, c = nodes_in_rank_order(n=3)
    cohort = {a, b, c}
    assert Plan(a, "d" * 64).leads(cohort, [b, c])
    assert not Plan(b, "d" * 64).leads(cohort, [a, c])
    assert Plan(b, "d" * 64).leads(cohort, [c])  # the first is gone: the next leads
    assert not Plan(c, "d" * 64).leads({a, b}, [a, b])  # not in the cohort: it waits and sees


def test_without_a_cohort_the_first_of_all_live_members_leads() -> None:
    a, b, c = nodes_in_rank_order(n=3)
    assert Plan(a, "d" * 64).leads(set(), [b, c])
    assert not Plan(b, "d" * 64).leads(set(), [a, c])  # a may start it too: b waits and sees
    assert Plan(b, "d" * 64).leads(set(), [c])
    assert Plan(c, "d" * 64).leads(set(), [])  # alone


def test_a_source_that_stalls_with_bytes_to_send_is_dropped_one_starved_is_not() -> None:
    a, b, me = nodes_in_rank_order(n=3)
    clock = Clock()
    plan = Plan(me, "d" * 64, clock)
    view = {a: t(UP, 50 * MB), b: t(PEER, 0)}
    assert plan.decide(view, 0) == Relay(b)
    assert not plan.stalled(b, view, 0)  # it had nothing yet for this node
    assert plan.decide(view, 0) == Relay(b)
    view = {a: t(UP, 50 * MB), b: t(PEER, 20 * MB)}
    assert plan.stalled(b, view, 0)
    assert plan.decide(view, 0) == Relay(a)
    clock.now += DROP_FOR + 1
    assert plan.decide(view, 0) == Relay(b)


def test_it_relays_from_the_nearest_fast_node_ahead_and_skips_slow_ones() -> None:
    a, b, c, d, me = nodes_in_rank_order(n=5)
    plan = Plan(me, "d" * 64)
    fetcher = t(UP, 50 * MB, 50 * MB)
    assert plan.decide({a: fetcher, b: t(PEER, 40 * MB, 50 * MB),
                        c: t(PEER, 30 * MB, 48 * MB), d: t(PEER, 20 * MB, 49 * MB)},
                       10 * MB) == Relay(d)
    # d is slow: 6 MB/s against 50: c feeds instead, d stays a leaf
    assert plan.decide({a: fetcher, b: t(PEER, 40 * MB, 50 * MB),
                        c: t(PEER, 30 * MB, 48 * MB), d: t(PEER, 20 * MB, 6 * MB)},
                       10 * MB) == Relay(c)
    # a node with nothing beyond this node's offset cannot feed it
    assert plan.decide({a: fetcher, d: t(PEER, 5 * MB, 49 * MB)}, 10 * MB) == Relay(a)


def test_what_a_source_delivers_here_counts_not_only_what_it_says() -> None:
    a, b, me = nodes_in_rank_order(n=3)
    plan = Plan(me, "d" * 64)
    view = {a: t(UP, 50 * MB, 50 * MB), b: t(PEER, 40 * MB, 50 * MB)}
    assert plan.decide(view, 0) == Relay(b)
    plan.measured[b] = 5 * MB  # its uplink is slow
    assert plan.decide(view, 0) == Relay(a)


def test_a_dropped_source_stays_out_for_a_while() -> None:
    a, b, me = nodes_in_rank_order(n=3)
    clock = Clock()
    plan = Plan(me, "d" * 64, clock)
    view = {a: t(UP, 50 * MB, 50 * MB), b: t(PEER, 40 * MB, 50 * MB)}
    plan.drop(b)
    assert plan.decide(view, 0) == Relay(a)
    clock.now += DROP_FOR + 1
    assert plan.decide(view, 0) == Relay(b)


def test_a_slow_upstream_fetcher_is_overtaken_once_its_rate_settled_and_by_one_node(
        ) -> None:
    fetcher, first, second = nodes_in_rank_order(n=3)
    slow_fetcher_only = {fetcher: 6 * MB}
    plan = Plan(first, "d" * 64)
    young = {fetcher: t(UP, 10 * MB, 0), second: t(PEER, 0, 0, fetcher)}
    assert plan.needs_probe(young, fetcher, slow_fetcher_only, 0)  # at once: settled together
    assert not plan.overtakes(young, fetcher, slow_fetcher_only, 40 * MB)  # not settled
    starting = {fetcher: t(PEER), second: t(PEER, 0, 0, fetcher)}
    assert not plan.needs_probe(starting, fetcher, {}, 0)  # not fetching yet: nothing to judge
    no_byte_yet = {fetcher: t(UP), second: t(PEER, 0, 0, fetcher)}
    assert not plan.needs_probe(no_byte_yet, fetcher, {}, 0)  # the others may not have theirs
    assert plan.judging(fetcher, starting) and plan.judging(fetcher, young)
    # a node further down the chain keeps its pace: all re-planning at once broke the chain
    assert not Plan(second, "d" * 64).judging(fetcher, {fetcher: t(PEER), first: t(PEER)})
    view = {fetcher: t(UP, 20 * MB, 6 * MB), second: t(PEER, 0, 0, fetcher)}
    assert not plan.judging(fetcher, view)  # settled: the plan goes back to its pace
    # unless this node probes the upstream with another blob: its rate is known soon
    assert plan.judging(fetcher, view, probe_under_way=True)
    assert plan.needs_probe(view, fetcher, slow_fetcher_only, 0)
    assert not plan.overtakes(view, fetcher, slow_fetcher_only, 0)
    assert plan.overtakes(view, fetcher, slow_fetcher_only, own_upstream_rate=40 * MB)
    assert not plan.overtakes(view, fetcher, slow_fetcher_only, own_upstream_rate=15 * MB)
    # of the nodes relaying straight from the fetcher, only the first in rank acts
    other = Plan(second, "d" * 64)
    view2 = {fetcher: view[fetcher], first: t(PEER, 5 * MB, 0, fetcher)}
    assert not other.needs_probe(view2, fetcher, slow_fetcher_only, 0)
    assert not other.overtakes(view2, fetcher, slow_fetcher_only, 40 * MB)
    # ... but if the first relays from someone else, the second is first behind the fetcher
    view3 = {fetcher: view[fetcher], first: t(PEER, 5 * MB, 0, "")}
    assert other.overtakes(view3, fetcher, slow_fetcher_only, 40 * MB)
    # a node relaying from another follower neither probes nor overtakes
    assert not other.overtakes(view2, first, slow_fetcher_only, 40 * MB)
    # once a node overtook it, the others do not: they move to that one
    overtaken = {**view, second: t(UP, 25 * MB, 0)}
    assert not plan.overtakes(overtaken, fetcher, slow_fetcher_only, 40 * MB)
    # a rate some other node measured is enough, and no probe is needed then
    known = {**slow_fetcher_only, second: 45 * MB}
    assert not plan.needs_probe(view, fetcher, known, 0)
    assert plan.overtakes(view, fetcher, known, 0)
    # nor while another node probes, whatever its rank (it chose its feeder first)
    probing = {**view, second: dataclasses.replace(t(PEER, 2 * MB, 0, fetcher), probing=True)}
    assert not plan.needs_probe(probing, fetcher, slow_fetcher_only, 0)
    # a slow node that handed its upstream read over does not probe the node it relays from
    plan.handed_over = True
    assert not plan.needs_probe(view, fetcher, slow_fetcher_only, 0)


def test_the_rate_meter_counts_the_last_window() -> None:
    clock = Clock()
    meter = RateMeter(clock)
    clock.now += 1.0
    meter.add(2 * MB)
    clock.now += 1.0
    meter.add(2 * MB)
    assert 1.9 * MB <= meter.rate <= 2.1 * MB
    clock.now += 10
    assert meter.rate == 0


def test_the_cluster_plan_groups_each_blob_and_names_the_feeders() -> None:
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    blob = BlobTransfer("d" * 64, "acme/m/w.bin", 100, PeerTransfer(TransferSource.UPSTREAM,
                                                                     60, 10.0))
    fed = dataclasses.replace(blob, label="", state=PeerTransfer(TransferSource.PEER, 40, 9.0, a))
    other = BlobTransfer("e" * 64, "acme/m/x.bin", 50, PeerTransfer(TransferSource.PEER, 5, 1.0,
                                                                      "f" * 32, leaf=True))
    probing = dataclasses.replace(blob, state=PeerTransfer(TransferSource.PEER, 30, 8.0, a,
                                                           probing=True))
    plan = cluster_plan([(a, "h1", [blob]), (b, "h2", [fed, other]), (c, "h3", [probing])])
    assert [p.file for p in plan] == ["acme/m/w.bin", "acme/m/x.bin"]
    first, second = plan
    assert [(n.name, n.source, n.feeder_name, n.available, n.probing, n.leaf)
            for n in first.nodes] == [("h1", "upstream", "", 60, False, False),
                                      ("h2", "peer", "h1", 40, False, False),
                                      ("h3", "peer", "h1", 30, True, False)]
    assert second.nodes[0].feeder_name == "f" * 12  # a feeder that is not a member: its id
    assert second.nodes[0].leaf


def test_nodes_confirming_an_overtake_wait_apart_but_the_first_in_order() -> None:
    fetcher, first, *others = nodes_in_rank_order(n=5)
    view = {n: t() for n in [first, *others]} | {fetcher: t(UP)}
    alone = {fetcher: 6 * MB}  # the fetcher's node alone reads the upstream
    assert Plan(first, "d" * 64).overtake_pause(view, fetcher, alone) == 0  # the others see it
    pauses = [Plan(n, "d" * 64).overtake_pause(view, fetcher, alone) for n in others]
    assert all(0 <= p <= OVERTAKE_SPREAD for p in pauses)
    assert len(set(pauses)) == 3
    assert Plan(others[0], "d" * 64).overtake_pause(view, fetcher, alone) == pauses[0]
    # the fetcher is not one of those it waits for
    assert Plan(first, "d" * 64).overtake_pause({fetcher: t(UP)}, fetcher, alone) == 0
    # others read the link too: a starved fetcher may recover during the pause
    assert Plan(first, "d" * 64).overtake_pause(view, fetcher, {**alone, "b": 9 * MB}) > 0


def test_no_overtake_while_the_cluster_fills_the_upstream_link() -> None:
    fetcher, first = nodes_in_rank_order(n=2)
    plan = Plan(first, "d" * 64)
    view = {fetcher: t(UP, 20 * MB, 10 * MB)}
    rates = {fetcher: 10 * MB}
    # four blobs' fetchers at 10 MB/s each take 40 of the 50 MB/s a node once measured
    sharing = {fetcher: 10 * MB, "b": 10 * MB, "c": 10 * MB, "d": 10 * MB}
    assert not plan.overtakes(view, fetcher, rates, 50 * MB, sharing)
    assert plan.overtakes(view, fetcher, rates, 50 * MB, {fetcher: 10 * MB})
    # a slow fetcher is overtaken even then: a new reader's share of the full link (a third,
    # with two reading it) is many times what it delivers, and its last blob no longer waits
    # until the other overtakes end
    slow_view = {fetcher: t(UP, 20 * MB, MB * 3 // 2)}
    assert plan.overtakes(slow_view, fetcher, {}, 50 * MB, {fetcher: 6 * MB, "b": 43 * MB})
    assert not plan.overtakes(slow_view, fetcher, {}, 12 * MB, {fetcher: 3 * MB, "b": 9 * MB})
    # what arrives counts after 0.5 s, its prefix's rate after 1 s: in between, a fetcher
    # that got little while other nodes read the link too may have connections the queue
    # starved (asked again after 1 s): not overtaken yet; alone on the link, it is (a slow
    # node fetching every blob)
    young = {fetcher: PeerTransfer(UP, 20 * MB, 0.0, "", 100_000.0, since=0.6)}
    assert not plan.overtakes(young, fetcher, {}, 50 * MB, {fetcher: 0.1 * MB, "b": 3 * MB})
    assert plan.overtakes(young, fetcher, {}, 50 * MB, {fetcher: 0.1 * MB})
    # older, its prefix still (a slow node's blob starved on its own full link): judged
    older = {fetcher: PeerTransfer(UP, 20 * MB, 0.0, "", 100_000.0)}
    assert plan.overtakes(older, fetcher, {}, 50 * MB, {fetcher: 0.1 * MB, "b": 3 * MB})
    # on a full link, a fetcher that gets almost nothing in its first seconds is a late flow
    # the queue locked out: it gets its share as the others end, an overtaker would read
    # beside it
    full = {fetcher: 0.1 * MB, "b": 45 * MB}
    locked_out = {fetcher: PeerTransfer(UP, 20 * MB, 0.0, "", 100_000.0, since=1.5)}
    assert not plan.overtakes(locked_out, fetcher, {}, 50 * MB, full)
    assert plan.overtakes(older, fetcher, {}, 50 * MB, full)


def test_what_the_cluster_reads_at_once_counts_as_what_the_upstream_gives() -> None:
    fetcher, first = nodes_in_rank_order(n=2)
    plan = Plan(first, "d" * 64)
    view = {fetcher: t(UP, 20 * MB, 3 * MB)}  # the slow node's share for this blob
    # two probes taken at once each read 20 MB/s of a 50 MB/s link: nobody measured more
    probes = {"a": 20 * MB, "b": 20 * MB}
    alone = {fetcher: 8 * MB}  # the slow node, all its blobs: 20 is not 3 times that
    assert not plan.overtakes(view, fetcher, probes, 0.0, alone)
    # while an overtaker of another blob reads 40 MB/s beside the slow node's 8, the link
    # gives at least 48: 3 MB/s is slow, and a new reader's share many times that
    assert plan.overtakes(view, fetcher, probes, 0.0, {**alone, "a": 40 * MB})


def test_a_slow_fetcher_is_measured_before_it_has_brought_much() -> None:
    fetcher, first = nodes_in_rank_order(n=2)
    plan = Plan(first, "d" * 64)
    # 0.5 MB/s settled over a whole rate window: 1 MB in
    view = {fetcher: t(UP, 1 * MB, MB // 2)}
    assert plan.delivered(fetcher, view) == MB // 2
    assert plan.overtakes(view, fetcher, {}, 50 * MB, {fetcher: MB // 2})


def test_an_upstream_fetcher_hands_over_to_one_ahead_and_faster() -> None:
    me, fast, other = nodes_in_rank_order(n=3)
    clock = Clock()
    plan = Plan(me, "d" * 64, clock)
    rates = {other: 40 * MB}  # what the upstream gave a node

    def hand_over(view: dict[str, PeerTransfer], own_rate: float, offset: int) -> str | None:
        return plan.hand_over_to(view, own_rate, offset, rates, 0)

    # an overtaker fetching from the upstream at 40 MB/s, ahead of this slow fetcher
    view = {fast: t(UP, 30 * MB, 40 * MB), other: t(PEER, 29 * MB, 40 * MB, fast)}
    assert hand_over(view, 1 * MB, 10 * MB) == fast
    assert hand_over(view, 0, 10 * MB) is None  # this node's rate has not settled
    # behind by more than it reads in CATCH_UP: not yet
    assert hand_over(view, 1 * MB, 30 * MB + int(CATCH_UP * 40 * MB) + 1) is None
    # behind by less (its prefix moves in segment jumps): handed over to now
    assert hand_over(view, 1 * MB, 60 * MB) == fast
    assert hand_over({fast: t(UP, 30 * MB, 10 * MB)}, 20 * MB, 10 * MB) is None  # slower
    # two nodes that went to the upstream at once, at a share of it each: the one behind
    assert hand_over({fast: t(UP, 30 * MB, 10 * MB)}, 9 * MB, 10 * MB) == fast
    # an overtaker ramping up (0.3 MB/s so far) does not hand back to the slow node ahead
    assert hand_over({fast: t(UP, 12 * MB, 1 * MB)}, MB * 3 // 10, 10 * MB) is None
    # a relaying node is not a fetcher to hand over to
    assert hand_over({other: t(PEER, 29 * MB, 40 * MB)}, 1 * MB, 10 * MB) is None
    # once handed over, this node never overtakes the faster one, even while it ramps up
    ramping = {fast: t(UP, 30 * MB, 5 * MB)}
    assert plan.overtakes(ramping, fast, rates, 0)
    plan.handed_over = True
    assert not plan.overtakes(ramping, fast, rates, 0)
    # a node that failed this node as a source is not handed over to again for a while
    plan.drop(fast)
    assert hand_over(view, 1 * MB, 10 * MB) is None
    clock.now += DROP_FOR + 1
    assert hand_over(view, 1 * MB, 10 * MB) == fast
    # seen with a rate before, a fetcher that reports none delivers nothing: no target
    stalled_slow = {fast: t(UP, 11 * MB, 0)}
    assert hand_over(stalled_slow, 1 * MB, 10 * MB) is None
    # an overtaker never hands back to the node it overtook: one never seen with a rate
    # reads as young, at the best upstream rate, not as slow
    plan = Plan(me, "d" * 64, clock)
    assert hand_over(stalled_slow, 1 * MB, 10 * MB) == fast
    plan.overtaken.add(fast)
    assert hand_over(stalled_slow, 1 * MB, 10 * MB) is None
    # ... unless a rate of its own says it is ahead and as fast (a starved fetcher recovered)
    assert hand_over({fast: t(UP, 11 * MB, 20 * MB)}, 1 * MB, 10 * MB) == fast


def test_an_overtaken_fetcher_yields_to_its_overtaker_at_about_its_rate() -> None:
    me, overtaker = nodes_in_rank_order(n=2)
    plan = Plan(me, "d" * 64)

    def hand_over(view: PeerTransfer, own_rate: float, rates: dict[str, float] | None = None
                  ) -> str | None:
        # this node has read the blob from the upstream for 3.5 s, and is at byte 4 MB
        return plan.hand_over_to({overtaker: view}, own_rate, 4 * MB, rates or {}, 0, 3.5)

    # it took the upstream 0.8 s ago, 1 MB behind this node, at 9 MB/s against this one's 10
    # (a fetcher locked out of a full link that recovered as it was overtaken)
    late = PeerTransfer(UP, 3 * MB, 9 * MB, since=0.8)
    assert hand_over(late, 10 * MB) == overtaker
    assert hand_over(late, 0) == overtaker  # still locked out: no rate of its own
    assert hand_over(late, 19 * MB) is None  # over twice as fast: this node reads on
    # one that went to the upstream about when this node did must be as fast
    alike = dataclasses.replace(late, since=3.0)
    assert hand_over(alike, 10 * MB) is None
    assert hand_over(alike, 0) is None
    # an overtaker that has read nothing yet, behind this node, is not yielded to
    assert hand_over(PeerTransfer(UP, 2 * MB, 0, since=0.3), 0, {"x": 50 * MB}) is None
    # the overtaker hands back only to one twice as fast, so that they never both yield
    back = Plan(overtaker, "d" * 64)
    back.overtaken.add(me)
    ahead = PeerTransfer(UP, 4 * MB, 10 * MB, since=3.5)
    assert back.hand_over_to({me: ahead}, 9 * MB, 3 * MB, {}, 0, 0.8) is None
    assert back.hand_over_to({me: dataclasses.replace(ahead, rate=20 * MB)}, 9 * MB, 3 * MB,
                             {}, 0, 0.8) == me
    # an overtaker locked out itself hands back to the one it overtook, which reads again
    assert back.hand_over_to({me: ahead}, 0, 3 * MB, {}, 0, 0.8) == me
    assert back.hand_over_to({me: dataclasses.replace(ahead, rate=0)}, 0, 3 * MB, {}, 0,
                             0.8) is None


def test_complete_chunks_beat_a_feeder_that_waits_or_is_slow() -> None:
    me, feeder = nodes_in_rank_order(n=2)
    plan = Plan(me, "d" * 64)
    upstream_rates = {"prober": 40 * MB}

    def beat(view: dict[str, PeerTransfer], held: int = 8 * MB,
             rates: dict[str, float] = upstream_rates, own: float = 0) -> bool:
        return plan.chunks_beat(feeder, view, 10 * MB, held, rates, own)

    # a fast feeder with bytes past this node's offset is kept
    assert not beat({feeder: t(PEER, 30 * MB, 40 * MB)})
    # one with nothing past it yet, or gone
    assert beat({feeder: t(PEER, 10 * MB, 6 * MB)})
    assert beat({})
    # a slow node relaying what it gets itself: 1 MB/s where the upstream gives 40
    assert beat({feeder: t(PEER, 30 * MB, 1 * MB)})
    # what it delivered here counts too
    plan.measured[feeder] = 1 * MB
    assert beat({feeder: t(PEER, 30 * MB, 40 * MB)}, rates={}, own=40 * MB)
    del plan.measured[feeder]


def test_a_feeder_this_node_caught_up_with_beats_starting_a_torrent() -> None:
    me, feeder = nodes_in_rank_order(n=2)
    plan = Plan(me, "d" * 64)
    caught_up = {feeder: t(PEER, 10 * MB, 10 * MB)}  # at this node's offset, 10 MB/s coming

    def beat(view: dict[str, PeerTransfer], held: int) -> bool:
        return plan.chunks_beat(feeder, view, 10 * MB, held, {"prober": 40 * MB}, 0)

    # the rest of a chunk comes from it before a torrent would start
    assert not beat(caught_up, held=400_000)
    assert not beat(caught_up, held=int(10 * MB * TORRENT_START))
    # more than it brings meanwhile goes over BitTorrent
    assert beat(caught_up, held=int(10 * MB * TORRENT_START) + 1)
    # an upstream fetcher's prefix moves in segment jumps: its pace says nothing of when
    assert beat({feeder: t(UP, 10 * MB, 10 * MB)}, held=400_000)
    # nor does a feeder with no rate yet
    assert beat({feeder: t(PEER, 10 * MB, 0)}, held=400_000)


def test_an_upstream_fetcher_stuck_at_one_byte_is_overtaken() -> None:
    fetcher, first = nodes_in_rank_order(n=2)
    clock = Clock()
    plan = Plan(first, "d" * 64, clock)
    # its link is busy with other blobs: it reports no rate, and its bytes do not move
    view = {fetcher: t(UP, 2 * MB, 0)}
    assert plan.delivered(fetcher, view) is None  # young or stuck: not known yet
    assert not plan.overtakes(view, fetcher, {}, 50 * MB)
    clock.now += 1
    assert not plan.overtakes({fetcher: t(UP, 3 * MB, 0)}, fetcher, {}, 50 * MB)  # it moved
    clock.now += STALL_WINDOW
    assert plan.overtakes({fetcher: t(UP, 3 * MB, 0)}, fetcher, {}, 50 * MB)
    # on a full link too
    assert plan.overtakes({fetcher: t(UP, 3 * MB, 0)}, fetcher, {}, 50 * MB,
                          {fetcher: 0.0, "b": 45 * MB})


def test_a_fetcher_about_to_end_is_not_overtaken() -> None:
    fetcher, first = nodes_in_rank_order(n=2)
    near_end = {fetcher: t(UP, 58 * MB, 11 * MB)}  # 9 MB to go at 11 MB/s
    far = {fetcher: t(UP, 20 * MB, 11 * MB)}
    # the link is free (the other blobs ended) and the upstream gives 50 MB/s
    assert not Plan(first, "d" * 64, size=67 * MB).overtakes(near_end, fetcher, {}, 50 * MB)
    assert Plan(first, "d" * 64, size=67 * MB).overtakes(far, fetcher, {}, 50 * MB)
    assert Plan(first, "d" * 64).overtakes(near_end, fetcher, {}, 50 * MB)  # size unknown


def test_a_share_of_the_upstream_is_not_slow_a_drip_of_it_is() -> None:
    me, feeder = nodes_in_rank_order(n=2)
    plan = Plan(me, "d" * 64)
    # four blobs fetched at once each get a quarter of the 40 MB/s the upstream gives
    assert not plan.slow(feeder, {feeder: t(UP, 30 * MB, 10 * MB)}, {"x": 40 * MB}, 0)
    assert plan.slow(feeder, {feeder: t(UP, 30 * MB, 1 * MB)}, {"x": 40 * MB}, 0)
    # with a rate before, none now: it delivers nothing (a blob starved on a slow link)
    assert plan.slow(feeder, {feeder: t(UP, 30 * MB, 0)}, {"x": 40 * MB}, 0)
    plan = Plan(me, "d" * 64)
    assert not plan.slow(feeder, {feeder: t(UP, 30 * MB, 0)}, {"x": 40 * MB}, 0)  # young
    assert not plan.slow(feeder, {feeder: t(UP, 30 * MB, 1 * MB)}, {}, 0)  # nothing known


def test_a_fetcher_reading_several_blobs_well_is_not_overtaken_for_one_slow_share() -> None:
    fetcher, first = nodes_in_rank_order(n=2)
    plan = Plan(first, "d" * 64)
    view = {fetcher: t(UP, 20 * MB, 2 * MB)}  # this blob gets 2 MB/s of its node's 30
    assert plan.overtakes(view, fetcher, {}, 50 * MB, {"x": 10 * MB})
    assert not plan.overtakes(view, fetcher, {}, 50 * MB, {fetcher: 30 * MB})
    # a slow node: all its blobs together are slow
    assert plan.overtakes(view, fetcher, {}, 50 * MB, {fetcher: 6 * MB, "x": 4 * MB})
    # its node's upstream rate says the same (it reads the other blobs well): once they
    # end, this blob takes the link
    assert not plan.overtakes(view, fetcher, {fetcher: 30 * MB}, 50 * MB, {fetcher: 2 * MB})


async def test_an_overtake_about_to_end_leaves_the_intake_other_fetches_do_not() -> None:
    def fetching(size: int, available: int, nbytes_last_window: int) -> Transfer:
        blob = BlobId(f"{size:064x}", "sha256", size)
        transfer = Transfer(blob, "acme/model:w.bin")
        transfer.mark_source(0, UP)
        transfer.received(nbytes_last_window)  # what came over its connections lately
        transfer.advance(available)
        return transfer

    far = fetching(64 * MB, 4 * MB, 4 * MB)  # 60 MB to go at 16 MB/s (4 MB over 0.25 s)
    near = fetching(64 * MB, 60 * MB, 4 * MB)  # 4 MB to go: ends in a quarter of a second
    assert upstream_intake([far]) == 16 * MB
    # it fills the link until it ends: left out, a fetcher locked out beside it was overtaken
    assert upstream_intake([far, near]) == 32 * MB
    # an overtake leaves the link about when the next overtake of the slow node would start
    near.overtook = True
    assert upstream_intake([far, near]) == 16 * MB
    far.overtook = True
    assert upstream_intake([far, near]) == 16 * MB  # one far from its end counts
    near.probing = True
    far.probing = True
    assert upstream_intake([far, near]) == 0  # probes do not count either


def test_a_young_upstream_fetcher_counts_at_what_the_upstream_gives() -> None:
    slow, young, me = nodes_in_rank_order(n=3)
    plan = Plan(me, "d" * 64)
    # the slow fetcher at 0.5 MB/s and the node that overtook it, too young for a rate
    view = {slow: t(UP, 20 * MB, MB // 2), young: t(UP, 25 * MB, 0)}
    assert plan.decide(view, 10 * MB) == Relay(slow)  # nobody knows what the upstream gives
    assert plan.decide(view, 10 * MB, {"x": 50 * MB}) == Relay(young)
    # the slow fetcher hands over to it without waiting for its rate
    slow_plan = Plan(slow, "d" * 64)
    ahead = {young: t(UP, 25 * MB, 0)}
    assert slow_plan.hand_over_to(ahead, MB // 2, 20 * MB, {}, 0) is None
    assert slow_plan.hand_over_to(ahead, MB // 2, 20 * MB, {"x": 50 * MB}, 0) == young


def test_an_upstream_fetcher_behind_this_node_feeds_it_only_when_nobody_has_bytes() -> None:
    slow, me, other = nodes_in_rank_order(n=3)
    plan = Plan(me, "d" * 64)
    # a slow fetcher this node passed (its bytes came from another node meanwhile)
    view = {slow: t(UP, 4 * MB, 2 * MB), other: t(PEER, 30 * MB, 2 * MB)}
    assert plan.decide(view, 6 * MB) == Relay(other)
    assert plan.decide({slow: t(UP, 4 * MB, 2 * MB)}, 6 * MB) == Relay(slow)


def test_an_overtaker_just_behind_this_node_beats_the_slow_fetcher_ahead() -> None:
    overtaker, slow, me = nodes_in_rank_order(n=3)  # the slow one is nearest ahead
    plan = Plan(me, "d" * 64)
    # the overtaker started reading a few KB behind where this node relayed the slow one to;
    # too young for a rate, it counts at what the upstream gives (40 MB/s)
    view = {slow: t(UP, 2 * MB, int(1.6 * MB)), overtaker: t(UP, MB // 2)}
    assert plan.decide(view, MB, {overtaker: 40 * MB}) == Relay(overtaker)
    # one no faster than the node with bytes does not: this node stays where the bytes are
    view[overtaker] = t(UP, MB // 2, 2 * MB)
    assert plan.decide(view, MB, {overtaker: 40 * MB}) == Relay(slow)


def test_a_follower_that_goes_to_the_upstream_is_not_stuck_for_its_wait() -> None:
    fetcher, first = nodes_in_rank_order(n=2)
    clock = Clock()
    plan = Plan(first, "d" * 64, clock)
    # it waited on a peer at 5 KB for the stall window, then went to the upstream
    assert plan.delivered(fetcher, {fetcher: t(PEER, 5000, 0)}) is None
    clock.now += STALL_WINDOW
    assert plan.delivered(fetcher, {fetcher: t(UP, 5000, 0)}) is None  # young, not stuck
    clock.now += STALL_WINDOW
    assert plan.delivered(fetcher, {fetcher: t(UP, 5000, 0)}) == 0.0  # now it is


def test_a_relay_about_to_bring_the_last_byte_runs_one_more_period() -> None:
    clock = Clock()
    meter = RateMeter(clock)
    clock.now += 1.0
    meter.add(20 * MB)  # 20 MB/s over its first second
    assert nearly_done(20 * MB, meter)  # the rest comes within one more period (1.5 s)
    assert not nearly_done(40 * MB, meter)


def test_nodes_starting_together_make_a_chain_when_the_upstream_rate_is_known() -> None:
    fetcher, follower, me = nodes_in_rank_order(n=3)
    plan = Plan(me, "d" * 64)
    # everyone too young for a rate: the follower counts at what its feeder gives
    view = {fetcher: t(UP, 2 * MB, 0), follower: t(PEER, 2 * MB, 0, fetcher)}
    assert plan.decide(view, 0, {"x": 50 * MB}) == Relay(follower)


def test_feeders_are_compared_by_their_prefixes_fetchers_judged_by_what_arrives() -> None:
    fetcher, follower, me = nodes_in_rank_order(n=3)
    plan = Plan(me, "d" * 64)
    # 40 MB/s arrive over the fetcher's segments, its prefix grows at 10, the follower's too
    view = {fetcher: PeerTransfer(UP, 20 * MB, 10 * MB, "", 40 * MB),
            follower: t(PEER, 15 * MB, 10 * MB, fetcher)}
    assert plan.decide(view, 10 * MB) == Relay(follower)  # a chain, not all on the fetcher
    assert plan.delivered(fetcher, view) == 40 * MB


def test_nodes_relaying_from_a_young_fetcher_stay_a_chain_when_their_rates_settle_first() -> None:
    fetcher, b, c, me = nodes_in_rank_order(n=4)
    # the relays' rates settled a moment before the fetcher's, at its ramp-up's pace
    view = {fetcher: t(UP, 5 * MB, 0), b: t(PEER, 4 * MB, 4 * MB, fetcher),
            c: t(PEER, 4 * MB, 4 * MB, b)}
    assert Plan(me, "d" * 64).decide(view, 4 * MB, {fetcher: 20 * MB}) == Relay(c)
    # once the fetcher's rate settled, a relay much slower than it is passed over
    settled = {**view, fetcher: t(UP, 30 * MB, 20 * MB)}
    assert Plan(me, "d" * 64).decide(settled, 4 * MB, {fetcher: 20 * MB}) == Relay(fetcher)


def test_an_overtaken_slow_fetcher_is_no_feeder_beside_its_overtaker() -> None:
    overtaker, slow, me = nodes_in_rank_order(n=3)  # the slow one is nearest ahead
    # the overtaker's prefix jumps as its segments complete: between jumps it looks no faster
    view = {slow: t(UP, 10 * MB, MB), overtaker: dataclasses.replace(
        t(UP, 12 * MB, MB), received=16 * MB)}
    plan = Plan(me, "d" * 64)
    assert plan.decide(view, 9 * MB, {overtaker: 45 * MB}) == Relay(overtaker)
    # alone, the slow fetcher still feeds: nobody else has the bytes
    assert plan.decide({slow: view[slow]}, 9 * MB, {overtaker: 45 * MB}) == Relay(slow)


def test_a_slow_node_that_handed_over_is_a_leaf_nobody_relays_from() -> None:
    overtaker, slow, me = nodes_in_rank_order(n=3)  # the slow one is nearest ahead
    # relaying from the overtaker, its rate anew and young: it counted at its feeder's rate
    relaying = t(PEER, 5 * MB, 0, overtaker)
    view = {overtaker: t(UP, 30 * MB, 0), slow: relaying}
    plan = Plan(me, "d" * 64)
    assert plan.decide(view, 3 * MB, {overtaker: 45 * MB}) == Relay(slow)
    leaf = {**view, slow: dataclasses.replace(relaying, leaf=True)}
    assert plan.decide(leaf, 3 * MB, {overtaker: 45 * MB}) == Relay(overtaker)
    # a leaf that the upstream has back is a fetcher like any
    back = {slow: dataclasses.replace(t(UP, 5 * MB, 0), leaf=True)}
    assert plan.decide(back, 3 * MB, {overtaker: 45 * MB}) == Relay(slow)

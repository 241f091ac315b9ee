"""The transfer plan: where a node gets the next bytes of a blob while other nodes of the
cluster transfer the same blob. Pure decisions over what the peers said in their chunk maps and
what this node measured; fetch.py carries them out.

- Any node that has bytes beyond this node's offset, fetches from the upstream, or is ahead of
  it in the blob's order (upstream fetchers first, then rendezvous order) can feed it. Among the
  feeders whose rate is within SLOW_FRACTION of the best, the node picks the nearest one ahead,
  so each node feeds about one other (a chain, when nothing goes wrong), and a slow node ends up
  a leaf that nobody picks.
- A source that delivers nothing for STALL_WINDOW seconds is left out of this transfer for a
  while (a frozen node keeps its sockets open; only silence gives it away).
- When nobody fetches from the upstream yet, the nodes that want the blob agree without talking:
  the first of them in rendezvous order goes to the upstream, and each of the others relays from
  the node ahead of it, which waits for its own bytes; if the first does not start within the
  stall window, it stops answering or is dropped, and the next one goes.
- An upstream fetcher much slower than what the upstream gives the cluster is overtaken: the
  next node in order fetches the rest from the upstream itself. The overtaken fetcher stops
  reading the upstream once the overtaker reads at about its rate and is ahead of it or
  close behind, and relays the rest from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..peermsg import BlobTransfer, PeerTransfer
from ..registry import Transfers
from ..transfer import RATE_SETTLES, Transfer, TransferSource

SLOW_FRACTION = 0.5  # a feeder slower than this share of the best one is not used
# a source giving less than this share of what the upstream gives is slow whatever the others
# do (several blobs fetched at once each get a share of the upstream: that is not slow)
SLOW_SOURCE = 0.125
STALL_WINDOW = 3.0  # seconds without a byte before a source is dropped
DROP_FOR = 10.0  # how long a dropped source stays out of this transfer
OVERTAKE_FACTOR = 3.0  # the upstream must be this much faster than a fetcher to overtake it
INTAKE_SHARE = 0.5  # no overtake while the cluster takes this share of the known upstream rate
OVERTAKE_SPREAD = 0.6  # seconds over which nodes deciding to overtake at once confirm it
# s a young fetcher that gets almost nothing of a full upstream link is left to it: a flow that
# joins a full drop-tail queue loses its first packets and waits out their timeouts (2,896
# bytes in 1-3 s, a new connection no better), then takes its share as the others end; 12
# nodes at once overtook such fetchers 1.1-1.7 s in, and both read on (upstream 1.06-1.20x)
LOCKED_OUT_FOR = 2.5
# s: an overtake this close to its end (at its rate) no longer counts in the intake; the
# next overtake of a slow node's blob takes about this long to start reading
ENDING_SOON = 1.5
CATCH_UP = 1.0  # s: a fetcher behind by what it reads in this long counts as ahead (hand-over)
# s: until a chunk's torrent brings its first bytes (the torrent file, handshakes); the rest
# of one chunk, a few hundred KB, took 0.6-1.3 s over BitTorrent at 12 nodes on 2 cores
TORRENT_START = 1.0


@dataclasses.dataclass(frozen=True)
class Relay:
    node: str


@dataclasses.dataclass(frozen=True)
class GoUpstream:
    pass


Decision = Relay | GoUpstream | None  # None: no other node transfers the blob


class Plan:
    def __init__(self, node_id: str, digest: str,
                 clock: Callable[[], float] = time.monotonic, *, size: int | None = None
                 ) -> None:
        self.node_id = node_id
        self.digest = digest
        self.size = size  # the blob's; None: not known, no fetcher is taken to end soon
        self._clock = clock
        self._dropped: dict[str, float] = {}
        self.measured: dict[str, float] = {}  # what each source delivered to this node, B/s
        self.probed = False  # this transfer measured the upstream already
        self.handed_over = False  # this node left the upstream to a faster fetcher of the blob
        self.overtaken: set[str] = set()  # the fetchers this node overtook in this transfer
        # node -> (its source, available, seen since): what it sat at, since when
        self._progress: dict[str, tuple[TransferSource, int, float]] = {}
        # node -> the source it had a rate with: at 0 later, it is not young but delivers
        # nothing (a slow node's starved blob read 0 for 3 s, held as young, not overtaken)
        self._paced: dict[str, TransferSource] = {}

    def rank(self, node: str) -> str:
        return hashlib.sha256(f"{node}:{self.digest}".encode()).hexdigest()

    def drop(self, node: str) -> None:
        self._dropped[node] = self._clock() + DROP_FOR

    def dropped(self, node: str) -> bool:
        return self._dropped.get(node, 0.0) > self._clock()

    def chain(self, transfers: Mapping[str, PeerTransfer]) -> list[str]:
        """The nodes transferring the blob and this one: upstream fetchers first."""
        return sorted([*transfers, self.node_id],
                      key=lambda n: (n == self.node_id or
                                     transfers[n].source != TransferSource.UPSTREAM,
                                     self.rank(n)))

    def decide(self, transfers: Mapping[str, PeerTransfer], offset: int,
               upstream_rates: Mapping[str, float] | None = None,
               own_upstream_rate: float = 0.0) -> Decision:
        """Where the next bytes come from (see _young_rates for nodes without a rate)."""
        live = {n: t for n, t in transfers.items() if not self.dropped(n) and n != self.node_id}
        chain = self.chain(live)
        ahead = chain[:chain.index(self.node_id)]
        rates = self._young_rates(live, chain, _best_upstream_rate(upstream_rates or {},
                                                                   own_upstream_rate))
        feeders = {n: rates[n] for n, t in live.items()
                   if t.source == TransferSource.UPSTREAM or t.available > offset
                   or (n in ahead and t.available >= offset)}
        with_bytes = [rate for n, rate in feeders.items() if live[n].available > offset]
        if with_bytes:
            # an upstream fetcher behind this node has nothing for it: a slow one it overtook
            # held it a relay period at a time while another node had the bytes. One that the
            # nodes with bytes are slow beside stays (an overtaker that started a few KB
            # behind this node passes it at once; without it, the slow node fed this one on)
            feeders = {n: rate for n, rate in feeders.items()
                       if live[n].available > offset or live[n].source != TransferSource.UPSTREAM
                       or SLOW_FRACTION * rate > max(with_bytes)}
        if feeders:
            return Relay(self._best_feeder(ahead, self._without_slow_fetchers(
                _without_leaves(feeders, live), live, upstream_rates or {}, own_upstream_rate)))
        return GoUpstream() if live else None

    def _without_slow_fetchers(self, feeders: dict[str, float],
                               live: Mapping[str, PeerTransfer],
                               upstream_rates: Mapping[str, float],
                               own_upstream_rate: float) -> dict[str, float]:
        """The feeders but slow upstream fetchers, when another upstream fetcher of the blob
        is not slow (a slow node that was overtaken): feeders are compared by their prefixes,
        and the overtaker's, reading four segments at once, moves in jumps; between them the
        slow node looked as fast and was picked, with no byte to send, three plans in a row."""
        fetchers = [n for n in feeders if live[n].source == TransferSource.UPSTREAM]
        slow = {n for n in fetchers if self.slow(n, live, upstream_rates, own_upstream_rate)}
        if not slow or len(slow) == len(fetchers):
            return feeders
        return {n: rate for n, rate in feeders.items() if n not in slow}

    def leads(self, cohort: Iterable[str], live: Iterable[str]) -> bool:
        """Whether this node is the first, in rendezvous order, of the live nodes of a cohort
        that start the blob together by arrangement (a warm job's), or without a cohort, of
        all live members: no node that may start it too can be ahead, so it goes to the
        upstream without waiting to see who else starts (every pull of nodes starting
        together waited SETTLE for it, which T1 does not)."""
        live = set(live) | {self.node_id}
        cohort = set(cohort) or live
        return self.node_id in cohort and min(cohort & live, key=self.rank) == self.node_id

    def stalled(self, node: str, transfers: Mapping[str, PeerTransfer], offset: int) -> bool:
        """A source sent nothing for the stall window. One that had bytes for this node is
        dropped; one still waiting for its own bytes is not at fault (and a frozen node stops
        answering chunk-map requests, which leaves it out anyway). True when dropped."""
        t = transfers.get(node)
        if t is not None and t.available > offset:
            self.drop(node)
            return True
        return False

    def _young_rates(self, live: Mapping[str, PeerTransfer], chain: list[str],
                     presumed: float) -> dict[str, float]:
        """What each node gives, in chain order. One too young to have a rate counts, as an
        upstream fetcher, at the best rate the upstream gave any node (`presumed`: an
        overtaker reads a blob in about a rate window, and at rate 0 nobody relayed from it
        while it did; they stayed on the slow node it overtook), and as a relaying node at
        what its feeder gives (at `presumed` before, so the nodes starting together still
        make a chain rather than all relaying from the fetcher). A node relaying from a
        young feeder counts as young too: what it measured is its feeder's ramp-up, and its
        rate settling a moment before the feeder's made every node leave the chain for the
        fetcher at once."""
        rates: dict[str, float] = {}
        young: set[str] = set()
        for n in chain:
            if (t := live.get(n)) is None:
                continue
            relays = t.source != TransferSource.UPSTREAM
            if t.rate <= 0 or (relays and t.feeder in young):
                young.add(n)
            rate = 0.0 if n in young else t.rate
            rates[n] = self._effective_rate(
                n, rate, rates.get(t.feeder, presumed) if relays else presumed)
        return rates

    def _effective_rate(self, node: str, rate: float, presumed: float = 0.0) -> float:
        rate = rate if rate > 0 else presumed
        measured = self.measured.get(node)
        return rate if measured is None else min(rate, measured)

    def _best_feeder(self, ahead: list[str], feeders: dict[str, float]) -> str:
        best = max(feeders.values())
        fast = {n for n, rate in feeders.items() if rate >= SLOW_FRACTION * best}
        return next((n for n in reversed(ahead) if n in fast),
                    max(fast, key=lambda n: feeders[n]))

    def _first_behind(self, transfers: Mapping[str, PeerTransfer], source: str) -> bool:
        """Whether this node is the first, in rendezvous order, of those relaying straight from
        the upstream fetcher `source`: only it probes or overtakes, so that nodes starting
        together do not all go to the upstream at once."""
        fetcher = transfers.get(source)
        if fetcher is None or fetcher.source != TransferSource.UPSTREAM:
            return False
        behind = [n for n, t in transfers.items()
                  if t.source != TransferSource.UPSTREAM and t.feeder == source]
        return min([*behind, self.node_id], key=self.rank) == self.node_id

    def overtakes(self, transfers: Mapping[str, PeerTransfer], source: str,
                  upstream_rates: Mapping[str, float], own_upstream_rate: float,
                  intakes: Mapping[str, float] | None = None) -> bool:
        """Whether this node, relaying straight from an upstream fetcher, should leave it and
        fetch the rest from the upstream itself. `intakes`: what each node of the cluster
        (this one included) reads from the upstream now, all blobs together.

        The fetcher's rate has settled, and the upstream gave some other node (or this one),
        or gives the cluster now, OVERTAKE_FACTOR times what the fetcher delivers of this
        blob and what its node reads of all blobs (a node reading several blobs at a good
        rate is not slow when one of them gets a small share). While the cluster's upstream
        fetchers together take INTAKE_SHARE of that rate, the upstream link is full and a
        second reader would only halve the first: then only a slow fetcher (SLOW_SOURCE) is
        overtaken, and only when the share of the link a new reader would get is
        OVERTAKE_FACTOR times what it delivers (a slow node's last blob had waited until the
        other overtakes ended, then took the link alone and ended 2 s after them), and not
        in its first LOCKED_OUT_FOR seconds (a late flow the queue locks out). A fetcher
        in its first second (`since` in its chunk maps) is judged by what arrives (after
        0.5 s) only while its node is the only one reading the upstream (a slow node fetching
        every blob): where other nodes read the link too, a young fetcher's connections may be
        starved by its queue, which the starved-connection rule mends after 1 s (judged at
        0.5 s, the nodes that took over a frozen node's blobs were each overtaken within a
        second, and handed over: 1.58x T1; judged by its prefix's rate instead, a slow node's
        blob whose prefix sat still on its full link waited 0.6 s more). Once one node
        overtook, the others prefer it."""
        delivered = self.delivered(source, transfers)
        if (delivered is None or self.handed_over
                or not self._first_behind(transfers, source)):
            return False  # one that handed over knows the upstream gives it less
        if self._ends_soon(transfers[source], delivered):
            return False
        if any(t.source == TransferSource.UPSTREAM for n, t in transfers.items() if n != source):
            return False  # someone overtook it already: the plan moves to that one
        intakes = intakes or {}
        if transfers[source].since < RATE_SETTLES and _others_read(intakes, source):
            return False  # judged by what arrives alone, while others read the link too
        # what the cluster reads from the upstream now, all together, it gives at least:
        # probes taken at once read a share each (two at 20 MB/s of a 50 MB/s link)
        known = max(_best_upstream_rate(upstream_rates, own_upstream_rate, but=source),
                    sum(intakes.values()))
        if known < OVERTAKE_FACTOR * max(delivered, intakes.get(source, 0.0),
                                         upstream_rates.get(source, 0.0), 1.0):
            return False
        if sum(intakes.values()) < INTAKE_SHARE * known:
            return True
        if transfers[source].since < LOCKED_OUT_FOR:
            return False  # a late flow into a full drop-tail queue: it gets the link later
        readers = sum(1 for rate in intakes.values() if rate > 0)
        return (delivered < SLOW_SOURCE * known
                and known / (readers + 1) >= OVERTAKE_FACTOR * delivered)

    def _ends_soon(self, t: PeerTransfer, delivered: float) -> bool:
        """Whether an upstream fetcher will have the blob within ENDING_SOON at its pace: an
        overtake would read little before it ends, and that twice (a 2-node warm overtook a
        blob 9 MB from its end as the other blobs ended; it had the link from then on)."""
        return self.size is not None and _ends_within(self.size, t.available, delivered)

    def hand_over_to(self, transfers: Mapping[str, PeerTransfer], own_rate: float,
                     offset: int, upstream_rates: Mapping[str, float],
                     own_upstream_rate: float, own_since: float = 0.0) -> str | None:
        """The node this one, itself fetching the blob from the upstream, should relay the
        rest from instead, so that the WAN carries the blob once: another upstream fetcher
        of the blob, ahead of this one, at least as fast and not slow itself (the node that
        overtook this slow one, which then stops taking its share of the upstream link; or
        one of two nodes that went to the upstream at once). Only the one behind yields, so
        two fetchers never both stop, and a fetcher hands back to a node it overtook only on
        a rate measured (a slow node whose blob had not moved in a rate window read as young,
        at the best upstream rate, and an overtaker handed back to it: the others then
        followed the slow node to the end, 8.5x T1 in the slow-first bench; but a fetcher
        overtaken while its TCP share was starved, which recovered and is ahead, is handed
        back to, or both read the blob to its end). A fetcher too young to have a rate counts
        at the best rate the upstream gave any node (an overtaker often reads a blob in less
        than a rate window; waiting for its rate, the slow node read on until the blob was
        complete elsewhere and then took it over BitTorrent on its full link). None while
        this node has no rate, but to an overtaker (below). One whose prefix trails this
        node's offset by what it reads in CATCH_UP counts as ahead: it reads four segments
        at once, so its prefix moves in 8 MiB jumps, and a slow node overtaken in the
        slow-first bench read on for 3 s before the overtaker's prefix passed it, taking its
        share of the upstream link from the overtakers (this node then waits for bytes it
        has already); at a rate measured, never a presumed one (a slow node's blob with no
        rate yet, behind, was handed back to at the best upstream rate, 8.4x T1).

        Between an overtaker and the fetcher it overtook, the cluster already judged: the
        overtaken one (`own_since`: how long this node has read the blob from the upstream;
        an overtaker took the upstream at least RATE_SETTLES after it) yields to an overtaker
        that reads at SLOW_FRACTION of its rate, and the overtaker hands back only to one
        twice as fast, so that never both yield; either yields while it delivers nothing. A
        fetcher locked out of the link for 3 s recovered as it was overtaken; at about the
        same rate, each waited for the other to be faster, and both read 19 MB of the blob.
        An overtaker whose own new connection was locked out read nothing, the fetcher it
        overtook 10 MB/s, and both read 17 MB."""
        presumed = _best_upstream_rate(upstream_rates, own_upstream_rate)
        rates = {n: self._effective_rate(n, _pace(t), presumed) for n, t in transfers.items()
                 if n != self.node_id and not self.dropped(n)
                 and (n not in self.overtaken or _pace(t) > 0)
                 and t.source == TransferSource.UPSTREAM
                 and (own_rate > 0 or _overtook(t, own_since) or n in self.overtaken)
                 and not self.slow(n, transfers, upstream_rates, own_upstream_rate)}
        ahead = {n: rate for n, rate in rates.items()
                 if rate >= self._rate_to_yield(n, transfers[n], own_rate, own_since)
                 and (transfers[n].available > offset or offset - transfers[n].available
                      <= CATCH_UP * min(rate, _pace(transfers[n])))}
        return max(ahead, key=lambda n: ahead[n], default=None)

    def _rate_to_yield(self, node: str, t: PeerTransfer, own_rate: float,
                       own_since: float) -> float:
        """The rate at which another upstream fetcher of the blob takes it over from this
        node (hand_over_to)."""
        if node in self.overtaken:
            return own_rate / SLOW_FRACTION
        if _overtook(t, own_since):
            return own_rate * SLOW_FRACTION
        return own_rate

    def chunks_beat(self, node: str, transfers: Mapping[str, PeerTransfer], offset: int,
                    held: int, upstream_rates: Mapping[str, float],
                    own_upstream_rate: float) -> bool:
        """Whether complete chunks that peers hold (`held` bytes from `offset` on) beat
        relaying from `node`: it is slow (a slow node relaying what it gets itself), or it
        has no byte past this node's offset yet (a slow upstream fetcher can be minutes away)
        unless it relays them itself at a pace that brings them before a torrent would start
        (this node caught up with the node ahead in a chain: in the 12-node bench, the last
        few hundred KB of a chunk taken over BitTorrent then held a node and every node
        behind it 1 s, the feeder having them within 0.1 s). Complete chunks move at the
        LAN's speed once their torrents start."""
        t = transfers.get(node)
        if t is None or self.slow(node, transfers, upstream_rates, own_upstream_rate):
            return True
        if t.available > offset:
            return False
        pace = self.delivered(node, transfers)
        return not (t.source == TransferSource.PEER and pace is not None
                    and pace * TORRENT_START >= held)

    def slow(self, node: str, transfers: Mapping[str, PeerTransfer],
             upstream_rates: Mapping[str, float], own_upstream_rate: float) -> bool:
        """Whether `node` gives the blob at less than SLOW_SOURCE of what the upstream
        gives (as far as anyone measured it); a source whose rate has not settled is not, one
        that had a rate and delivers nothing now is (a slow node's blob starved on its own
        link stayed a fast node's feeder for 3.5 s after it was overtaken)."""
        t = transfers.get(node)
        pace = None if t is None else self._pace_seen(node, t)
        known = _best_upstream_rate(upstream_rates, own_upstream_rate)
        return (pace is not None and known > 0
                and self._effective_rate(node, pace) < SLOW_SOURCE * known)

    def judging(self, source: str, transfers: Mapping[str, PeerTransfer],
                probe_under_way: bool = False) -> bool:
        """Whether the rate of `source` is about to settle, or that of the upstream to be
        known (this node probes it with another blob), and this node is the one to probe or
        overtake it: the first behind an upstream fetcher, or right behind the first of
        nodes starting together, which goes to the upstream within SETTLE. The plan is made
        again soon, not after a whole relay period (in the slow-first bench the first
        overtake waited up to 1.5 s for it, and the probe 1.5 s for the fetcher to start;
        with the fetcher's rate settled and the upstream's not known yet, an overtake
        waited 1.5 s).
        Only then: a relay period shorter than a source's first byte, or than CHECK_EVERY,
        never drops a silent source or measures a drip (the stall window and the drip check
        count within one relay; a source stuck for the stall window is settled, at 0); and
        nodes that all re-planned every 0.5 s while young left their chain for the fetcher
        (each a few KB behind the node ahead, which then had no byte for it)."""
        t = transfers.get(source)
        if t is None:
            return False
        settled = self.delivered(source, transfers) is not None
        if t.source == TransferSource.UPSTREAM:
            return self._first_behind(transfers, source) and (not settled or probe_under_way)
        if settled:
            return False
        chain = self.chain(transfers)
        return chain[:2] == [source, self.node_id]

    def overtake_pause(self, transfers: Mapping[str, PeerTransfer], source: str,
                       intakes: Mapping[str, float]) -> float:
        """How long this node waits before it confirms an overtake of `source`: spread over
        OVERTAKE_SPREAD seconds by its rank for the blob, so that nodes deciding at once do
        not confirm at once, and a fetcher starved for a moment may recover meanwhile. None
        for the first, in rendezvous order, of the nodes that do not fetch the blob from the
        upstream (the one the others look to; they confirm after it and find it fetching)
        while the fetcher's node is the only one reading the upstream (a slow node fetching
        every blob): each confirmation is a chunk-map round, 0.26 s when the slow fetcher's
        link is full both ways, and with everyone pausing the slow-first bench overtook
        1.9-2.1 s into the pull. With no pause where others read the link too, 12 nodes at
        once overtook starved fetchers (upstream 1.12-1.15x the repo)."""
        followers = [n for n, t in transfers.items() if t.source != TransferSource.UPSTREAM]
        if (not _others_read(intakes, source)
                and min([*followers, self.node_id], key=self.rank) == self.node_id):
            return 0.0
        return int(self.rank(self.node_id)[:4], 16) / 0xFFFF * OVERTAKE_SPREAD

    def needs_probe(self, transfers: Mapping[str, PeerTransfer], source: str,
                    upstream_rates: Mapping[str, float], own_upstream_rate: float) -> bool:
        """Nobody but the fetcher knows what the upstream gives: the node relaying straight from
        it measures it once, with a few MiB of the bytes it needs anyway, as soon as the
        fetcher has its first bytes, so that both rates are known when the fetcher's settles
        (probing once it had settled, a slow first fetcher was overtaken 2.2-2.7 s into the
        pull). Not before: nodes that start together read their first bytes about then, and
        say so in their chunk maps; a node that probed at the very start of a warm job, on a
        link the job's fetchers were filling, read 4 MiB at 2 MB/s. Never by a node that
        handed its upstream read over: it is the slow one, and would measure its own link
        (an overtaken node probed its overtaker, whose rate only it knew, for 16 MiB). Nor
        while another node probes the blob: of nodes starting together, each took itself for
        the first behind the fetcher before the others had chosen their feeder, and in CI
        three probed one blob at once (their relays then waited a period on each other's
        missing bytes). Nodes behind the fetchers of different blobs do probe at once: each
        then knows at once what the upstream gives it, and the overtakes of a slow node's four
        blobs come together, before the first overtakers fill the link (with one probe among
        them they came 2.2-4.5 s in, the later ones held by the full link: 1.45-1.66x T1)."""
        others_know = (any(r for n, r in upstream_rates.items() if n != source)
                       or any(t.probing for t in transfers.values()))
        fetcher = transfers.get(source)
        return (not self.handed_over and fetcher is not None and fetcher.available > 0
                and self._first_behind(transfers, source)
                and own_upstream_rate == 0 and not others_know)

    def delivered(self, source: str, transfers: Mapping[str, PeerTransfer]) -> float | None:
        """What a source gives once its rate has settled over a whole rate window (None
        before: a transfer ramping up says little; 0 once it had a rate and has none now):
        the better of what it says and what it delivered here. A slow source settles as
        soon as a fast one: waiting for it to bring some amount of bytes first would make
        the slowest the last to be found out."""
        t = transfers.get(source)
        pace = None if t is None else self._pace_seen(source, t)
        if pace is None or pace == 0:
            return pace
        return max(pace, self.measured.get(source, 0.0))

    def _pace_seen(self, node: str, t: PeerTransfer) -> float | None:
        """The node's pace (_pace); None while it is young, 0 when it delivers nothing: seen
        at one byte for the stall window, or with a rate before as the source it has now."""
        pace = _pace(t)
        if pace > 0:
            self._paced[node] = t.source
            return pace
        return 0.0 if self._stuck(node, t) or self._paced.get(node) == t.source else None

    def _stuck(self, node: str, t: PeerTransfer) -> bool:
        """Whether the node's prefix sat still for the stall window as the source it has now
        (a follower that waited and then went to the upstream is not stuck at once)."""
        now = self._clock()
        seen = self._progress.get(node)
        if seen is None or seen[:2] != (t.source, t.available):
            self._progress[node] = (t.source, t.available, now)
            return False
        return now - seen[2] >= STALL_WINDOW


def _without_leaves(feeders: dict[str, float], live: Mapping[str, PeerTransfer]
                    ) -> dict[str, float]:
    """The feeders but slow nodes that were overtaken and relay the rest (leaves), unless
    only leaves are left. A leaf's rate is young once it relays, so it counted at its
    feeder's rate, and it was ahead of the fast nodes in the chain: one of them relayed from
    a 50 Mbit/s node for 3 s, 0.2 MB at a time, beside the overtaker's 40 MB/s (1.71x T1)."""
    fed = {n: rate for n, rate in feeders.items()
           if not (live[n].leaf and live[n].source != TransferSource.UPSTREAM)}
    return fed or feeders


def _overtook(t: PeerTransfer, own_since: float) -> bool:
    """Whether a node took the upstream for the blob after this node's own read had a
    rate: it judged this node slow and overtook it (nodes going to the upstream at once do
    not)."""
    return t.since + RATE_SETTLES <= own_since


def _ends_within(size: int, available: int, rate: float) -> bool:
    """Whether a fetch of a blob of `size`, `available` bytes in, ends within ENDING_SOON at
    `rate`."""
    return size - available <= ENDING_SOON * rate


def _others_read(intakes: Mapping[str, float], fetcher: str) -> bool:
    """Whether a node other than the fetcher's reads the upstream now."""
    return any(rate > 0 for n, rate in intakes.items() if n != fetcher)


def _pace(t: PeerTransfer) -> float:
    """How fast a node gets the blob: for an upstream fetcher, the bytes arriving over all its
    connections (its prefix, what it can relay, moves in jumps as its segments complete); for
    a relaying node, its prefix. Feeders are compared by their prefixes (decide), fetchers
    judged by their pace (overtakes, hand-overs, slow)."""
    return max(t.rate, t.received) if t.source == TransferSource.UPSTREAM else t.rate


def _best_upstream_rate(upstream_rates: Mapping[str, float], own_upstream_rate: float,
                        but: str = "") -> float:
    """The best rate the upstream gave any node lately (this one's included), leaving out
    `but` (a fetcher being judged: what it gets says nothing of what others could)."""
    return max([own_upstream_rate, *(r for n, r in upstream_rates.items() if n != but)])


# --- the plan as operators see it ---------------------------------------------------------
@dataclasses.dataclass
class PlanNode:
    node_id: str
    name: str
    source: str  # upstream, peer (fed by `feeder`) or store
    feeder: str  # node id, "" for none
    feeder_name: str
    available: int
    rate: int  # bytes/s
    probing: bool  # it reads a few MiB from the upstream to measure it
    leaf: bool  # it handed its upstream read over to a faster node: nobody relays from it


@dataclasses.dataclass
class PlanBlob:
    digest: str
    file: str
    size: int
    nodes: list[PlanNode]


def cluster_plan(members: Sequence[tuple[str, str, Sequence[BlobTransfer]]]) -> list[PlanBlob]:
    """Who feeds whom, for each blob in transfer anywhere on the cluster, from each member's
    (node id, name, transfers): this node's own first, then what each peer's status said."""
    names = {node_id: name for node_id, name, _ in members}
    blobs: dict[str, PlanBlob] = {}
    for node_id, name, transfers in members:
        for t in transfers:
            blob = blobs.setdefault(t.digest, PlanBlob(t.digest, t.label, t.size, []))
            blob.file = blob.file or t.label
            feeder = t.state.feeder
            blob.nodes.append(PlanNode(node_id, name, t.state.source.value, feeder,
                                       names.get(feeder, feeder[:12]), t.state.available,
                                       round(t.state.rate), t.state.probing, t.state.leaf))
    return sorted(blobs.values(), key=lambda b: (b.file, b.digest))


def peer_view(t: Transfer) -> PeerTransfer:
    """This node's transfer of a blob as its peers see it: a node probing the upstream is not
    an upstream fetcher to them."""
    source = TransferSource.PEER if t.probing else t.source
    return PeerTransfer(source, t.available, t.meter.settled_rate, t.feeder,
                        t.intake.settled_rate, t.probing, t.leaf, t.meter.age)


def own_upstream_rate(measured: float, transfers: Iterable[Transfer]) -> float:
    """What the upstream gives this node: what it measured lately (UpstreamFetch.rate), or
    at least what it reads from the upstream now, all blobs and probes together (a node
    reading it well tells as much as a probe would; without, each node relaying from a
    fetcher probed: 4 MiB more each)."""
    return max(measured, sum(t.intake.rate for t in transfers
                             if t.source == TransferSource.UPSTREAM))


def upstream_intake(transfers: Iterable[Transfer]) -> float:
    """What this node reads from the upstream now, all blobs together, bytes/s. Probes are
    left out (they are short). A fetcher younger than a rate window counts at what it has
    read so far: it fills the link as much as an older one.

    An overtake that ends within ENDING_SOON at its rate is left out: it leaves the link
    about when the next overtake would start reading, and counting it held the overtakes of
    a slow node's other blobs until it ended (they wait out LOCKED_OUT_FOR on a full link).
    Other fetches about to end count: the fetchers beside them, starved or locked out of
    the link, speed up once they end, and with them left out the link looked free while it
    was full, and such fetchers were overtaken just before they would have had the link
    (benchmarks.md, issue 12, session 16)."""
    return sum(rate for t in transfers
               if t.source == TransferSource.UPSTREAM and not t.probing
               and (rate := t.intake.rate) > 0
               and not (t.overtook and _ends_within(t.blob.size, t.available, rate)))


def upstream_reads(transfers: Iterable[Transfer]) -> int:
    """How many blobs this node reads from the upstream now (probes left out): whether the
    link is shared, whatever their rates (a fetcher locked out of the link reads nothing)."""
    return sum(1 for t in transfers if t.source == TransferSource.UPSTREAM and not t.probing)


def blob_transfers(transfers: Transfers) -> list[BlobTransfer]:
    """Every running transfer as the cluster sees it, for the plan view."""
    return [BlobTransfer(t.blob.digest, t.label, t.blob.size, peer_view(t))
            for t in transfers.running.values()]

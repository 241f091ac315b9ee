"""Where a node's next bytes of a blob come from while the LAN has them: relayed from the node
the transfer plan picks (plan.py), complete chunks over BitTorrent from their holders, or a
few MiB from the upstream to measure it; returns when the upstream should take over. The
fetcher calls it through its PeerSource seam; with no LAN, NoPeers stands in for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref

from ..errors import PeerError
from ..peermsg import PeerTransfer
from ..store import BlobId, BlobWriter, Store
from ..transfer import RATE_SETTLES, Origin, RateMeter, Transfer, TransferSource
from ..upstreamfetch import UpstreamFetch
from .peers import BAN_SECONDS, Peer
from .plan import STALL_WINDOW, GoUpstream, Plan, Relay, own_upstream_rate, upstream_intake
from .relay import Relay as RelayApi
from .sharing import Holders, Sharing

log = logging.getLogger(__name__)

SETTLE = 0.3  # nodes that start a blob within this long of each other see each other first
RACED_BLOB = 8 * 1024 * 1024  # smaller blobs go at once: fetching one twice costs little
CHECK_EVERY = 1.0  # a rate measured over a shorter time says little
MIN_RELAY_RATE = 64 * 1024  # a source with bytes to send that gives less is dropped
REPLAN_EVERY = 1.5  # how long a relay runs before the plan is made again with fresh news
REPLAN_SLOW = 0.5  # the same from a slow source: the plan may soon move to a faster one
# the same from an upstream fetcher with no byte yet, by the node that probes the upstream as
# soon as it has some: with 0.5 s, the slow-first bench's probes began 0.7 s into the pull
REPLAN_FIRST = 0.25
PROBED_BLOB = 64 * 1024 * 1024  # smaller blobs are not worth reading twice in part
OUTPACED_EVERY = 0.5  # how often an upstream fetch looks for a peer ahead of it
TAIL_RELAYED = 64 * 1024 * 1024  # at most this much is relayed from a feeder that completed


class PeerFetch:
    def __init__(self, store: Store, sharing: Sharing, relay: RelayApi,
                 upstream: UpstreamFetch) -> None:
        self.store = store
        self.sharing = sharing
        self.relay = relay
        self.upstream = upstream
        # one plan per transfer, across its turns between the peers and the upstream
        self._plans: weakref.WeakKeyDictionary[Transfer, Plan] = weakref.WeakKeyDictionary()

    def _upstream_rate(self) -> float:
        """What the upstream gives this node: measured lately, or at least what this node
        reads from it now (a node reading the upstream well does not probe it)."""
        return own_upstream_rate(self.upstream.rate(), self.sharing.transfers.running.values())

    def _reads_upstream(self) -> bool:
        """Whether this node fetches some blob from the upstream: it learns what the upstream
        gives from that within a rate window, without a probe (one that has not had its
        first bytes yet has no rate to show)."""
        return any(t.source == TransferSource.UPSTREAM
                   for t in self.sharing.transfers.running.values())

    def _plan(self, transfer: Transfer) -> Plan:
        if (plan := self._plans.get(transfer)) is None:
            plan = self._plans[transfer] = Plan(self.sharing.peers.node_id, transfer.blob.digest,
                                                size=transfer.blob.size)
        return plan

    async def fill(self, transfer: Transfer, writer: BlobWriter, origin: Origin) -> None:
        """As much of the blob, in order from the writer's offset, as LAN peers have or are
        getting: relayed from other nodes transferring it (plan.py says which), over
        BitTorrent where peers hold its chunks. Returns when the upstream should take over."""
        blob = transfer.blob
        transfer.mark_source(writer.offset, TransferSource.PEER)
        plan = self._plan(transfer)
        held_failed_at = -1  # where getting complete chunks from their holders broke last
        looked_again = False  # before going to the upstream, the holders are asked twice
        fresh = False  # this round waits for every peer's answer (chunkmaps.py)
        while writer.offset < blob.size:
            held = await self.sharing.holders(blob, fresh=fresh)
            # a round in which no earlier answer stood in heard every peer now: the leader of
            # a warm job's blob went to the upstream after a second round that told it nothing
            asked_fresh, fresh = fresh or not held.stood_in, False
            if held.small:
                data = await self.sharing.small_blob(blob, held.small)
                if data is not None:
                    await _write(transfer, writer, memoryview(data)[writer.offset:])
                break
            decision = plan.decide(held.transfers, writer.offset, held.upstream_rates,
                                   self._upstream_rate())
            overtake = isinstance(decision, Relay) and self._overtakes(plan, held, decision.node,
                                                                       blob)
            log.debug("%s at byte %d: %s%s (peers: %s)", transfer.label, writer.offset, decision,
                      ", overtaking it" if overtake else "", held.transfers)
            chunks = (_holders(held.chunks, decision.node, its_own=False)
                      if overtake and isinstance(decision, Relay) else held.chunks)
            run = self._held_run(blob, writer.offset, chunks)
            relay = decision.node if isinstance(decision, Relay) and not overtake else ""
            if relay and not (run and writer.offset != held_failed_at
                              and plan.chunks_beat(relay, held.transfers, writer.offset,
                                                   self._held_bytes(blob, writer.offset, run),
                                                   held.upstream_rates, self._upstream_rate())):
                await self._relay_decided(transfer, writer, plan, held, relay, origin)
            elif run and (tail := self._feeder_that_completed(transfer, writer, plan,
                                                              chunks)) is not None:
                # the node this one relayed from completed the blob with the rest still to
                # come here: its stream brings it at the LAN's speed, a torrent per chunk took
                # about a second for the last 30 MB in the 4-node bench
                before = writer.offset
                await self._relay_from(transfer, writer, plan, held.transfers, tail, math.inf)
                if writer.offset == before:  # it sent nothing: its chunks go over BitTorrent
                    plan.drop(tail.node_id)
            elif run:
                # complete chunks somewhere beat the upstream, and a feeder that waits for its
                # own bytes or is slow: BitTorrent from their holders (if that breaks, the
                # feeder again)
                if not await self._chunks_held(transfer, writer, chunks, held):
                    if not relay:
                        break
                    held_failed_at = writer.offset
            elif isinstance(decision, GoUpstream) or (
                    decision is None and blob.size >= RACED_BLOB and self.sharing.peers.usable()):
                # nobody fetches it yet, or no peer knew of it: a node that started it at the
                # same instant may be first, or may not have asked for it yet when asked; look
                # once more, after SETTLE, before going to the upstream (unless this node leads
                # the nodes that may start it), each time on what every peer says now
                fresh = True
                if not asked_fresh:
                    continue
                if looked_again or plan.leads(origin.cohort, (
                        p.node_id for p in self.sharing.peers.usable())):
                    break
                looked_again = True
                await asyncio.sleep(max(0.0, SETTLE - (time.monotonic() - transfer.started)))
            else:
                if overtake and isinstance(decision, Relay):
                    if not await self._still_overtakes(plan, transfer, decision.node, held):
                        continue
                    plan.overtaken.add(decision.node)
                    transfer.overtook = True
                    log.info("%s: node %s gets it from the upstream at %.1f MB/s, the upstream "
                             "gives more; fetching the rest from there", transfer.label,
                             decision.node,
                             (plan.delivered(decision.node, held.transfers) or 0) / 1e6)
                break
        transfer.feeder = ""
        transfer.mark_source(writer.offset, TransferSource.UPSTREAM)

    async def outpaced(self, transfer: Transfer, writer: BlobWriter) -> None:
        """Returns when peers should feed this node the rest of the blob, which it reads from
        the upstream now: they hold every chunk still to come complete (this node froze or
        fell behind while they finished it: BitTorrent moves those at the LAN's speed, and
        the WAN does not carry them again), or another node reads the blob from the upstream
        ahead of this one and at least as fast (plan.hand_over_to: an overtaken slow
        fetcher, or the later of two nodes that went to the upstream at once). Looks once
        this node's rate has settled."""
        plan = self._plan(transfer)
        await asyncio.sleep(RATE_SETTLES)
        while True:
            held = await self.sharing.holders(transfer.blob)
            if self._held_to_the_end(transfer.blob, writer.offset, held.chunks):
                log.info("%s: peers hold the rest complete (from byte %d); getting it from "
                         "them, not from the upstream", transfer.label, writer.offset)
                return
            own = transfer.intake.settled_rate
            node = plan.hand_over_to(held.transfers, own, writer.offset, held.upstream_rates,
                                     self._upstream_rate(), transfer.intake.age)
            if node is not None:
                plan.handed_over = transfer.leaf = True
                ahead = held.transfers[node]
                log.info("%s: node %s reads it from the upstream too, at byte %d at %.1f MB/s "
                         "(this node: byte %d at %.1f MB/s); relaying the rest from it",
                         transfer.label, node, ahead.available, ahead.rate / 1e6, writer.offset,
                         own / 1e6)
                return
            await asyncio.sleep(OUTPACED_EVERY)

    def has_members(self) -> bool:
        return bool(self.sharing.peers.usable())

    async def upstream_shared(self, transfer: Transfer) -> bool:
        """Whether another node reads from the upstream now: its chunk map of the blob says
        it reads blobs from the upstream, or its last status lists one it reads from there."""
        held = await self.sharing.holders(transfer.blob, fresh=True)
        return (any(n > 0 for n in held.upstream_reads.values())
                or any(b.state.source == TransferSource.UPSTREAM
                       for p in self.sharing.peers.usable() for b in p.transfers))

    def blame(self, transfer: Transfer) -> None:
        """The blob failed its digest: the peers that sent parts of it are not trusted again
        for a while (the upstream alone cannot produce a wrong blob twice)."""
        for node_id in transfer.peers_used:
            self.sharing.peers.ban(node_id, BAN_SECONDS, f"{transfer.label} built with its "
                                   "bytes failed the blob digest")

    async def _still_overtakes(self, plan: Plan, transfer: Transfer, node: str,
                               held: Holders) -> bool:
        """Whether overtaking `node` still stands after a pause of this node's own and fresh
        chunk maps: two nodes that each took themselves for the first behind it (their news
        a round apart) do not both go to the upstream; the later one sees the earlier one
        fetching and relays from it. The first in order does not pause or look again while
        the fetcher's node alone reads the upstream (Plan.overtake_pause)."""
        pause = plan.overtake_pause(held.transfers, node, self._intakes(held))
        if pause == 0:
            return True
        await asyncio.sleep(pause)
        return self._overtakes(plan, await self.sharing.holders(transfer.blob), node,
                               transfer.blob)

    def _overtakes(self, plan: Plan, held: Holders, node: str, blob: BlobId) -> bool:
        """plan.overtakes with this round's news; what the cluster reads from the upstream
        now is this node's upstream fetches and what each peer said with its chunk map. Never
        for the last RACED_BLOB bytes of a blob: reading them twice costs more than waiting
        (a 3 MiB file beside a large one, judged after 1 s, was fetched twice)."""
        fetcher = held.transfers.get(node)
        if fetcher is None or blob.size - fetcher.available < RACED_BLOB:
            return False
        return plan.overtakes(held.transfers, node, held.upstream_rates, self._upstream_rate(),
                              self._intakes(held))

    def _intakes(self, held: Holders) -> dict[str, float]:
        """What each node of the cluster reads from the upstream now: what each peer said
        with its chunk map, and this node's upstream fetches."""
        own = upstream_intake(self.sharing.transfers.running.values())
        return {**held.upstream_intakes, self.sharing.peers.node_id: own}

    async def _relay_decided(self, transfer: Transfer, writer: BlobWriter, plan: Plan,
                             held: Holders, node: str, origin: Origin) -> None:
        """Relay from the node the plan chose for a while, or first measure the upstream
        when only that node knows what it gives."""
        peer = self.sharing.peers.peers.get(node)
        if peer is None:
            plan.drop(node)
        elif (plan.needs_probe(held.transfers, node, held.upstream_rates, self._upstream_rate())
                and not plan.probed and self.upstream.may_probe() and not self._reads_upstream()
                and transfer.blob.size >= PROBED_BLOB):
            plan.probed = True
            # the others relaying from `node` see this one behind it: only one of them probes
            transfer.feeder = node
            await self.upstream.probe(transfer, writer, origin)
        else:
            await self._relay_from(transfer, writer, plan, held.transfers, peer,
                                   self._relay_period(plan, held, node))

    def _relay_period(self, plan: Plan, held: Holders, node: str) -> float:
        """How long a relay runs before the plan is made again. A node that handed its
        upstream read over to a faster one is the slow one: what it receives is bound by its
        own link, not by its source, so it follows its source to the end of the blob (the
        stream goes on when the source completes the blob; a new request would find no
        transfer there and turn to BitTorrent, which stalled on a full slow link)."""
        if plan.handed_over:
            return math.inf
        slow = plan.slow(node, held.transfers, held.upstream_rates, self._upstream_rate())
        judging = plan.judging(node, held.transfers, self.upstream.probing)
        source = held.transfers.get(node)
        if (judging and source is not None and source.source == TransferSource.UPSTREAM
                and source.available == 0):
            return REPLAN_FIRST  # the probe waits for the fetcher's first bytes, not longer
        return REPLAN_SLOW if slow or judging else REPLAN_EVERY

    async def _chunks_held(self, transfer: Transfer, writer: BlobWriter,
                           chunks: dict[int, list[tuple[Peer, str]]], held: Holders) -> bool:
        """The complete chunks peers hold from the writer's offset on, over BitTorrent; False
        when there are none or the transfer broke."""
        run = self._held_run(transfer.blob, writer.offset, chunks)
        known = self.sharing.peers.peers
        co = [known[n] for n in held.transfers if n in known]
        return bool(run) and await self._stream_chunks(transfer, writer, run, chunks, co)

    async def _relay_from(self, transfer: Transfer, writer: BlobWriter, plan: Plan,
                          transfers: dict[str, PeerTransfer], peer: Peer,
                          period: float) -> None:
        """Bytes of the blob from `peer`'s copy as they land there, for `period` seconds at
        most (then the plan is made again with fresh news), or until the peer is silent for
        the stall window. The stream runs on across chunk ends: ending it at each (a new plan
        round and a new request every 8 MiB) held a node catching up on a fast source to a
        third of the LAN's speed."""
        before = writer.offset
        end = transfer.blob.size
        transfer.peers_used.add(peer.node_id)
        transfer.feeder = peer.node_id
        meter = RateMeter()
        stream = self.relay.stream(peer, transfer.blob, before, end)
        # a source that has bytes for this node and sends none is dropped after the stall
        # window; one that waits for its own bytes is only looked at again with fresh news
        source = transfers.get(peer.node_id)
        silence = (STALL_WINDOW if source is not None and source.available > before
                   else min(period, REPLAN_EVERY))
        quiet_since = time.monotonic()
        ends = period  # one more period for a relay about to bring the blob's last byte
        try:
            async with contextlib.aclosing(stream):
                while True:
                    if meter.age >= ends:
                        if ends > period or not nearly_done(transfer.blob.size - writer.offset,
                                                            meter):
                            break
                        ends += REPLAN_EVERY
                    # the wait for a piece ends with the period too: a source that sends a
                    # little now and then must not hold the next plan for the stall window
                    wait = min(silence - (time.monotonic() - quiet_since), ends - meter.age)
                    try:
                        piece = await asyncio.wait_for(anext(stream), max(wait, 0.0))
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        if time.monotonic() - quiet_since < silence:
                            break  # the period is over; the source was not silent that long
                        raise
                    quiet_since = time.monotonic()
                    meter.add(len(piece))
                    await _write(transfer, writer, piece)  # a view: used before the next read
        except TimeoutError:
            dropped = plan.stalled(peer.node_id, transfers, writer.offset)
            (log.warning if dropped else log.info)(
                "relaying %s from peer %s: no byte for %.1fs at byte %d; %s", transfer.label,
                peer.node_id, silence, writer.offset,
                "trying another source" if dropped else "looking again")
        except PeerError as e:
            plan.drop(peer.node_id)
            log.info("relaying %s from peer %s stopped at byte %d: %s", transfer.label,
                     peer.node_id, writer.offset, e)
        log.info("relayed %d bytes of %s from peer %s, bytes %d to %d, in %.1fs",
                 writer.offset - before, transfer.label, peer.node_id, before, writer.offset,
                 meter.age)
        if meter.age >= CHECK_EVERY:
            if source is not None and writer.offset >= source.available:
                # it sent all it had when the relay began: what came is the pace of its own
                # source, which its rate says already; a rate measured so once made a fast
                # upstream fetcher slow in the plan for the rest of the transfer
                plan.measured.pop(peer.node_id, None)
            else:
                plan.measured[peer.node_id] = meter.rate
            if (meter.rate < MIN_RELAY_RATE
                    and plan.stalled(peer.node_id, transfers, writer.offset)):
                log.warning("relaying %s from peer %s: %.0f B/s, a drip; trying another source",
                            transfer.label, peer.node_id, meter.rate)

    def _feeder_that_completed(self, transfer: Transfer, writer: BlobWriter, plan: Plan,
                               chunks: dict[int, list[tuple[Peer, str]]]) -> Peer | None:
        """The node this transfer relayed from last, when it holds the rest of the blob
        complete and that rest is at most TAIL_RELAYED bytes."""
        peer = self.sharing.peers.peers.get(transfer.feeder)
        if (peer is None or plan.dropped(peer.node_id)
                or transfer.blob.size - writer.offset > TAIL_RELAYED):
            return None
        its_own = _holders(chunks, peer.node_id, its_own=True)
        return peer if self._held_to_the_end(transfer.blob, writer.offset, its_own) else None

    def _held_to_the_end(self, blob: BlobId, offset: int,
                         chunks: dict[int, list[tuple[Peer, str]]]) -> bool:
        run = self._held_run(blob, offset, chunks)
        return bool(run) and run[-1] == len(self.store.chunks(blob)) - 1

    def _held_bytes(self, blob: BlobId, offset: int, run: list[int]) -> int:
        """How many bytes from `offset` on the held run of chunks brings."""
        return min((run[-1] + 1) * self.store.chunk_size, blob.size) - offset if run else 0

    def _held_run(self, blob: BlobId, offset: int,
                  chunks: dict[int, list[tuple[Peer, str]]]) -> list[int]:
        """The chunks from the one holding `offset` on that some peer holds, in a row."""
        run = []
        for chunk in self.store.chunks(blob):
            if chunk.offset + chunk.length <= offset:
                continue
            if chunk.idx not in chunks:
                break
            run.append(chunk.idx)
        return run

    async def _stream_chunks(self, transfer: Transfer, writer: BlobWriter, run: list[int],
                             chunks: dict[int, list[tuple[Peer, str]]],
                             co_downloaders: list[Peer]) -> bool:
        blob = transfer.blob
        pos = run[0] * self.store.chunk_size  # the blob offset of the bytes coming next
        before, started = writer.offset, time.monotonic()
        try:
            async for data in self.sharing.chunks_in_order(blob, run, chunks, co_downloaders):
                skip = max(0, writer.offset - pos)
                pos += len(data)
                await _write(transfer, writer, memoryview(data)[skip:])
        except PeerError as e:
            log.warning("getting %s from peers stopped at byte %d (%s); the upstream takes "
                        "over", transfer.label, writer.offset, e)
            return False
        finally:
            transfer.peers_used.update(chunks[i][0][0].node_id for i in run if chunks.get(i))
        log.info("took %d bytes of %s over BitTorrent (chunks %d to %d), bytes %d to %d, in "
                 "%.1fs", writer.offset - before, transfer.label, run[0], run[-1], before,
                 writer.offset, time.monotonic() - started)
        return True


def nearly_done(remaining: int, meter: RateMeter) -> bool:
    """Whether the rest of the blob comes within one more relay period at this relay's rate.
    A relay that ended then found its source complete and took the last bytes over BitTorrent
    (a torrent and a handshake per chunk: about 1 s for the last 12 MB in the 4-node bench)."""
    return remaining <= meter.rate * REPLAN_EVERY


async def _write(transfer: Transfer, writer: BlobWriter, data: memoryview) -> None:
    """Bytes from peers, in order."""
    if data:
        await writer.write(data)
        transfer.bytes_peers += len(data)
        transfer.advance(writer.offset)


def _holders(chunks: dict[int, list[tuple[Peer, str]]], node: str, *,
             its_own: bool) -> dict[int, list[tuple[Peer, str]]]:
    """Who holds which chunk: only `node` (its_own: the feeder that completed the blob), or
    all but `node` (an upstream fetcher being overtaken)."""
    left = {i: [(p, ih) for p, ih in holders if (p.node_id == node) == its_own]
            for i, holders in chunks.items()}
    return {i: holders for i, holders in left.items() if holders}

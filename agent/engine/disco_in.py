"""DISCO in: what the engine does with each Ping, Pong and CallMeMaybe it receives.

    DiscoReceiver.receive(packet, src, now, derp_src) -> PeerPath
        open the packet with our disco key (only for a sender disco key some peer has), find the
        peer it came from, emit DiscoAuthenticated, then act on the message:
    Ping         pong to the exact source; a UDP source becomes a candidate, pinged back at once
                 while we have no trusted path (static mode: the peer may not know we exist);
                 duplicate TxIDs per source are counted and ignored
    Pong         matched to our ping by TxID and destination: the candidate's latency (a pong
                 through DERP only ever times the DERP path); PongReceived
    CallMeMaybe  only through DERP: the peer's endpoints become candidates, each due one is
                 pinged (simultaneous open), and we answer with our own endpoints
    NatInfo      only through DERP: what the peer knows of its NAT, to `on_nat_info`
                 (engine/birthday.py); a pong to a birthday ping makes its destination a
                 LEARNED candidate (it was no candidate before)

Follows tailscale's wgengine/magicsock (magicsock.go handleDiscoMessage, endpoint.go
handlePingLocked / handlePongConnLocked / handleCallMeMaybe). `receive` raises only
RemoteProtocolError; the engine counts it and carries on.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Final

from agent.engine.candidates import Candidate, CandidateSource
from agent.engine.disco_out import MESSAGE_KIND, DiscoSender
from agent.engine.disco_tx import PingPurpose
from agent.engine.events import DiscoAuthenticated, EngineEvent, PongReceived
from agent.engine.paths import Endpoint, derp_endpoint, derp_region_of
from agent.engine.peerpath import PeerPath, usable_endpoint
from agent.engine.stats import EngineStats
from agent.engine.timings import MAX_CALL_ME_MAYBE_ENDPOINTS, Timings
from agent.keys import DiscoPrivate, DiscoPublic, NodePublic
from agent.proto import disco
from agent.proto.errors import MalformedPacket, UnknownPeer

__all__ = ["DiscoReceiver"]

_DEDUP_SOURCES: Final = 1024  # sources whose last ping TxID we remember (duplicate detection)


class DiscoReceiver:
    """Acts on received DISCO messages. Owned by the PathEngine that creates it, whose peer
    tables, event queue, stats and timings it shares."""

    def __init__(
        self,
        disco_private: DiscoPrivate,
        *,
        peers: Mapping[NodePublic, PeerPath],
        by_disco: Mapping[DiscoPublic, list[NodePublic]],
        out: DiscoSender,
        events: deque[EngineEvent],
        stats: EngineStats,
        timings: Timings,
        on_nat_info: Callable[[PeerPath, disco.NatInfo, float], None],
    ) -> None:
        self._disco_private = disco_private  # static after construction
        self._on_nat_info = on_nat_info
        self._peers = peers
        self._by_disco = by_disco
        self._out = out
        self._events = events
        self._stats = stats
        self._timings = timings
        self._last_ping_rx: OrderedDict[Endpoint, bytes] = OrderedDict()

    def receive(
        self, packet: bytes, src: Endpoint, now: float, derp_src: NodePublic | None
    ) -> PeerPath:
        """Act on one DISCO packet; the peer it came from. RemoteProtocolError when the packet
        is malformed, does not open, or comes from no peer (or the wrong one)."""
        sender = DiscoPublic(disco.sender_key(packet))  # MalformedPacket if not DISCO
        keys = self._by_disco.get(sender)
        if not keys:
            raise UnknownPeer("disco key of no peer")  # not even worth opening (§8.2)
        _, message = disco.open_packet(self._disco_private.raw, packet)
        kind = MESSAGE_KIND[type(message)]
        self._stats.received[kind] += 1
        peer = self._sender_peer(keys, message, derp_src)
        self._events.append(DiscoAuthenticated(peer.key, kind, src))
        region = derp_region_of(src)
        match message:
            case disco.Ping():
                self._on_ping(peer, message, src, region, now)
            case disco.Pong():
                self._on_pong(peer, message, src, now)
            case disco.CallMeMaybe():
                if region is None:
                    raise MalformedPacket("CallMeMaybe is valid only through DERP")
                self._on_call_me_maybe(peer, message, region, now)
            case disco.NatInfo():
                if region is None:
                    raise MalformedPacket("NatInfo is valid only through DERP")
                peer.derp_rx_region = region
                self._on_nat_info(peer, message, now)
        return peer

    def _sender_peer(
        self, keys: list[NodePublic], message: disco.Message, derp_src: NodePublic | None
    ) -> PeerPath:
        if derp_src is not None:
            if derp_src not in keys:
                raise UnknownPeer("DERP source is not the peer of this disco key")
            return self._peers[derp_src]
        if len(keys) == 1:
            return self._peers[keys[0]]
        if isinstance(message, disco.Ping) and message.node_key is not None:
            claimed = NodePublic(message.node_key)
            if claimed in keys:
                return self._peers[claimed]
        raise UnknownPeer("disco key shared by several peers")

    def _on_ping(
        self, peer: PeerPath, ping: disco.Ping, src: Endpoint, region: int | None, now: float
    ) -> None:
        if region is not None:
            peer.derp_rx_region = region
            self._out.send(peer, disco.Pong(ping.tx_id, derp_endpoint(region)), src)
            return
        if self._last_ping_rx.get(src) == ping.tx_id:
            self._stats.duplicate_pings += 1
            return
        self._last_ping_rx[src] = ping.tx_id
        self._last_ping_rx.move_to_end(src)
        if len(self._last_ping_rx) > _DEDUP_SOURCES:
            self._last_ping_rx.popitem(last=False)
        cand = peer.add_candidate(src, CandidateSource.LEARNED, now)
        self._out.send(peer, disco.Pong(ping.tx_id, src), src)
        if cand is not None and self._wants_ping_back(peer, cand, now):
            self._out.ping(peer, src, now, PingPurpose.DISCOVERY)

    def _wants_ping_back(self, peer: PeerPath, cand: Candidate, now: float) -> bool:
        """Ping the source of an unsolicited UDP ping back when we have no trusted path and
        either talk to the peer or never had a pong from that source (one ping back for an
        idle peer, not one per heartbeat it sends us); at most once per PING_BACK_INTERVAL."""
        if peer.trusted(now):
            return False
        if not peer.schedule.active(now, self._timings) and cand.latest_latency is not None:
            return False
        return cand.last_ping is None or now - cand.last_ping >= self._timings.ping_back_interval

    def _on_pong(self, peer: PeerPath, pong: disco.Pong, src: Endpoint, now: float) -> None:
        sent = self._out.tx.match(pong.tx_id, src, peer.key)
        if sent is None:
            self._stats.unmatched_pongs += 1
            return
        latency = max(0.0, now - sent.sent_at)
        arrived_via_derp = derp_region_of(src) is not None
        if sent.purpose is PingPurpose.BIRTHDAY and not arrived_via_derp:
            if sent.dest not in peer.candidates:  # a guessed port (easy side) answered
                self._stats.birthday_hits += 1
            peer.add_candidate(sent.dest, CandidateSource.LEARNED, now)
        if sent.via_derp:
            if arrived_via_derp:
                peer.derp_latency = latency
        elif not arrived_via_derp:  # a DERP pong never changes the direct path (§8.6)
            peer.on_pong(sent.dest, latency, pong.src, now, self._timings)
        self._events.append(PongReceived(peer.key, sent.tx_id, pong.src, latency, sent.dest))

    def _on_call_me_maybe(
        self, peer: PeerPath, cmm: disco.CallMeMaybe, region: int, now: float
    ) -> None:
        peer.derp_rx_region = region
        endpoints = [
            ep for ep in cmm.endpoints[:MAX_CALL_ME_MAYBE_ENDPOINTS] if usable_endpoint(ep)
        ]
        peer.set_call_me_maybe(endpoints, now)
        for ep in peer.due_pings(now, self._timings):
            self._out.ping(peer, ep, now, PingPurpose.DISCOVERY)
        # Answer with our endpoints so the peer punches towards us too. Inside the pacing
        # interval as well while we have no trusted path (our last CallMeMaybe may have gone
        # out before the peer joined the relay), but at most once per answer interval.
        sched = peer.schedule
        if sched.may_call_me_maybe(now, self._timings):
            self._out.call_me_maybe(peer, now)
        elif not peer.trusted(now) and sched.may_answer_call_me_maybe(now, self._timings):
            self._out.call_me_maybe(peer, now, force=True)
            sched.note_call_me_maybe_answer(now)

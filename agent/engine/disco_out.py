"""DISCO out: sealing and queueing the engine's Ping, Pong and CallMeMaybe messages.

    DiscoSender.send(peer, message, dest)     seal for the peer's disco key, queue an Outgoing
    DiscoSender.ping(peer, dest, now, ...)    a Ping under a fresh (or given) TxID, remembered in
                                              the transaction table until its pong or timeout
    DiscoSender.discover(peer, now, ...)      a discovery round: every candidate due a ping,
                                              then a CallMeMaybe when one went out
    DiscoSender.call_me_maybe(peer, now)      our endpoints to the peer through its DERP region,
                                              paced per peer (tailscaled endpoint.go
                                              sendDiscoPingsLocked / callMeMaybe), followed by
                                              our NatInfo when `nat_info` gives one
    DiscoSender.probe(peer, dest, now, via)   a birthday round's ping (engine/birthday.py): from
                                              socket `via`, no candidate's ping time touched
    DiscoSender.drain()                       the queued datagrams, for the daemon to send

Owned by the PathEngine that creates it; it shares the engine's stats and timings.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.engine.disco_tx import PingPurpose, SentPing, TxTable
from agent.engine.events import Outgoing
from agent.engine.paths import Endpoint, derp_endpoint, derp_region_of
from agent.engine.peerpath import PeerPath
from agent.engine.stats import EngineStats
from agent.engine.timings import Timings
from agent.keys import DiscoPrivate, NodePublic
from agent.proto import disco
from agent.proto.errors import DropReason, LocalProtocolError

__all__ = ["MESSAGE_KIND", "DiscoSender"]

MESSAGE_KIND: dict[type[disco.Message], str] = {
    disco.Ping: "ping",
    disco.Pong: "pong",
    disco.CallMeMaybe: "call_me_maybe",
    disco.NatInfo: "nat_info",
}


class DiscoSender:
    """Seals the engine's DISCO messages and keeps the pings that wait for a pong."""

    def __init__(
        self,
        disco_private: DiscoPrivate,
        node_key: NodePublic,
        *,
        stats: EngineStats,
        timings: Timings,
        home_region: Callable[[], int | None],
        randbytes: Callable[[int], bytes],
    ) -> None:
        self._disco_private = disco_private  # static after construction
        self._node_key = node_key  # static: sent in every Ping
        self._stats = stats
        self._timings = timings
        self._home_region = home_region
        self._randbytes = randbytes
        self.tx = TxTable()  # pings awaiting a pong; the engine reads its deadlines
        self.local: tuple[Endpoint, ...] = ()  # our endpoints, advertised in CallMeMaybe
        # What follows each CallMeMaybe to a peer (the engine sets it to its Birthday's).
        self.nat_info: Callable[[PeerPath, float], disco.NatInfo | None] = lambda p, now: None
        self._out: list[Outgoing] = []

    def new_tx_id(self) -> bytes:
        return self._randbytes(disco.TX_ID_LEN)

    def drain(self) -> list[Outgoing]:
        """The DISCO datagrams queued since the last call."""
        out, self._out = self._out, []
        return out

    def send(self, peer: PeerPath, message: disco.Message, dest: Endpoint, via: int = 0) -> None:
        nonce = self._randbytes(disco.NONCE_LEN)
        try:
            packet = disco.seal(self._disco_private.raw, peer.disco.raw, message, nonce)
        except LocalProtocolError:  # a low-order peer disco key: unusable, count it
            self._stats.drops[DropReason.SEND_FAILED] += 1
            return
        self._stats.sent[MESSAGE_KIND[type(message)]] += 1
        self._out.append(Outgoing(packet, dest, peer.key, via))

    def ping(
        self,
        peer: PeerPath,
        dest: Endpoint,
        now: float,
        purpose: PingPurpose,
        tx_id: bytes | None = None,
    ) -> None:
        t = self._timings
        tx_id = tx_id if tx_id is not None else self.new_tx_id()
        late_at = None
        if purpose is PingPurpose.HEARTBEAT and peer.trusted(now) and peer.best is not None:
            late_at = now + t.heartbeat_late_after(peer.best.latency)
        self.tx.add(SentPing(tx_id, peer.key, dest, now, purpose, now + t.ping_timeout, late_at))
        if derp_region_of(dest) is None:
            peer.note_ping(dest, now)
        self.send(peer, disco.Ping(tx_id, node_key=self._node_key.raw), dest)

    def probe(self, peer: PeerPath, dest: Endpoint, now: float, via: int) -> None:
        """A birthday round's ping to `dest` from socket `via` (0: the WireGuard socket)."""
        tx_id = self.new_tx_id()
        t = self._timings
        self.tx.add(
            SentPing(tx_id, peer.key, dest, now, PingPurpose.BIRTHDAY, now + t.ping_timeout)
        )
        self.send(peer, disco.Ping(tx_id, node_key=self._node_key.raw), dest, via)

    def discover(self, peer: PeerPath, now: float, *, call_me_maybe: bool) -> None:
        """A discovery round: ping each candidate not pinged for DISCO_PING_INTERVAL; then a
        CallMeMaybe if a ping went out, or if the peer has no candidate at all (static mode:
        it must learn ours to punch)."""
        due = peer.due_pings(now, self._timings)
        for ep in due:
            self.ping(peer, ep, now, PingPurpose.DISCOVERY)
        peer.schedule.note_full_ping(now)
        if call_me_maybe and (due or not peer.candidates):
            self.call_me_maybe(peer, now)

    def call_me_maybe(self, peer: PeerPath, now: float, *, force: bool = False) -> None:
        """Our endpoints to the peer through its DERP region; paced unless `force`."""
        region = peer.region(self._home_region())
        if region is None:
            return
        if not force and not peer.schedule.may_call_me_maybe(now, self._timings):
            return
        self.send(peer, disco.CallMeMaybe(self.local), derp_endpoint(region))
        peer.schedule.note_call_me_maybe(now)
        info = self.nat_info(peer, now)
        if info is not None:
            self.send(peer, info, derp_endpoint(region))

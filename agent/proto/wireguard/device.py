"""The WireGuard device core: our identity, the peers, cryptokey routing and datagram demux.

    receive_batch(datagrams, src, now)   UDP in  -> plaintext IP packets for the TUN + replies
    route(dst) -> Peer                   TUN out -> the peer owning the destination (then
                                         `peer.encrypt(packets, now)`)
    on_timer(now) / next_deadline()      WireGuard's timers for every peer
    events()                             HandshakeCompleted, EndpointChanged, ...

Demux by the first byte of the datagram (wireguard-go receive.go):
    1 initiation  mac1 -> (under load: mac2 or cookie reply; per-source rate limit) -> decrypt
                  static -> peer -> timestamp/flood checks -> response
    2 response    mac1 -> (under load: mac2) -> receiver index -> pending handshake -> keys
    3 cookie      receiver index -> pending handshake -> store cookie for mac2
    4 transport   receiver index -> keypair -> AEAD -> replay window -> trim padding ->
                  allowed-IPs source check -> packet
Every bad datagram is dropped and counted in `drops` by DropReason; nothing is raised. Datagrams
that do not start with a WireGuard type word (1-4, then three zero bytes) are returned in
`RxBatch.foreign` instead: DISCO and STUN share the socket, and the caller tells them apart.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from agent.keys import NodePrivate, NodePublic, PresharedKey
from agent.proto.errors import DropReason, RemoteProtocolError
from agent.proto.wireguard.allowedips import AllowedIPs, Network
from agent.proto.wireguard.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
    UNDER_LOAD_HANDSHAKES_PER_SECOND,
)
from agent.proto.wireguard.context import DeviceContext, IndexTable
from agent.proto.wireguard.cookie import CookieChecker
from agent.proto.wireguard.events import Endpoint, Event
from agent.proto.wireguard.handshake import Handshake, LocalIdentity, consume_initiation
from agent.proto.wireguard.messages import TRANSPORT_HEADER, CookieReply
from agent.proto.wireguard.peer import Peer
from agent.proto.wireguard.ratelimit import LoadMonitor, RateLimiter, source_bytes
from agent.proto.wireguard.session import Keypair
from agent.proto.wireguard.transport import PYTHON, Transport

__all__ = ["Device", "RxBatch"]

Buffer = bytes | bytearray | memoryview
_TYPE_WORDS = {
    MSG_INITIATION: INITIATION_SIZE,
    MSG_RESPONSE: RESPONSE_SIZE,
    MSG_COOKIE_REPLY: COOKIE_REPLY_SIZE,
}
_ROUTE_CACHE_MAX = 4096


@dataclass(slots=True)
class RxBatch:
    """What one received batch produced."""

    packets: list[Buffer] = field(default_factory=list)  # plaintext IP packets for the TUN
    replies: list[tuple[bytes, Endpoint]] = field(default_factory=list)
    # peers that authenticated at least one message of the batch (path choice learns from it)
    peers: list[Peer] = field(default_factory=list)
    # datagrams whose first 4 bytes are no WireGuard message type (DISCO, STUN share the
    # socket): not counted here, for the caller to demultiplex further
    foreign: list[Buffer] = field(default_factory=list)


def _source(pkt: bytes) -> bytes:
    """The source address of an IP packet `open_run` accepted (version and length checked)."""
    return pkt[12:16] if pkt[0] >> 4 == 4 else pkt[8:24]


class Device:
    """A WireGuard interface's protocol state. One owner calls it; never thread-safe."""

    def __init__(
        self,
        private_key: NodePrivate,
        *,
        wall_offset: float = 0.0,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        under_load_threshold: int = UNDER_LOAD_HANDSHAKES_PER_SECOND,
        transport: Transport = PYTHON,
    ) -> None:
        local = LocalIdentity.from_private(private_key)
        self._ctx: DeviceContext[Peer] = DeviceContext(
            local=local,
            indexes=IndexTable(randbytes),
            wall_offset=wall_offset,
            randbytes=randbytes,
            transport=transport,
        )
        self._cookie_checker = CookieChecker(local.public, randbytes=randbytes)
        self._rate = RateLimiter()
        self._load = LoadMonitor(under_load_threshold)
        self.peers: dict[NodePublic, Peer] = {}
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        self._route_cache: dict[bytes, Peer | None] = {}

    # -- configuration -----------------------------------------------------------------------
    @property
    def public_key(self) -> NodePublic:
        return self._ctx.local.public

    @property
    def private_key(self) -> NodePrivate:
        return self._ctx.local.private

    @property
    def drops(self) -> dict[DropReason, int]:
        return self._ctx.drops

    def count_drop(self, reason: DropReason, n: int = 1) -> None:
        """Drops counted outside the device (a data-plane lane opened the messages)."""
        self._ctx.drop(reason, n)

    @property
    def route_cache(self) -> dict[bytes, Peer | None]:
        """Address (4 or 16 raw bytes) -> the peer `route` found; cleared whenever allowed
        IPs change. The data plane's lanes look destinations and sources up here."""
        return self._route_cache

    def add_peer(
        self,
        public_key: NodePublic,
        *,
        preshared_key: PresharedKey | None = None,
        endpoint: Endpoint | None = None,
        allowed_ips: Iterable[Network] = (),
        persistent_keepalive: int | None = None,
    ) -> Peer:
        """Add a peer (or return the existing one with that key, unchanged)."""
        existing = self.peers.get(public_key)
        if existing is not None:
            return existing
        peer = Peer(
            self._ctx,
            public_key,
            preshared_key=preshared_key,
            endpoint=endpoint,
            persistent_keepalive=persistent_keepalive,
        )
        self.peers[public_key] = peer
        self.set_allowed_ips(peer, allowed_ips)
        return peer

    def remove_peer(self, public_key: NodePublic) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is not None:
            self.allowed_ips.remove_value(peer)
            peer.zero_keys()
            peer.timers.stop_all()
            self._route_cache.clear()

    def set_allowed_ips(
        self, peer: Peer, networks: Iterable[Network], *, replace: bool = True
    ) -> None:
        if replace:
            self.allowed_ips.remove_value(peer)
        for net in networks:
            self.allowed_ips.insert(net, peer)
        self._route_cache.clear()

    def events(self) -> list[Event]:
        ev = self._ctx.events
        out = list(ev)
        ev.clear()
        return out

    # -- outbound ----------------------------------------------------------------------------
    def route(self, dst: bytes) -> Peer | None:
        """The peer whose allowed IPs hold `dst` (4 or 16 raw bytes), cached."""
        cache = self._route_cache
        try:
            return cache[dst]
        except KeyError:
            pass
        peer = self.allowed_ips.lookup(dst)
        if len(cache) >= _ROUTE_CACHE_MAX:
            cache.clear()
        cache[dst] = peer
        return peer

    # -- inbound -----------------------------------------------------------------------------
    def receive(self, datagram: Buffer, src: Endpoint, now: float) -> RxBatch:
        return self.receive_batch((datagram,), src, now)

    @property
    def transport(self) -> Transport:
        return self._ctx.transport

    def receive_batch(self, datagrams: Sequence[Buffer], src: Endpoint, now: float) -> RxBatch:
        """Process datagrams that all came from `src`. Never raises for bad input.

        Consecutive transport messages for one receiver index are opened as one run
        (`Keypair.open_run`: the compiled module or its Python twin); the rest one by one."""
        result = RxBatch()
        packets = result.packets
        keypairs = self._ctx.indexes.keypairs
        drop = self._ctx.drop
        unpack = TRANSPORT_HEADER.unpack_from
        # The keypair whose authenticated messages are being accumulated, and their bytes.
        cur_kp: Keypair | None = None
        cur_peer: Peer | None = None
        cur_bytes = 0
        cur_data = False
        i = 0
        n = len(datagrams)
        while i < n:
            d = datagrams[i]
            if len(d) < TRANSPORT_MIN_SIZE or d[0] != MSG_TRANSPORT:
                i += 1
                try:
                    result.replies.extend(self._receive_handshake(d, src, now, result))
                except RemoteProtocolError as e:
                    drop(e.reason)
                continue
            word, index, _counter = unpack(d)
            if word != MSG_TRANSPORT:
                result.foreign.append(d)
                i += 1
                continue
            entry = keypairs.get(index)
            if entry is None:
                drop(DropReason.UNKNOWN_RECEIVER)
                i += 1
                continue
            kp, peer = entry
            if not kp.can_receive(now):
                drop(DropReason.EXPIRED_SESSION)
                i += 1
                continue
            run = kp.open_run(datagrams, i)
            i = run.next
            if run.authentication:
                drop(DropReason.AUTHENTICATION, run.authentication)
            if run.replay:
                drop(DropReason.REPLAY, run.replay)
            if run.not_ip:
                drop(DropReason.NOT_IP, run.not_ip)
            if run.malformed:
                drop(DropReason.MALFORMED, run.malformed)
            if not run.wire_bytes:
                continue
            if kp is not cur_kp:
                if cur_peer is not None and cur_kp is not None:
                    self._finish_transport(result, cur_peer, cur_kp, src, now, cur_bytes, cur_data)
                cur_kp, cur_peer, cur_bytes, cur_data = kp, peer, 0, False
            cur_bytes += run.wire_bytes
            cur_data = cur_data or run.data
            if run.packets:
                packets.extend(self._allowed_sources(run.packets, run.sources, peer))
        if cur_peer is not None and cur_kp is not None:
            self._finish_transport(result, cur_peer, cur_kp, src, now, cur_bytes, cur_data)
        return result

    def _allowed_sources(self, pkts: list[bytes], sources: list[bytes], peer: Peer) -> list[bytes]:
        """Cryptokey routing, inbound: a packet's source must be one of the sender's allowed
        IPs (the longest prefix holding it belongs to `peer`). Checked once per distinct source."""
        route = self.route
        bad = [s for s in sources if route(s) is not peer]
        if not bad:
            return pkts
        kept = [p for p in pkts if _source(p) not in bad]
        self._ctx.drop(DropReason.DISALLOWED_SOURCE, len(pkts) - len(kept))
        return kept

    def _finish_transport(
        self,
        result: RxBatch,
        peer: Peer,
        kp: Keypair,
        src: Endpoint,
        now: float,
        nbytes: int,
        data: bool,
    ) -> None:
        out = peer.on_transport(kp, src, now, nbytes=nbytes, data=data)
        if out:
            result.replies.extend([(d, src) for d in out])
        if peer not in result.peers:
            result.peers.append(peer)

    def _receive_handshake(
        self, d: Buffer, src: Endpoint, now: float, result: RxBatch
    ) -> list[tuple[bytes, Endpoint]]:
        n = len(d)
        kind = d[0] if n else 0
        if n < 4 or not MSG_INITIATION <= kind <= MSG_TRANSPORT or bytes(d[1:4]) != b"\0\0\0":
            result.foreign.append(d)
            return []
        if kind not in _TYPE_WORDS or n != _TYPE_WORDS[kind]:
            self._ctx.drop(DropReason.MALFORMED)
            return []
        indexes = self._ctx.indexes
        if kind == MSG_COOKIE_REPLY:
            reply = CookieReply.parse(d)
            peer = indexes.handshakes.get(reply.receiver)
            if peer is None:
                self._ctx.drop(DropReason.UNKNOWN_RECEIVER)
                return []
            peer.cookies.consume_reply(reply, now)
            return []
        checker = self._cookie_checker
        if not checker.check_mac1(d):
            self._ctx.drop(DropReason.AUTHENTICATION)
            return []
        if self._load.under_load(now):
            source = source_bytes(src)
            if not checker.check_mac2(d, source, now):
                self._ctx.drop(DropReason.COOKIE_REQUIRED)
                return [(checker.create_reply(d, source, now), src)]
            if not self._rate.allow(source[:-2], now):
                self._ctx.drop(DropReason.RATE_LIMITED)
                return []
        if kind == MSG_INITIATION:
            peers = self.peers

            def find(key: NodePublic) -> Handshake | None:
                p = peers.get(key)
                return p.handshake if p is not None else None

            consumed = consume_initiation(self._ctx.local, d, find_peer=find)
            peer = peers[consumed.remote_static]
            response = peer.on_initiation(consumed, src, now)
            if response is None:
                return []  # we keep our own initiation (counted by the peer)
            result.peers.append(peer)
            return [(response, src)]
        # MSG_RESPONSE: receiver index is bytes 8..12
        receiver = int.from_bytes(d[8:12], "little")
        peer = indexes.handshakes.get(receiver)
        if peer is None:
            self._ctx.drop(DropReason.UNKNOWN_RECEIVER)
            return []
        out = peer.on_response(d, src, now)
        result.peers.append(peer)
        return [(x, src) for x in out]

    # -- timers ------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """The earliest timer of any peer (a heap: no scan over the peers)."""
        return self._ctx.deadlines.next()

    def on_timer(self, now: float) -> list[tuple[bytes, Endpoint]]:
        """Run every peer's expired timers; datagrams to send (peers without endpoint skipped)."""
        out: list[tuple[bytes, Endpoint]] = []
        for peer, datagrams in self.on_timer_by_peer(now):
            if peer.endpoint is None:
                self._ctx.drop(DropReason.NO_ENDPOINT, len(datagrams))
            else:
                out.extend((x, peer.endpoint) for x in datagrams)
        return out

    def on_timer_by_peer(self, now: float) -> list[tuple[Peer, list[bytes]]]:
        """Run every peer's expired timers; the datagrams each peer wants sent (the caller
        chooses the path: direct UDP, a DERP region, or both)."""
        out: list[tuple[Peer, list[bytes]]] = []
        deadlines = self._ctx.deadlines
        for peer in deadlines.due(now):  # a removed peer's timers were stopped: never due
            datagrams = peer.on_timer(now)
            deadlines.set(peer, peer.next_deadline())  # due() took it off the heap
            if datagrams:
                out.append((peer, datagrams))
        return out

"""PathEngine: NAT traversal for every peer, sans-I/O (tailscaled's magicsock path logic).

Follows tailscale's wgengine/magicsock (endpoint.go: DISCO semantics and timings; magicsock.go:
which packets are DISCO). A facade over small parts, each in its own module:

    peerpath.PeerPath      per peer: candidates, best path, trust window, DERP route
    candidates             per candidate: sources, last ping, pong history; better_path()
    disco_in.DiscoReceiver what each received Ping, Pong and CallMeMaybe does
    disco_out.DiscoSender  sealing our messages; pings, discovery rounds, CallMeMaybe pacing
    disco_tx.TxTable       pings awaiting a pong: TxID -> peer, destination, time, purpose
    birthday.Birthday      easy NAT against hard NAT: extra sockets, guessed ports, and which
                           endpoint is sent to from which extra socket (`socket_for`)
    schedule               per peer activity/heartbeat/CallMeMaybe pacing; the deadline heap
    paths.PathTable        plain WireGuard peers (no disco key): unchanged policy
    timings.Timings        every interval, named as in §8.7

Flow between two nodes A and B that both run an engine (B's side is symmetrical):

    A on_send(B)           no trusted direct path: ping every candidate of B not pinged for
                           5 s (UDP), and send CallMeMaybe(A's endpoints) to B through DERP
    B receive CallMeMaybe  ping all of A's endpoints at once (simultaneous open: B's NAT now
                           lets A in), and answer with its own CallMeMaybe (static mode has no
                           coordinator to tell A B's endpoints)
    A receive CallMeMaybe  ping all of B's endpoints: these get through B's NAT
    B receive Ping (UDP)   pong to the exact source; learn the source as a candidate; no
                           trusted path yet, so ping the source back at once
    either receive Pong    latency of that candidate; best path with hysteresis
                           (better_path); trusted for 6.5 s: targets() = UDP only
    while active           heartbeat ping to the best path every 3 s renews the trust; a
                           heartbeat without pong for 0.5 s ends the trust (DERP is used
                           again); pings time out at 5 s
    sending, no answer     data sent over the trusted path and nothing back over it for
                           0.5 s: a heartbeat ping at once, so a path that dies under traffic
                           falls back to DERP in about 1 s, not up to 3.5 s
    relayed, no answer     the peer's data comes through DERP while our trusted direct path
                           has been silent for 0.5 s: the peer gave up on it, so trust ends at
                           once (a side that only answers falls back with the sending side)
    while relayed+active   every heartbeat runs a discovery round (each candidate at most once
                           per 5 s, plus a CallMeMaybe): the path upgrades by itself when the
                           network lets it, about 6 s after it does
    idle 45 s              heartbeats stop; the next on_send starts over

Inputs: `add_peer`/`remove_peer`/`set_endpoint`/`set_netmap_endpoints` (configuration),
`on_send` (we are about to send to a peer: activity), `on_receive` (an authenticated WireGuard
packet arrived), `receive_disco` (a DISCO packet arrived over UDP or DERP, or on an extra
socket: `via`), `set_local_endpoints`, `set_nat` (netcheck's MappingVariesByDestIP), `ping`,
`on_timer`. Outputs: `targets`/`status` (per peer, now), `outgoing()` (DISCO datagrams to
send, `via` the socket), `events()` (PathChanged, PongReceived, DiscoAuthenticated: the
daemon answers the last with `handshake_wake`), `socket_for(endpoint)` and `extra_sockets()`
(birthday rounds, engine/birthday.py), `next_deadline()`. Hostile input to `receive_disco` is
counted in `stats.drops` and never raises.

Disco keys in static-config mode: see `discokeys`.

Differences from tailscaled, all for the static mode or the issue's 5 s fallback bound: the
CallMeMaybe answer, the ping back on an unsolicited UDP ping, the late-heartbeat trust cut, a
CallMeMaybe rate limit of one per 5 s per peer; no path-MTU probing, no peer relays.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from agent.engine.birthday import DEFAULT_BIRTHDAY, Birthday, BirthdayLimits
from agent.engine.candidates import CandidateSource
from agent.engine.disco_in import DiscoReceiver
from agent.engine.disco_out import DiscoSender
from agent.engine.disco_tx import PingPurpose
from agent.engine.events import EngineEvent, Outgoing, PathChanged, PeerPathStatus
from agent.engine.paths import (
    Endpoint,
    PathTable,
    Targets,
    derp_endpoint,
    derp_region_of,
)
from agent.engine.peerpath import PeerPath, path_summary, usable_endpoint
from agent.engine.schedule import Deadlines
from agent.engine.stats import EngineStats
from agent.engine.timings import DEFAULT_TIMINGS, MAX_CALL_ME_MAYBE_ENDPOINTS, Timings
from agent.keys import DiscoPrivate, DiscoPublic, NodePublic
from agent.proto.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["PathEngine"]


class PathEngine:
    """Per-peer path choice with DISCO hole punching; a drop-in superset of `PathTable`.

    Single owner (the daemon's event loop); every field below is owned by it.
    """

    def __init__(
        self,
        disco_private: DiscoPrivate,
        node_key: NodePublic,
        home_region: int | None = None,
        *,
        timings: Timings = DEFAULT_TIMINGS,
        birthday: BirthdayLimits = DEFAULT_BIRTHDAY,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.timings = timings
        self.stats = EngineStats()
        self._plain = PathTable(home_region)
        self._peers: dict[NodePublic, PeerPath] = {}
        self._by_disco: dict[DiscoPublic, list[NodePublic]] = {}
        self._deadlines: Deadlines[NodePublic] = Deadlines()
        self._last_now = 0.0  # the latest time any input carried
        self._events: deque[EngineEvent] = deque()
        self._out = DiscoSender(
            disco_private,
            node_key,
            stats=self.stats,
            timings=timings,
            home_region=lambda: self._plain.home_region,
            randbytes=randbytes,
        )
        self._birthday = Birthday(
            birthday,
            peers=self._peers,
            out=self._out,
            stats=self.stats,
            timings=timings,
            home_region=lambda: self._plain.home_region,
            randbytes=randbytes,
        )
        self._out.nat_info = self._birthday.nat_info
        self._rx = DiscoReceiver(
            disco_private,
            peers=self._peers,
            by_disco=self._by_disco,
            out=self._out,
            events=self._events,
            stats=self.stats,
            timings=timings,
            on_nat_info=self._birthday.on_nat_info,
        )

    # -- configuration (PathTable's API) ---------------------------------------------------------
    @property
    def home_region(self) -> int | None:
        return self._plain.home_region

    @home_region.setter
    def home_region(self, region: int | None) -> None:
        self._plain.home_region = region

    def add_peer(
        self,
        key: NodePublic,
        *,
        endpoint: Endpoint | None = None,
        derp_region: int | None = None,
        disco_key: DiscoPublic | None = None,
    ) -> None:
        """Add (or replace) a peer. Without `disco_key` it is a plain WireGuard peer: its
        configured endpoint and DERP route follow PathTable's policy, and no DISCO is sent."""
        self.remove_peer(key)
        if disco_key is None:
            self._plain.add_peer(key, endpoint=endpoint, derp_region=derp_region)
            return
        if endpoint is not None and derp_region_of(endpoint) is not None:
            endpoint = None
        peer = PeerPath(key, disco_key, configured_endpoint=endpoint, configured_region=derp_region)
        self._peers[key] = peer
        self._by_disco.setdefault(disco_key, []).append(key)
        peer.reported = path_summary(peer.status(0.0, self.home_region))

    def has_peer(self, key: NodePublic) -> bool:
        return key in self._peers or self._plain.has_peer(key)

    def has_disco(self, key: NodePublic) -> bool:
        """Whether the peer speaks DISCO (was added with a disco key)."""
        return key in self._peers

    def remove_peer(self, key: NodePublic) -> None:
        self._plain.remove_peer(key)
        peer = self._peers.pop(key, None)
        if peer is None:
            return
        keys = self._by_disco.get(peer.disco, [])
        if key in keys:
            keys.remove(key)
        if not keys:
            self._by_disco.pop(peer.disco, None)
        self._deadlines.set(key, None)
        self._out.tx.drop_peer(key)
        self._birthday.remove_peer(key, self._last_now)

    def set_endpoint(self, key: NodePublic, endpoint: Endpoint | None) -> None:
        """A direct endpoint given from outside (config, `wg set`): a candidate, not trusted."""
        peer = self._peers.get(key)
        if peer is None:
            self._plain.set_endpoint(key, endpoint)
        elif derp_region_of(endpoint) is None and endpoint != peer.configured_endpoint:
            peer.set_configured_endpoint(endpoint)

    def set_netmap_endpoints(
        self, key: NodePublic, endpoints: Iterable[Endpoint], now: float
    ) -> None:
        """The peer's endpoints from the coordinator's netmap: candidates to probe (tailscaled
        takes them from its netmap too), so a direct path can be tried before the peer's first
        CallMeMaybe. An active peer without a trusted path is probed at once."""
        peer = self._peers.get(key)
        if peer is None:
            return
        eps = [(str(ep[0]), int(ep[1])) for ep in endpoints]
        peer.set_netmap_endpoints(eps[:MAX_CALL_ME_MAYBE_ENDPOINTS], now)
        if peer.schedule.active(now, self.timings) and not peer.trusted(now):
            self._out.discover(peer, now, call_me_maybe=False)
        self._rearm(peer, now)

    def set_local_endpoints(self, endpoints: Iterable[Endpoint], now: float | None = None) -> None:
        """Our candidate endpoints (STUN-learned public ones first, then local addresses with
        the WireGuard port), advertised in CallMeMaybe. With `now`, a changed set is sent at
        once to every active peer that has no trusted direct path."""
        fresh: list[Endpoint] = []
        for ep in endpoints:
            ep = (str(ep[0]), int(ep[1]))
            if usable_endpoint(ep) and ep not in fresh:
                fresh.append(ep)
        new = tuple(fresh[:MAX_CALL_ME_MAYBE_ENDPOINTS])
        if new == self._out.local:
            return
        self._out.local = new
        if now is None:
            return
        for peer in self._peers.values():
            if peer.schedule.active(now, self.timings) and not peer.trusted(now):
                self._out.call_me_maybe(peer, now, force=True)

    @property
    def local_endpoints(self) -> tuple[Endpoint, ...]:
        return self._out.local

    def set_nat(self, hard: bool | None, now: float) -> None:
        """Whether our NAT maps per destination (netcheck's MappingVariesByDestIP; None: not
        known). Peers hear it in NatInfo; it decides our birthday role (engine/birthday.py)."""
        self._last_now = now
        self._birthday.set_own(hard, now)

    # -- birthday rounds' sockets (engine/birthday.py) -----------------------------------------
    def socket_for(self, endpoint: Endpoint) -> int:
        """The socket UDP to `endpoint` must leave from: 0 the WireGuard socket, else the extra
        socket a birthday round found the path through."""
        return self._birthday.route.get(endpoint, 0)

    @property
    def socket_routes(self) -> Mapping[Endpoint, int]:
        """Endpoint -> the extra socket UDP to it leaves from: a live read-only view (empty
        while no birthday round found a path), for the shell's send path."""
        return self._birthday.route

    def extra_sockets(self) -> frozenset[int]:
        """The extra sockets to hold open (ids); read again when `sockets_version` changes."""
        return self._birthday.sockets()

    @property
    def sockets_version(self) -> int:
        return self._birthday.sockets_version

    def birthday_status(self) -> dict[str, object]:
        return self._birthday.status()

    # -- data-path hooks -------------------------------------------------------------------------
    def on_send(self, key: NodePublic, now: float) -> None:
        """We are about to send data to `key`: the session is active (heartbeats run), and
        without a trusted direct path a discovery round runs (rate-limited per candidate)."""
        peer = self._peers.get(key)
        if peer is None:
            return
        peer.schedule.note_send(now, self.timings)
        if not peer.trusted(now):
            self._out.discover(peer, now, call_me_maybe=True)
            self._birthday.want(peer, now)
            self._rearm(peer, now)
            return
        if peer.note_direct_send(now, self.timings):
            assert peer.best is not None
            self.stats.silence_probes += 1
            self._out.ping(peer, peer.best.endpoint, now, PingPurpose.HEARTBEAT)
        if self._deadlines.get(key) is None:
            self._rearm(peer, now)

    def on_receive(self, key: NodePublic, src: Endpoint, now: float) -> None:
        """An authenticated WireGuard message from `key` arrived from `src` (a UDP source or a
        DERP pseudo-endpoint). For a DISCO peer a UDP source becomes a candidate to probe; only
        pongs make a direct path trusted."""
        peer = self._peers.get(key)
        if peer is None:
            self._plain.on_receive(key, src, now)
            return
        region = derp_region_of(src)
        if region is None:
            peer.add_candidate(src, CandidateSource.LEARNED, now)
            if peer.best is not None and peer.best.endpoint == src:
                peer.note_direct_answer(now)
            return
        if peer.relayed_while_silent(now, self.timings):
            # The peer sends through DERP and the direct path says nothing: answer through
            # DERP as well from now on, and probe the direct path (a pong restores it).
            assert peer.best is not None
            peer.lose_trust(peer.best.endpoint, now)
            self.stats.relayed_fallbacks += 1
            self._out.ping(peer, peer.best.endpoint, now, PingPurpose.HEARTBEAT)
            self._out.discover(peer, now, call_me_maybe=True)
            peer.derp_rx_region = region
            self._rearm(peer, now)
        elif region != peer.derp_rx_region:
            peer.derp_rx_region = region
            self._refresh(peer, now)

    def direct(self, key: NodePublic, now: float) -> tuple[Endpoint, float] | None:
        """UDP alone, to this endpoint, until this time unless something changes first
        (a trusted best path until its trust ends); None when `targets` uses DERP too."""
        peer = self._peers.get(key)
        if peer is None:
            return self._plain.direct(key, now)
        if peer.trusted(now):
            assert peer.best is not None
            assert peer.trust_until is not None
            return peer.best.endpoint, peer.trust_until
        return None

    def targets(self, key: NodePublic, now: float) -> Targets:
        peer = self._peers.get(key)
        if peer is None:
            return self._plain.targets(key, now)
        return peer.targets(now, self.home_region)

    def status(self, key: NodePublic, now: float) -> PeerPathStatus:
        peer = self._peers.get(key)
        if peer is None:
            s = self._plain.status(key, now)
            return PeerPathStatus(s.path, s.endpoint, s.derp_region)
        return peer.status(now, self.home_region)

    def status_if_added(self, endpoint: Endpoint | None, now: float) -> PeerPathStatus:
        """Read only: what `status` shows for a plain peer once added at `endpoint`."""
        s = self._plain.status_if_added(endpoint, now)
        return PeerPathStatus(s.path, s.endpoint, s.derp_region)

    # -- DISCO in (disco_in.DiscoReceiver) -----------------------------------------------------
    def receive_disco(
        self,
        packet: bytes,
        src: Endpoint,
        now: float,
        *,
        derp_src: NodePublic | None = None,
        via: int = 0,
    ) -> None:
        """A DISCO packet from `src`: a UDP source, or `derp_endpoint(region)` when it came
        through DERP, with `derp_src` the frame's source node key if the daemon has it (then
        it must be the peer owning the sender disco key); `via` the extra socket a UDP one
        arrived on (0: the WireGuard socket). An authenticated one is announced as
        DiscoAuthenticated. Never raises for bad input: drops are counted in `stats.drops`."""
        self._last_now = now
        try:
            peer = self._rx.receive(bytes(packet), src, now, derp_src)
        except RemoteProtocolError as exc:
            self.stats.drops[exc.reason] += 1
            return
        if via:  # before the replies it queued are sent: they must leave through `via`
            self._birthday.on_disco_via(peer, src, via, now)
        self._rearm(peer, now)

    # -- DISCO out ------------------------------------------------------------------------------
    def announce(self, key: NodePublic, now: float) -> None:
        """We just joined a relay: send the peer our endpoints (a paced CallMeMaybe) without
        counting it as activity, so no heartbeats start for peers we are not talking to."""
        peer = self._peers.get(key)
        if peer is not None:
            self._out.call_me_maybe(peer, now)
            self._rearm(peer, now)

    def ping(self, key: NodePublic, now: float) -> bytes:
        """`agent ping`: one TxID, sent to the trusted best path, or else through DERP and to
        every candidate. Each pong shows up as a PongReceived with this TxID. Counts as
        activity (heartbeats, discovery). LocalProtocolError for a peer without DISCO."""
        peer = self._peers.get(key)
        if peer is None:
            raise LocalProtocolError("ping needs a peer that speaks DISCO")
        peer.schedule.note_send(now, self.timings)
        tx_id = self._out.new_tx_id()
        if peer.trusted(now):
            assert peer.best is not None
            self._out.ping(peer, peer.best.endpoint, now, PingPurpose.CLI, tx_id)
        else:
            region = peer.region(self.home_region)
            if region is not None:
                self._out.ping(peer, derp_endpoint(region), now, PingPurpose.CLI, tx_id)
            peer.prune(now, self.timings)
            for ep in list(peer.candidates):
                self._out.ping(peer, ep, now, PingPurpose.CLI, tx_id)
            peer.schedule.note_full_ping(now)
            self._out.call_me_maybe(peer, now)
        self._rearm(peer, now)
        return tx_id

    def outgoing(self) -> list[Outgoing]:
        """Drain the DISCO datagrams to send (UDP, or DERP when `endpoint` is a DERP one)."""
        return self._out.drain()

    def events(self) -> list[EngineEvent]:
        out = list(self._events)
        self._events.clear()
        return out

    # -- timers ---------------------------------------------------------------------------------
    def on_timer(self, now: float) -> None:
        """Everything due at `now`, in order: late heartbeats, ping timeouts, per-peer
        deadlines (heartbeat, end of trust)."""
        self._last_now = now
        touched: dict[NodePublic, PeerPath] = {}
        late, expired = self._out.tx.due(now)
        for sent in late:
            peer = self._peers.get(sent.key)
            if peer is not None and peer.lose_trust(sent.dest, now):
                self._out.discover(peer, now, call_me_maybe=True)
                touched[peer.key] = peer
        for sent in expired:
            peer = self._peers.get(sent.key)
            if peer is not None and not sent.via_derp and sent.purpose is not PingPurpose.BIRTHDAY:
                peer.on_ping_timeout(sent.dest, now)
                touched[peer.key] = peer
        for key in self._deadlines.due(now):
            peer = self._peers.get(key)
            if peer is None:
                continue
            touched[key] = peer
            if peer.schedule.heartbeat_due(now) and peer.schedule.on_heartbeat(now, self.timings):
                self._heartbeat(peer, now)
        self._birthday.on_timer(now)
        for peer in touched.values():
            self._rearm(peer, now)

    def _heartbeat(self, peer: PeerPath, now: float) -> None:
        if peer.best is not None:
            self._out.ping(peer, peer.best.endpoint, now, PingPurpose.HEARTBEAT)
        if peer.want_full_ping(now, self.timings):
            self._out.discover(peer, now, call_me_maybe=True)

    def next_deadline(self) -> float | None:
        times = [
            t
            for t in (
                self._deadlines.next(),
                self._out.tx.next_deadline(),
                self._birthday.next_deadline(),
            )
            if t is not None
        ]
        return min(times) if times else None

    def _rearm(self, peer: PeerPath, now: float) -> None:
        self._deadlines.set(peer.key, peer.next_deadline(now))
        self._refresh(peer, now)

    # -- events ---------------------------------------------------------------------------------
    def _refresh(self, peer: PeerPath, now: float) -> None:
        status = peer.status(now, self.home_region)
        summary = path_summary(status)
        if summary != peer.reported:
            old = peer.reported[0]
            peer.reported = summary
            self._events.append(PathChanged(peer.key, old, status.path, summary[1], summary[2]))

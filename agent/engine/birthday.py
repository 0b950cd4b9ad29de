"""The birthday technique: a direct path between an easy NAT and a hard one. Sans-I/O.

After Tailscale's "How NAT traversal works". An easy NAT maps a socket to one public port
whatever the destination (netcheck: MappingVariesByDestIP false); a hard one (true) gives every
(socket, destination) pair a port of its own and lets in only replies from that destination.
Between the two, ordinary punching fails: the easy side pings the port STUN saw, which is not
the one the hard NAT gave the hard side's pings to us, and the hard side's pings reach the easy
NAT from a port the easy side never sent to (most easy NATs filter by address and port).

Roles, per peer, from our own NAT (`set_own`, from netcheck) and the peer's NatInfo
(`on_nat_info`, through DERP beside CallMeMaybe):

    we hard, peer easy   the HARD side. When the peer wants a path (we send to it, or its
                         NatInfo says `want`) and none is trusted after `start_after`: open
                         `sockets` extra sockets, ping the peer's public endpoint from each (at
                         `spray_rate` per second; the hard NAT now holds that many mappings
                         towards it, each letting exactly that endpoint in), then send
                         NatInfo(probe) through DERP and keep the sockets `listen` seconds
    we easy, peer hard   the EASY side. On the peer's NatInfo(probe): ping random ports of its
                         public IPv4 address from the WireGuard socket, `probe_rate` per second,
                         at most `probes`, until a direct path is trusted. Each guess hits one of
                         the mappings with odds sockets/64512: 1024 guesses against 256 sockets
                         succeed 98 times in 100
    anything else        nothing (both easy: ordinary punching works; both hard: hopeless
                         without port mapping; unknown, or either side has it off: no guessing)

A hit: the hard side receives the easy side's ping on extra socket k. The mapping belongs to the
pair (socket k, the peer's endpoint), so from then on every datagram to that endpoint leaves
through socket k (`PathEngine.socket_for`, asked for every UDP send) and what arrives on k
goes to the data plane; the other sockets close at once. The pong goes back through k, the easy
side trusts hard_ip:port like any direct path (a LEARNED candidate), and WireGuard follows both
ways. A pong on socket k to one of the hard side's own pings binds the same way.

Bounds: one round at a time, whatever the role or the peer, so never more than `sockets` extra
sockets (plus the bound ones, one per direct path found this way) and never more birthday pings
per second than `spray_rate` or `probe_rate`. The hard side starts a round for a peer again only
`retry` seconds after a miss (doubling up to `retry_max`), the easy side at most once per
`easy_interval` per peer. A bound socket whose path has not been trusted for `release_after`
seconds is closed, and so is everything of a peer that is removed.

The shell owns the sockets: `sockets()` is the set of extra socket ids to hold open (read it
again when `sockets_version` changes); `Outgoing.via` names the socket a ping leaves from; a
DISCO message that arrived on an extra socket is reported with `on_disco_via` once opened.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from agent.engine.candidates import CandidateSource
from agent.engine.disco_out import DiscoSender
from agent.engine.paths import Endpoint, derp_endpoint
from agent.engine.peerpath import PeerPath
from agent.engine.stats import EngineStats
from agent.engine.timings import Timings
from agent.keys import NodePublic
from agent.proto import disco

__all__ = ["BirthdayLimits", "DEFAULT_BIRTHDAY", "Birthday", "public_v4"]

_ADVERTISED: Final = CandidateSource.CALL_ME_MAYBE | CandidateSource.NETMAP | CandidateSource.CONFIG
_NOT_PUBLIC: Final = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "0.0.0.0/8")
)
_ANSWER_INTERVAL: Final = 1.0  # NatInfo sent back to a peer's NatInfo at most this often


@dataclass(frozen=True, slots=True)
class BirthdayLimits:
    """The technique's switch, rates and bounds (seconds, per second, counts)."""

    enabled: bool = True
    sockets: int = 256  # hard side: extra sockets per round (the only ones, but bound ones)
    spray_rate: float = 1000.0  # hard side: pings per second from the extra sockets
    probe_rate: float = 256.0  # easy side: guessed ports per second
    probes: int = 1024  # easy side: guessed ports per round
    tick: float = 0.02  # pings go out in batches this far apart
    start_after: float = 1.0  # hard side: a wanted path not trusted this long starts a round
    want_valid: float = 10.0  # a want not renewed for this long has lapsed
    listen: float = 6.0  # hard side: sockets kept this long after the last sprayed ping
    retry: float = 30.0  # hard side: a round without a hit waits this long before the next
    retry_max: float = 300.0  # ... doubling each time, up to this
    easy_interval: float = 5.0  # easy side: at most one round per peer this often
    release_after: float = 60.0  # a bound socket whose path is untrusted this long is closed
    port_low: int = 1024  # the ports a hard NAT hands out (Linux: 1024-65535)
    port_high: int = 65535
    max_targets: int = 2  # endpoints (hard side) or addresses (easy side) aimed at per round


DEFAULT_BIRTHDAY: Final = BirthdayLimits()


def public_v4(ip: str) -> bool:
    """An IPv4 address a peer on the internet could send to: not RFC 1918, CGNAT (100.64/10,
    also our overlay), loopback, link-local, multicast or unspecified."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if not isinstance(addr, ipaddress.IPv4Address):
        return False
    if addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified:
        return False
    return not any(addr in net for net in _NOT_PUBLIC)


@dataclass(slots=True)
class _HardRound:
    key: NodePublic
    targets: tuple[Endpoint, ...]  # the easy side's public endpoints
    sockets: tuple[int, ...]
    started: float
    next_at: float
    sent: int = 0
    sprayed_at: float | None = None

    @property
    def total(self) -> int:
        return len(self.sockets) * len(self.targets)


@dataclass(slots=True)
class _EasyRound:
    key: NodePublic
    ips: tuple[str, ...]  # the hard side's public addresses
    started: float
    next_at: float
    sent: int = 0
    tried: set[Endpoint] = field(default_factory=set)


@dataclass(slots=True)
class _Binding:
    socket: int
    key: NodePublic
    ok_at: float  # last time the path through it was trusted (or when it was bound)


@dataclass(slots=True)
class _PeerNat:
    hard: bool | None = None  # from the peer's latest NatInfo
    want_at: float | None = None  # hard side: first want since the path was last trusted
    want_last: float = -math.inf  # hard side: latest want
    next_round: float = -math.inf  # hard side: no round before this (after a miss)
    delay: float = 0.0  # hard side: the current wait after a miss
    easy_at: float = -math.inf  # easy side: when its last round started
    sent: disco.NatInfo | None = None  # our latest NatInfo to the peer (probe left out)
    answered_at: float = -math.inf


class Birthday:
    """Rounds of the technique, the sockets they hold, the endpoints bound to a socket.

    Owned by the PathEngine that creates it; shares its peers, DISCO sender, stats, timings."""

    def __init__(
        self,
        limits: BirthdayLimits,
        *,
        peers: Mapping[NodePublic, PeerPath],
        out: DiscoSender,
        stats: EngineStats,
        timings: Timings,
        home_region: Callable[[], int | None],
        randbytes: Callable[[int], bytes],
    ) -> None:
        self.limits = limits  # static after construction
        self._peers = peers
        self._out = out
        self._stats = stats
        self._timings = timings
        self._home_region = home_region
        self._randbytes = randbytes
        self.own_hard: bool | None = None  # our NAT, from netcheck (None: not known)
        self._nat: dict[NodePublic, _PeerNat] = {}
        self._round: _HardRound | _EasyRound | None = None
        self._pending: dict[NodePublic, float] = {}  # hard side: peers waiting for a round
        self._bound: dict[Endpoint, _Binding] = {}
        self.route: dict[Endpoint, int] = {}  # endpoint -> the extra socket it is sent from
        self.sockets_version = 0
        self._next_socket = 1

    # -- what the shell asks ---------------------------------------------------------------------
    def sockets(self) -> frozenset[int]:
        """The extra sockets to hold open now: the hard round's and the bound ones."""
        held = {b.socket for b in self._bound.values()}
        if isinstance(self._round, _HardRound):
            held.update(self._round.sockets)
        return frozenset(held)

    def status(self) -> dict[str, Any]:
        r = self._round
        current: dict[str, Any] | None = None
        if isinstance(r, _HardRound):
            current = {"role": "hard", "sockets": len(r.sockets), "pings": r.sent}
        elif isinstance(r, _EasyRound):
            current = {"role": "easy", "probes": r.sent}
        return {
            "enabled": self.limits.enabled,
            "nat": None if self.own_hard is None else ("hard" if self.own_hard else "easy"),
            "round": current,
            "bound": len(self._bound),
        }

    # -- our NAT, the peer's ---------------------------------------------------------------------
    def set_own(self, hard: bool | None, now: float) -> None:
        """What netcheck says of our NAT (False as well while a port mapping is up)."""
        if hard == self.own_hard:
            return
        self.own_hard = hard
        if isinstance(self._round, _HardRound) and hard is not True:
            self._end_round(now, hit=True)  # not our fault: no wait before the next one
        for peer in self._peers.values():
            if peer.schedule.active(now, self._timings) and not peer.trusted(now):
                self._send_info(peer, now)

    def nat_info(self, peer: PeerPath, now: float, *, probe: bool = False) -> disco.NatInfo | None:
        """Our NatInfo for `peer` (None: off, or our NAT is not known yet); noted as sent."""
        if not self.limits.enabled or self.own_hard is None:
            return None
        want = peer.schedule.active(now, self._timings) and not peer.trusted(now)
        self._state(peer.key).sent = disco.NatInfo(hard=self.own_hard, want=want)
        return disco.NatInfo(hard=self.own_hard, want=want, probe=probe)

    def on_nat_info(self, peer: PeerPath, info: disco.NatInfo, now: float) -> None:
        """The peer's NatInfo (authenticated, through DERP)."""
        st = self._state(peer.key)
        st.hard = info.hard
        if not self.limits.enabled or self.own_hard is None:
            return
        mine = disco.NatInfo(
            hard=self.own_hard,
            want=peer.schedule.active(now, self._timings) and not peer.trusted(now),
        )
        if st.sent != mine and now - st.answered_at >= _ANSWER_INTERVAL:
            st.answered_at = now  # the peer learns our NAT now, not at our next CallMeMaybe
            self._send_info(peer, now)
        if info.want:
            self.want(peer, now)
        if info.probe:
            self._start_easy(peer, now)

    def _state(self, key: NodePublic) -> _PeerNat:
        st = self._nat.get(key)
        if st is None:
            st = self._nat[key] = _PeerNat()
        return st

    def _send_info(self, peer: PeerPath, now: float, *, probe: bool = False) -> None:
        region = peer.region(self._home_region())
        info = self.nat_info(peer, now, probe=probe)
        if region is not None and info is not None:
            self._out.send(peer, info, derp_endpoint(region))

    def remove_peer(self, key: NodePublic, now: float) -> None:
        self._nat.pop(key, None)
        self._pending.pop(key, None)
        if self._round is not None and self._round.key == key:
            self._end_round(now, hit=True)
        for ep in [ep for ep, b in self._bound.items() if b.key == key]:
            self._unbind(ep)

    # -- hard side -------------------------------------------------------------------------------
    def want(self, peer: PeerPath, now: float) -> None:
        """The peer wants a direct path (we send to it untrusted, or its NatInfo says so)."""
        if not self._hard_role(peer.key):
            return
        st = self._state(peer.key)
        if peer.trusted(now):
            st.want_at = None
            return
        if st.want_at is None or now - st.want_last > self.limits.want_valid:
            st.want_at = now
        st.want_last = now
        if self._round is None:
            self._try_start(peer, now)
        elif peer.key not in self._pending:
            self._pending[peer.key] = max(st.want_at + self.limits.start_after, st.next_round)

    def _hard_role(self, key: NodePublic) -> bool:
        st = self._nat.get(key)
        return self.limits.enabled and self.own_hard is True and st is not None and st.hard is False

    def _try_start(self, peer: PeerPath, now: float) -> None:
        """Start a hard round for `peer` if everything allows it; else keep it pending when
        only time stands in the way."""
        key, lim = peer.key, self.limits
        self._pending.pop(key, None)
        st = self._nat.get(key)
        if not self._hard_role(key) or st is None or st.want_at is None:
            return
        if peer.trusted(now) or now - st.want_last > lim.want_valid:
            st.want_at = None
            return
        at = max(st.want_at + lim.start_after, st.next_round)
        if now < at or self._round is not None:
            self._pending[key] = at
            return
        targets = tuple(self._advertised(peer)[: lim.max_targets])
        if not targets or lim.sockets <= 0:
            st.next_round = now + lim.start_after  # look again later, not on every send
            return
        ids = tuple(range(self._next_socket, self._next_socket + lim.sockets))
        self._next_socket += lim.sockets
        self._round = _HardRound(key, targets, ids, now, now)
        self.sockets_version += 1
        self._stats.birthday_rounds += 1
        self._hard_tick(self._round, peer, now)

    def _hard_tick(self, r: _HardRound, peer: PeerPath, now: float) -> None:
        lim = self.limits
        if r.sprayed_at is None:
            due = min(r.total, _due(now - r.started, lim.spray_rate, lim.tick))
            n = len(r.sockets)
            while r.sent < due:
                self._out.probe(peer, r.targets[r.sent // n], now, r.sockets[r.sent % n])
                r.sent += 1
                self._stats.birthday_pings += 1
            if r.sent >= r.total:
                r.sprayed_at = now
                self._send_info(peer, now, probe=True)
                r.next_at = now + lim.listen
            else:
                r.next_at = now + lim.tick
        elif now >= r.sprayed_at + lim.listen:
            self._end_round(now, hit=False)

    def on_disco_via(self, peer: PeerPath, src: Endpoint, via: int, now: float) -> None:
        """An authenticated DISCO message from `peer` at `src` arrived on extra socket `via`:
        during the peer's hard round, that pair is the mapping we were looking for."""
        r = self._round
        if not isinstance(r, _HardRound) or r.key != peer.key or via not in r.sockets:
            return
        if src not in r.targets or self.route.get(src) == via:
            return
        self._bind(src, via, peer.key, now)
        self._stats.birthday_hits += 1
        self._end_round(now, hit=True)

    def _bind(self, ep: Endpoint, sock: int, key: NodePublic, now: float) -> None:
        self._bound[ep] = _Binding(sock, key, now)
        self.route[ep] = sock
        self.sockets_version += 1

    def _unbind(self, ep: Endpoint) -> None:
        if self._bound.pop(ep, None) is not None:
            self.route.pop(ep, None)
            self.sockets_version += 1

    def _end_round(self, now: float, *, hit: bool) -> None:
        r, self._round = self._round, None
        if r is None:
            return
        if isinstance(r, _HardRound):
            self.sockets_version += 1
            st = self._nat.get(r.key)
            if st is not None:
                lim = self.limits
                if hit:  # the path should be trusted within a round trip: no round meanwhile
                    st.delay, st.next_round, st.want_at = 0.0, now + lim.listen, None
                else:
                    st.delay = min(lim.retry_max, lim.retry if st.delay <= 0 else 2 * st.delay)
                    st.next_round = now + st.delay
                    self._stats.birthday_misses += 1
                if st.want_at is not None:
                    self._pending[r.key] = max(st.next_round, now)

    # -- easy side -------------------------------------------------------------------------------
    def _start_easy(self, peer: PeerPath, now: float) -> None:
        st, lim = self._state(peer.key), self.limits
        if not lim.enabled or self.own_hard is not False or st.hard is not True:
            return
        if peer.trusted(now) or self._round is not None or lim.probes <= 0:
            return
        if now - st.easy_at < lim.easy_interval:
            return
        ips = tuple(dict.fromkeys(ep[0] for ep in self._advertised(peer)))[: lim.max_targets]
        if not ips:
            return
        st.easy_at = now
        self._round = _EasyRound(peer.key, ips, now, now)
        self._stats.birthday_probe_rounds += 1
        self._easy_tick(self._round, peer, now)

    def _easy_tick(self, r: _EasyRound, peer: PeerPath, now: float) -> None:
        lim = self.limits
        if peer.trusted(now):
            self._end_round(now, hit=True)
            return
        due = min(lim.probes, _due(now - r.started, lim.probe_rate, lim.tick))
        while r.sent < due:
            ip = r.ips[r.sent % len(r.ips)]
            self._out.probe(peer, (ip, self._port(ip, r.tried)), now, 0)
            r.sent += 1
            self._stats.birthday_pings += 1
        if r.sent >= lim.probes:
            self._end_round(now, hit=False)
        else:
            r.next_at = now + lim.tick

    def _port(self, ip: str, tried: set[Endpoint]) -> int:
        lo, hi = self.limits.port_low, self.limits.port_high
        span = hi - lo + 1
        port = lo
        for _ in range(16):
            port = lo + int.from_bytes(self._randbytes(4), "big") % span
            if (ip, port) not in tried:
                break
        tried.add((ip, port))
        return port

    # -- both ------------------------------------------------------------------------------------
    def _advertised(self, peer: PeerPath) -> list[Endpoint]:
        """The peer's public IPv4 endpoints as it advertised them (CallMeMaybe, the coordinator,
        the config), none at one of our own addresses; in the order they were learned."""
        ours = {ep[0] for ep in self._out.local}
        return [
            ep
            for ep, cand in peer.candidates.items()
            if cand.sources & _ADVERTISED and public_v4(ep[0]) and ep[0] not in ours
        ]

    def on_timer(self, now: float) -> None:
        r = self._round
        if r is not None and now >= r.next_at:
            peer = self._peers.get(r.key)
            if peer is None:
                self._end_round(now, hit=True)
            elif isinstance(r, _HardRound):
                self._hard_tick(r, peer, now)
            else:
                self._easy_tick(r, peer, now)
        if self._round is None:
            for key, at in sorted(self._pending.items(), key=lambda kv: kv[1]):
                if at > now or self._round is not None:
                    break
                peer = self._peers.get(key)
                if peer is None:
                    self._pending.pop(key, None)
                else:
                    self._try_start(peer, now)
        self._release(now)

    def _release(self, now: float) -> None:
        after = self.limits.release_after
        for ep, b in list(self._bound.items()):
            peer = self._peers.get(b.key)
            best = peer.best if peer is not None and peer.trusted(now) else None
            if best is not None and best.endpoint == ep:
                b.ok_at = now
            if peer is None or now - b.ok_at >= after:
                self._unbind(ep)

    def next_deadline(self) -> float | None:
        times: list[float] = []
        if self._round is not None:
            times.append(self._round.next_at)
        elif self._pending:
            times.append(min(self._pending.values()))
        if self._bound:
            times.append(min(b.ok_at for b in self._bound.values()) + self.limits.release_after)
        return min(times) if times else None


def _due(elapsed: float, rate: float, tick: float) -> int:
    """Pings due `elapsed` seconds into a round paced at `rate`: one tick's worth at once."""
    return int(max(elapsed, 0.0) * rate) + max(1, math.ceil(rate * tick))

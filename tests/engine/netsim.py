"""A deterministic simulated internet for driving PathEngines: hosts, NATs, STUN, a DERP relay.

    host a 10.1.0.2:41641 --[NAT a 198.51.100.1]--+                 +--[NAT b 198.51.100.2]-- host b
                                                  |   "internet"    |     10.2.0.2:41641
                         STUN 203.0.113.1:3478 ---+-----------------+--- DERP region 1 (TCP:
                                                                          always delivers)

Time is a float in a `Sim` (an event heap, no wall clock); every delivery is an event.

NAT behaviour (RFC 4787 terms):
    mapping    EIM  endpoint-independent: one public port per inside endpoint
               EDM  endpoint-dependent (address and port): a new public port per destination
    filtering  EIF  anyone may send to a mapping            (full cone)
               ADF  only IPs the mapping has sent to         (restricted cone)
               APDF only ip:ports the mapping has sent to    (port-restricted cone, symmetric)
Presets: NAT_TYPES maps "full_cone", "restricted", "port_restricted", "symmetric" to them;
"public" means no NAT. `Host.udp_blocked` drops every UDP datagram in or out (a firewall), which
also stops STUN; DERP is TCP and unaffected.

A host holds the extra sockets its engine asks for (birthday rounds, engine/birthday.py), each
on a port of its own behind the same NAT: DISCO sent `via` one leaves from it, data to an
endpoint leaves from `engine.socket_for(endpoint)`, and what arrives on an extra socket is
handed over with its id (data only from the endpoint bound to it, as the node's shell does).

Data is modelled, not encrypted: a data packet is DATA_MAGIC + the sender's node key, and the
receiver treats it as an authenticated WireGuard packet (`engine.on_receive`). `Flow` sends one
each way every `interval` through whatever `engine.targets()` says, calling `engine.on_send`
first, as the daemon does; receptions are logged per path for the assertions.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from agent.engine.discokeys import static_disco_private, static_disco_public
from agent.engine.engine import PathEngine
from agent.engine.events import EngineEvent
from agent.engine.paths import Endpoint, derp_endpoint
from agent.keys import NodePrivate, NodePublic
from agent.proto import disco, stun
from agent.proto.errors import MalformedPacket

Mapping = Literal["eim", "edm"]
Filtering = Literal["eif", "adf", "apdf"]

NAT_TYPES: dict[str, tuple[Mapping, Filtering]] = {
    "full_cone": ("eim", "eif"),
    "restricted": ("eim", "adf"),
    "port_restricted": ("eim", "apdf"),
    "symmetric": ("edm", "apdf"),
}

DATA_MAGIC = b"\x04SIMDATA"
STUN_SERVER: Endpoint = ("203.0.113.1", 3478)
REGION = 1
WG_PORT = 41641


class Sim:
    """A fake clock and an event queue."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.events_run = 0

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(when, self.now), next(self._seq), fn))

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.at(self.now + delay, fn)

    def run_until(self, end: float, until: Callable[[], bool] | None = None) -> float | None:
        """Run events up to time `end`; with `until`, stop at the first event after which it
        holds and return that time (None if it never held)."""
        if until is not None and until():
            return self.now
        while self._queue and self._queue[0][0] <= end:
            when, _, fn = heapq.heappop(self._queue)
            self.now = when
            fn()
            self.events_run += 1
            if until is not None and until():
                return self.now
        self.now = max(self.now, end)
        return None

    def run_for(self, seconds: float, until: Callable[[], bool] | None = None) -> float | None:
        return self.run_until(self.now + seconds, until)


class Nat:
    """One NAT box with one public IP."""

    def __init__(self, public_ip: str, mapping: Mapping, filtering: Filtering, rng: random.Random):
        self.public_ip = public_ip
        self.mapping = mapping
        self.filtering = filtering
        self._rng = rng
        self._ports: dict[tuple[Endpoint, Endpoint | None], int] = {}
        self._inside: dict[int, Endpoint] = {}
        self._contacted: dict[int, set[Endpoint]] = {}

    def _new_port(self) -> int:
        while True:
            port = self._rng.randrange(1024, 65536)
            if port not in self._inside:
                return port

    def outbound(self, inside: Endpoint, dst: Endpoint) -> Endpoint:
        key = (inside, None if self.mapping == "eim" else dst)
        port = self._ports.get(key)
        if port is None:
            port = self._ports[key] = self._new_port()
            self._inside[port] = inside
        self._contacted.setdefault(port, set()).add(dst)
        return (self.public_ip, port)

    def inbound(self, port: int, src: Endpoint) -> Endpoint | None:
        inside = self._inside.get(port)
        if inside is None:
            return None
        contacted = self._contacted.get(port, set())
        if self.filtering == "adf" and all(ep[0] != src[0] for ep in contacted):
            return None
        if self.filtering == "apdf" and src not in contacted:
            return None
        return inside


@dataclass
class Rx:
    at: float
    path: Literal["udp", "derp"]


@dataclass
class Host:
    """A node: one UDP socket (ip, port), maybe behind a NAT, running a PathEngine."""

    name: str
    ip: str
    net: Network
    nat: Nat | None = None
    port: int = WG_PORT
    udp_blocked: bool = False
    private: NodePrivate = field(default_factory=NodePrivate.generate)
    engine: PathEngine = field(init=False)
    events: list[tuple[float, EngineEvent]] = field(default_factory=list)
    rx: dict[NodePublic, list[Rx]] = field(default_factory=dict)
    extra: dict[int, int] = field(default_factory=dict)  # extra socket id -> local port
    max_extra: int = 0  # the most extra sockets held at once
    _sockets_version: int = 0
    _armed: float | None = None
    _stun_tx: bytes | None = None

    def __post_init__(self) -> None:
        self.engine = PathEngine(
            static_disco_private(self.private),
            self.key,
            REGION,
            randbytes=self.net.rng.randbytes,
        )

    @property
    def key(self) -> NodePublic:
        return self.private.public()

    @property
    def local(self) -> Endpoint:
        return (self.ip, self.port)

    @property
    def now(self) -> float:
        return self.net.sim.now

    def add_peer(self, other: Host, *, endpoint: Endpoint | None = None) -> None:
        self.engine.add_peer(
            other.key,
            endpoint=endpoint,
            derp_region=REGION,
            disco_key=static_disco_public(other.key),
        )

    def socket_of(self, port: int) -> int | None:
        """The socket bound to local `port`: 0 the WireGuard one, an extra one's id, or None."""
        if port == self.port:
            return 0
        return next((sid for sid, p in self.extra.items() if p == port), None)

    # -- UDP and DERP in -------------------------------------------------------------------------
    def receive_udp(self, src: Endpoint, payload: bytes, via: int = 0) -> None:
        if self.udp_blocked:
            return
        if via and disco.looks_like_disco(payload):
            self.engine.receive_disco(payload, src, self.now, via=via)
        elif via and not (payload.startswith(DATA_MAGIC) and self.engine.socket_for(src) == via):
            pass  # an extra socket takes data only from the endpoint bound to it
        elif stun.is_stun(payload):
            self._stun_response(payload)
        elif disco.looks_like_disco(payload):
            self.engine.receive_disco(payload, src, self.now)
        elif payload.startswith(DATA_MAGIC):
            sender = NodePublic(payload[len(DATA_MAGIC) :])
            self.engine.on_receive(sender, src, self.now)
            self.rx.setdefault(sender, []).append(Rx(self.now, "udp"))
        self.pump()

    def receive_derp(self, src_key: NodePublic, region: int, payload: bytes) -> None:
        via = derp_endpoint(region)
        if disco.looks_like_disco(payload):
            self.engine.receive_disco(payload, via, self.now, derp_src=src_key)
        elif payload.startswith(DATA_MAGIC):
            self.engine.on_receive(src_key, via, self.now)
            self.rx.setdefault(src_key, []).append(Rx(self.now, "derp"))
        self.pump()

    # -- out -----------------------------------------------------------------------------------
    def send_udp(self, dst: Endpoint, payload: bytes, via: int | None = None) -> None:
        """From socket `via` (None: the one `engine.socket_for(dst)` names)."""
        if via is None:
            via = self.engine.socket_for(dst)
        port = self.port if via == 0 else self.extra.get(via)
        if port is not None and not self.udp_blocked:
            self.net.send_udp(self, (self.ip, port), dst, payload)

    def send_data(self, peer: Host) -> None:
        self.engine.on_send(peer.key, self.now)
        targets = self.engine.targets(peer.key, self.now)
        payload = DATA_MAGIC + self.key.raw
        if targets.udp is not None:
            self.send_udp(targets.udp, payload)
        if targets.derp is not None:
            self.net.derp.send(targets.derp, self.key, peer.key, payload)
        self.pump()

    def stun(self) -> None:
        self._stun_tx = stun.new_txid(self.net.rng.randbytes)
        self.send_udp(STUN_SERVER, stun.binding_request(self._stun_tx))

    def _stun_response(self, payload: bytes) -> None:
        txid, mapped = stun.parse_response(payload)
        if txid == self._stun_tx:
            self.engine.set_local_endpoints([mapped, self.local], self.now)

    def pump(self) -> None:
        """Send what the engine wants sent, log its events, re-arm its one timer."""
        if self.engine.sockets_version != self._sockets_version:
            self._sockets_version = self.engine.sockets_version
            wanted = self.engine.extra_sockets()
            self.extra = {sid: p for sid, p in self.extra.items() if sid in wanted}
            for sid in sorted(wanted - self.extra.keys()):
                self.extra[sid] = 20000 + sid
            self.max_extra = max(self.max_extra, len(self.extra))
        for out in self.engine.outgoing():
            region = out.derp_region
            if region is None:
                self.send_udp(out.endpoint, out.payload, None if out.via == 0 else out.via)
            else:
                self.net.derp.send(region, self.key, out.key, out.payload)
        self.events.extend((self.now, ev) for ev in self.engine.events())
        deadline = self.engine.next_deadline()
        if deadline is not None and deadline != self._armed:
            self._armed = deadline
            self.net.sim.at(deadline, lambda: self._fire(deadline))

    def _fire(self, deadline: float) -> None:
        if self._armed != deadline:
            return
        self._armed = None
        self.engine.on_timer(self.now)
        self.pump()


class Derp:
    """The relay: delivers every packet to the host holding the destination key."""

    def __init__(self, sim: Sim, latency: float) -> None:
        self.sim = sim
        self.latency = latency
        self.hosts: dict[NodePublic, Host] = {}
        self.delivered = 0

    def send(self, region: int, src: NodePublic, dst: NodePublic, payload: bytes) -> None:
        host = self.hosts.get(dst)
        if host is None:
            return

        def deliver() -> None:
            self.delivered += 1
            host.receive_derp(src, region, payload)

        self.sim.after(self.latency, deliver)


class Network:
    """The internet between NATs and public hosts, with one STUN server."""

    def __init__(self, *, udp_latency: float = 0.010, derp_latency: float = 0.025, seed: int = 1):
        self.sim = Sim()
        self.rng = random.Random(seed)
        self.udp_latency = udp_latency
        self.derp = Derp(self.sim, derp_latency)
        self._public: dict[str, Nat | Host] = {}
        self.udp_delivered = 0

    def host(self, name: str, nat_type: str, index: int) -> Host:
        """A host behind a NAT of `nat_type` (a NAT_TYPES key) or "public"."""
        if nat_type == "public":
            host = Host(name, f"198.51.100.{index}", self)
            self._public[host.ip] = host
        else:
            mapping, filtering = NAT_TYPES[nat_type]
            nat = Nat(f"198.51.100.{index}", mapping, filtering, self.rng)
            host = Host(name, f"10.{index}.0.2", self, nat=nat)
            self._public[nat.public_ip] = nat
        self.derp.hosts[host.key] = host
        return host

    def send_udp(self, sender: Host, local: Endpoint, dst: Endpoint, payload: bytes) -> None:
        src = local if sender.nat is None else sender.nat.outbound(local, dst)
        self.sim.after(self.udp_latency, lambda: self._arrive(src, dst, payload))

    def _arrive(self, src: Endpoint, dst: Endpoint, payload: bytes) -> None:
        if dst == STUN_SERVER:
            self._stun_server(src, payload)
            return
        box = self._public.get(dst[0])
        if isinstance(box, Host):
            via = box.socket_of(dst[1])
            if via is not None:
                self.udp_delivered += 1
                box.receive_udp(src, payload, via)
        elif isinstance(box, Nat):
            inside = box.inbound(dst[1], src)
            if inside is None:
                return
            for h in self.derp.hosts.values():
                via = h.socket_of(inside[1]) if h.nat is box and h.ip == inside[0] else None
                if via is not None:
                    self.udp_delivered += 1
                    h.receive_udp(src, payload, via)
                    return

    def _stun_server(self, src: Endpoint, payload: bytes) -> None:
        try:
            txid = stun.parse_binding_request(payload)
        except MalformedPacket:
            return
        response = stun.binding_response(txid, src)
        self.sim.after(self.udp_latency, lambda: self._arrive(STUN_SERVER, src, response))


class Flow:
    """Bidirectional traffic between two hosts: one data packet each way every `interval`."""

    def __init__(self, a: Host, b: Host, interval: float = 0.1) -> None:
        self.a, self.b, self.interval = a, b, interval
        self.running = False

    def start(self) -> None:
        self.running = True
        self._tick()

    def stop(self) -> None:
        self.running = False

    def _tick(self) -> None:
        if not self.running:
            return
        self.a.send_data(self.b)
        self.b.send_data(self.a)
        self.a.net.sim.after(self.interval, self._tick)


@dataclass
class Pair:
    net: Network
    a: Host
    b: Host
    flow: Flow

    @property
    def sim(self) -> Sim:
        return self.net.sim

    def path(self, x: Host, y: Host) -> str:
        return x.engine.status(y.key, self.sim.now).path

    def both(self, kind: str) -> bool:
        return self.path(self.a, self.b) == kind and self.path(self.b, self.a) == kind

    def start(self) -> None:
        """STUN on both hosts now; traffic starts 100 ms later."""
        self.a.stun()
        self.b.stun()
        self.sim.after(0.1, self.flow.start)


def pair(nat_a: str, nat_b: str, *, seed: int = 1, configured_endpoints: bool = False) -> Pair:
    """Two hosts (a behind `nat_a`, b behind `nat_b`) that know each other as DISCO peers in
    DERP region 1, as the static config gives them; no traffic until `Pair.start()`."""
    net = Network(seed=seed)
    a = net.host("a", nat_a, 1)
    b = net.host("b", nat_b, 2)
    a.add_peer(b, endpoint=b.local if configured_endpoints and nat_b == "public" else None)
    b.add_peer(a, endpoint=a.local if configured_endpoints and nat_a == "public" else None)
    return Pair(net, a, b, Flow(a, b))

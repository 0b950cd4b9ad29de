"""PathEngine.receive_disco (and the calls around it) driven by a sequence of fuzz events.

Contract (agent/engine/engine.py): hostile input to receive_disco is counted in
`stats.drops` and never raises; nothing else the harness calls raises either. Invariants: the
candidate table, the pings in flight and the duplicate-ping memory stay within their caps.

Input: a sequence of events, each an op byte then its operands:
    0  DISCO message sealed by the peer (plaintext = the next length-prefixed bytes), from a
       source picked by a byte (known UDP endpoints, a fuzzed IPv4/IPv6 one or a DERP region),
       with the DERP source node key absent, right or wrong
    1  a raw packet            2  on_send (activity)      3  `agent ping`
    4  a Pong for the last ping sealed by the peer, from where it was sent
    5  time passes, timers     6  on_receive from a source 7  set_local_endpoints
"""

from __future__ import annotations

import ipaddress
import random

import nacl.public

from agent.engine.discokeys import static_disco_private, static_disco_public
from agent.engine.engine import PathEngine
from agent.engine.paths import derp_endpoint
from agent.engine.timings import MAX_CANDIDATES, MAX_OUTSTANDING_PINGS
from agent.keys import NodePrivate
from agent.proto import disco
from fuzz.common import Data, Seed, check
from fuzz.targets.disco import golden_messages

_KA = NodePrivate.from_hex("a8" * 31 + "40")
_KB = NodePrivate.from_hex("b0" * 31 + "50")
_KC = NodePrivate.from_hex("c8" * 31 + "60")
_UDP = [("198.18.0.2", 41641), ("198.18.0.3", 41641), ("2001:db8::2", 41641), ("10.0.0.2", 1)]
REBUILD = 500


class _World:
    def __init__(self, rng: random.Random) -> None:
        self.now = 1000.0
        self.engine = PathEngine(
            static_disco_private(_KA), _KA.public(), home_region=900, randbytes=rng.randbytes
        )
        self.engine.add_peer(
            _KB.public(), derp_region=900, disco_key=static_disco_public(_KB.public())
        )
        self.engine.add_peer(_KC.public(), endpoint=("198.18.0.4", 51820))
        self.engine.set_local_endpoints([("198.18.0.1", 41641)])
        self.last_tx: bytes = bytes(12)
        self.last_dest = _UDP[0]
        self.count = 0


def _endpoint(d: Data) -> tuple[str, int]:
    sel = d.byte()
    if sel < 128:
        return _UDP[sel % len(_UDP)]
    if sel < 192:
        return derp_endpoint(d.uint(2))
    if sel < 240:
        return str(ipaddress.IPv4Address(d.uint(4))), d.uint(2)
    return str(ipaddress.IPv6Address(d.uint(16))), d.uint(2)


class Harness:
    name = "engine_disco"
    contract = "never raises (drops counted in stats.drops)"
    dictionary = (b"\x01\x00", b"\x02\x00", b"\x03\x00", disco.MAGIC)

    def __init__(self) -> None:
        self._rng = random.Random(11)
        self._w = _World(self._rng)
        self._box = nacl.public.Box(
            nacl.public.PrivateKey(static_disco_private(_KB).raw),
            nacl.public.PublicKey(static_disco_private(_KA).public().raw),
        )

    def _seal(self, plaintext: bytes) -> bytes:
        nonce = self._rng.randbytes(24)
        return (
            disco.MAGIC
            + static_disco_public(_KB.public()).raw
            + bytes(self._box.encrypt(plaintext, nonce))
        )

    def run(self, data: bytes) -> str:
        w = self._w
        w.count += 1
        if w.count > REBUILD:
            w = self._w = _World(self._rng)
        eng = w.engine
        b = _KB.public()
        d = Data(data)
        ops = []
        steps = 0
        while d.remaining() and steps < 16:
            steps += 1
            op = d.byte() & 7
            ops.append(str(op))
            if op == 0:
                src = _endpoint(d)
                who = d.byte() % 3
                derp_src = (None, b, _KC.public())[who]
                eng.receive_disco(self._seal(d.take(d.byte())), src, w.now, derp_src=derp_src)
            elif op == 1:
                eng.receive_disco(d.take(d.uint(2)), _endpoint(d), w.now)
            elif op == 2:
                eng.on_send(b, w.now)
            elif op == 3:
                w.last_tx = eng.ping(b, w.now)
                sent = eng.outgoing()
                if sent:
                    w.last_dest = sent[d.byte() % len(sent)].endpoint
            elif op == 4:
                pong = disco.Pong(w.last_tx, _endpoint(d))
                try:
                    plain = pong.encode()
                except Exception:  # noqa: BLE001 - a fuzzed port may not fit: send raw bytes
                    plain = b"\x02\x00" + w.last_tx + d.take(18)
                eng.receive_disco(self._seal(plain), w.last_dest, w.now + d.byte() / 100)
            elif op == 5:
                w.now += d.byte() / 10
                eng.on_timer(w.now)
            elif op == 6:
                eng.on_receive(b, _endpoint(d), w.now)
            else:
                eng.set_local_endpoints([_endpoint(d) for _ in range(d.byte() % 6)], w.now)
            eng.outgoing()
            eng.events()
            eng.targets(b, w.now)
            eng.status(b, w.now)
        peer = eng._peers[b]
        check(len(peer.candidates) <= MAX_CANDIDATES + 2, f"{len(peer.candidates)} candidates")
        check(len(eng._out.tx._pings) <= MAX_OUTSTANDING_PINGS, "pings in flight over the cap")
        check(len(eng._rx._last_ping_rx) <= 1024, "duplicate-ping memory over its cap")
        return "".join(ops[:6])

    def seeds(self) -> list[bytes]:
        out = []
        for m in golden_messages():
            p = m.encode()
            out.append(Seed().byte(0).byte(0).byte(0).byte(len(p)).raw(p).build())
            out.append(Seed().byte(0).byte(130).uint(900, 2).byte(1).byte(len(p)).raw(p).build())
        out.append(Seed().byte(2).byte(3).byte(0).byte(4).byte(0).byte(5).byte(0).byte(5)
                   .byte(30).byte(5).byte(200).build())  # fmt: skip
        out.append(Seed().byte(6).byte(1).byte(2).byte(5).byte(60).byte(3).byte(1).byte(4).byte(2)
                   .byte(5).byte(5).byte(7).byte(2).byte(0).byte(1).build())  # fmt: skip
        return out

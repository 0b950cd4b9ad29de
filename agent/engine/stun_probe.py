"""Learning our public UDP endpoints from the DERP regions' STUN servers, sans-I/O.

The requests leave from the socket that carries WireGuard, so the mapping a NAT gives them is
the one peers must hit. Every round sends one Binding Request to every configured STUN server;
the daemon sends `on_timer` output on the WireGuard socket and feeds STUN-looking datagrams
back into `receive`. A round repeats every ROUND_INTERVAL (jittered, as tailscaled re-STUNs
every 20-26 s); a server that has not answered within REQUEST_TIMEOUT is noted as unreachable.

    public_endpoints()   the distinct addresses servers saw us as (latest answer per server)
    mapping_varies()     True when two servers saw different ports or addresses: an
                         endpoint-dependent (symmetric) NAT, where hole punching rarely works
    latency(region)      round trip of that region's latest answer
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from agent.proto import stun
from agent.proto.errors import RemoteProtocolError

__all__ = [
    "REQUEST_TIMEOUT",
    "ROUND_INTERVAL",
    "StunServer",
    "StunProber",
]

Endpoint = tuple[str, int]

ROUND_INTERVAL: Final = (20.0, 26.0)  # seconds between rounds, uniform in this range
REQUEST_TIMEOUT: Final = 5.0
FIRST_RETRY: Final = 3.0  # a round with no answer at all is retried sooner


@dataclass(frozen=True, slots=True)
class StunServer:
    region: int
    endpoint: Endpoint


@dataclass(slots=True)
class _Answer:
    mapped: Endpoint
    latency: float
    at: float


class StunProber:
    """STUN rounds against every server; the answers kept per server."""

    def __init__(
        self,
        servers: Sequence[StunServer],
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.servers = tuple(servers)
        self._randbytes = randbytes
        self._pending: dict[bytes, tuple[StunServer, float]] = {}
        self._answers: dict[StunServer, _Answer] = {}
        self._next_round: float | None = None
        self.sent = 0
        self.answered = 0
        self.ignored = 0
        self.changed = False  # set when public_endpoints() changed; the caller clears it

    # --- timers ---------------------------------------------------------------------------------

    def start(self, now: float) -> list[tuple[bytes, Endpoint]]:
        return self._round(now) if self.servers else []

    def next_deadline(self) -> float | None:
        return self._next_round

    def on_timer(self, now: float) -> list[tuple[bytes, Endpoint]]:
        for txid, (_server, sent_at) in list(self._pending.items()):
            if now - sent_at >= REQUEST_TIMEOUT:
                del self._pending[txid]
        if self._next_round is not None and now >= self._next_round:
            return self._round(now)
        return []

    def _round(self, now: float) -> list[tuple[bytes, Endpoint]]:
        out = []
        for server in self.servers:
            txid = stun.new_txid(self._randbytes)
            self._pending[txid] = (server, now)
            out.append((stun.binding_request(txid), server.endpoint))
        self.sent += len(out)
        lo, hi = ROUND_INTERVAL
        if not self._answers:
            lo = hi = FIRST_RETRY
        jitter = int.from_bytes(self._randbytes(2), "big") / 65535
        self._next_round = now + lo + (hi - lo) * jitter
        return out

    # --- answers --------------------------------------------------------------------------------

    def receive(self, data: bytes, src: Endpoint, now: float) -> bool:
        """A datagram that may be a STUN answer; True when it was one of ours."""
        if not stun.is_stun(data):
            return False
        try:
            txid, mapped = stun.parse_response(data)
        except RemoteProtocolError:
            self.ignored += 1
            return True
        entry = self._pending.pop(txid, None)
        if entry is None:
            self.ignored += 1  # late, duplicate or not ours
            return True
        server, sent_at = entry
        before = self.public_endpoints()
        self._answers[server] = _Answer(mapped=mapped, latency=now - sent_at, at=now)
        self.answered += 1
        if self.public_endpoints() != before:
            self.changed = True
        return True

    def public_endpoints(self) -> list[Endpoint]:
        seen: list[Endpoint] = []
        for server in self.servers:
            answer = self._answers.get(server)
            if answer is not None and answer.mapped not in seen:
                seen.append(answer.mapped)
        return seen

    def mapping_varies(self) -> bool | None:
        """None until two servers of one address family answered."""
        by_family: dict[bool, set[Endpoint]] = {}
        for answer in self._answers.values():
            by_family.setdefault(":" in answer.mapped[0], set()).add(answer.mapped)
        counted = [
            len(v)
            for fam, v in by_family.items()
            if sum(1 for a in self._answers.values() if (":" in a.mapped[0]) == fam) >= 2
        ]
        if not counted:
            return None
        return any(n > 1 for n in counted)

    def latency(self, region: int) -> float | None:
        best = [a.latency for s, a in self._answers.items() if s.region == region]
        return min(best) if best else None

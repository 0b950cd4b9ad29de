"""Bookkeeping for queries forwarded upstream: ID rewrite, deadlines, a bound, answer matching.

    client query ──► Responder: Forward ──► ForwardTable.start ──► Sent(upstream_id, wire)
                                               │ full / no upstream: ToClient(SERVFAIL)
    upstream answer ──► ForwardTable.receive ──► ToClient(answer, client ID restored)
                                               ├─ TC over UDP: RetryOverTcp (entry stays)
                                               └─ unknown ID, other question or source: Dropped
    on_timer(now) ──► ToClient(SERVFAIL) for every query past its deadline

Every forwarded query gets a fresh random ID (from the injected `randbytes`) unique among the
outstanding ones, so clients cannot collide with each other and an off-path answer must guess
it; an answer is accepted only from the upstream the query went to and with the same
question (case-insensitively). All queries share one timeout, so deadlines expire in
insertion order and the table is a dict scanned from the front.
"""

from __future__ import annotations

import secrets
import struct
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

import dns.exception
import dns.flags
import dns.message
import dns.rcode

from .drops import DnsDrop
from .responder import (
    HEADER_LEN,
    Dropped,
    Forward,
    Question,
    Transport,
    error_reply,
)

__all__ = [
    "ForwardLimits",
    "ForwardTable",
    "Sent",
    "ToClient",
    "RetryOverTcp",
]

C = TypeVar("C", bound=Hashable)

_U16 = struct.Struct("!H")
_QR: Final = 0x8000
_TC: Final = 0x0200
_PARSE_ERRORS: Final = (dns.exception.DNSException, ValueError, UnicodeError, struct.error)


@dataclass(frozen=True, slots=True)
class ForwardLimits:
    max_outstanding: int = 256  # queries upstream at once; more are answered SERVFAIL
    timeout: float = 5.0  # seconds for an upstream answer, TCP retry included (resolv.conf's)
    max_answer_size: int = 0xFFFF  # larger upstream answers are dropped


@dataclass(frozen=True, slots=True)
class Sent:
    """Send `wire` (the query with its new ID) to the upstream given to `start`."""

    upstream_id: int
    wire: bytes


@dataclass(frozen=True, slots=True)
class ToClient(Generic[C]):
    """Send `wire` to `client` (TCP clients: already length-prefixed)."""

    client: C
    wire: bytes
    rcode: int


@dataclass(frozen=True, slots=True)
class RetryOverTcp:
    """The upstream truncated its UDP answer: ask it again over TCP before `deadline`."""

    upstream_id: int
    wire: bytes  # the query with its upstream ID, unframed
    deadline: float


@dataclass(slots=True)
class _Pending(Generic[C]):
    client: C
    forward: Forward
    upstream: Hashable
    upstream_id: int
    wire: bytes
    deadline: float


class ForwardTable(Generic[C]):
    """Outstanding upstream queries for one DNS service; owned by its task, not thread-safe."""

    def __init__(
        self,
        limits: ForwardLimits | None = None,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        udp_payload: int = 1232,
    ) -> None:
        self.limits = limits or ForwardLimits()
        self._randbytes = randbytes
        self._udp_payload = udp_payload
        self._pending: dict[int, _Pending[C]] = {}
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._pending)

    def _reply(self, forward: Forward, client: C, wire: bytes, rcode: int) -> ToClient[C]:
        if forward.transport is Transport.TCP:
            wire = _U16.pack(len(wire)) + wire
        return ToClient(client, wire, rcode)

    def _servfail(self, forward: Forward, client: C) -> ToClient[C]:
        wire = error_reply(forward.query, dns.rcode.SERVFAIL, self._udp_payload)
        return self._reply(forward, client, wire, dns.rcode.SERVFAIL)

    def _drop(self, reason: DnsDrop) -> Dropped:
        self.counters[f"drop_{reason}"] += 1
        return Dropped(reason)

    def start(
        self, forward: Forward, client: C, upstream: Hashable | None, now: float
    ) -> Sent | ToClient[C]:
        """Track `forward` for `client` towards `upstream` (None: there is none configured)."""
        if upstream is None:
            self._drop(DnsDrop.NO_UPSTREAM)
            return self._servfail(forward, client)
        if len(self._pending) >= self.limits.max_outstanding:
            self._drop(DnsDrop.FORWARD_FULL)
            return self._servfail(forward, client)
        while True:
            upstream_id = int.from_bytes(self._randbytes(2), "big")
            if upstream_id not in self._pending:
                break
        wire = _U16.pack(upstream_id) + forward.wire[2:]
        deadline = now + self.limits.timeout
        self._pending[upstream_id] = _Pending(
            client, forward, upstream, upstream_id, wire, deadline
        )
        self.counters["started"] += 1
        return Sent(upstream_id, wire)

    def receive(
        self, data: bytes, source: Hashable, now: float, *, via_tcp: bool = False
    ) -> ToClient[C] | RetryOverTcp | Dropped:
        """Match an upstream answer (unframed) from `source` to the query it answers."""
        data = bytes(data)
        if len(data) < HEADER_LEN or len(data) > self.limits.max_answer_size:
            return self._drop(DnsDrop.UPSTREAM_MALFORMED)
        upstream_id, flags = struct.unpack_from("!HH", data)
        entry = self._pending.get(upstream_id)
        if entry is None:
            return self._drop(DnsDrop.UPSTREAM_UNKNOWN_ID)
        if source != entry.upstream or not flags & _QR:
            return self._drop(DnsDrop.UPSTREAM_MISMATCH)
        try:
            answer = dns.message.from_wire(data, question_only=True)
        except _PARSE_ERRORS:
            return self._drop(DnsDrop.UPSTREAM_MALFORMED)
        if len(answer.question) != 1 or Question.of(answer) != entry.forward.question:
            return self._drop(DnsDrop.UPSTREAM_MISMATCH)
        if flags & _TC and not via_tcp:
            self.counters["retry_tcp"] += 1
            return RetryOverTcp(upstream_id, entry.wire, entry.deadline)
        del self._pending[upstream_id]
        forward = entry.forward
        rcode = flags & 0xF
        if len(data) > forward.client_limit:
            # The client cannot take it over UDP: header and question with TC, it asks on TCP.
            self.counters["truncated"] += 1
            wire = self._truncated(forward.query, flags)
        else:
            wire = bytes(forward.wire[:2]) + data[2:]
        self.counters["answered"] += 1
        return self._reply(forward, entry.client, wire, rcode)

    def _truncated(self, query: dns.message.Message, flags: int) -> bytes:
        response = dns.message.make_response(query, recursion_available=True)
        response.flags = dns.flags.Flag(flags & 0xFFF0) | dns.flags.TC
        response.set_rcode(dns.rcode.Rcode(flags & 0xF))
        return response.to_wire()

    def next_deadline(self) -> float | None:
        """When `on_timer` next has work: the oldest query's deadline."""
        for entry in self._pending.values():
            return entry.deadline
        return None

    def on_timer(self, now: float) -> list[ToClient[C]]:
        """SERVFAIL to every client whose query is past its deadline; those entries go."""
        out: list[ToClient[C]] = []
        while self._pending:
            upstream_id, entry = next(iter(self._pending.items()))
            if entry.deadline > now:
                break
            del self._pending[upstream_id]
            self._drop(DnsDrop.UPSTREAM_TIMEOUT)
            out.append(self._servfail(entry.forward, entry.client))
        return out

    def clear(self) -> list[ToClient[C]]:
        """SERVFAIL to every outstanding client (the service stops or the upstreams change)."""
        out = [self._servfail(e.forward, e.client) for e in self._pending.values()]
        self._pending.clear()
        return out

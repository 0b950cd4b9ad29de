"""The MagicDNS responder: one query in, one verdict out (answer, forward upstream, or drop).

    query ──► size/header checks ──► dnspython parse ──► zone decision
                │ < 12 B: drop          │ fails: FORMERR     │
                │ > max:  drop          │ opcode: NOTIMP     ├─ <name>.<domain>, <name>: A/AAAA
                │ QR set: drop          │ qdcount != 1:      ├─ unknown in domain: NXDOMAIN
                                           FORMERR           ├─ PTR in overlay reverse zones
                                                             └─ anything else: Forward

Answers are authoritative (AA) for our domain and the overlay's reverse zones, carry `ttl`,
and have no SOA: negative answers are not cached (RFC 2308 §5), so a node that joins resolves
at once. Over UDP an answer larger than the client allows (512, or its EDNS payload capped by
ours) is cut to the header and question with TC set, and the client retries over TCP. TCP
input and output carry the 2-byte length prefix (RFC 1035 §4.2.2).

The `NameTable` is immutable; the owner swaps in a new one when the netmap changes
(`Responder.table = …`), so a lookup never sees half an update.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from agent.proto.errors import LocalProtocolError

from .drops import DnsDrop
from .names import (
    DEFAULT_DOMAIN,
    IPAddress,
    address_from_reverse,
    is_reverse_zone_name,
    is_valid_label,
    normalize_domain,
)

__all__ = [
    "Transport",
    "ResponderConfig",
    "NameTable",
    "Question",
    "Reply",
    "Forward",
    "Dropped",
    "Verdict",
    "Responder",
    "parse_query",
    "error_reply",
    "truncated_reply",
    "client_limit",
    "HEADER_LEN",
    "DNS_PORT",
]

HEADER_LEN: Final = 12
DNS_PORT: Final = 53
UDP_CLASSIC_LIMIT: Final = 512  # a client without EDNS takes no more over UDP (RFC 1035)
TCP_LIMIT: Final = 0xFFFF
_QR: Final = 0x8000
_HEADER = struct.Struct("!HHHHHH")
_U16 = struct.Struct("!H")
# Parse failures dnspython raises for hostile input besides its own DNSException tree.
_PARSE_ERRORS: Final = (dns.exception.DNSException, ValueError, UnicodeError, struct.error)


class Transport(Enum):
    UDP = "udp"
    TCP = "tcp"  # input and output carry the 2-byte length prefix


@dataclass(frozen=True, slots=True)
class ResponderConfig:
    """Limits and answer parameters, fixed for a responder's life."""

    max_query_size: int = 4096  # bytes of DNS message; longer ones are dropped unparsed
    udp_payload: int = 1232  # our EDNS payload size (DNS flag day 2020)
    ttl: int = 5  # short: names follow the netmap live, caches must not outlive a removal


@dataclass(frozen=True, slots=True)
class Question:
    """The question of a query, case-folded: the key answers are matched on."""

    labels: tuple[bytes, ...]  # lowercased, without the root label
    rdtype: int
    rdclass: int

    @classmethod
    def of(cls, message: dns.message.Message) -> Question:
        q = message.question[0]
        labels = tuple(label.lower() for label in q.name.labels if label)
        return cls(labels, int(q.rdtype), int(q.rdclass))


class NameTable:
    """Who answers to what: `<name>.<domain>` -> addresses, and address -> FQDN for PTR.

    Immutable once built; build a new one when the netmap changes and assign it to the
    responder. `records` maps FQDNs (`laptop.mesh.internal`, trailing dot optional) or bare
    labels to the node's overlay addresses.
    """

    __slots__ = ("_by_address", "_by_label", "domain", "domain_labels")

    def __init__(
        self,
        records: Mapping[str, Iterable[IPAddress]] | None = None,
        domain: str = DEFAULT_DOMAIN,
    ) -> None:
        self.domain = normalize_domain(domain)
        self.domain_labels = tuple(label.encode() for label in self.domain.split("."))
        by_label: dict[bytes, tuple[IPAddress, ...]] = {}
        by_address: dict[IPAddress, str] = {}
        for key, addresses in (records or {}).items():
            label = self._label_of(key)
            addrs = tuple(dict.fromkeys(ipaddress.ip_address(a) for a in addresses))
            by_label[label.encode()] = addrs
            for addr in addrs:
                by_address.setdefault(addr, f"{label}.{self.domain}")
        self._by_label = by_label
        self._by_address = by_address

    def _label_of(self, key: str) -> str:
        text = key.strip().rstrip(".").lower()
        suffix = "." + self.domain
        label = text[: -len(suffix)] if text.endswith(suffix) else text
        if not is_valid_label(label):
            raise LocalProtocolError(f"{key!r} is not one label under {self.domain}")
        return label

    def __len__(self) -> int:
        return len(self._by_label)

    def addresses(self, label: bytes) -> tuple[IPAddress, ...] | None:
        """The addresses of the node named `label` (lowercase), None when no node has it."""
        return self._by_label.get(label)

    def name_of(self, address: IPAddress) -> str | None:
        """The FQDN of the node that has `address`."""
        return self._by_address.get(address)


@dataclass(frozen=True, slots=True)
class Reply:
    """Send `wire` back to the client (length-prefixed when the query came over TCP)."""

    wire: bytes
    rcode: dns.rcode.Rcode


@dataclass(frozen=True, slots=True)
class Forward:
    """Not ours: send the query upstream (`ForwardTable.start`), answer the client later."""

    query: dns.message.Message
    wire: bytes  # the query as received, without any TCP prefix
    question: Question
    client_limit: int  # the largest answer the client takes over its transport
    transport: Transport


@dataclass(frozen=True, slots=True)
class Dropped:
    """Nothing to send: the input did not allow an answer."""

    reason: DnsDrop


Verdict = Reply | Forward | Dropped


def client_limit(query: dns.message.Message, transport: Transport, udp_payload: int) -> int:
    """The largest answer the client takes: TCP's 64 KiB, else its EDNS size capped by ours."""
    if transport is Transport.TCP:
        return TCP_LIMIT
    if query.edns >= 0:
        return max(UDP_CLASSIC_LIMIT, min(int(query.payload), udp_payload))
    return UDP_CLASSIC_LIMIT


def _header_only_reply(header: bytes, rcode: dns.rcode.Rcode) -> bytes:
    """A reply built from the query's header alone (ID, opcode, RD), no sections."""
    qid, flags = _HEADER.unpack_from(header)[:2]
    flags = _QR | (flags & 0x7900) | int(rcode)  # keep opcode (0x7800) and RD (0x0100)
    return _HEADER.pack(qid, flags, 0, 0, 0, 0)


def error_reply(
    query: dns.message.Message, rcode: dns.rcode.Rcode, udp_payload: int = 1232
) -> bytes:
    """The query's question echoed with `rcode` (SERVFAIL, REFUSED, NOTIMP, FORMERR)."""
    response = dns.message.make_response(query, recursion_available=True, our_payload=udp_payload)
    response.set_rcode(rcode)
    return response.to_wire()


def truncated_reply(answer: bytes | dns.message.Message, query: dns.message.Message) -> bytes:
    """`answer` cut to header and question with TC set, for a client that must retry on TCP."""
    response = dns.message.make_response(query)
    if isinstance(answer, dns.message.Message):
        response.set_rcode(answer.rcode())
        response.flags = answer.flags
    response.flags |= dns.flags.TC
    return response.to_wire()


def parse_query(wire: bytes) -> dns.message.Message:
    """Parse a query; raises only the dnspython/stdlib parse errors caught by the responder."""
    return dns.message.from_wire(wire, ignore_trailing=False)


class Responder:
    """Answers MagicDNS queries from `table`; everything else becomes a `Forward` verdict.

    Owned by one task (the DNS service); `table` may be replaced at any time between calls.
    """

    def __init__(self, table: NameTable | None = None, config: ResponderConfig | None = None):
        self.table = table if table is not None else NameTable()
        self.config = config or ResponderConfig()
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------------------ entry

    def respond(self, data: bytes, transport: Transport = Transport.UDP) -> Verdict:
        """The verdict on one query message (TCP: with its 2-byte length prefix)."""
        verdict = self._respond(bytes(data), transport)
        if isinstance(verdict, Dropped):
            self.counters[f"drop_{verdict.reason}"] += 1
        elif isinstance(verdict, Forward):
            self.counters["forwarded"] += 1
        else:
            self.counters[f"rcode_{verdict.rcode.name.lower()}"] += 1
            if transport is Transport.TCP:
                return Reply(_U16.pack(len(verdict.wire)) + verdict.wire, verdict.rcode)
        return verdict

    def _respond(self, data: bytes, transport: Transport) -> Verdict:
        if transport is Transport.TCP:
            if len(data) < 2 or _U16.unpack_from(data)[0] != len(data) - 2:
                return Dropped(DnsDrop.BAD_TCP_FRAME)
            data = data[2:]
        if len(data) > self.config.max_query_size:
            return Dropped(DnsDrop.OVERSIZED)
        if len(data) < HEADER_LEN:
            return Dropped(DnsDrop.SHORT)
        if _HEADER.unpack_from(data)[1] & _QR:
            return Dropped(DnsDrop.NOT_QUERY)
        try:
            query = parse_query(data)
        except _PARSE_ERRORS:
            return Reply(_header_only_reply(data, dns.rcode.FORMERR), dns.rcode.FORMERR)
        if query.opcode() != dns.opcode.QUERY:
            return Reply(_header_only_reply(data, dns.rcode.NOTIMP), dns.rcode.NOTIMP)
        if len(query.question) != 1:
            return Reply(_header_only_reply(data, dns.rcode.FORMERR), dns.rcode.FORMERR)
        question = Question.of(query)
        limit = client_limit(query, transport, self.config.udp_payload)
        try:
            return self._decide(query, question, data, transport, limit)
        except _PARSE_ERRORS:  # e.g. an EDNS option dnspython cannot re-encode
            return Reply(_header_only_reply(data, dns.rcode.FORMERR), dns.rcode.FORMERR)

    # ------------------------------------------------------------------------------ zones

    def _decide(
        self,
        query: dns.message.Message,
        question: Question,
        wire: bytes,
        transport: Transport,
        limit: int,
    ) -> Verdict:
        labels = question.labels
        domain = self.table.domain_labels
        ours = len(labels) >= len(domain) and labels[len(labels) - len(domain) :] == domain
        if ours:
            host = labels[: len(labels) - len(domain)]
            if not host:  # the domain itself: exists, holds no records of its own
                return self._answer(query, question, None, limit, dns.rcode.NOERROR)
            if len(host) == 1 and (addrs := self.table.addresses(host[0])) is not None:
                return self._answer(query, question, addrs, limit, dns.rcode.NOERROR)
            return self._answer(query, question, None, limit, dns.rcode.NXDOMAIN)
        if len(labels) == 1 and (addrs := self.table.addresses(labels[0])) is not None:
            return self._answer(query, question, addrs, limit, dns.rcode.NOERROR)
        text = b".".join(labels).decode("ascii", "replace")
        if is_reverse_zone_name(text):
            return self._answer_reverse(query, question, text, limit)
        return Forward(query, wire, question, limit, transport)

    def _answer_reverse(
        self, query: dns.message.Message, question: Question, name: str, limit: int
    ) -> Reply:
        address = address_from_reverse(name)
        owner = self.table.name_of(address) if address is not None else None
        if owner is None:
            # A complete name no node has, or a partial one (an empty non-terminal): NXDOMAIN
            # for the former, NODATA for the latter.
            rcode = dns.rcode.NXDOMAIN if address is not None else dns.rcode.NOERROR
            return self._answer(query, question, None, limit, rcode)
        response = self._response(query)
        if question.rdtype in (dns.rdatatype.PTR, dns.rdatatype.ANY) and self._in(question):
            rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.PTR, owner + ".")
            response.answer.append(
                dns.rrset.from_rdata(query.question[0].name, self.config.ttl, rdata)
            )
        return self._finish(query, response, limit)

    def _in(self, question: Question) -> bool:
        return question.rdclass in (dns.rdataclass.IN, dns.rdataclass.ANY)

    def _answer(
        self,
        query: dns.message.Message,
        question: Question,
        addresses: tuple[IPAddress, ...] | None,
        limit: int,
        rcode: dns.rcode.Rcode,
    ) -> Reply:
        response = self._response(query)
        response.set_rcode(rcode)
        if addresses and self._in(question):
            owner = query.question[0].name
            want4 = question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY)
            want6 = question.rdtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY)
            v4 = [
                dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.A, str(a))
                for a in addresses
                if want4 and a.version == 4
            ]
            v6 = [
                dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.AAAA, str(a))
                for a in addresses
                if want6 and a.version == 6
            ]
            for rdatas in (v4, v6):
                if rdatas:
                    response.answer.append(dns.rrset.from_rdata(owner, self.config.ttl, *rdatas))
        return self._finish(query, response, limit)

    def _response(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(
            query, recursion_available=True, our_payload=self.config.udp_payload
        )
        response.flags |= dns.flags.AA
        return response

    def _finish(
        self, query: dns.message.Message, response: dns.message.Message, limit: int
    ) -> Reply:
        try:
            wire = response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            self.counters["truncated"] += 1
            wire = truncated_reply(response, query)
        return Reply(wire, response.rcode())

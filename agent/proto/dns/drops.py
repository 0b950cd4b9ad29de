"""Why a DNS query, upstream answer or service packet was dropped; counters use these names."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["DnsDrop"]


class DnsDrop(StrEnum):
    """Every reason the DNS service drops something without answering it."""

    SHORT = "short"  # fewer than the 12 header bytes: not even an ID to answer
    OVERSIZED = "oversized"  # longer than the configured maximum query size
    NOT_QUERY = "not_query"  # QR set: a response (or reflection) sent to the responder
    BAD_TCP_FRAME = "bad_tcp_frame"  # the 2-byte length prefix disagrees with the message
    FORWARD_FULL = "forward_full"  # as many queries upstream as allowed: answered SERVFAIL
    NO_UPSTREAM = "no_upstream"  # nowhere to forward to: answered SERVFAIL
    UPSTREAM_TIMEOUT = "upstream_timeout"  # no answer before the deadline: answered SERVFAIL
    UPSTREAM_UNKNOWN_ID = "upstream_unknown_id"  # late, duplicate or spoofed answer
    UPSTREAM_MISMATCH = "upstream_mismatch"  # ID known but question or source differs
    UPSTREAM_MALFORMED = "upstream_malformed"  # the upstream's answer does not parse
    NOT_DNS_PACKET = "not_dns_packet"  # a TUN packet that is not UDP to the service :53
    MALFORMED_PACKET = "malformed_packet"  # bad IP/UDP header or lengths on the service path
    FRAGMENT = "fragment"  # a fragmented IP packet: never reassembled here

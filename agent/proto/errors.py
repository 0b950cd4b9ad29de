"""Errors raised by the protocol cores, and the reasons a packet is dropped.

    ProtocolError
    ├── LocalProtocolError        we misused the API: a bug, let it raise
    └── RemoteProtocolError       the peer (or the network) sent something invalid
        ├── MalformedPacket       wrong size, type or field
        ├── AuthenticationFailed  MAC, AEAD tag or static key did not verify
        ├── ReplayedCounter       transport counter already seen or too old
        ├── ReplayedHandshake     initiation timestamp not newer than the last accepted
        ├── UnknownReceiver       receiver index matches no session or handshake
        ├── UnknownPeer           static key matches no configured peer
        ├── CookieRequired        under load and mac2 missing/invalid: answer with a cookie
        ├── RateLimited           handshake rate limit per source exceeded
        ├── ExpiredSession        keypair past its reject-after time or message limit
        ├── DisallowedSource      inner source address outside the peer's allowed IPs
        └── NotPermitted          a frame the sender's login does not allow (DERP mesh frames)

Receive paths raise only RemoteProtocolError; the caller counts it by `reason` and moves on.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "DropReason",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "MalformedPacket",
    "AuthenticationFailed",
    "ReplayedCounter",
    "ReplayedHandshake",
    "UnknownReceiver",
    "UnknownPeer",
    "CookieRequired",
    "RateLimited",
    "ExpiredSession",
    "DisallowedSource",
    "NotPermitted",
]


class DropReason(StrEnum):
    """Every reason a datagram, packet or frame can be dropped; stats count by these names."""

    MALFORMED = "malformed"
    AUTHENTICATION = "authentication"
    REPLAY = "replay"
    REPLAYED_HANDSHAKE = "replayed_handshake"
    SIMULTANEOUS_INITIATION = "simultaneous_initiation"  # ours is kept (the larger key wins)
    UNKNOWN_RECEIVER = "unknown_receiver"
    UNKNOWN_PEER = "unknown_peer"
    COOKIE_REQUIRED = "cookie_required"
    RATE_LIMITED = "rate_limited"
    EXPIRED_SESSION = "expired_session"
    DISALLOWED_SOURCE = "disallowed_source"
    NO_ROUTE = "no_route"
    NO_ENDPOINT = "no_endpoint"
    QUEUE_FULL = "queue_full"
    NOT_IP = "not_ip"
    SEND_FAILED = "send_failed"
    TUN_WRITE_FAILED = "tun_write_failed"
    NOT_PERMITTED = "not_permitted"
    # The node's packet filter (access control policy)
    FILTER_DENIED = "filter_denied"  # no rule of the policy accepts the flow
    FILTER_NOT_LOCAL = "filter_not_local"  # from the tunnel, but not to this node's addresses
    FILTER_MALFORMED = "filter_malformed"  # the filter could not read the IP header
    # DERP relay (tailscale derpserver's dropReason names)
    UNKNOWN_DEST = "unknown_dest"  # no local client with that key, none on a mesh node
    UNKNOWN_DEST_ON_FWD = "unknown_dest_on_fwd"  # a mesh node forwarded to a key not here
    DUP_CLIENT = "dup_client"  # several connections for the key and none of them active


class ProtocolError(Exception):
    """Base of every error a protocol core raises."""


class LocalProtocolError(ProtocolError):
    """The caller misused a core's API (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The remote side sent something invalid; the packet is dropped and counted."""

    reason: DropReason = DropReason.MALFORMED


class MalformedPacket(RemoteProtocolError):
    reason = DropReason.MALFORMED


class AuthenticationFailed(RemoteProtocolError):
    reason = DropReason.AUTHENTICATION


class ReplayedCounter(RemoteProtocolError):
    reason = DropReason.REPLAY


class ReplayedHandshake(RemoteProtocolError):
    reason = DropReason.REPLAYED_HANDSHAKE


class UnknownReceiver(RemoteProtocolError):
    reason = DropReason.UNKNOWN_RECEIVER


class UnknownPeer(RemoteProtocolError):
    reason = DropReason.UNKNOWN_PEER


class CookieRequired(RemoteProtocolError):
    reason = DropReason.COOKIE_REQUIRED


class RateLimited(RemoteProtocolError):
    reason = DropReason.RATE_LIMITED


class ExpiredSession(RemoteProtocolError):
    reason = DropReason.EXPIRED_SESSION


class DisallowedSource(RemoteProtocolError):
    reason = DropReason.DISALLOWED_SOURCE


class NotPermitted(RemoteProtocolError):
    reason = DropReason.NOT_PERMITTED

"""mac1/mac2 and cookie replies, WireGuard's DoS mitigation (whitepaper §5.4.4, §5.4.7).

Every handshake message ends with two 16-byte MACs:

    mac1 = MAC(HASH(LABEL_MAC1 || receiver's static public), msg[:-32])   always present
    mac2 = MAC(cookie, msg[:-16])                                          zeros without a cookie

A receiver under load answers a message whose mac2 is missing or stale with a CookieReply instead
of doing any DH:

    cookie        = MAC(secret, source address)          secret: 32 random bytes, replaced when
                                                         older than COOKIE_REFRESH_TIME
    reply.cookie  = XAEAD(HASH(LABEL_COOKIE || replier's static public), nonce, cookie,
                          ad = mac1 of the message answered)

The sender decrypts the cookie with the mac1 it last sent and puts mac2 on its next handshake
messages for COOKIE_REFRESH_TIME. CookieChecker is our side as a receiver (one per device);
CookieGenerator is our side as a sender to one peer. `now` is the caller's monotonic clock.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Final

from agent.keys import NodePublic
from agent.proto.errors import AuthenticationFailed, LocalProtocolError, MalformedPacket
from agent.proto.wireguard.constants import (
    COOKIE_REFRESH_TIME,
    INITIATION_SIZE,
    LABEL_COOKIE,
    LABEL_MAC1,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESPONSE_SIZE,
)
from agent.proto.wireguard.crypto import (
    MAC_LEN,
    XNONCE_LEN,
    constant_time_equal,
    hash_,
    mac,
    xaead_decrypt,
    xaead_encrypt,
)
from agent.proto.wireguard.messages import TYPE_WORD, CookieReply

__all__ = ["CookieChecker", "CookieGenerator", "is_handshake_message"]

_SECRET_LEN: Final = 32
_MAC_AREA: Final = 2 * MAC_LEN  # mac1 || mac2 at the end of a handshake message
_ZERO_MAC: Final = bytes(MAC_LEN)
_SIZES: Final = {MSG_INITIATION: INITIATION_SIZE, MSG_RESPONSE: RESPONSE_SIZE}

_Buffer = bytes | bytearray | memoryview


def is_handshake_message(msg: _Buffer) -> bool:
    """True if `msg` has the type word and exact size of an initiation or a response."""
    if len(msg) < TYPE_WORD.size:
        return False
    return _SIZES.get(TYPE_WORD.unpack_from(msg)[0]) == len(msg)


class CookieChecker:
    """Checks the MACs of handshake messages sent to us and makes cookie replies."""

    __slots__ = ("_cookie_key", "_mac1_key", "_randbytes", "_secret", "_secret_set")

    def __init__(
        self, local_public: NodePublic, *, randbytes: Callable[[int], bytes] = secrets.token_bytes
    ) -> None:
        # Static after construction:
        self._mac1_key = hash_(LABEL_MAC1, local_public.raw)
        self._cookie_key = hash_(LABEL_COOKIE, local_public.raw)
        self._randbytes = randbytes
        # Rotated by create_reply:
        self._secret = b""
        self._secret_set: float | None = None

    def _secret_fresh(self, now: float) -> bool:
        return self._secret_set is not None and now - self._secret_set <= COOKIE_REFRESH_TIME

    def check_mac1(self, msg: _Buffer) -> bool:
        """True if `msg` is a whole initiation/response whose mac1 was made for our public key."""
        if not is_handshake_message(msg):
            return False
        view = memoryview(msg)
        expected = mac(self._mac1_key, view[:-_MAC_AREA])
        return constant_time_equal(expected, view[-_MAC_AREA:-MAC_LEN])

    def check_mac2(self, msg: _Buffer, source: bytes, now: float) -> bool:
        """True if mac2 carries a cookie we gave `source` under the current secret."""
        if not is_handshake_message(msg) or not self._secret_fresh(now):
            return False
        view = memoryview(msg)
        cookie = mac(self._secret, source)
        expected = mac(cookie, view[:-MAC_LEN])
        return constant_time_equal(expected, view[-MAC_LEN:])

    def create_reply(self, msg: _Buffer, source: bytes, now: float) -> bytes:
        """A 64-byte CookieReply to the sender of handshake message `msg` (MalformedPacket if
        `msg` is not one). Rotates the secret first when it is older than COOKIE_REFRESH_TIME."""
        if not is_handshake_message(msg):
            raise MalformedPacket("cookie reply requested for a non-handshake message")
        if not self._secret_fresh(now):
            self._secret = self._randbytes(_SECRET_LEN)
            self._secret_set = now
        view = memoryview(msg)
        sender: int = TYPE_WORD.unpack_from(view, 4)[0]
        cookie = mac(self._secret, source)
        nonce = self._randbytes(XNONCE_LEN)
        mac1 = bytes(view[-_MAC_AREA:-MAC_LEN])
        encrypted = xaead_encrypt(self._cookie_key, nonce, cookie, mac1)
        return CookieReply(sender, nonce, encrypted).encode()


class CookieGenerator:
    """Adds mac1/mac2 to the handshake messages we send to one peer; holds that peer's cookie."""

    __slots__ = ("_cookie", "_cookie_key", "_cookie_set", "_last_mac1", "_mac1_key")

    def __init__(self, remote_public: NodePublic) -> None:
        # Static after construction:
        self._mac1_key = hash_(LABEL_MAC1, remote_public.raw)
        self._cookie_key = hash_(LABEL_COOKIE, remote_public.raw)
        # Updated by add_macs / consume_reply:
        self._last_mac1: bytes | None = None
        self._cookie = b""
        self._cookie_set: float | None = None

    def has_cookie(self, now: float) -> bool:
        """True while a cookie is held that is at most COOKIE_REFRESH_TIME old."""
        return self._cookie_set is not None and now - self._cookie_set <= COOKIE_REFRESH_TIME

    def add_macs(self, msg: bytearray, now: float) -> None:
        """Fill mac1 (always) and mac2 (with a fresh cookie, else zeros) in place."""
        if not is_handshake_message(msg):
            raise LocalProtocolError("add_macs needs a whole initiation or response")
        n = len(msg)
        mac1 = mac(self._mac1_key, memoryview(msg)[: n - _MAC_AREA])
        msg[n - _MAC_AREA : n - MAC_LEN] = mac1
        self._last_mac1 = mac1
        if self.has_cookie(now):
            msg[n - MAC_LEN :] = mac(self._cookie, memoryview(msg)[: n - MAC_LEN])
        else:
            msg[n - MAC_LEN :] = _ZERO_MAC

    def consume_reply(self, reply: CookieReply, now: float) -> None:
        """Store the cookie in `reply`; AuthenticationFailed if it does not decrypt with the
        mac1 we last sent (or if we never sent one)."""
        if self._last_mac1 is None:
            raise AuthenticationFailed("cookie reply but no handshake message was sent")
        cookie = xaead_decrypt(
            self._cookie_key, reply.nonce, reply.encrypted_cookie, self._last_mac1
        )
        self._cookie = cookie
        self._cookie_set = now

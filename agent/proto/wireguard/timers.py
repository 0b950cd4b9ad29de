"""Per-peer WireGuard timers as named deadlines, armed and cleared by event hooks.

Semantics follow wireguard-go `device/timers.go` (whitepaper §6). Each hook's docstring is its
contract. `expired(now)` disarms and returns the due timers in a fixed order; the Peer acts on them.
Jitter comes from the injected `randbytes`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from enum import Enum

from agent.proto.wireguard.constants import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
)

__all__ = ["Timer", "PeerTimers"]


class Timer(Enum):
    RETRANSMIT_HANDSHAKE = "retransmit_handshake"
    SEND_KEEPALIVE = "send_keepalive"
    NEW_HANDSHAKE = "new_handshake"
    ZERO_KEY_MATERIAL = "zero_key_material"
    PERSISTENT_KEEPALIVE = "persistent_keepalive"

    # Members are singletons: identity hashing is C-level (Enum's own __hash__ is Python code,
    # and the deadlines dict is looked up on every batch sent or received).
    __hash__ = object.__hash__


_ORDER = tuple(Timer)


class PeerTimers:
    """Deadlines (monotonic seconds or None) for one peer."""

    __slots__ = (
        "_deadline",
        "_on_change",
        "_randbytes",
        "deadlines",
        "need_another_keepalive",
        "persistent_keepalive",
    )

    def __init__(
        self,
        persistent_keepalive: int | None = None,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        on_change: Callable[[float | None], None] | None = None,
    ) -> None:
        self.deadlines: dict[Timer, float | None] = dict.fromkeys(Timer)
        self.persistent_keepalive = persistent_keepalive
        self.need_another_keepalive = False
        self._randbytes = randbytes
        self._deadline: float | None = None
        self._on_change = on_change  # told the earliest deadline whenever it changes

    # -- plumbing ----------------------------------------------------------------------------
    def _jitter(self) -> float:
        return int.from_bytes(self._randbytes(2), "big") / 65536 * REKEY_TIMEOUT_JITTER_MAX

    def _set(self, timer: Timer, at: float | None) -> None:
        self.deadlines[timer] = at
        self._moved(min((d for d in self.deadlines.values() if d is not None), default=None))

    def _moved(self, deadline: float | None) -> None:
        if deadline != self._deadline:
            self._deadline = deadline
            if self._on_change is not None:
                self._on_change(deadline)

    def pending(self, timer: Timer) -> bool:
        return self.deadlines[timer] is not None

    def next_deadline(self) -> float | None:
        return self._deadline

    def expired(self, now: float) -> list[Timer]:
        """Disarm and return every timer whose deadline has passed, in a fixed order."""
        if self._deadline is None or self._deadline > now:
            return []
        due = [t for t in _ORDER if (d := self.deadlines[t]) is not None and d <= now]
        for t in due:
            self.deadlines[t] = None
        self._set(Timer.RETRANSMIT_HANDSHAKE, self.deadlines[Timer.RETRANSMIT_HANDSHAKE])
        return due

    def stop_all(self) -> None:
        for t in Timer:
            self.deadlines[t] = None
        self._moved(None)

    # -- hooks -------------------------------------------------------------------------------
    def on_data_sent(self, now: float) -> None:
        """Data (not keepalive) sent: expect an answer, else start a new handshake."""
        if self.deadlines[Timer.NEW_HANDSHAKE] is None:
            self._set(Timer.NEW_HANDSHAKE, now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter())

    def on_data_received(self, now: float) -> None:
        """Data (not keepalive) received: answer with a keepalive if we send nothing back."""
        if self.deadlines[Timer.SEND_KEEPALIVE] is None:
            self._set(Timer.SEND_KEEPALIVE, now + KEEPALIVE_TIMEOUT)
        else:
            self.need_another_keepalive = True

    def on_authenticated_sent(self) -> None:
        """Any authenticated packet sent: a pending keepalive is no longer needed."""
        if self.deadlines[Timer.SEND_KEEPALIVE] is not None:
            self._set(Timer.SEND_KEEPALIVE, None)

    def on_authenticated_received(self) -> None:
        """Any authenticated packet received: the peer is alive, no new handshake needed."""
        if self.deadlines[Timer.NEW_HANDSHAKE] is not None:
            self._set(Timer.NEW_HANDSHAKE, None)

    def on_authenticated_traversal(self, now: float) -> None:
        """Any authenticated packet sent or received: push the persistent keepalive back."""
        if self.persistent_keepalive:
            self._set(Timer.PERSISTENT_KEEPALIVE, now + self.persistent_keepalive)

    def on_handshake_initiated(self, now: float) -> None:
        """Initiation sent: retransmit after REKEY_TIMEOUT plus jitter."""
        self._set(Timer.RETRANSMIT_HANDSHAKE, now + REKEY_TIMEOUT + self._jitter())

    def expedite_retransmit(self, at: float) -> None:
        """Retransmit the pending initiation no later than `at` (the peer proved reachable)."""
        current = self.deadlines[Timer.RETRANSMIT_HANDSHAKE]
        if current is not None and at < current:
            self._set(Timer.RETRANSMIT_HANDSHAKE, at)

    def on_handshake_complete(self) -> None:
        """Response consumed: stop retransmitting."""
        self._set(Timer.RETRANSMIT_HANDSHAKE, None)

    def on_session_derived(self, now: float) -> None:
        """New keys: forget all key material if nothing happens for 3 x REJECT_AFTER_TIME."""
        self._set(Timer.ZERO_KEY_MATERIAL, now + 3 * REJECT_AFTER_TIME)

    def on_handshake_given_up(self, now: float) -> None:
        """Retries exhausted: stop trying; zero keys later unless already scheduled."""
        self._set(Timer.RETRANSMIT_HANDSHAKE, None)
        self._set(Timer.NEW_HANDSHAKE, None)
        if self.deadlines[Timer.ZERO_KEY_MATERIAL] is None:
            self._set(Timer.ZERO_KEY_MATERIAL, now + 3 * REJECT_AFTER_TIME)

    def on_keepalive_due(self, now: float) -> None:
        """Keepalive timer fired: fire once more later if more data arrived meanwhile."""
        if self.need_another_keepalive:
            self.need_another_keepalive = False
            self._set(Timer.SEND_KEEPALIVE, now + KEEPALIVE_TIMEOUT)

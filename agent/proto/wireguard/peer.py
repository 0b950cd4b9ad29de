"""One WireGuard peer: its handshake, sessions, timers, staged packets and counters.

The Peer is driven by its Device (which demultiplexes datagrams) and by the data plane (which
calls `encrypt`). Every method takes `now`; datagrams it returns go to `peer.endpoint`.

    encrypt(packets)      valid session -> transport datagrams (+ initiation when keys grow old)
                          no session    -> stage packets (bounded) and send an initiation
    on_initiation(...)    responder: accept, answer, put the new keypair in `next`
    on_response(...)      initiator: keys into `current`, flush staged packets (or a keepalive)
    on_transport(...)     bookkeeping once per received batch: rotate `next`, timers, flush
    on_timer(now)         retransmit / keepalive / new handshake / zero keys / persistent keepalive
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from agent.keys import NodePublic, PresharedKey
from agent.proto.errors import DropReason
from agent.proto.wireguard.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_STAGED_PACKETS,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
)
from agent.proto.wireguard.context import DeviceContext
from agent.proto.wireguard.cookie import CookieGenerator
from agent.proto.wireguard.events import (
    Endpoint,
    EndpointChanged,
    Event,
    HandshakeCompleted,
    HandshakeGivenUp,
    KeysZeroed,
)
from agent.proto.wireguard.handshake import ConsumedInitiation, Handshake
from agent.proto.wireguard.session import Keypair, Keypairs
from agent.proto.wireguard.timers import PeerTimers, Timer

RETRY_HANDSHAKE_MIN_INTERVAL = 0.25  # seconds between early initiations (retry_handshake)
SIMULTANEOUS_INITIATION = 1.0  # the peer's initiation this soon after ours: both in flight

# The events are defined in `events` and re-exported here, where they used to live.
__all__ = [
    "RETRY_HANDSHAKE_MIN_INTERVAL",
    "SIMULTANEOUS_INITIATION",
    "Endpoint",
    "Event",
    "HandshakeCompleted",
    "HandshakeGivenUp",
    "KeysZeroed",
    "EndpointChanged",
    "Peer",
]

Buffer = bytes | bytearray | memoryview


class Peer:
    """State of one configured peer. Owned by the Device; not thread-safe (one owner)."""

    def __init__(
        self,
        ctx: DeviceContext[Peer],
        public_key: NodePublic,
        *,
        preshared_key: PresharedKey | None = None,
        endpoint: Endpoint | None = None,
        persistent_keepalive: int | None = None,
    ) -> None:
        self._ctx = ctx
        self.public_key = public_key
        self.handshake = Handshake(
            ctx.local,
            public_key,
            preshared_key.raw if preshared_key else None,
            randbytes=ctx.randbytes,
        )
        self.preshared_key = preshared_key
        self.cookies = CookieGenerator(public_key)
        self.keypairs = Keypairs()
        self.endpoint = endpoint
        self.timers = PeerTimers(
            persistent_keepalive, randbytes=ctx.randbytes, on_change=self._deadline_moved
        )
        self.staged: deque[Buffer] = deque()
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake: float | None = None  # wall seconds
        self.handshake_attempts = 0
        self._last_initiation_sent: float | None = None
        self._initiation_index: int | None = None
        self._sent_last_minute_handshake = False
        # The data plane's fast path for this peer (agent/node/lanes.py), owned by the node
        self.lane: object | None = None

    def __repr__(self) -> str:
        return f"Peer({self.public_key})"

    @property
    def persistent_keepalive(self) -> int | None:
        return self.timers.persistent_keepalive

    def set_persistent_keepalive(self, interval: int | None, now: float) -> list[bytes]:
        """Change the interval; like wireguard-go, send a keepalive at once when turned on."""
        self.timers.persistent_keepalive = interval or None
        return self.keepalive(now) if interval else []

    def set_preshared_key(self, psk: PresharedKey | None) -> None:
        self.preshared_key = psk
        self.handshake.set_preshared_key(psk.raw if psk else None)

    # -- sending -----------------------------------------------------------------------------
    def encrypt(self, packets: Sequence[Buffer], now: float) -> list[bytes]:
        """Transport datagrams for `packets`, or stage them and start a handshake."""
        kp = self.keypairs.current
        if kp is None or not kp.can_send(now):
            self._stage(packets)
            return self._initiate(now)
        out = kp.seal(packets)
        self.tx_bytes += sum(map(len, out))
        out.extend(self.note_sent(now))
        return out

    def note_sent(self, now: float) -> list[bytes]:
        """The timers after data went out on the current session (sealed here, or by a
        data-plane lane with the session's sealer, which counts the bytes itself); an
        initiation to send when the session is due for a new handshake."""
        t = self.timers
        t.on_data_sent(now)
        t.on_authenticated_sent()
        t.on_authenticated_traversal(now)
        kp = self.keypairs.current
        if kp is not None and (
            kp.send_counter > REKEY_AFTER_MESSAGES
            or (kp.is_initiator and now - kp.created > REKEY_AFTER_TIME)
        ):
            return self._initiate(now)
        return []

    def keepalive(self, now: float) -> list[bytes]:
        """An empty transport packet if a session can send (else a handshake starts)."""
        kp = self.keypairs.current
        if kp is None or not kp.can_send(now):
            return self._initiate(now)
        out = kp.seal((b"",))
        self.tx_bytes += len(out[0])
        self.timers.on_authenticated_sent()
        self.timers.on_authenticated_traversal(now)
        return out

    def retry_handshake(self, now: float) -> list[bytes]:
        """The peer just proved reachable (an authenticated DISCO message arrived, possibly
        through a relay it had not joined yet) while our handshake waits without a session:
        a new initiation now instead of at the retransmit timer, at most one per
        RETRY_HANDSHAKE_MIN_INTERVAL (the peer's DISCO messages, each authenticated, are what
        trigger it, so it cannot loop faster). Within that interval the retransmit timer is
        brought forward to its end instead: the
        news must not wait out the full REKEY_TIMEOUT (the first initiation typically went out
        just before the peer joined the relay, and its announcement arrives moments later)."""
        last = self._last_initiation_sent
        if self.keypairs.current is not None or self._initiation_index is None or last is None:
            return []
        if now - last < RETRY_HANDSHAKE_MIN_INTERVAL:
            self.timers.expedite_retransmit(last + RETRY_HANDSHAKE_MIN_INTERVAL)
            return []
        return self._initiate(now, retry=True)

    def _stage(self, packets: Sequence[Buffer]) -> None:
        staged = self.staged
        staged.extend(bytes(p) for p in packets)
        over = len(staged) - MAX_STAGED_PACKETS
        if over > 0:
            for _ in range(over):
                staged.popleft()
            self._ctx.drop(DropReason.QUEUE_FULL, over)

    def _flush_staged(self, now: float) -> list[bytes]:
        if not self.staged:
            return self.keepalive(now)
        packets = list(self.staged)
        self.staged.clear()
        return self.encrypt(packets, now)

    def _initiate(self, now: float, *, retry: bool = False) -> list[bytes]:
        """A new handshake initiation, at most one per REKEY_TIMEOUT unless retrying."""
        if not retry:
            last = self._last_initiation_sent
            if last is not None and now - last < REKEY_TIMEOUT:
                return []
            self.handshake_attempts = 0
        ctx = self._ctx
        if self._initiation_index is not None:
            ctx.indexes.free(self._initiation_index)
        index = ctx.indexes.allocate(self)
        self._initiation_index = index
        msg = self.handshake.create_initiation(index, now + ctx.wall_offset)
        self.cookies.add_macs(msg, now)
        self._last_initiation_sent = now
        self.tx_bytes += len(msg)
        t = self.timers
        t.on_handshake_initiated(now)
        t.on_authenticated_sent()
        t.on_authenticated_traversal(now)
        return [bytes(msg)]

    # -- receiving (called by the Device) ----------------------------------------------------
    def on_initiation(
        self, consumed: ConsumedInitiation, src: Endpoint, now: float
    ) -> bytes | None:
        """Responder: accept a decrypted initiation and return the response datagram.

        None when both sides initiated at once (ours left less than SIMULTANEOUS_INITIATION
        ago, unanswered) and our public key is the larger: we keep our handshake and the peer,
        which sees the same two keys, takes ours and answers it, one round trip. Taking both
        would free each side's own initiation index, so both responses would be unknown and
        the session would wait for the retransmit timer (REKEY_TIMEOUT)."""
        if (
            self._initiation_index is not None
            and self._last_initiation_sent is not None
            and now - self._last_initiation_sent < SIMULTANEOUS_INITIATION
            and self._ctx.local.public.raw > self.public_key.raw
        ):
            self.handshake.note_timestamp(consumed)
            self._ctx.drop(DropReason.SIMULTANEOUS_INITIATION)
            return None
        self.handshake.accept_initiation(consumed, now)
        ctx = self._ctx
        if self._initiation_index is not None:  # theirs replaces ours
            ctx.indexes.free(self._initiation_index)
            self._initiation_index = None
        index = ctx.indexes.allocate(self)
        msg, keys = self.handshake.create_response(index)
        self.cookies.add_macs(msg, now)
        kp = Keypair.from_session_keys(keys, created=now, transport=ctx.transport)
        self.keypairs.install_responder(kp)
        ctx.indexes.bind_keypair(kp, self)
        self._free_dropped()
        self.rx_bytes += 148
        self.tx_bytes += len(msg)
        self.set_endpoint(src)
        t = self.timers
        t.on_session_derived(now)
        t.on_authenticated_received()
        t.on_authenticated_sent()
        t.on_authenticated_traversal(now)
        return bytes(msg)

    def on_response(self, data: Buffer, src: Endpoint, now: float) -> list[bytes]:
        """Initiator: finish our handshake; returns staged packets (or a keepalive) to send."""
        keys = self.handshake.consume_response(data)
        ctx = self._ctx
        kp = Keypair.from_session_keys(keys, created=now, transport=ctx.transport)
        self.keypairs.install_initiator(kp)
        ctx.indexes.bind_keypair(kp, self)
        self._initiation_index = None
        self._free_dropped()
        self.rx_bytes += len(data)
        self.set_endpoint(src)
        self._handshake_complete(now, initiator=True)
        t = self.timers
        t.on_session_derived(now)
        t.on_authenticated_received()
        t.on_authenticated_traversal(now)
        return self._flush_staged(now)

    def on_transport(
        self, kp: Keypair, src: Endpoint, now: float, *, nbytes: int, data: bool
    ) -> list[bytes]:
        """Bookkeeping after a batch of authenticated transport datagrams on `kp`."""
        self.rx_bytes += nbytes
        if self.endpoint != src:
            self.set_endpoint(src)
        out: list[bytes] = []
        if kp is self.keypairs.next:
            self.keypairs.promote_next()
            self._free_dropped()
            self._handshake_complete(now, initiator=False)
            if self.staged:
                out = self._flush_staged(now)
        t = self.timers
        t.on_authenticated_received()
        t.on_authenticated_traversal(now)
        if data:
            t.on_data_received(now)
        cur = self.keypairs.current
        if (
            not self._sent_last_minute_handshake
            and cur is not None
            and cur.is_initiator
            and now - cur.created > REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
        ):
            self._sent_last_minute_handshake = True
            out.extend(self._initiate(now))
        return out

    def set_endpoint(self, src: Endpoint) -> None:
        if self.endpoint != src:
            self.endpoint = src
            self._ctx.events.append(EndpointChanged(self.public_key, src))

    def _handshake_complete(self, now: float, *, initiator: bool) -> None:
        self.timers.on_handshake_complete()
        self.handshake_attempts = 0
        self._sent_last_minute_handshake = False
        self.last_handshake = now + self._ctx.wall_offset
        self._ctx.events.append(HandshakeCompleted(self.public_key, initiator))

    def _free_dropped(self) -> None:
        for old in self.keypairs.take_dropped():
            self._ctx.indexes.free(old.local_index)

    # -- timers ------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        return self.timers.next_deadline()

    def _deadline_moved(self, when: float | None) -> None:
        self._ctx.deadlines.set(self, when)

    def on_timer(self, now: float) -> list[bytes]:
        """Act on every expired timer; returns datagrams for `self.endpoint`."""
        out: list[bytes] = []
        for timer in self.timers.expired(now):
            if timer is Timer.RETRANSMIT_HANDSHAKE:
                if self.handshake_attempts >= MAX_TIMER_HANDSHAKES:
                    self._give_up(now)
                else:
                    self.handshake_attempts += 1
                    out.extend(self._initiate(now, retry=True))
            elif timer is Timer.SEND_KEEPALIVE:
                out.extend(self.keepalive(now))
                self.timers.on_keepalive_due(now)
            elif timer is Timer.NEW_HANDSHAKE:
                out.extend(self._initiate(now))
            elif timer is Timer.ZERO_KEY_MATERIAL:
                self.zero_keys()
            elif timer is Timer.PERSISTENT_KEEPALIVE:
                out.extend(self.keepalive(now))
        return out

    def _give_up(self, now: float) -> None:
        attempts = self.handshake_attempts
        if self.staged:
            self._ctx.drop(DropReason.QUEUE_FULL, len(self.staged))
            self.staged.clear()
        if self._initiation_index is not None:
            self._ctx.indexes.free(self._initiation_index)
            self._initiation_index = None
        self.handshake.clear()
        self.timers.on_handshake_given_up(now)
        self._ctx.events.append(HandshakeGivenUp(self.public_key, attempts))

    def zero_keys(self) -> None:
        """Forget every session and handshake state (timer or peer removal)."""
        self.keypairs.clear()
        self._free_dropped()
        if self._initiation_index is not None:
            self._ctx.indexes.free(self._initiation_index)
            self._initiation_index = None
        self.handshake.clear()
        self._ctx.events.append(KeysZeroed(self.public_key))

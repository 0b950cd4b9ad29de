"""WireGuard protocol core (sans-I/O): handshake, sessions, timers, cookies, cryptokey routing.

`Device` is the entry point: `receive_batch` for UDP input, `route` + `Peer.encrypt` for TUN
output, `on_timer`/`next_deadline` for WireGuard's timers.
"""

from agent.proto.wireguard.device import Device, RxBatch
from agent.proto.wireguard.events import (
    EndpointChanged,
    Event,
    HandshakeCompleted,
    HandshakeGivenUp,
    KeysZeroed,
)
from agent.proto.wireguard.peer import Peer

__all__ = [
    "Device",
    "RxBatch",
    "Peer",
    "Event",
    "HandshakeCompleted",
    "HandshakeGivenUp",
    "KeysZeroed",
    "EndpointChanged",
]

"""The WireGuard core's output outside the packet path, handled for the daemon.

send_timer_output(device, transport, drops, now)   what the core's timers produced
                                                   (handshake retries, keepalives), sent
                                                   over each peer's path; counted drops
                                                   when a peer has none or a send fails
log_events(events, names, handshakes)              one log line per core event; completed
                                                   handshakes counted per peer (metrics)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, MutableMapping

from agent.keys import NodePublic
from agent.log import get_logger
from agent.node.transport import PeerTransport
from agent.proto.errors import DropReason
from agent.proto.wireguard.device import Device
from agent.proto.wireguard.peer import (
    EndpointChanged,
    Event,
    HandshakeCompleted,
    HandshakeGivenUp,
    KeysZeroed,
)

__all__ = ["log_events", "send_timer_output"]

log = get_logger("agent.daemon")


def send_timer_output(
    device: Device, transport: PeerTransport, drops: Counter[DropReason], now: float
) -> None:
    for peer, datagrams in device.on_timer_by_peer(now):
        if not transport.has_path(peer, now):
            drops[DropReason.NO_ENDPOINT] += len(datagrams)
            continue
        dropped = transport.send_to_peer(peer, datagrams, now)
        if dropped:
            drops[DropReason.SEND_FAILED] += dropped


def log_events(
    events: Iterable[Event],
    names: Mapping[NodePublic, str],
    handshakes: MutableMapping[NodePublic, int],
) -> None:
    for ev in events:
        name = names.get(ev.peer, str(ev.peer))
        if isinstance(ev, HandshakeCompleted):
            handshakes[ev.peer] = handshakes.get(ev.peer, 0) + 1
            log.info("handshake complete", peer=name, initiator=ev.initiator)
        elif isinstance(ev, EndpointChanged):
            log.debug("peer endpoint", peer=name, endpoint=f"{ev.endpoint[0]}:{ev.endpoint[1]}")
        elif isinstance(ev, HandshakeGivenUp):
            log.warning("handshake gave up", peer=name, attempts=ev.attempts)
        elif isinstance(ev, KeysZeroed):
            log.info("session keys zeroed", peer=name)

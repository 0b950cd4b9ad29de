"""The node's one STUN sender: every Binding Request leaves the WireGuard socket through here.

Two cores ask for STUN and neither sends it:

    StunProber (engine/stun_probe.py)   rounds that learn our public endpoints for CallMeMaybe
    NetcheckDriver (node/netcheck_cmd)  reports that pick the home DERP region

Both must leave from the socket that carries WireGuard, so the mapping a NAT gives them is the
one peers must hit. `StunSender` sends the prober's rounds (`start`, `on_timer`) and the
netcheck driver's requests (`send_request`, the driver's `send`) with the same function, counts
them, and hands each STUN answer that comes back on the socket to the one that asked: the
running netcheck report first (it claims only its own transaction IDs), then the prober (which
claims every other STUN datagram, so none is mistaken for WireGuard or DISCO).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

from agent.config import DerpConfig
from agent.engine.stun_probe import StunProber, StunServer
from agent.log import get_logger
from agent.node.netcheck_cmd import NetcheckDriver

__all__ = ["StunSender", "stun_servers"]

log = get_logger("agent.daemon")

Endpoint = tuple[str, int]
SendBatch = Callable[[Sequence[bytes], Endpoint], int]  # returns how many were not sent


class StunSender:
    """Sends STUN for the prober and the netcheck driver; routes the answers back.
    Owned by the event loop's thread."""

    def __init__(self, send: SendBatch, prober: StunProber) -> None:
        self._send = send  # static after construction: the WireGuard socket's send_batch
        self.prober = prober
        self.netcheck: NetcheckDriver | None = None  # set once the driver exists
        self.sent = 0  # requests handed to the socket, for both users
        self.failed = 0  # of those, not sent

    def send_request(self, data: bytes, endpoint: Endpoint) -> None:
        """One Binding Request (the netcheck driver's `send`)."""
        self.sent += 1
        self.failed += self._send([data], endpoint)

    def _send_all(self, requests: list[tuple[bytes, Endpoint]]) -> None:
        for data, endpoint in requests:
            self.send_request(data, endpoint)

    def start(self, now: float) -> None:
        """The prober's first round."""
        self._send_all(self.prober.start(now))

    def on_timer(self, now: float) -> None:
        """The prober's timeouts, and its next round when due."""
        self._send_all(self.prober.on_timer(now))

    def next_deadline(self) -> float | None:
        return self.prober.next_deadline()

    def receive(self, data: bytes, src: Endpoint, now: float) -> bool:
        """A datagram from the WireGuard socket; True when it was STUN (then it is consumed)."""
        netcheck = self.netcheck
        if netcheck is not None and netcheck.receive(data, src, now):
            return True
        return self.prober.receive(data, src, now)

    def endpoints_changed(self) -> bool:
        """Whether the prober's public endpoints changed since the last call."""
        changed, self.prober.changed = self.prober.changed, False
        return changed


def stun_servers(derp: DerpConfig) -> list[StunServer]:
    """The DERP map's STUN servers given by IP address (names would need a resolver here)."""
    servers = []
    for region in derp.regions:
        for node in region.nodes:
            if not node.stun_port:
                continue
            try:
                ipaddress.ip_address(node.host)
            except ValueError:
                log.info("STUN server skipped: not an IP address", host=node.host)
                continue
            servers.append(StunServer(region.id, (node.host, node.stun_port)))
    return servers

"""What an authenticated DISCO message means for the WireGuard handshake with that peer.

The engine emits `DiscoAuthenticated(key, ...)` for every DISCO message that opened with a peer's
disco key; the daemon hands it here with that peer's WireGuard state:

    our handshake waits without a session   the peer is reachable now: initiate again at once
                                            (the first initiation may have been lost, e.g.
                                            before the peer had joined the relay), paced by
                                            Peer.retry_handshake
    no session and no handshake at all      we restarted while the peer kept its old session,
                                            or never talked: start one, so the peer does not
                                            wait out WireGuard's 15 s "no reply" timer (one
                                            per REKEY_TIMEOUT, Peer.keepalive)
    a session                               nothing

The result is the datagrams to send to the peer over its current path.
"""

from __future__ import annotations

from agent.engine.events import DiscoAuthenticated
from agent.proto.errors import LocalProtocolError
from agent.proto.wireguard.peer import Peer

__all__ = ["wake_handshake"]


def wake_handshake(event: DiscoAuthenticated, peer: Peer, now: float) -> list[bytes]:
    """The WireGuard datagrams `peer` (the one `event.key` names) should send now."""
    if peer.public_key != event.key:
        raise LocalProtocolError("the event is about another peer")
    datagrams = peer.retry_handshake(now)
    if not datagrams and peer.keypairs.current is None:
        datagrams = peer.keepalive(now)
    return datagrams

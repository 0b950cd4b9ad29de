"""What every peer of one device shares: our identity, the receiver index table, the event
queue, the drop counters and the heap of peer timers. Owned by the Device; each Peer holds it.

Both classes are generic in the peer type, so this module does not import `peer`.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from agent.proto.deadlines import Deadlines
from agent.proto.errors import DropReason
from agent.proto.wireguard.events import Event
from agent.proto.wireguard.handshake import LocalIdentity
from agent.proto.wireguard.session import Keypair
from agent.proto.wireguard.transport import PYTHON, Transport

__all__ = [
    "IndexTable",
    "DeviceContext",
]

P = TypeVar("P", bound=Hashable)


class IndexTable(Generic[P]):
    """Our 32-bit receiver indexes: each names a pending handshake or a live keypair of a peer."""

    __slots__ = ("_randbytes", "handshakes", "keypairs")

    def __init__(self, randbytes: Callable[[int], bytes]) -> None:
        self._randbytes = randbytes
        self.handshakes: dict[int, P] = {}
        self.keypairs: dict[int, tuple[Keypair, P]] = {}

    def allocate(self, peer: P) -> int:
        while True:
            index = int.from_bytes(self._randbytes(4), "little")
            if index not in self.handshakes and index not in self.keypairs:
                self.handshakes[index] = peer
                return index

    def bind_keypair(self, kp: Keypair, peer: P) -> None:
        self.handshakes.pop(kp.local_index, None)
        self.keypairs[kp.local_index] = (kp, peer)

    def free(self, index: int) -> None:
        self.handshakes.pop(index, None)
        self.keypairs.pop(index, None)


@dataclass(slots=True)
class DeviceContext(Generic[P]):
    """What every peer of one device shares. Owned by the Device."""

    local: LocalIdentity
    indexes: IndexTable[P]
    wall_offset: float = 0.0  # wall clock = now + wall_offset (TAI64N, latest handshake)
    randbytes: Callable[[int], bytes] = secrets.token_bytes
    events: deque[Event] = field(default_factory=deque)
    drops: dict[DropReason, int] = field(default_factory=dict)
    deadlines: Deadlines[P] = field(default_factory=Deadlines)  # each peer's earliest timer
    transport: Transport = PYTHON  # who seals and opens transport messages (Python or native)

    def drop(self, reason: DropReason, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n

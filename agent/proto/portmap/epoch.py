"""Has the router lost its mapping table? The epoch rule of RFC 6887 §8.5 (PCP), also applied
to NAT-PMP (RFC 6886 §3.6 states a looser form of the same rule).

Every NAT-PMP/PCP answer carries the server's epoch: seconds since its mapping state began. Two
answers, the server's epochs S0, S1 and our clock readings C0, C1: the state was lost if

    S1 + 2 < S0                                        the epoch went backwards
    or (C1 - C0) + 2 < (S1 - S0) - (S1 - S0) / 16      the server's clock ran ahead of ours
    or (S1 - S0) + 2 < (C1 - C0) - (C1 - C0) / 16      ours ran ahead: the server restarted

Pure; the client feeds `observe()` with each answer's epoch and its `now`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EpochTracker"]


@dataclass(slots=True)
class EpochTracker:
    """The last (server epoch, client time) seen from one server."""

    server: int | None = None
    client: float = 0.0

    def observe(self, epoch: int, now: float) -> bool:
        """Record an answer's epoch; True when the server has lost its state since the last one."""
        lost = False
        if self.server is not None:
            server_delta = epoch - self.server
            client_delta = now - self.client
            lost = (
                epoch + 2 < self.server
                or client_delta + 2 < server_delta - server_delta / 16
                or server_delta + 2 < client_delta - client_delta / 16
            )
        self.server, self.client = epoch, now
        return lost

    def reset(self) -> None:
        self.server, self.client = None, 0.0

"""The path engine's counters (disco messages sent and received, drops by DropReason)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from agent.proto.errors import DropReason

__all__ = ["EngineStats"]


@dataclass(slots=True)
class EngineStats:
    """Counters. `drops` uses DropReason values: malformed, authentication, unknown_peer,
    send_failed (a peer disco key that cannot be used)."""

    drops: Counter[DropReason] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)  # "ping" / "pong" / "call_me_maybe"
    sent: Counter[str] = field(default_factory=Counter)
    duplicate_pings: int = 0
    unmatched_pongs: int = 0
    silence_probes: int = 0  # heartbeat pings sent early: the direct path went silent
    relayed_fallbacks: int = 0  # trust ended because the peer's data came through DERP
    birthday_rounds: int = 0  # birthday rounds as the hard side (extra sockets opened)
    birthday_probe_rounds: int = 0  # birthday rounds as the easy side (ports guessed)
    birthday_pings: int = 0  # pings of those rounds (from extra sockets, or to guessed ports)
    birthday_hits: int = 0  # a guessed port answered, or an extra socket heard the peer
    birthday_misses: int = 0  # hard rounds that ended without a hit

    def counters(self) -> dict[str, int]:
        """Every counter under one flat name (for metrics): sent_ping, received_pong,
        dropped_malformed, silence_probes, ..."""
        out = {f"sent_{k}": v for k, v in self.sent.items()}
        out.update({f"received_{k}": v for k, v in self.received.items()})
        out.update({f"dropped_{k.value}": v for k, v in self.drops.items()})
        out["duplicate_pings"] = self.duplicate_pings
        out["unmatched_pongs"] = self.unmatched_pongs
        out["silence_probes"] = self.silence_probes
        out["relayed_fallbacks"] = self.relayed_fallbacks
        for name in (
            "birthday_rounds",
            "birthday_probe_rounds",
            "birthday_pings",
            "birthday_hits",
            "birthday_misses",
        ):
            out[name] = getattr(self, name)
        return out

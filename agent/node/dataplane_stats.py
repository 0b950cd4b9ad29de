"""The data plane's counters (node/dataplane.py), which the lanes' bookkeeping adds to too
(node/lane_keeper.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from agent.proto.errors import DropReason

__all__ = ["DataPlaneStats"]


@dataclass(slots=True)
class DataPlaneStats:
    """Counters. tx = from the TUN towards peers, rx = from peers into the TUN.

    `tx_packets`/`tx_bytes` count plaintext IP packets after segmentation, `rx_packets`/
    `rx_bytes` plaintext packets handed to the TUN; `*_datagrams`/`*_wire_bytes` count UDP.
    """

    tun_reads: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_datagrams: int = 0
    tx_wire_bytes: int = 0
    udp_reads: int = 0
    rx_datagrams: int = 0
    rx_wire_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    tun_writes: int = 0
    local: int = 0  # packets from the TUN that a service of this node took (on_local)
    lane_tx_packets: int = 0  # of tx_packets, those a lane sealed and sent (node/lanes.py)
    lane_rx_packets: int = 0  # of rx_packets, those a lane opened and wrote
    # what the lanes' own thread handed over (node/lane_pump.py): a batch with work for Python,
    # or a sum of batches of lanes alone
    pump_batches: int = 0
    drops: Counter[DropReason] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int | dict[str, int]]:
        out: dict[str, int | dict[str, int]] = {
            name: getattr(self, name) for name in self.__slots__ if name != "drops"
        }
        out["drops"] = {str(k): v for k, v in self.drops.items()}
        return out

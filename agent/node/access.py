"""Access control in the node: the policy's packet filter between the tunnel and the TUN.

The rules come from the coordinator's netmap (`NetMap.packet_filter`: the rules whose
destination is this node) or, for a node with static peers, from `[interface] policy_file`
(Tailscale's policy syntax, compiled here for this node alone). No rules = no filter: every
packet passes and the data plane pays nothing (one `is None` test per batch).

With rules, every plaintext packet from a peer is checked before it reaches the TUN
(`agent.policy.filter.PacketFilter.check_batch`, a decrypted batch at a time, one clock read per
batch); packets this node sends into the tunnel open flows whose replies pass (`note_outbound`),
until they have been idle for a while (the filter's flow tables, timed by this clock). Which
peer a packet came from needs no second check here: the WireGuard device already dropped any
packet whose source is outside its sender's allowed IPs (`disallowed_source`), so the filter
is handed one set of sources that admits them all.

Drops are counted in the data plane's drops as `filter_denied` (and `filter_not_local`,
`filter_malformed`); a denied flow is logged at most once a minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Interface, IPv6Interface, ip_network
from typing import Final

from agent.log import get_logger
from agent.policy.filter import FastView, FilterDrop, PacketFilter, PeerSources
from agent.policy.rules import FilterRule
from agent.proto.errors import DropReason

__all__ = ["Access", "DROP_OF"]

log = get_logger("agent.access")

Buffer = bytes | bytearray | memoryview
# The filter's reasons as the node's drop counters name them.
DROP_OF: Final = {
    FilterDrop.DENIED: DropReason.FILTER_DENIED,
    FilterDrop.NOT_LOCAL: DropReason.FILTER_NOT_LOCAL,
    FilterDrop.MALFORMED: DropReason.FILTER_MALFORMED,
    FilterDrop.SPOOFED_SOURCE: DropReason.DISALLOWED_SOURCE,
}
_ANY_SOURCE: Final = PeerSources((ip_network("0.0.0.0/0"), ip_network("::/0")))


class Access:
    """The filter of one interface; `filter` is None while no policy applies."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.filter: PacketFilter | None = None
        self.rules: tuple[FilterRule, ...] | None = None

    def set_rules(
        self,
        rules: tuple[FilterRule, ...] | None,
        addresses: Iterable[IPv4Interface | IPv6Interface],
    ) -> None:
        """New rules (None: no policy, everything passes). Open flows survive a change."""
        if rules == self.rules:
            return
        local = [a.ip for a in addresses]
        if rules is None:
            if self.filter is not None:
                log.info("packet filter off: no policy")
            self.filter = None
        elif self.filter is None:
            self.filter = PacketFilter(rules, local)
            log.info("packet filter on", rules=len(rules))
        else:
            self.filter.update_rules(rules, local)
            log.info("packet filter updated", rules=len(rules))
        self.rules = rules

    def inbound(self, packets: Sequence[Buffer], drops: dict[DropReason, int]) -> list[Buffer]:
        """The packets the filter lets through to the TUN; the others counted in `drops`."""
        f = self.filter
        if f is None:
            return list(packets)
        now = self.clock()
        passed, dropped = f.check_batch(packets, _ANY_SOURCE, now)
        for pkt, why in dropped:
            reason = DROP_OF[why]
            drops[reason] = drops.get(reason, 0) + 1
            if why is FilterDrop.DENIED:
                flow = f.flow_of(pkt)
                if flow is not None and f.should_log(flow, now):
                    log.info("packet denied by policy", flow=str(flow))
        return passed

    def fast_view(self) -> FastView | None:
        """The filter's decision tables for the compiled data plane; None without a filter."""
        f = self.filter
        return None if f is None else f.fast_view(_ANY_SOURCE)

    def outbound(self, packet: Buffer) -> None:
        """A packet this node sends into the tunnel: its replies may come back."""
        f = self.filter
        if f is None:
            return
        try:  # TCP keeps no state in the filter (its replies are not SYNs): skip the clock
            if (packet[9] if packet[0] >> 4 == 4 else packet[6]) == 6:
                return
        except IndexError:
            return
        f.note_outbound(packet, self.clock())

"""Netmaps from one Snapshot: what each node sees, computed once per snapshot, joined per request.

    Snapshot (nodes, policy text, version)
        │  once per snapshot
        ├── fragments   each node's NodeInfo JSON (with its user and tags), encoded once
        ├── compiled    CompiledPolicy(policy, the nodes live then); None = no policy
        │  once per node per snapshot, when first asked
        ├── peers       compiled.peers_of(node): the nodes it may exchange traffic with, either
        │               direction (no policy: every other node), in id order
        └── filter      `"packet_filter":RULES` = compiled.filter_for(node) (no policy: null)
        │  per request
        └── body        {"version","self","peers":[live peers],"packet_filter","dns_domain",
                         "ipv4_range","ipv6_range","derp"} (NetMap.parse's layout)

A change of policy or of any node is a new version, so a new Snapshot and a new SnapshotNetmaps.
A stored policy that no longer parses (the database edited by hand: `policy set` checks what it
stores) fails closed: no peers and an empty filter for everyone.
"""

from __future__ import annotations

import json

from agent.coordinator.identity import load_policy, policy_nodes
from agent.coordinator.records import NodeRecord, Snapshot
from agent.policy.compile import CompiledPolicy
from agent.policy.errors import PolicyError
from agent.policy.model import parse_policy
from agent.policy.rules import rules_to_json

__all__ = ["SnapshotNetmaps"]

_NO_FILTER = b'"packet_filter":null'
_DENY_ALL = "{}"  # a policy without rules


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class SnapshotNetmaps:
    """The netmaps of one snapshot. Built on the server's loop; never touches the database."""

    def __init__(self, snapshot: Snapshot, *, tail: bytes, dns_domain: str, now: float) -> None:
        self.snapshot = snapshot
        self._tail = b'"dns_domain":' + _dumps(dns_domain) + b"," + tail
        self.fragments: dict[int, tuple[NodeRecord, bytes]] = {
            n.id: (n, _dumps(n.info().to_json())) for n in snapshot.nodes
        }
        self.compiled: CompiledPolicy | None = None
        if snapshot.policy is not None:
            try:
                policy = load_policy(snapshot.policy)
            except PolicyError:
                policy = parse_policy(_DENY_ALL)
            live = [n for n in snapshot.nodes if not n.expired(now)]
            self.compiled = CompiledPolicy(policy, policy_nodes(live))
        self._peers: dict[int, tuple[int, ...]] = {}
        self._filters: dict[int, bytes] = {}

    def peers_of(self, node_id: int) -> tuple[int, ...]:
        """The ids of the nodes `node_id` may exchange traffic with, in id order."""
        found = self._peers.get(node_id)
        if found is None:
            if self.compiled is None:
                found = tuple(i for i in self.fragments if i != node_id)
            elif node_id in self.compiled.nodes:
                found = tuple(sorted(self.compiled.peers_of(node_id)))
            else:
                found = ()  # expired when the snapshot was compiled
            self._peers[node_id] = found
        return found

    def _filter(self, node_id: int) -> bytes:
        found = self._filters.get(node_id)
        if found is None:
            if self.compiled is None:
                found = _NO_FILTER
            elif node_id in self.compiled.nodes:
                rules = rules_to_json(self.compiled.filter_for(node_id))
                found = b'"packet_filter":' + _dumps(rules)
            else:
                found = b'"packet_filter":[]'
            self._filters[node_id] = found
        return found

    def body(self, node_id: int, now: float) -> bytes:
        """The netmap of `node_id` (which must be in the snapshot), peers expired by `now` left
        out."""
        me = self.fragments[node_id][1]
        peers = b",".join(
            frag
            for node, frag in (self.fragments[i] for i in self.peers_of(node_id))
            if not node.expired(now)
        )
        return b"".join(
            (
                b'{"version":%d,"self":' % self.snapshot.version,
                me,
                b',"peers":[',
                peers,
                b"],",
                self._filter(node_id),
                b",",
                self._tail,
            )
        )

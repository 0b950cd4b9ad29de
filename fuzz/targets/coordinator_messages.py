"""Coordinator wire messages (agent/proto/coordinator_messages): every `parse`, derp_from_json,
NodeInfo.from_json and parse_endpoint.

Contract: parse raises only BadMessage (a MalformedPacket); parse_endpoint raises ValueError.
Invariant: a parsed message re-encodes to bytes that parse to the same message.
"""

from __future__ import annotations

import json
import math

from agent.proto import coordinator_messages as netmap
from agent.proto.coordinator_messages import BadMessage
from fuzz.common import Data, Seed, check, tag

_KEY = "pv3xaF61kkWFO9GXW4A27eB3xX2fXq1wc1iz7cslgDE="
_NODE = (
    f'{{"id":1,"name":"a","node_key":"{_KEY}","disco_key":"{_KEY}","addresses":["100.64.0.1",'
    '"fd7a:115c:a1e0::1"],"endpoints":["198.18.0.1:41641","[2001:db8::1]:41641"],'
    '"home_region":900,"key_expiry":1.7e9}'
)
_DERP = (
    '{"regions":[{"id":900,"code":"lab","nodes":[{"host":"198.18.0.10","port":443,'
    '"stun_port":3478,"ca_file":null,"insecure_skip_verify":false}]}]}'
)
_RANGES = '"ipv4_range":"100.64.0.0/10","ipv6_range":"fd7a:115c:a1e0::/48"'
_GOLDEN: tuple[tuple[int, str], ...] = (
    (0, '{"error":"bad_request","message":"x"}'),
    (1, f'{{"public_key":"{_KEY}","time":1700000000.5}}'),
    (2, '{{"node_key":"{}","nonce":"{}","sealed":"AAAA"}}'.format(_KEY, "A" * 32)),
    (3, '{"nonce":"%s","sealed":"AAAA"}' % ("A" * 32)),
    (
        4,
        f'{{"auth_key":"agentkey-00","disco_key":"{_KEY}","hostname":"h","endpoints":'
        '["198.18.0.1:41641"],"home_region":900,"timestamp":1700000000}',
    ),
    (5, f'{{"disco_key":"{_KEY}","endpoints":[],"home_region":null}}'),
    (6, f'{{"node":{_NODE},"token":"t",{_RANGES},"derp":{_DERP}}}'),
    (7, f'{{"version":3,"self":{_NODE},"peers":[{_NODE}],{_RANGES},"derp":{_DERP}}}'),
    (8, _DERP),
    (9, _NODE),
    (10, "198.18.0.1:41641"),
    (10, "[2001:db8::1]:1"),
)
_PARSERS = (
    netmap.ErrorBody, netmap.ServerKey, netmap.SealedRequest, netmap.SealedResponse,
    netmap.RegisterRequest, netmap.UpdateRequest, netmap.Registration, netmap.NetMap,
)  # fmt: skip


class Harness:
    name = "coordinator_messages"
    contract = "BadMessage (parse_endpoint: ValueError)"
    dictionary = (b'"', b":", b",", b"{", b"[", b"null", b"NaN", b"1e999", b'"node_key"',
                  b'"endpoints"', b'"derp"', b'"regions"', b'"nodes"', _KEY.encode())  # fmt: skip

    def run(self, data: bytes) -> str:
        d = Data(data)
        mode = d.byte() % 11
        body = d.rest()
        try:
            if mode < len(_PARSERS):
                msg = _PARSERS[mode].parse(body)
                again = type(msg).parse(msg.encode())
                if "nan" not in repr(msg):
                    check(again == msg, f"{type(msg).__name__} does not survive encode/parse")
                return f"{mode}:ok"
            if mode == 10:
                try:
                    ep = netmap.parse_endpoint(body.decode("utf-8", "replace"))
                except ValueError as exc:
                    return f"ep:{tag(exc)[:12]}"
                check(netmap.parse_endpoint(netmap.format_endpoint(ep)) == ep, "endpoint trip")
                return "ep:ok"
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):
                return "json"
            if mode == 8:
                derp = netmap.derp_from_json(doc)
                check(netmap.derp_from_json(netmap.derp_to_json(derp)) == derp, "derp trip")
            else:
                node = netmap.NodeInfo.from_json(doc, "n")
                ok = node.key_expiry is None or math.isfinite(node.key_expiry)
                if ok:
                    check(netmap.NodeInfo.from_json(node.to_json(), "n") == node, "node trip")
            return f"{mode}:ok"
        except BadMessage as exc:
            return f"{mode}:{tag(exc)[:16]}"

    def seeds(self) -> list[bytes]:
        return [Seed().byte(m).raw(t.encode()).build() for m, t in _GOLDEN]

"""The control API schema (agent/api.py): Request.parse, Response.parse, Status.from_json.

Contract: ApiError (a ValueError) for a line that does not follow the schema; nothing else.
Invariant: a parsed request/response/status re-encodes to a line that parses to the same value.
"""

from __future__ import annotations

import math

from agent.api import ApiError, Request, Response, Status
from fuzz.common import Data, Seed, check, tag

_STATUS = (
    '{"interface": "agent0", "public_key": "pv3xaF61kkWFO9GXW4A27eB3xX2fXq1wc1iz7cslgDE=", '
    '"listen_port": 41641, "addresses": ["100.64.0.1/32"], "derp": {"home_region": 900, '
    '"connected_regions": [900]}, "peers": [{"name": "b", "public_key": "x", "path": "direct", '
    '"endpoint": "198.18.0.2:41641", "latency_ms": 1.5, "rx_bytes": 1, "tx_bytes": 2}], '
    '"drops": {"malformed": 3}, "dataplane": {"offload": true}}'
)


def _finite(obj: object) -> bool:
    return (
        "nan" not in repr(obj)
        and "inf" not in repr(obj)
        and not (isinstance(obj, float) and not math.isfinite(obj))
    )


class Harness:
    name = "control_api"
    contract = "ApiError"
    dictionary = (b'"op"', b'"status"', b'"ping"', b'"ok"', b"true", b"false", b'"result"',
                  b'"peers"', b'"drops"', b'"derp"', b"{", b"[", b"NaN", b"Infinity")  # fmt: skip

    def run(self, data: bytes) -> str:
        d = Data(data)
        mode = d.byte() % 3
        line = d.rest()
        try:
            if mode == 0:
                req = Request.parse(line)
                if _finite(req):
                    check(Request.parse(req.encode()) == req, "request trip")
            elif mode == 1:
                res = Response.parse(line)
                if _finite(res):
                    check(Response.parse(res.encode()) == res, "response trip")
            else:
                st = Status.from_json(line)
                if _finite(st):
                    check(Status.from_json(st.to_json()) == st, "status trip")
        except ApiError as exc:
            return f"{mode}:{tag(exc)[:20]}"
        return f"{mode}:ok"

    def seeds(self) -> list[bytes]:
        return [
            Seed().byte(0).raw(b'{"op": "status"}').build(),
            Seed().byte(0).raw(b'{"op": "ping", "peer": "b", "count": 3}\n').build(),
            Seed().byte(1).raw(b'{"ok": true, "result": ' + _STATUS.encode() + b"}").build(),
            Seed().byte(1).raw(b'{"ok": false, "error": "unknown op"}').build(),
            Seed().byte(2).raw(_STATUS.encode()).build(),
        ]

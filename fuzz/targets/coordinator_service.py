"""The coordinator's request handling, apart from sockets: Service.handle (and netmap_reply).

Contract (agent/coordinator/service.py): every request becomes a Reply (errors as
`{"error": code}` bodies with the documented statuses) or a WaitForNetmap; handle never raises.
Runs on a throwaway SQLite database holding one registered node (its bearer token is known)
and a reusable auth key.

Input: method byte, target selector byte, authorization selector byte, then the body; mode
bit 7 of the method byte seals the body (as a RegisterRequest plaintext) with a real node key,
so the JSON inside a register request is reached.
"""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

from agent.config import DerpConfig, DerpNode, DerpRegion
from agent.coordinator.config import CoordinatorConfig
from agent.coordinator.service import Reply, Service, WaitForNetmap
from agent.coordinator.store import Store
from agent.keys import DiscoPrivate, NodePrivate
from agent.proto.coordinator_messages import API, ErrorBody, seal
from fuzz.common import Data, Seed, check

_STATUSES = {200, 400, 401, 403, 404, 405, 409, 413, 503}
_METHODS = ("GET", "POST", "HEAD", "PUT", "get", "")
_TARGETS = ("/key", "/register", "/update", "/netmap", "/netmap?since=1", "/netmap?since=x",
            "/netmap?since=99999999999999999999", "/nope", "")  # fmt: skip
_NODE = NodePrivate.from_hex("a8" * 31 + "40")
_OTHER = NodePrivate.from_hex("c8" * 31 + "60")
NOW = 1_700_000_000.0


class Harness:
    name = "coordinator_service"
    contract = "never raises: errors become Reply(status, error body)"
    dictionary = (b'"auth_key"', b'"disco_key"', b'"hostname"', b'"endpoints"',
                  b'"home_region"', b'"timestamp"', b"1700000000", b'"node_key"', b'"nonce"',
                  b'"sealed"', b"{", b"[", b"NaN", b"Infinity", b"-0")  # fmt: skip

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fuzz-coord-")
        self._dir = Path(self._tmp.name)
        derp = DerpConfig(
            regions=(
                DerpRegion(id=900, code="lab", nodes=(DerpNode(host="127.0.0.1", port=8443),)),
            )
        )
        self._cfg = CoordinatorConfig(database=str(self._dir / "db.sqlite"), derp=derp)
        store = Store.open(self._cfg.database)
        self._auth, _ = store.create_auth_key(reusable=True, expires=None, now=NOW)
        _, self._token = store.register_node(
            auth_key=self._auth, node_key=_NODE.public(),
            disco_key=DiscoPrivate.from_hex("11" * 32).public(), hostname="a", endpoints=(),
            home_region=900, timestamp=NOW, key_lifetime=None,
            ipv4_range=self._cfg.ipv4_range, ipv6_range=self._cfg.ipv6_range, now=NOW,
        )  # fmt: skip
        self._service = Service(store, self._cfg, randbytes=lambda n: bytes(n))
        self._store = store
        self._pub = self._service.server_key.public().raw
        self._t = NOW

    def close(self) -> None:
        self._store.close()
        self._tmp.cleanup()

    def run(self, data: bytes) -> str:
        d = Data(data)
        m = d.byte()
        method = _METHODS[m % len(_METHODS)]
        target = API + _TARGETS[d.byte() % len(_TARGETS)]
        a = d.byte()
        auth = (None, f"Bearer {self._token}", "Bearer nope", "bearer", "")[a % 5]
        body = d.rest()
        self._t += 0.001
        if m & 0x80:
            key = (_NODE, _OTHER)[(m >> 6) & 1]
            text = body.replace(b"@TS@", repr(self._t).encode()).replace(
                b"@AUTH@", self._auth.encode()
            )
            nonce = bytes(24)
            body = json.dumps({
                "node_key": key.public().to_b64(),
                "nonce": base64.b64encode(nonce).decode(),
                "sealed": base64.b64encode(seal(key, self._pub, text, nonce)).decode(),
            }).encode()  # fmt: skip
            method, target = "POST", f"{API}/register"
        reply = self._service.handle(method, target, auth, body, self._t)
        if isinstance(reply, WaitForNetmap):
            r2 = self._service.netmap_reply(reply.node_id, self._store.snapshot(), self._t)
            check(r2.status in _STATUSES, f"netmap status {r2.status}")
            return "wait"
        check(isinstance(reply, Reply), "not a Reply")
        check(reply.status in _STATUSES, f"status {reply.status}")
        if reply.status != 200:
            ErrorBody.parse(reply.body)
        return f"{method}:{target[-8:]}:{reply.status}"

    def seeds(self) -> list[bytes]:
        disco = DiscoPrivate.from_hex("22" * 32).public().to_b64()
        reg = (
            b'{"auth_key":"@AUTH@","disco_key":"%s","hostname":"h","endpoints":'
            b'["198.18.0.1:41641"],"home_region":900,"timestamp":@TS@}' % disco.encode()
        )
        upd = b'{"disco_key":"%s","endpoints":["[2001:db8::1]:1"],"home_region":null}' % (
            disco.encode()
        )
        return [
            Seed().byte(0).byte(0).byte(0).build(),
            Seed().byte(0x80).byte(0).byte(0).raw(reg).build(),
            Seed().byte(0xC0).byte(0).byte(0).raw(reg).build(),
            Seed().byte(1).byte(2).byte(1).raw(upd).build(),
            Seed().byte(0).byte(3).byte(1).build(),
            Seed().byte(0).byte(4).byte(1).build(),
            Seed().byte(1).byte(1).byte(0).raw(b'{"node_key":"x"}').build(),
        ]

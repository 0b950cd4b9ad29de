"""The UAPI request reader and `set=1`/`get=1` handling (agent/node/uapi.py).

Contract: `apply_set` returns (0 or EINVAL, datagrams) and never raises; a request that is
refused changes nothing (the `get=1` dump is the same before and after); `_read_request`
returns the lines or None, never raises. The input is the raw bytes of a UAPI connection;
mode byte bit 0 sends them through the asyncio reader first (slower, so only half the time).
"""

from __future__ import annotations

import asyncio
from ipaddress import ip_network

from agent.keys import NodePrivate, PresharedKey
from agent.node.uapi import EINVAL, MAX_REQUEST_BYTES, _read_request, apply_set, format_get
from agent.proto.wireguard.device import Device
from fuzz.common import Data, Seed, check

_KEY = NodePrivate.from_hex("a8" * 31 + "40")
_PEER = NodePrivate.from_hex("b0" * 31 + "50").public()
_PEER2 = NodePrivate.from_hex("c8" * 31 + "60").public()
LISTEN_PORT = 51820


def _device() -> Device:
    dev = Device(_KEY, randbytes=lambda n: bytes(n))
    dev.add_peer(_PEER, endpoint=("198.18.0.2", 51820), allowed_ips=[ip_network("10.0.0.0/24")])
    return dev


class Harness:
    name = "uapi"
    contract = "never raises: apply_set answers 0 or EINVAL (-22)"
    dictionary = (b"set=1\n", b"get=1\n", b"\n\n", b"public_key=" + _PEER.to_hex().encode(),
                  b"private_key=", b"listen_port=51820", b"replace_peers=true", b"remove=true",
                  b"update_only=true", b"preshared_key=", b"endpoint=[::1]:1", b"endpoint=",
                  b"persistent_keepalive_interval=25", b"replace_allowed_ips=true",
                  b"allowed_ip=", b"protocol_version=1", b"fwmark=0", b"/0", b"=")  # fmt: skip

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._dev = _device()
        self._clean = format_get(self._dev, LISTEN_PORT)

    def close(self) -> None:
        self._loop.close()

    def _read(self, raw: bytes) -> list[list[str]]:
        async def read_all() -> list[list[str]]:
            reader = asyncio.StreamReader(limit=MAX_REQUEST_BYTES, loop=self._loop)
            reader.feed_data(raw)
            reader.feed_eof()
            out = []
            while (req := await _read_request(reader)) is not None and req:
                out.append(req)
            return out

        return self._loop.run_until_complete(read_all())

    def run(self, data: bytes) -> str:
        d = Data(data)
        mode = d.byte()
        raw = d.rest()
        if mode & 1:
            requests = self._read(raw)
        else:
            text = raw.decode("utf-8", "replace")
            requests = [text.split("\n")]
        if format_get(self._dev, LISTEN_PORT) != self._clean:
            self._dev = _device()
        dev = self._dev
        outcome = []
        for req in requests:
            before = format_get(dev, LISTEN_PORT)
            op, body = (req[0], req[1:]) if mode & 1 else ("set=1", req)
            if op != "set=1":
                outcome.append("op")
                continue
            errno, out = apply_set(dev, body, listen_port=LISTEN_PORT, now=100.0)
            check(errno in (0, EINVAL), f"errno {errno}")
            if errno:
                check(format_get(dev, LISTEN_PORT) == before, "a refused set changed the device")
                check(not out, "a refused set sent datagrams")
            outcome.append(str(errno))
        return ",".join(outcome[:4])

    def seeds(self) -> list[bytes]:
        psk = PresharedKey.from_hex("01" * 32)
        set_body = "\n".join([
            "replace_peers=true", f"public_key={_PEER.to_hex()}", f"preshared_key={psk.to_hex()}",
            "endpoint=198.18.0.2:51820", "persistent_keepalive_interval=25",
            "replace_allowed_ips=true", "allowed_ip=10.0.0.0/24", "allowed_ip=fd00::/64",
            f"public_key={_PEER2.to_hex()}", "endpoint=[2001:db8::1]:51820", "protocol_version=1",
            f"public_key={_PEER2.to_hex()}", "remove=true",
        ])  # fmt: skip
        return [
            Seed().byte(0).raw(set_body.encode()).build(),
            Seed().byte(1).raw(b"get=1\n\nset=1\n" + set_body.encode() + b"\n\n").build(),
            Seed().byte(1).raw(b"set=1\nlisten_port=51820\nfwmark=0\n\n").build(),
            Seed().byte(0).raw(f"private_key={_KEY.to_hex()}\nlisten_port=0".encode()).build(),
        ]

"""A STUN responder answering RFC 5780 CHANGE-REQUEST, for the port-mapping lab (root only).

    python -m tests.integration.stun5780 PRIMARY_IP ALT_IP [PORT ALT_PORT]

It listens on PRIMARY_IP:PORT and answers each Binding Request with MAPPED-ADDRESS and
XOR-MAPPED-ADDRESS, sent from the address the request's CHANGE-REQUEST asks for: 0x04 changes
the IP to ALT_IP, 0x02 the port to ALT_PORT (RFC 5780 §7.2, RFC 3489 §11.2.4). miniupnpd uses
exactly that (four probes: no change, port, IP, both) to decide whether a WAN address it
considers reserved (198.18.0.0/15 is) sits behind an endpoint-independent, unfiltered mapping;
only then does it accept port-mapping requests.
"""

from __future__ import annotations

import socket
import struct
import sys

MAGIC = 0x2112A442
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
ATTR_MAPPED = 0x0001
ATTR_CHANGE_REQUEST = 0x0003
ATTR_XOR_MAPPED = 0x0020
ATTR_OTHER_ADDRESS = 0x802C


def _addr_attr(kind: int, ip: str, port: int, xor: bool) -> bytes:
    raw_ip = socket.inet_aton(ip)
    if xor:
        port ^= MAGIC >> 16
        raw_ip = bytes(a ^ b for a, b in zip(raw_ip, struct.pack("!I", MAGIC), strict=True))
    return struct.pack("!HHBBH4s", kind, 8, 0, 1, port, raw_ip)


def answer(request: bytes, src: tuple[str, int], other: tuple[str, int]) -> tuple[bytes, int]:
    """The response to `request` from `src`, and its CHANGE-REQUEST flags (0 if none)."""
    if len(request) < 20:
        raise ValueError("short")
    mtype, length, magic = struct.unpack_from("!HHI", request)
    if mtype != BINDING_REQUEST or magic != MAGIC or 20 + length > len(request):
        raise ValueError("not a binding request")
    txid = request[8:20]
    flags, pos = 0, 20
    while pos + 4 <= 20 + length:
        atype, alen = struct.unpack_from("!HH", request, pos)
        if atype == ATTR_CHANGE_REQUEST and alen == 4:
            (flags,) = struct.unpack_from("!I", request, pos + 4)
        pos += 4 + (alen + 3) // 4 * 4
    attrs = (
        _addr_attr(ATTR_MAPPED, src[0], src[1], xor=False)
        + _addr_attr(ATTR_XOR_MAPPED, src[0], src[1], xor=True)
        + _addr_attr(ATTR_OTHER_ADDRESS, other[0], other[1], xor=False)
    )
    return struct.pack("!HHI12s", BINDING_SUCCESS, len(attrs), MAGIC, txid) + attrs, flags


def serve(ip: str, alt_ip: str, port: int, alt_port: int) -> None:
    socks: dict[tuple[bool, bool], socket.socket] = {}
    for change_ip in (False, True):
        for change_port in (False, True):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((alt_ip if change_ip else ip, alt_port if change_port else port))
            socks[(change_ip, change_port)] = s
    listener = socks[(False, False)]
    print(f"stun5780 on {ip}:{port} (alt {alt_ip}:{alt_port})", flush=True)
    while True:
        data, src = listener.recvfrom(2048)
        try:
            resp, flags = answer(data, src, (alt_ip, alt_port))
        except ValueError:
            continue
        socks[(bool(flags & 0x4), bool(flags & 0x2))].sendto(resp, src)


if __name__ == "__main__":
    args = sys.argv[1:]
    serve(args[0], args[1], int(args[2]) if len(args) > 2 else 3478,
          int(args[3]) if len(args) > 3 else 3479)  # fmt: skip

"""WireGuard's cross-platform UAPI on /var/run/wireguard/<iface>.sock, so the stock `wg` works.

Text protocol: `key=value` lines, a request ends with an empty line, every answer ends with
`errno=N` and an empty line. `get=1` dumps the device (keys in hex); `set=1` changes it. A `set`
is validated completely before anything is applied, so a bad line changes nothing. The private
key and listen port cannot change on a live device: only their current values are accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from structlog.typing import FilteringBoundLogger

from agent.config import InterfaceConfig
from agent.keys import KeyError_, NodePrivate, NodePublic, PresharedKey
from agent.proto.endpoint import format_endpoint
from agent.proto.wireguard.allowedips import Network
from agent.proto.wireguard.device import Device

__all__ = [
    "EINVAL",
    "apply_set",
    "format_get",
    "remove_uapi",
    "serve_uapi",
    "serve_interface_uapi",
    "uapi_path",
]

EINVAL = -22
MAX_REQUEST_BYTES = 1 << 20
MAX_REQUEST_LINES = 10000
_ZERO_HEX = "0" * 64
Endpoint = tuple[str, int]
Datagrams = list[tuple[bytes, Endpoint]]


class _Invalid(ValueError):
    """One line of a `set` request is not acceptable; the message says why."""


def format_get(device: Device, listen_port: int, fwmark: int = 0) -> str:
    """The full reply to `get=1`, ending with `errno=0` and an empty line."""
    out = [f"private_key={device.private_key.to_hex()}", f"listen_port={listen_port}"]
    if fwmark:
        out.append(f"fwmark={fwmark}")
    for pk, peer in device.peers.items():
        psk = peer.preshared_key
        out += [f"public_key={pk.to_hex()}", f"preshared_key={psk.to_hex() if psk else _ZERO_HEX}"]
        out.append("protocol_version=1")
        if peer.endpoint is not None:
            out.append(f"endpoint={format_endpoint(peer.endpoint)}")
        sec, nsec = divmod(int((peer.last_handshake or 0) * 1e9), 1_000_000_000)
        out += [
            f"last_handshake_time_sec={sec}",
            f"last_handshake_time_nsec={nsec}",
            f"tx_bytes={peer.tx_bytes}",
            f"rx_bytes={peer.rx_bytes}",
            f"persistent_keepalive_interval={peer.persistent_keepalive or 0}",
        ]
        out += [f"allowed_ip={net}" for net in device.allowed_ips.networks_of(peer)]
    return "\n".join(out) + "\nerrno=0\n\n"


@dataclass(slots=True)
class _PeerPlan:
    key: NodePublic
    remove: bool = False
    update_only: bool = False
    psk: PresharedKey | None = None
    set_psk: bool = False
    endpoint: Endpoint | None = None
    keepalive: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: list[Network] = field(default_factory=list)


def _uint(key: str, value: str, top: int) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) > top:
        raise _Invalid(f"{key}: {value!r} is not an integer in 0..{top}")
    return int(value)


def _true(key: str, value: str) -> bool:
    if value != "true":
        raise _Invalid(f"{key}: only 'true' is accepted, got {value!r}")
    return True


def _parse_endpoint(value: str) -> Endpoint:
    host, sep, port = value.rpartition(":")
    if not sep:
        raise _Invalid(f"endpoint: {value!r} has no port")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError as e:
        raise _Invalid(f"endpoint: {host!r} is not a literal IP address") from e
    if addr.version == 6 and not bracketed:
        raise _Invalid(f"endpoint: IPv6 {value!r} needs [addr]:port")
    p = _uint("endpoint port", port, 65535)
    if p == 0:
        raise _Invalid("endpoint: port 0")
    return str(addr), p


def _plan(
    device: Device, lines: list[str], listen_port: int, fwmark: int = 0
) -> tuple[bool, list[_PeerPlan]]:
    replace_peers = False
    peers: list[_PeerPlan] = []
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            raise _Invalid(f"line {line[:40]!r} is not key=value")
        cur = peers[-1] if peers else None
        try:
            if key == "public_key":
                pk = NodePublic.from_hex(value)
                if pk == device.public_key:
                    raise _Invalid("public_key: that is this device's own key")
                peers.append(_PeerPlan(pk))
            elif cur is None and key == "private_key":
                if NodePrivate.from_hex(value) != device.private_key:
                    raise _Invalid("private_key: cannot change the key of a live device")
            elif cur is None and key == "listen_port":
                if _uint(key, value, 65535) not in (0, listen_port):
                    raise _Invalid(f"listen_port: cannot move a live device off {listen_port}")
            elif cur is None and key == "fwmark":
                if _uint(key, value, 0xFFFFFFFF) != fwmark:
                    raise _Invalid(f"fwmark: cannot change a live device's mark ({fwmark})")
            elif cur is None and key == "replace_peers":
                replace_peers = _true(key, value)
            elif cur is None:
                raise _Invalid(f"unknown interface key {key!r}")
            elif key == "remove":
                cur.remove = _true(key, value)
            elif key == "update_only":
                cur.update_only = _true(key, value)
            elif key == "preshared_key":
                psk = PresharedKey.from_hex(value)
                cur.psk, cur.set_psk = (None if psk.is_zero() else psk), True
            elif key == "endpoint":
                cur.endpoint = _parse_endpoint(value)
            elif key == "persistent_keepalive_interval":
                cur.keepalive = _uint(key, value, 65535)
            elif key == "replace_allowed_ips":
                cur.replace_allowed_ips = _true(key, value)
            elif key == "allowed_ip":
                if "/" not in value:
                    raise _Invalid(f"allowed_ip: {value!r} has no prefix length")
                cur.allowed_ips.append(ipaddress.ip_network(value, strict=False))
            elif key == "protocol_version":
                if value != "1":
                    raise _Invalid(f"protocol_version: {value!r} unsupported, only 1")
            else:
                raise _Invalid(f"unknown peer key {key!r}")
        except _Invalid:
            raise
        except (KeyError_, ValueError) as e:
            raise _Invalid(f"{key}: {e}") from e
    return replace_peers, peers


def _apply(device: Device, replace_peers: bool, plans: list[_PeerPlan], now: float) -> Datagrams:
    out: Datagrams = []
    if replace_peers:
        named = {p.key for p in plans}
        for pk in [k for k in device.peers if k not in named]:
            device.remove_peer(pk)
    for plan in plans:
        if plan.remove:
            device.remove_peer(plan.key)
            continue
        peer = device.peers.get(plan.key)
        if peer is None:
            if plan.update_only:
                continue
            peer = device.add_peer(plan.key)
        if plan.set_psk:
            peer.set_preshared_key(plan.psk)
        if plan.endpoint is not None:
            peer.endpoint = plan.endpoint
        if plan.replace_allowed_ips or plan.allowed_ips:
            device.set_allowed_ips(peer, plan.allowed_ips, replace=plan.replace_allowed_ips)
        if plan.keepalive is not None:
            sent = peer.set_persistent_keepalive(plan.keepalive, now)
            if peer.endpoint is not None:
                out += [(d, peer.endpoint) for d in sent]
    return out


def _apply_set(
    device: Device, lines: list[str], listen_port: int, now: float, fwmark: int = 0
) -> tuple[int, Datagrams, str]:
    try:
        replace_peers, plans = _plan(device, lines, listen_port, fwmark)
    except _Invalid as e:
        return EINVAL, [], str(e)
    return 0, _apply(device, replace_peers, plans, now), ""


def apply_set(
    device: Device, lines: list[str], *, listen_port: int, now: float, fwmark: int = 0
) -> tuple[int, Datagrams]:
    """Apply the body of a `set=1` request: (0 or EINVAL, datagrams to send)."""
    errno, out, _ = _apply_set(device, lines, listen_port, now, fwmark)
    return errno, out


async def _read_request(reader: asyncio.StreamReader) -> list[str] | None:
    """Lines up to the empty line; None on EOF, a truncated request or one over the bounds."""
    lines: list[str] = []
    size = 0
    while True:
        try:
            raw = await reader.readuntil(b"\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return None
        size += len(raw)
        if size > MAX_REQUEST_BYTES or len(lines) >= MAX_REQUEST_LINES:
            return None
        line = raw[:-1].decode("utf-8", "replace")
        if not line:
            return lines
        lines.append(line)


async def serve_uapi(
    path: str,
    device: Device,
    *,
    listen_port: int,
    clock: Callable[[], float],
    send: Callable[[bytes, Endpoint], object],
    log: FilteringBoundLogger,
    fwmark: int = 0,
    on_set: Callable[[], None] = lambda: None,
) -> asyncio.AbstractServer:
    """Listen on `path` (mode 0600) and answer `get=1` / `set=1` until the server is closed;
    `on_set` runs after every set (the daemon re-arms its timer and its data plane's lanes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await _read_request(reader)) is not None and request:
                op, body = request[0], request[1:]
                if op == "get=1" and not body:
                    writer.write(format_get(device, listen_port, fwmark).encode())
                elif op == "set=1":
                    errno, out, reason = _apply_set(device, body, listen_port, clock(), fwmark)
                    for datagram, ep in out:
                        send(datagram, ep)
                    on_set()
                    log.info("uapi set", lines=len(body), errno=errno, reason=reason or None)
                    writer.write(f"errno={errno}\n\n".encode())
                else:
                    log.info("uapi unknown operation", op=op[:40])
                    break
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock.bind(tmp)  # bind aside, restrict, then move into place: never reachable as 0755
        os.chmod(tmp, 0o600)
        sock.listen(16)
        os.replace(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    server = await asyncio.start_unix_server(handle, sock=sock, limit=MAX_REQUEST_BYTES)
    log.info("uapi listening", path=path)
    return server


async def serve_interface_uapi(
    cfg: InterfaceConfig,
    device: Device,
    *,
    listen_port: int,
    send: Callable[[bytes, Endpoint], object],
    log: FilteringBoundLogger,
    on_set: Callable[[], None] = lambda: None,
) -> asyncio.AbstractServer | None:
    """`serve_uapi` for the node's interface, at its `uapi_path`, on the running loop's clock;
    None (and a warning) when it cannot listen."""
    path = uapi_path(cfg.name)
    clock = asyncio.get_running_loop().time
    try:
        return await serve_uapi(
            path,
            device,
            listen_port=listen_port,
            clock=clock,
            send=send,
            log=log,
            fwmark=cfg.fwmark,
            on_set=on_set,
        )
    except OSError as e:
        log.warning("UAPI socket unavailable", path=path, error=str(e))
        return None


def uapi_path(interface: str) -> str:
    """Where `wg` looks for the interface's UAPI socket."""
    return f"/var/run/wireguard/{interface}.sock"


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise OSError(f"UAPI socket {path} is in use by another process")


def remove_uapi(path: str) -> None:
    """Remove our socket file (when the device goes down)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)

"""Endpoints as text: `IP:PORT`, `[V6]:PORT`, listen addresses and HTTP Host values.

The one place that writes and reads them, for every layer: the config, the coordinator's wire
messages, the node, the relay and the engine's reports. Pure functions; nothing is resolved
through DNS.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

__all__ = ["format_endpoint", "host_header", "parse_endpoint", "parse_listen_address"]


def format_endpoint(ep: tuple[str, int]) -> str:
    """`IP:PORT`, or `[V6]:PORT` for an IPv6 address."""
    host, port = ep
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    """`IP:PORT` or `[V6]:PORT` to (ip, port): a literal address (normalised), port 1..65535.
    ValueError says what is wrong."""
    if text.startswith("["):
        host, sep, port_s = text[1:].partition("]:")
    else:
        host, sep, port_s = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 endpoint as [address]:port")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port or [v6]:port")
    addr: IPv4Address | IPv6Address
    try:
        addr = ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not a literal IP address (names are not resolved)") from None
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"{text!r}: port {port_s!r} is not 1..65535")
    return str(addr), int(port_s)


def parse_listen_address(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` (every address) or `[V6]:PORT` to (host, port), port 0..65535, as Go's
    `net.Listen` takes them; the host may be a name. ValueError names the expected forms."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT, :PORT or [V6]:PORT")
    return host.strip("[]"), int(port)


def host_header(host: str, port: int, default_port: int = 443) -> str:
    """The HTTP Host value for host:port: IPv6 in brackets, the port left out when default."""
    name = f"[{host}]" if ":" in host else host
    return name if port == default_port else f"{name}:{port}"

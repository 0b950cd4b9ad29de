"""The coordinator's TOML config (`/etc/agent/coordinator.conf`): text in, `CoordinatorConfig` out.

    [coordinator]
    listen = ":8443"                  # HOST:PORT, :PORT or [V6]:PORT (default :8443)
    hostname = "coord.example.net"    # TLS name: the self-signed certificate's SAN, or the
                                      # manual certificate's file name (default coordinator.local)
    database = "/var/lib/agent-coordinator/coordinator.db"   # SQLite path (relative = beside
                                      # this file) or postgresql://USER@HOST/DB (psycopg 3)
    node_key_expiry = "180d"          # how long a node key stays valid after joining; "0" = never

    [tls]
    mode = "self-signed"              # or "manual": CERT_DIR/HOSTNAME.crt and .key (as derper)
    cert_dir = "/var/lib/agent-coordinator/certs"

    [addresses]
    ipv4 = "100.64.0.0/10"            # overlay addresses handed out (the lowest free first)
    ipv6 = "fd7a:115c:a1e0::/48"      # the same host offset in this ULA prefix

    [dns]
    domain = "mesh.internal"          # nodes are <name>.<domain> (`.internal` is for private use)

    [[derp.regions]]                  # the DERP map handed to every node, in the agent's format
    id = 900
    code = "lab"
    nodes = [{ host = "198.18.0.10", port = 443, stun_port = 3478 }]

Every section is optional. Problems are collected and raised together as `agent.config.
ConfigError`, each naming its key (`coordinator.node_key_expiry: '3x' is not a duration`); unknown
keys are problems too. Durations are `<number><unit>` runs with units s, m, h, d, w (`90s`,
`1h30m`, `7d`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Final

from agent.config import Checker, ConfigError, DerpConfig, read_config_text
from agent.proto.dns.names import DEFAULT_DOMAIN, normalize_domain
from agent.proto.endpoint import parse_listen_address
from agent.proto.errors import LocalProtocolError

__all__ = [
    "DEFAULT_COORDINATOR_CONFIG",
    "DEFAULT_DATABASE",
    "DEFAULT_CERT_DIR",
    "CoordinatorConfig",
    "load_coordinator_config",
    "parse_coordinator_config",
    "parse_duration",
    "format_duration",
]

DEFAULT_COORDINATOR_CONFIG: Final = "/etc/agent/coordinator.conf"
DEFAULT_DATABASE: Final = "/var/lib/agent-coordinator/coordinator.db"
DEFAULT_CERT_DIR: Final = "/var/lib/agent-coordinator/certs"
_IPV4_RANGE: Final = IPv4Network("100.64.0.0/10")
_IPV6_RANGE: Final = IPv6Network("fd7a:115c:a1e0::/48")
_NO_DERP: Final = DerpConfig()
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION: Final = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_PART: Final = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """`90s`, `30m`, `24h`, `7d`, `1h30m`, or `0` -> seconds; ValueError otherwise."""
    t = text.strip()
    if t == "0":
        return 0.0
    if not _DURATION.fullmatch(t):
        raise ValueError(f"{text!r} is not a duration (for example 90s, 30m, 24h, 7d)")
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(t))


def format_duration(seconds: float) -> str:
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorConfig:
    listen: tuple[str, int] = ("", 8443)  # host "" = every address
    hostname: str = "coordinator.local"
    database: str = DEFAULT_DATABASE
    node_key_expiry: float | None = 180 * 86400.0  # seconds; None = never
    tls_mode: str = "self-signed"  # or "manual"
    cert_dir: str = DEFAULT_CERT_DIR
    ipv4_range: IPv4Network = _IPV4_RANGE
    ipv6_range: IPv6Network = _IPV6_RANGE
    derp: DerpConfig = _NO_DERP
    dns_domain: str = DEFAULT_DOMAIN  # lower case, no trailing dot


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    p = Path(path)
    return parse_coordinator_config(read_config_text(p), base_dir=p.parent)


def parse_coordinator_config(text: str, *, base_dir: Path | None = None) -> CoordinatorConfig:
    """Validate TOML `text`; ConfigError lists every problem."""
    c = Checker(base_dir)
    doc = c.toml(text)
    c.known("", doc, {"coordinator", "tls", "addresses", "dns", "derp"})
    d = CoordinatorConfig()
    t = c.table("coordinator", doc.get("coordinator")) or {}
    c.known("coordinator", t, {"listen", "hostname", "database", "node_key_expiry"})
    listen = c.opt("coordinator", t, "listen", lambda p, v: _listen(c, p, v), d.listen)
    hostname = c.opt("coordinator", t, "hostname", c.string, d.hostname)
    database = c.opt("coordinator", t, "database", lambda p, v: _database(c, p, v), d.database)
    expiry = c.opt("coordinator", t, "node_key_expiry", lambda p, v: _duration(c, p, v), -1.0)
    tls = c.table("tls", doc.get("tls")) or {}
    c.known("tls", tls, {"mode", "cert_dir"})
    mode = c.opt("tls", tls, "mode", lambda p, v: _mode(c, p, v), d.tls_mode)
    cert_dir = c.opt("tls", tls, "cert_dir", c.path, d.cert_dir)
    addrs = c.table("addresses", doc.get("addresses")) or {}
    c.known("addresses", addrs, {"ipv4", "ipv6"})
    v4 = c.opt("addresses", addrs, "ipv4", lambda p, v: _net4(c, p, v), d.ipv4_range)
    v6 = c.opt("addresses", addrs, "ipv6", lambda p, v: _net6(c, p, v), d.ipv6_range)
    if v4.num_addresses < 4:
        c.bad("addresses.ipv4", f"{v4} is too small (at least a /30)")
    if v6.num_addresses < v4.num_addresses:
        c.bad("addresses.ipv6", f"{v6} has fewer addresses than addresses.ipv4 ({v4})")
    dns = c.table("dns", doc.get("dns")) or {}
    c.known("dns", dns, {"domain"})
    domain = c.opt("dns", dns, "domain", lambda p, v: _domain(c, p, v), d.dns_domain)
    derp_t = doc.get("derp")
    if isinstance(derp_t, dict) and "home_region" in derp_t:
        c.bad("derp.home_region", "not used here: each node chooses its home region")
        derp_t = {k: v for k, v in derp_t.items() if k != "home_region"}
    derp = c.derp(derp_t)
    if c.problems:
        raise ConfigError(c.problems)
    assert derp is not None
    return CoordinatorConfig(
        listen=listen,
        hostname=hostname,
        database=database,
        node_key_expiry=d.node_key_expiry if expiry < 0 else (expiry or None),
        tls_mode=mode,
        cert_dir=cert_dir,
        ipv4_range=v4,
        ipv6_range=v6,
        derp=derp,
        dns_domain=domain,
    )


def _domain(c: Checker, path: str, v: object) -> str | None:
    s = c.string(path, v)
    if s is None:
        return None
    try:
        return normalize_domain(s)
    except LocalProtocolError:
        c.bad(path, f"{s!r} is not a DNS name (labels of a-z, 0-9 and '-', dot-separated)")
        return None


def _listen(c: Checker, path: str, v: object) -> tuple[str, int] | None:
    s = c.string(path, v)
    if s is None:
        return None
    try:
        return parse_listen_address(s)
    except ValueError as e:
        c.bad(path, str(e))
        return None


def _database(c: Checker, path: str, v: object) -> str | None:
    s = c.string(path, v)
    if s is None:
        return None
    if "://" in s:
        if not s.startswith(("postgresql://", "postgres://")):
            c.bad(path, f"{s.split('://')[0]!r} databases are not supported (postgresql://...)")
            return None
        return s
    return c.path(path, s)


def _duration(c: Checker, path: str, v: object) -> float | None:
    s = c.string(path, v)
    if s is None:
        return None
    try:
        return parse_duration(s)
    except ValueError as e:
        c.bad(path, str(e))
        return None


def _mode(c: Checker, path: str, v: object) -> str | None:
    s = c.string(path, v)
    if s is not None and s not in ("self-signed", "manual"):
        c.bad(path, f"{s!r} is not self-signed or manual")
        return None
    return s


def _net4(c: Checker, path: str, v: object) -> IPv4Network | None:
    net = c.network(path, v)
    if net is not None and not isinstance(net, IPv4Network):
        c.bad(path, f"{net} is not an IPv4 prefix")
        return None
    return net


def _net6(c: Checker, path: str, v: object) -> IPv6Network | None:
    net = c.network(path, v)
    if net is not None and not isinstance(net, IPv6Network):
        c.bad(path, f"{net} is not an IPv6 prefix")
        return None
    return net

"""The agent's TOML configuration: text in, frozen dataclasses out (see `agent.conf.example`).

Every problem is collected before anything is raised, one line per problem naming the key path
(`peers[1].allowed_ips[0]: '100.64.0.300/32' is not an IP prefix`), so a user fixes a config in
one pass. Unknown keys are problems too: a typo must never pass silently. The checker itself
(`Checker`, shared with the coordinator's config) is agent/config/checker.py; the node's own
sections (interface, control, peers) are `NodeChecker` below.

The only I/O here is reading the config file itself and the key files it names
(`private_key_file`, `preshared_key_file`); relative paths are taken from the config's directory.
Nothing is resolved through DNS: peer endpoints are literal IP addresses.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network, ip_address
from pathlib import Path
from typing import Any

from agent.config.checker import Checker, ConfigError, format_problems, read_config_text
from agent.keys import NodePrivate, NodePublic, PresharedKey
from agent.policy.checks import check_policy
from agent.policy.compile import CompiledPolicy
from agent.policy.errors import PolicyError
from agent.policy.rules import FilterRule, Node
from agent.proto.derpmap import DerpConfig, DerpNode, DerpRegion
from agent.proto.endpoint import parse_endpoint

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Config",
    "InterfaceConfig",
    "PeerConfig",
    "ControlConfig",
    "DnsConfig",
    "DerpConfig",
    "DerpRegion",
    "DerpNode",
    "ConfigError",
    "load_config",
    "parse_config",
    "control_socket_path",
    "format_problems",
    "read_config_text",
    "Checker",
]

DEFAULT_CONFIG_PATH = "/etc/agent/agent.conf"
_IPV6_MIN_MTU = 1280
# The TUN's transmit queue (packets the kernel holds for us to read). The data plane reads in
# batches and, on a busy machine, may be off the CPU for a few ms: 2000 packets is 15 ms of 64 B
# packets at 130k/s, where the kernel's 500 overflowed (measured in bench/throughput.py).
DEFAULT_TXQUEUELEN = 2000

_INTERFACE_KEYS = {
    "name", "private_key", "private_key_file", "addresses", "listen_port", "mtu",
    "txqueuelen", "control_socket", "uapi", "fwmark", "metrics_listen", "policy_file", "portmap",
    "dataplane", "nat_birthday",
}  # fmt: skip
_PEER_KEYS = {
    "name", "public_key", "allowed_ips", "endpoint", "derp_region", "preshared_key",
    "preshared_key_file", "persistent_keepalive",
}  # fmt: skip

# -- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class InterfaceConfig:
    name: str = "agent0"
    private_key: NodePrivate
    addresses: tuple[IPv4Interface | IPv6Interface, ...]
    listen_port: int = 41641  # 0 = let the kernel pick
    mtu: int = 1280
    txqueuelen: int = DEFAULT_TXQUEUELEN
    control_socket: str = ""  # "" = /run/agent/<name>.sock
    uapi: bool = True  # also serve the WireGuard UAPI at /var/run/wireguard/<name>.sock
    fwmark: int = 0  # 0 = no mark on underlay packets
    metrics_listen: tuple[str, int] | None = None  # loopback ip, port for Prometheus; None = off
    policy_file: str | None = None  # a static node's access policy (Tailscale's syntax)
    # ...compiled for this node: what peers may send it. None = no policy, everything passes.
    policy: tuple[FilterRule, ...] | None = None
    portmap: bool = True  # ask the router (UPnP IGD, NAT-PMP, PCP) to map listen_port
    nat_birthday: bool = True  # the birthday technique against a hard NAT (engine/birthday.py)
    # the per-packet loop: "native" (compiled), "python" (the reference twin), "auto" (native
    # where it loads)
    dataplane: str = "auto"

    def __post_init__(self) -> None:
        if not self.control_socket:
            object.__setattr__(self, "control_socket", f"/run/agent/{self.name}.sock")


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerConfig:
    name: str
    public_key: NodePublic
    allowed_ips: tuple[IPv4Network | IPv6Network, ...] = ()
    endpoint: tuple[str, int] | None = None  # literal IP (no brackets), port
    derp_region: int | None = None
    preshared_key: PresharedKey | None = None
    persistent_keepalive: int | None = None  # seconds; None = off


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlConfig:
    """A coordinator (`agent coordinator`): it hands out addresses, peers and the DERP map."""

    url: str  # https://HOST[:PORT]
    auth_key: str = ""  # pre-auth key; "" once the node is registered
    ca_file: str | None = None  # None = the system trust store
    hostname: str = ""  # "" = this machine's host name

    def __repr__(self) -> str:  # the auth key is a secret
        return f"ControlConfig(url={self.url!r}, hostname={self.hostname!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsConfig:
    """The name service at 100.100.100.100 (node/dns_service.py)."""

    enable: bool = True
    # (ip, port) to forward other names to; None = the resolvers the system had before us
    upstreams: tuple[tuple[str, int], ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    interface: InterfaceConfig
    derp: DerpConfig = DerpConfig()
    peers: tuple[PeerConfig, ...] = ()
    control: ControlConfig | None = None
    dns: DnsConfig = DnsConfig()


# -- entry points ---------------------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Read and validate the config file at `path`; key files are relative to its directory."""
    p = Path(path)
    return parse_config(read_config_text(p), base_dir=p.parent)


def parse_config(text: str, *, base_dir: Path | None = None) -> Config:
    """Validate TOML `text`; raise ConfigError listing every problem found."""
    c = NodeChecker(base_dir)
    doc = c.toml(text)
    c.known("", doc, {"interface", "derp", "peers", "control", "dns"})
    c.has_control = "control" in doc
    iface_t = c.table("interface", doc.get("interface"), required=True)
    iface = c.interface(iface_t) if iface_t is not None else None
    derp = c.derp(doc.get("derp"))
    peers = tuple(c.items("", doc, "peers", c.peer))
    control = c.control(doc["control"]) if c.has_control else None
    dns = c.dns(doc.get("dns"))
    if c.problems:
        raise ConfigError(c.problems)
    assert iface is not None
    assert derp is not None
    return Config(interface=iface, derp=derp, peers=peers, control=control, dns=dns)


def control_socket_path(path: str | Path) -> str:
    """Just the control socket a config names (no key files read): what `agent status` needs."""
    p = Path(path)
    c = Checker(p.parent)
    doc = c.toml(read_config_text(p))
    t = c.table("interface", doc.get("interface"), required=True) or {}
    name = c.opt("interface", t, "name", c.ifname, "agent0")
    sock = c.opt("interface", t, "control_socket", c.path, "")
    if c.problems:
        raise ConfigError(c.problems)
    return sock or f"/run/agent/{name}.sock"


# -- the node's sections --------------------------------------------------------------------------


class NodeChecker(Checker):
    """The checker with the node's own sections and their cross-checks."""

    def __init__(self, base_dir: Path | None) -> None:
        super().__init__(base_dir)
        # cross-checks, filled as sections are read (interface and derp before peers)
        self.own_public: NodePublic | None = None
        self.has_control = False  # a [control] section: addresses come from the coordinator
        self.peer_names: dict[str, str] = {}
        self.peer_keys: dict[NodePublic, str] = {}
        self.routes: dict[IPv4Network | IPv6Network, str] = {}

    def control(self, v: object) -> ControlConfig | None:
        p = "control"
        t = self.table(p, v)
        if t is None:
            return None
        self.known(p, t, {"url", "auth_key", "auth_key_file", "ca_file", "hostname"})
        url = self.required(p, t, "url", self.string)
        if url is not None and not url.startswith("https://"):
            self.bad(f"{p}.url", f"{url!r} is not an https:// URL")
        auth_key = ""
        if "auth_key" in t and "auth_key_file" in t:
            self.bad(p, "give auth_key or auth_key_file, not both")
        elif "auth_key" in t:
            auth_key = self.string(f"{p}.auth_key", t["auth_key"]) or ""
        elif "auth_key_file" in t:
            file = self.path(f"{p}.auth_key_file", t["auth_key_file"])
            if file is not None:
                try:
                    auth_key = Path(file).read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as e:
                    self.bad(f"{p}.auth_key_file", f"cannot read {file!r}: {e}")
        ca_file = self.opt(p, t, "ca_file", self.path, None)
        hostname = self.opt(p, t, "hostname", self.string, "")
        if url is None or not url.startswith("https://"):
            return None
        return ControlConfig(url=url, auth_key=auth_key, ca_file=ca_file, hostname=hostname)

    def dns(self, v: object) -> DnsConfig:
        p = "dns"
        t = self.table(p, v) or {}
        self.known(p, t, {"enable", "upstreams"})
        enable = self.opt(p, t, "enable", self.boolean, True)
        upstreams = None
        if "upstreams" in t:
            upstreams = tuple(self.items(p, t, "upstreams", self.upstream))
        return DnsConfig(enable=enable, upstreams=upstreams)

    def upstream(self, path: str, v: object) -> tuple[str, int] | None:
        """A resolver: `IP` (port 53), `IP:PORT` or `[V6]:PORT`."""
        s = self.string(path, v)
        if s is None:
            return None
        try:
            return str(ip_address(s)), 53
        except ValueError:
            pass
        try:
            return parse_endpoint(s)
        except ValueError as e:
            self.bad(path, f"{e}; expected IP, IP:PORT or [V6]:PORT")
            return None

    def interface(self, t: dict[str, Any]) -> InterfaceConfig | None:
        p = "interface"
        self.known(p, t, _INTERFACE_KEYS)
        before = len(self.problems)
        name = self.opt(p, t, "name", self.ifname, "agent0")
        priv = self.key_or_file(p, t, "private_key", NodePrivate, required=True)
        self.own_public = priv.public() if priv is not None else None
        addrs: list[IPv4Interface | IPv6Interface] = self.items(
            p,
            t,
            "addresses",
            self.address,
            empty=None if self.has_control else "lists no overlay address",
        )
        listen_port = self.opt(p, t, "listen_port", self.port, 41641)
        mtu = self.opt(p, t, "mtu", lambda q, v: self.integer(q, v, 576, 65535), 1280)
        if mtu < _IPV6_MIN_MTU and any(a.version == 6 for a in addrs):
            self.bad(f"{p}.mtu", f"{mtu} is below {_IPV6_MIN_MTU}, the minimum for IPv6 addresses")
        txqueuelen = self.opt(
            p, t, "txqueuelen", lambda q, v: self.integer(q, v, 1, 1_000_000), DEFAULT_TXQUEUELEN
        )
        sock = self.opt(p, t, "control_socket", self.path, "")
        uapi = self.opt(p, t, "uapi", self.boolean, True)
        fwmark = self.opt(p, t, "fwmark", lambda q, v: self.integer(q, v, 0, 2**32 - 1), 0)
        metrics = self.opt(p, t, "metrics_listen", self.loopback_endpoint, None)
        policy_file = self.opt(p, t, "policy_file", self.path, None)
        portmap = self.opt(p, t, "portmap", self.boolean, True)
        nat_birthday = self.opt(p, t, "nat_birthday", self.boolean, True)
        dataplane = self.opt(p, t, "dataplane", self.dataplane, "auto")
        if len(self.problems) > before or priv is None:
            return None
        policy = self.policy(f"{p}.policy_file", policy_file, name, addrs)
        return InterfaceConfig(
            name=name,
            private_key=priv,
            addresses=tuple(addrs),
            listen_port=listen_port,
            mtu=mtu,
            txqueuelen=txqueuelen,
            control_socket=sock,
            uapi=uapi,
            fwmark=fwmark,
            metrics_listen=metrics,
            policy_file=policy_file,
            policy=policy,
            portmap=portmap,
            nat_birthday=nat_birthday,
            dataplane=dataplane,
        )

    def policy(
        self,
        path: str,
        file: str | None,
        name: str,
        addrs: list[IPv4Interface | IPv6Interface],
    ) -> tuple[FilterRule, ...] | None:
        """The rules of `file` whose destination is this node; its `tests` must pass."""
        if file is None:
            return None
        if self.has_control:
            self.bad(path, "the coordinator hands out this network's policy; drop one of the two")
            return None
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            self.bad(path, f"cannot read {file!r}: {getattr(e, 'strerror', None) or e}")
            return None
        me = Node(0, name, None, frozenset(), tuple(a.ip for a in addrs))
        try:
            policy = check_policy(text, nodes=[me])
        except PolicyError as e:  # "FILE:LINE:COLUMN: why" for syntax, "FILE: acls[2].dst[0]: why"
            self.bad(path, f"{file}:{e}" if e.position and not e.path else f"{file}: {e}")
            return None
        return CompiledPolicy(policy, [me]).filter_for(me.id)

    def peer(self, p: str, v: object) -> PeerConfig | None:
        t = self.table(p, v)
        if t is None:
            return None
        self.known(p, t, _PEER_KEYS)
        before = len(self.problems)
        pub = self.required(p, t, "public_key", lambda q, v: self.key(q, v, NodePublic))
        if pub is not None:
            if pub in self.peer_keys:
                self.bad(f"{p}.public_key", f"same key as {self.peer_keys[pub]}")
            elif pub == self.own_public:
                self.bad(f"{p}.public_key", "is this node's own public key")
            self.peer_keys.setdefault(pub, p)
        name = self.opt(p, t, "name", self.string, pub.to_b64()[:8] if pub else "")
        if name and name in self.peer_names:
            self.bad(f"{p}.name", f"{name!r} is already the name of {self.peer_names[name]}")
        self.peer_names.setdefault(name, p)
        if "allowed_ips" not in t:
            self.bad(f"{p}.allowed_ips", "missing (write [] for a peer that carries no traffic)")
        nets: list[IPv4Network | IPv6Network] = []
        for j, raw in enumerate(self.array(f"{p}.allowed_ips", t.get("allowed_ips", []))):
            q = f"{p}.allowed_ips[{j}]"
            if (net := self.network(q, raw)) is None:
                continue
            if net in self.routes:
                self.bad(q, f"'{net}' is already routed to {self.routes[net]}")
            self.routes.setdefault(net, p)
            nets.append(net)
        endpoint = self.opt(p, t, "endpoint", self.endpoint, None)
        region = self.opt(p, t, "derp_region", self.region_id, None)
        if region is not None and self.region_ids and region not in self.region_ids:
            self.bad(f"{p}.derp_region", f"region {region} is not in derp.regions")
        psk = self.key_or_file(p, t, "preshared_key", PresharedKey, required=False)
        keepalive = self.opt(p, t, "persistent_keepalive", self.port, 0)
        if len(self.problems) > before or pub is None:
            return None
        return PeerConfig(
            name=name,
            public_key=pub,
            allowed_ips=tuple(nets),
            endpoint=endpoint,
            derp_region=region,
            preshared_key=psk,
            persistent_keepalive=keepalive or None,
        )

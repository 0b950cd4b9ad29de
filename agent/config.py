"""The agent's TOML configuration: text in, frozen dataclasses out (see `agent.conf.example`).

Every problem is collected before anything is raised, one line per problem naming the key path
(`peers[1].allowed_ips[0]: '100.64.0.300/32' is not an IP prefix`), so a user fixes a config in
one pass. Unknown keys are problems too: a typo must never pass silently.

The only I/O here is reading the config file itself and the key files it names
(`private_key_file`, `preshared_key_file`); relative paths are taken from the config's directory.
Nothing is resolved through DNS: peer endpoints are literal IP addresses.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import (
    IPv4Interface,
    IPv4Network,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)
from pathlib import Path
from typing import Any, TypeVar

from agent.keys import Key32, KeyError_, NodePrivate, NodePublic, PresharedKey
from agent.proto.derpmap import DerpConfig, DerpNode, DerpRegion
from agent.proto.endpoint import parse_endpoint

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Config",
    "InterfaceConfig",
    "PeerConfig",
    "ControlConfig",
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
    "txqueuelen", "control_socket", "uapi", "fwmark", "metrics_listen",
}  # fmt: skip
_PEER_KEYS = {
    "name", "public_key", "allowed_ips", "endpoint", "derp_region", "preshared_key",
    "preshared_key_file", "persistent_keepalive",
}  # fmt: skip

_K = TypeVar("_K", bound=Key32)
_MAX_KEY_FILE = 4096
_T = TypeVar("_T")


class ConfigError(Exception):
    """The config is unusable; `problems` holds one `key.path: what is wrong` line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0] if problems else 'invalid config'}{more}")


def format_problems(err: ConfigError, *, source: str | None = None) -> str:
    """All problems, one per line, each prefixed by `source: ` when given (a file name)."""
    prefix = f"{source}: " if source else ""
    return "\n".join(prefix + line for line in err.problems)


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
class Config:
    interface: InterfaceConfig
    derp: DerpConfig = DerpConfig()
    peers: tuple[PeerConfig, ...] = ()
    control: ControlConfig | None = None


# -- entry points ---------------------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Read and validate the config file at `path`; key files are relative to its directory."""
    p = Path(path)
    return parse_config(read_config_text(p), base_dir=p.parent)


def parse_config(text: str, *, base_dir: Path | None = None) -> Config:
    """Validate TOML `text`; raise ConfigError listing every problem found."""
    c = Checker(base_dir)
    doc = c.toml(text)
    c.known("", doc, {"interface", "derp", "peers", "control"})
    c.has_control = "control" in doc
    iface_t = c.table("interface", doc.get("interface"), required=True)
    iface = c.interface(iface_t) if iface_t is not None else None
    derp = c.derp(doc.get("derp"))
    peers = tuple(c.items("", doc, "peers", c.peer))
    control = c.control(doc["control"]) if c.has_control else None
    if c.problems:
        raise ConfigError(c.problems)
    assert iface is not None
    assert derp is not None
    return Config(interface=iface, derp=derp, peers=peers, control=control)


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


def read_config_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"cannot read the config: {e.strerror or e}"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"the config is not UTF-8 text: {e.reason}"]) from e


# -- validation -----------------------------------------------------------------------------------


def _join(p: str, key: str) -> str:
    return f"{p}.{key}" if p else key


def _kind(v: object) -> str:
    match v:
        case bool():
            return f"a boolean ({str(v).lower()})"
        case int():
            return f"an integer ({v})"
        case float():
            return f"a float ({v})"
        case str():
            return f"a string ({v!r})"
        case list():
            return "an array"
        case dict():
            return "a table"
    return f"a {type(v).__name__}"


class Checker:
    """Collects problems; each check returns the parsed value, or None after adding a problem."""

    def __init__(self, base_dir: Path | None) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []
        # cross-checks, filled as sections are read (interface and derp before peers)
        self.own_public: NodePublic | None = None
        self.has_control = False  # a [control] section: addresses come from the coordinator
        self.region_ids: set[int] = set()
        self.peer_names: dict[str, str] = {}
        self.peer_keys: dict[NodePublic, str] = {}
        self.routes: dict[IPv4Network | IPv6Network, str] = {}

    def bad(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}" if path else msg)

    # generic shapes

    def toml(self, text: str) -> dict[str, Any]:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([f"not valid TOML: {e}"]) from e
        except ValueError as e:  # an integer of more than 4300 digits
            raise ConfigError([f"not valid TOML: {e}"]) from e
        except RecursionError as e:  # arrays or inline tables nested too deep
            raise ConfigError(["not valid TOML: nested too deep"]) from e

    def known(self, path: str, table: Mapping[str, Any], allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.5)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                self.bad(_join(path, key), f"unknown key{extra}")

    def table(self, path: str, v: object, *, required: bool = False) -> dict[str, Any] | None:
        if v is None:
            if required:
                self.bad(path, "missing")
            return None
        if not isinstance(v, dict):
            self.bad(path, f"expected a table, got {_kind(v)}")
            return None
        return v

    def opt(
        self,
        p: str,
        t: Mapping[str, Any],
        key: str,
        check: Callable[[str, object], _T | None],
        default: _T,
    ) -> _T:
        """t[key] through `check`, the default when absent (or when invalid: already reported)."""
        if key not in t:
            return default
        got = check(_join(p, key), t[key])
        return default if got is None else got

    def items(
        self,
        p: str,
        t: Mapping[str, Any],
        key: str,
        check: Callable[[str, object], _T | None],
        *,
        empty: str | None = None,
    ) -> list[_T]:
        """The valid items of array t[key] (absent = []); `empty` is the problem when empty."""
        if key not in t and empty is not None:
            self.bad(_join(p, key), "missing")
            return []
        arr = self.array(_join(p, key), t.get(key, []))
        if not arr and empty is not None and isinstance(t[key], list):
            self.bad(_join(p, key), empty)
        got = (check(f"{_join(p, key)}[{i}]", v) for i, v in enumerate(arr))
        return [x for x in got if x is not None]

    def required(
        self, p: str, t: Mapping[str, Any], key: str, check: Callable[[str, object], _T | None]
    ) -> _T | None:
        """t[key] through `check`; a problem when absent."""
        if key not in t:
            self.bad(_join(p, key), "missing")
            return None
        return check(_join(p, key), t[key])

    def array(self, path: str, v: object) -> list[Any]:
        if not isinstance(v, list):
            self.bad(path, f"expected an array, got {_kind(v)}")
            return []
        return v

    def string(self, path: str, v: object) -> str | None:
        if not isinstance(v, str):
            self.bad(path, f"expected a string, got {_kind(v)}")
            return None
        if not v.strip():
            self.bad(path, "must not be empty")
            return None
        return v

    def boolean(self, path: str, v: object) -> bool | None:
        if not isinstance(v, bool):
            self.bad(path, f"expected true or false, got {_kind(v)}")
            return None
        return v

    def integer(self, path: str, v: object, lo: int, hi: int) -> int | None:
        if not isinstance(v, int) or isinstance(v, bool):
            self.bad(path, f"expected an integer, got {_kind(v)}")
            return None
        if not lo <= v <= hi:
            self.bad(path, f"{v} is out of range {lo}..{hi}")
            return None
        return v

    def port(self, path: str, v: object) -> int | None:
        return self.integer(path, v, 0, 65535)

    def loopback_endpoint(self, path: str, v: object) -> tuple[str, int] | None:
        """IP:PORT such as 127.0.0.1:9101 or [::1]:9101: metrics are served on loopback only."""
        s = self.string(path, v)
        if s is None:
            return None
        host, sep, port_text = s.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ip = ip_address(host)
            port = int(port_text)
        except ValueError:
            ip, port = None, -1
        if not sep or ip is None or not 0 < port < 65536:
            self.bad(path, f"{s!r} is not IP:PORT (for example 127.0.0.1:9101)")
            return None
        if not ip.is_loopback:
            self.bad(path, f"{s!r} is not a loopback address: metrics are served on loopback only")
            return None
        return (str(ip), port)

    def nonzero_port(self, path: str, v: object) -> int | None:
        return self.integer(path, v, 1, 65535)

    def region_id(self, path: str, v: object) -> int | None:
        return self.integer(path, v, 1, 2**31 - 1)

    def path(self, path: str, v: object) -> str | None:
        s = self.string(path, v)
        if s is None:
            return None
        p = Path(s)
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
        return str(p)

    def ifname(self, path: str, v: object) -> str | None:
        s = self.string(path, v)
        if s is None:
            return None
        if len(s) > 15 or "/" in s or any(ch.isspace() for ch in s) or s in (".", ".."):
            self.bad(path, f"{s!r} is not an interface name (1-15 characters, no '/' or spaces)")
            return None
        return s

    def key(self, path: str, v: object, cls: type[_K]) -> _K | None:
        s = self.string(path, v)
        if s is None:
            return None
        try:
            k = cls.from_b64(s)
        except KeyError_ as e:
            self.bad(path, f"not a base64 key ({e})")
            return None
        if k.is_zero():
            self.bad(path, "is all zeros")
            return None
        return k

    def key_file(self, path: str, v: object, cls: type[_K]) -> _K | None:
        file = self.path(path, v)
        if file is None:
            return None
        try:
            with open(file, "rb") as f:  # bounded: a key file is ~45 bytes (not /dev/zero)
                text = f.read(_MAX_KEY_FILE).decode("ascii")
        except OSError as e:
            self.bad(path, f"cannot read {file!r}: {e.strerror or e}")
            return None
        except UnicodeDecodeError:
            self.bad(path, f"{file!r} does not hold a base64 key")
            return None
        try:
            return cls.from_b64(text)
        except KeyError_ as e:
            self.bad(path, f"{file!r} does not hold a base64 key ({e})")
            return None

    def key_or_file(
        self, path: str, t: Mapping[str, Any], key: str, cls: type[_K], *, required: bool
    ) -> _K | None:
        has_inline, has_file = key in t, f"{key}_file" in t
        if has_inline and has_file:
            self.bad(path, f"give {key} or {key}_file, not both")
            return None
        if has_inline:
            return self.key(f"{path}.{key}", t[key], cls)
        if has_file:
            return self.key_file(f"{path}.{key}_file", t[f"{key}_file"], cls)
        if required:
            self.bad(f"{path}.{key}", f"missing (give {key} or {key}_file)")
        return None

    # sections

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
        if len(self.problems) > before or priv is None:
            return None
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
        )

    def address(self, path: str, v: object) -> IPv4Interface | IPv6Interface | None:
        s = self.string(path, v)
        if s is None:
            return None
        if "/" not in s:
            self.bad(path, f"{s!r} needs a prefix length (for example {s}/32)")
            return None
        try:
            return ip_interface(s)
        except ValueError:
            self.bad(path, f"{s!r} is not an IP address with prefix")
            return None

    def network(self, path: str, v: object) -> IPv4Network | IPv6Network | None:
        s = self.string(path, v)
        if s is None:
            return None
        try:
            ip_interface(s)
        except ValueError:
            self.bad(path, f"{s!r} is not an IP prefix")
            return None
        try:
            return ip_network(s)
        except ValueError:
            self.bad(path, f"{s!r} has host bits set (did you mean {ip_interface(s).network}?)")
            return None

    def endpoint(self, path: str, v: object) -> tuple[str, int] | None:
        s = self.string(path, v)
        if s is None:
            return None
        try:
            return parse_endpoint(s)
        except ValueError as e:
            self.bad(path, str(e))
            return None

    def derp(self, v: object) -> DerpConfig | None:
        t = self.table("derp", v)
        if t is None:
            return DerpConfig() if v is None else None
        self.known("derp", t, {"home_region", "regions"})
        before = len(self.problems)
        home = self.opt("derp", t, "home_region", self.region_id, None)
        regions = self.items("derp", t, "regions", self.region)
        if home is not None and home not in self.region_ids:
            self.bad("derp.home_region", f"region {home} is not in derp.regions")
        if len(self.problems) > before:
            return None
        return DerpConfig(home_region=home, regions=tuple(regions))

    def region(self, p: str, v: object) -> DerpRegion | None:
        t = self.table(p, v)
        if t is None:
            return None
        self.known(p, t, {"id", "code", "nodes"})
        before = len(self.problems)
        rid = self.required(p, t, "id", self.region_id)
        if rid is not None:
            if rid in self.region_ids:
                self.bad(f"{p}.id", f"region {rid} is defined twice")
            self.region_ids.add(rid)
        code = self.required(p, t, "code", self.string)
        nodes = self.items(p, t, "nodes", self.node, empty="lists no node")
        if len(self.problems) > before or rid is None or code is None:
            return None
        return DerpRegion(id=rid, code=code, nodes=tuple(nodes))

    def node(self, p: str, v: object) -> DerpNode | None:
        t = self.table(p, v)
        if t is None:
            return None
        self.known(p, t, {"host", "port", "stun_port", "ca_file", "insecure_skip_verify"})
        before = len(self.problems)
        host = self.required(p, t, "host", self.string)
        if host is not None and (host.startswith("[") or any(c.isspace() for c in host)):
            self.bad(f"{p}.host", f"{host!r} is not a host name or IP address (no brackets)")
        port = self.opt(p, t, "port", self.nonzero_port, 443)
        stun_port = self.opt(p, t, "stun_port", self.port, 3478)
        ca_file = self.opt(p, t, "ca_file", self.path, None)
        insecure = self.opt(p, t, "insecure_skip_verify", self.boolean, False)
        if len(self.problems) > before or host is None:
            return None
        return DerpNode(
            host=host,
            port=port,
            stun_port=stun_port,
            ca_file=ca_file,
            insecure_skip_verify=insecure,
        )

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

"""The config checker: TOML text in, checked values out, every problem collected.

Each check takes the key path it reads (`derp.regions[0].nodes[1].port`) and the raw TOML value,
and returns the parsed value, or None after adding one `path: what is wrong` line to `problems`.
Unknown keys are problems too (with the closest known key as a hint). `ConfigError` carries them
all, so a user fixes a config in one pass. The node's config (agent.config) and the coordinator's
(agent.coordinator.config) are both read with it; the DERP map is checked here because both
carry one.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable, Mapping
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

from agent.keys import Key32, KeyError_
from agent.proto.derpmap import DerpConfig, DerpNode, DerpRegion
from agent.proto.endpoint import parse_endpoint

__all__ = ["Checker", "ConfigError", "format_problems", "read_config_text"]

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


def read_config_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"cannot read the config: {e.strerror or e}"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"the config is not UTF-8 text: {e.reason}"]) from e


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
        self.region_ids: set[int] = set()  # filled by derp(), for later cross-checks

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

    def dataplane(self, path: str, v: object) -> str | None:
        s = self.string(path, v)
        if s is not None and s not in ("auto", "native", "python"):
            self.bad(path, f"{s!r} is not one of 'auto', 'native', 'python'")
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

    # values with a meaning

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

    # the DERP map

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

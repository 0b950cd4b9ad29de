"""The control API between the daemon and the CLI: JSON lines over a UNIX stream socket.

The schema, and the CLI's side of the socket (`request`). The CLI connects to `control_socket`,
writes one request line and reads one response line:

    -> {"op": "status"}
    <- {"ok": true, "result": {"interface": "agent0", "public_key": "...", ...}}
    <- {"ok": false, "error": "unknown op 'frob'"}

Arguments of an op sit next to "op" (`{"op": "ping", "peer": "b", "count": 3}`). A line is at most
MAX_LINE bytes. The `status` result is `Status.to_dict()`, the `agent status --json` shape
(docs/reference.md): fields may be added, never renamed, so readers ignore fields they do not know.
The daemon converts engine statistics into these dataclasses; the engine never imports this.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Self, TypeVar, cast

__all__ = [
    "DaemonUnreachableError",
    "request",
    "MAX_LINE",
    "OPS",
    "PATHS",
    "PathKind",
    "ApiError",
    "Request",
    "Response",
    "PeerStatus",
    "DerpStatus",
    "Status",
]

MAX_LINE = 1 << 20
OPS = frozenset({"status", "ping", "metrics"})
PathKind = Literal["direct", "derp", "none"]
PATHS: tuple[PathKind, ...] = ("direct", "derp", "none")

_T = TypeVar("_T")


class ApiError(ValueError):
    """A request or response line does not follow this schema (or the daemon answered an error)."""


def _load_line(line: bytes | str) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise ApiError(f"message longer than {MAX_LINE} bytes")
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(f"not a JSON line: {e}") from e
    if not isinstance(obj, dict):
        raise ApiError("a message is a JSON object")
    return cast(dict[str, Any], obj)


def _dump_line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class Request:
    op: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        """One JSON line, newline included."""
        if "op" in self.args:
            raise ApiError("'op' is not an argument name")
        return _dump_line({"op": self.op, **self.args})

    @classmethod
    def parse(cls, line: bytes | str) -> Self:
        obj = _load_line(line)
        op = obj.pop("op", None)
        if not isinstance(op, str):
            raise ApiError('a request needs an "op" string')
        if op not in OPS:
            raise ApiError(f"unknown op {op!r}")
        return cls(op, obj)


@dataclass(frozen=True, slots=True)
class Response:
    ok: bool
    result: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""

    @classmethod
    def success(cls, result: Mapping[str, Any]) -> Self:
        return cls(True, result)

    @classmethod
    def failure(cls, error: str) -> Self:
        return cls(False, {}, error)

    def encode(self) -> bytes:
        """One JSON line, newline included."""
        if self.ok:
            return _dump_line({"ok": True, "result": dict(self.result)})
        return _dump_line({"ok": False, "error": self.error})

    @classmethod
    def parse(cls, line: bytes | str) -> Self:
        obj = _load_line(line)
        ok = obj.get("ok")
        if ok is True:
            result = obj.get("result", {})
            if not isinstance(result, dict):
                raise ApiError('"result" is not an object')
            return cls.success(result)
        if ok is False:
            return cls.failure(str(obj.get("error") or "unspecified error"))
        raise ApiError('a response needs "ok": true or false')


# -- status ---------------------------------------------------------------------------------------


def _field(d: Mapping[str, Any], key: str, kind: type[_T] | tuple[type, ...], default: Any) -> Any:
    """d[key] checked against `kind` (None allowed when the default is None)."""
    if key not in d:
        return default
    v = d[key]
    if v is None and default is None:
        return None
    bad_bool = isinstance(v, bool) and kind is not bool
    if bad_bool or not isinstance(v, kind):
        raise ApiError(f"status field {key!r}: unexpected {type(v).__name__} {v!r}")
    return v


def _required(d: Mapping[str, Any], key: str, kind: type[_T]) -> _T:
    if d.get(key) is None:
        raise ApiError(f"status field {key!r} is missing")
    return cast(_T, _field(d, key, kind, ...))


def _strings(d: Mapping[str, Any], key: str) -> tuple[str, ...]:
    items = _field(d, key, list, [])
    if not all(isinstance(x, str) for x in items):
        raise ApiError(f"status field {key!r}: expected a list of strings")
    return tuple(items)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerStatus:
    name: str
    public_key: str  # base64
    allowed_ips: tuple[str, ...] = ()
    path: PathKind = "none"
    endpoint: str | None = None  # "ip:port" or "[v6]:port" of the direct path in use or known
    derp_region: int | None = None
    latest_handshake: int | None = None  # unix seconds
    rx_bytes: int = 0
    tx_bytes: int = 0
    latency_ms: float | None = None
    persistent_keepalive: int | None = None  # seconds
    user: str | None = None  # the peer's owner, when a coordinator says (not for tagged nodes)
    tags: tuple[str, ...] = ()  # a tagged node's tags (they replace the user)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "public_key": self.public_key,
            "allowed_ips": list(self.allowed_ips),
            "path": self.path,
            "endpoint": self.endpoint,
            "derp_region": self.derp_region,
            "latest_handshake": self.latest_handshake,
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "latency_ms": self.latency_ms,
            "persistent_keepalive": self.persistent_keepalive,
            "user": self.user,
            "tags": list(self.tags),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        path = _field(d, "path", str, "none")
        if path not in PATHS:
            raise ApiError(f"status field 'path': {path!r} is not one of {', '.join(PATHS)}")
        latency = _field(d, "latency_ms", (int, float), None)
        return cls(
            name=_required(d, "name", str),
            public_key=_required(d, "public_key", str),
            allowed_ips=_strings(d, "allowed_ips"),
            path=path,
            endpoint=_field(d, "endpoint", str, None),
            derp_region=_field(d, "derp_region", int, None),
            latest_handshake=_field(d, "latest_handshake", int, None),
            rx_bytes=_field(d, "rx_bytes", int, 0),
            tx_bytes=_field(d, "tx_bytes", int, 0),
            latency_ms=None if latency is None else float(latency),
            persistent_keepalive=_field(d, "persistent_keepalive", int, None),
            user=_field(d, "user", str, None),
            tags=_strings(d, "tags"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DerpStatus:
    home_region: int | None = None
    connected_regions: tuple[int, ...] = ()
    stats: Mapping[str, int] = field(default_factory=dict)  # DERP link counters, summed

    def to_dict(self) -> dict[str, Any]:
        return {
            "home_region": self.home_region,
            "connected_regions": list(self.connected_regions),
            "stats": dict(self.stats),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        regions = _field(d, "connected_regions", list, [])
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in regions):
            raise ApiError("status field 'connected_regions': expected a list of integers")
        stats = _field(d, "stats", dict, {})
        return cls(
            home_region=_field(d, "home_region", int, None),
            connected_regions=tuple(regions),
            stats={str(k): int(v) for k, v in stats.items() if isinstance(v, int)},
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    interface: str
    public_key: str  # base64
    listen_port: int
    addresses: tuple[str, ...] = ()
    derp: DerpStatus = DerpStatus()
    peers: tuple[PeerStatus, ...] = ()
    drops: Mapping[str, int] = field(default_factory=dict)  # DropReason value -> count
    dataplane: Mapping[str, Any] = field(default_factory=dict)  # "offload" and free-form facts
    dns: Mapping[str, Any] | None = None  # the name service (node/dns_service.py); None: none
    portmap: Mapping[str, Any] | None = None  # the router's mapping: protocol, external, lifetime
    name: str | None = None  # this node's name on its coordinator; None without one

    def to_dict(self) -> dict[str, Any]:
        return {
            "interface": self.interface,
            "name": self.name,
            "public_key": self.public_key,
            "listen_port": self.listen_port,
            "addresses": list(self.addresses),
            "derp": self.derp.to_dict(),
            "peers": [p.to_dict() for p in self.peers],
            "drops": dict(self.drops),
            "dataplane": dict(self.dataplane),
            "dns": None if self.dns is None else dict(self.dns),
            "portmap": None if self.portmap is None else dict(self.portmap),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        peers = _field(d, "peers", list, [])
        if not all(isinstance(p, dict) for p in peers):
            raise ApiError("status field 'peers': expected a list of objects")
        drops = _field(d, "drops", dict, {})
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in drops.values()):
            raise ApiError("status field 'drops': expected integer counts")
        return cls(
            interface=_required(d, "interface", str),
            public_key=_required(d, "public_key", str),
            listen_port=_required(d, "listen_port", int),
            addresses=_strings(d, "addresses"),
            derp=DerpStatus.from_dict(_field(d, "derp", dict, {})),
            peers=tuple(PeerStatus.from_dict(p) for p in peers),
            drops=dict(drops),
            dataplane=dict(_field(d, "dataplane", dict, {})),
            dns=_field(d, "dns", dict, None),
            portmap=_field(d, "portmap", dict, None),
            name=_field(d, "name", str, None),
        )

    def to_json(self) -> str:
        """One line of JSON (no newline): what `agent status --json` prints."""
        return json.dumps(self.to_dict(), separators=(", ", ": "), allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        try:
            obj = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(f"not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise ApiError("a status is a JSON object")
        return cls.from_dict(obj)


class DaemonUnreachableError(Exception):
    """The control socket is absent, refuses, or does not answer."""


REQUEST_TIMEOUT = 5.0


# -- the client's side: one request, one answer -------------------------------------------------


def request(
    socket_path: str, op: str, *, timeout: float = REQUEST_TIMEOUT, **args: Any
) -> dict[str, Any]:
    """Send one request to the daemon and return its result; ApiError when it answers an error."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(Request(op, args).encode())
            buf = bytearray()
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise ApiError(f"answer longer than {MAX_LINE} bytes")
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise DaemonUnreachableError(
            f"cannot reach the daemon at {socket_path} (is `agent up` running?)"
        ) from e
    except PermissionError as e:
        raise DaemonUnreachableError(f"no permission to use {socket_path} (try as root)") from e
    except TimeoutError as e:
        raise DaemonUnreachableError(
            f"the daemon at {socket_path} did not answer in {timeout:g}s"
        ) from e
    except OSError as e:
        raise DaemonUnreachableError(
            f"cannot reach the daemon at {socket_path}: {e.strerror or e}"
        ) from e
    line, _, _ = bytes(buf).partition(b"\n")
    if not line:
        raise DaemonUnreachableError(f"the daemon at {socket_path} closed without answering")
    resp = Response.parse(line)
    if not resp.ok:
        raise ApiError(resp.error)
    return dict(resp.result)

"""The `agent` command: key tools, the daemon in the foreground, status, the demo.

    agent genkey | genpsk                  a new private / preshared key, base64 (as `wg genkey`)
    agent pubkey                           private key on stdin -> public key (as `wg pubkey`)
    agent genkey -o FILE [--if-missing]    write a new private key to FILE (0600)
    agent join URL --auth-key KEY          join a coordinator: config, then the service
    agent up -c FILE [--log-level L]       run the daemon in the foreground
    agent status [-c FILE] [--json]        ask the running daemon over its control socket
    agent demo                             a self-contained tour on one machine (root)

Expected failures (a missing file, a bad key, a bad config, no daemon) print one line and exit 1;
never a traceback. Logging is configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from agent import __version__
from agent.api import MAX_LINE, ApiError, Request, Response, Status
from agent.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    control_socket_path,
    format_problems,
    load_config,
)
from agent.keys import KeyError_, NodePrivate, PresharedKey
from agent.log import LEVELS, configure_logging

__all__ = ["main", "request", "DaemonUnreachableError", "format_status"]

_REQUEST_TIMEOUT = 5.0
_PING_WAIT = 5.0  # the daemon waits this long for a pong


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count")
    return n


_DEFAULT_SOCKET = "/run/agent/agent0.sock"


class DaemonUnreachableError(Exception):
    """The control socket is absent, refuses, or does not answer."""


def _err(msg: str) -> int:
    sys.stderr.write(f"agent: {msg}\n")
    return 1


# -- the control socket client --------------------------------------------------------------------


def request(
    socket_path: str, op: str, *, timeout: float = _REQUEST_TIMEOUT, **args: Any
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


# -- human output ---------------------------------------------------------------------------------


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def _ago(then: int, now: float) -> str:
    secs = int(now) - then
    if secs <= 0:
        return "just now"
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if secs >= size:
            parts.append(_plural(secs // size, unit))
            secs %= size
    return ", ".join(parts) + " ago"


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.2f} {unit}"


def format_status(st: Status, now: float) -> str:
    """A `wg show`-like table of a status; `now` is unix seconds (for "N seconds ago")."""
    home = st.derp.home_region
    connected = ", ".join(str(r) for r in st.derp.connected_regions) or "none"
    lines = [
        f"interface: {st.interface}",
        f"  public key: {st.public_key}",
        f"  listening port: {st.listen_port}",
        f"  addresses: {', '.join(st.addresses) or '(none)'}",
        f"  home derp: {home if home is not None else '(none)'} (connected: {connected})",
    ]
    if st.dataplane:
        facts = ", ".join(f"{k} {v}" for k, v in sorted(st.dataplane.items()))
        lines.append(f"  dataplane: {facts}")
    if any(st.drops.values()):
        drops = ", ".join(f"{k} {n}" for k, n in sorted(st.drops.items()) if n)
        lines.append(f"  drops: {drops}")
    for p in st.peers:
        lines += ["", f"peer: {p.name} ({p.public_key})", f"  path: {p.path}"]
        if p.endpoint:
            lines.append(f"  endpoint: {p.endpoint}")
        if p.derp_region is not None:
            lines.append(f"  derp region: {p.derp_region}")
        lines.append(f"  allowed ips: {', '.join(p.allowed_ips) or '(none)'}")
        if p.latest_handshake:
            lines.append(f"  latest handshake: {_ago(p.latest_handshake, now)}")
        if p.rx_bytes or p.tx_bytes:
            lines.append(f"  transfer: {_bytes(p.rx_bytes)} received, {_bytes(p.tx_bytes)} sent")
        if p.latency_ms is not None:
            lines.append(f"  latency: {p.latency_ms:.1f} ms")
        if p.persistent_keepalive:
            lines.append(
                f"  persistent keepalive: every {_plural(p.persistent_keepalive, 'second')}"
            )
    return "\n".join(lines)


# -- commands -------------------------------------------------------------------------------------


def _cmd_genkey(args: argparse.Namespace) -> int:
    if args.out is None:
        sys.stdout.write(NodePrivate.generate().to_b64() + "\n")
        return 0
    return _write_key_file(args.out, keep=args.if_missing)


def _write_key_file(path: str, *, keep: bool) -> int:
    """A new private key in `path` (0600, written whole or not at all). With `keep`, a file
    that already holds a key is left alone: what the service runs before every start."""
    try:
        with open(path, encoding="ascii") as f:
            existing = f.read(4096)
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        return _err(f"genkey: cannot read {path}: {getattr(e, 'strerror', None) or e}")
    else:
        if not keep:
            return _err(f"genkey: {path} exists (--if-missing keeps a key that is there)")
        try:
            NodePrivate.from_b64(existing)
        except KeyError_ as e:
            return _err(f"genkey: {path} exists but holds no private key ({e}); not replaced")
        return 0
    tmp = f"{path}.new"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (NodePrivate.generate().to_b64() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        return _err(f"genkey: cannot write {path}: {e.strerror or e}")
    return 0


def _cmd_genpsk(args: argparse.Namespace) -> int:
    sys.stdout.write(PresharedKey.generate().to_b64() + "\n")
    return 0


def _cmd_pubkey(args: argparse.Namespace) -> int:
    text = sys.stdin.read(4096)
    try:
        key = NodePrivate.from_b64(text)
    except KeyError_ as e:
        return _err(f"pubkey: the input is not a private key ({e})")
    sys.stdout.write(key.public().to_b64() + "\n")
    return 0


def _problems(path: str, err: ConfigError) -> int:
    sys.stderr.write(format_problems(err, source=path) + "\n")
    return 1


def _cmd_up(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        return _problems(args.config, e)
    try:
        configure_logging(
            args.log_level, json={"auto": None, "json": True, "console": False}[args.log_format]
        )
    except ValueError as e:  # a bad AGENT_LOG_LEVEL (argparse does not check defaults)
        return _err(str(e))
    try:
        from agent.node.main import run_daemon  # lazy: heavy, and only for `up`
    except ImportError as e:
        return _err(f"the daemon is not available: {e}")
    try:
        return run_daemon(config)
    except KeyboardInterrupt:
        return 130


def _cmd_join(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agent.join import JoinError, run_join, wait_for_addresses

    def ask(path: str) -> list[str]:
        return list(Status.from_dict(request(path, "status")).addresses)

    def addresses(config: Path, wait: float) -> list[str]:
        try:
            socket_path = control_socket_path(config)
        except ConfigError as e:
            raise JoinError(format_problems(e, source=str(config))) from e
        return wait_for_addresses(wait, ask, socket_path)

    try:
        got = run_join(
            Path(args.config),
            url=args.url,
            auth_key=args.auth_key,
            ca_file=args.ca_file,
            hostname=args.hostname,
            start=not args.no_start,
            addresses=addresses,
        )
    except JoinError as e:
        return _err(f"join: {e}")
    if args.json:
        sys.stdout.write(json.dumps({"config": args.config, "addresses": got}) + "\n")
    elif got:
        sys.stdout.write(f"joined: {', '.join(got)}\n")
    return 0


def _cmd_derper(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agent.log import get_logger
    from agent.relay.main import parse_addr, run_derper

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    try:
        configure_logging(args.log_level)
        parse_addr(args.addr)
    except ValueError as e:
        return _err(str(e))
    try:
        return run_derper(
            addr=args.addr,
            hostname=args.hostname,
            cert_mode=args.cert_mode,
            cert_dir=Path(args.cert_dir),
            stun_port=args.stun_port,
            log=get_logger("agent.derper"),
            config=path(args.config),
            mesh_key_file=path(args.mesh_key_file),
            mesh_with=args.mesh_with,
            mesh_ca_file=path(args.mesh_ca_file),
            verify_clients_file=path(args.verify_clients_file),
            rate_config=path(args.rate_config),
        )
    except ValueError as e:  # a bad key file, mesh key, --mesh-with entry, allowed-keys line
        # or rate config
        return _err(f"derper: {e}")
    except OSError as e:  # includes ssl.SSLError (bad or missing certificate)
        return _err(f"derper: {e}")
    except KeyboardInterrupt:
        return 130


def _socket_path(args: argparse.Namespace) -> str | int:
    """The daemon's control socket from --socket or the config; an exit status on a bad config."""
    path: str | None = args.socket
    if path is None and args.config is None and not os.path.exists(DEFAULT_CONFIG_PATH):
        path = _DEFAULT_SOCKET  # no config installed: the daemon's default socket
    if path is None:
        conf = args.config or DEFAULT_CONFIG_PATH
        try:
            path = control_socket_path(conf)
        except ConfigError as e:
            return _problems(conf, e)
    return path


def _cmd_status(args: argparse.Namespace) -> int:
    path = _socket_path(args)
    if isinstance(path, int):
        return path
    try:
        result = request(path, "status")
        status = Status.from_dict(result)
    except DaemonUnreachableError as e:
        return _err(str(e))
    except ApiError as e:
        return _err(f"bad answer from the daemon at {path}: {e}")
    if args.json:
        sys.stdout.write(json.dumps(status.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(format_status(status, time.time()) + "\n")
    return 0


def format_pong(result: dict[str, Any]) -> str:
    """One `tailscale ping`-like line: `pong from b (100.64.0.2) via DERP(lab) in 3.1ms`."""
    who = f"{result.get('peer')} ({result.get('address')})"
    if not result.get("pong"):
        return f"timeout waiting for pong from {who}"
    if result.get("via") == "derp":
        via = f"DERP({result.get('derp_code') or result.get('derp_region')})"
    else:
        via = str(result.get("endpoint"))
    return f"pong from {who} via {via} in {float(result.get('latency_ms') or 0):.1f}ms"


def _cmd_ping(args: argparse.Namespace) -> int:
    path = _socket_path(args)
    if isinstance(path, int):
        return path
    ponged = direct = False
    for i in range(args.count):
        if i:
            time.sleep(args.interval)
        try:
            result = request(path, "ping", timeout=_PING_WAIT + 3, peer=args.peer)
        except DaemonUnreachableError as e:
            return _err(str(e))
        except ApiError as e:
            return _err(str(e))
        line = json.dumps(result) if args.json else format_pong(result)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        ponged = ponged or bool(result.get("pong"))
        direct = bool(result.get("pong")) and result.get("via") == "direct"
        if direct and args.until_direct:
            break
    if args.until_direct and not direct:
        sys.stderr.write("direct connection not established\n")
        return 1
    return 0 if ponged else 1


def _cmd_metrics(args: argparse.Namespace) -> int:
    path = _socket_path(args)
    if isinstance(path, int):
        return path
    try:
        result = request(path, "metrics")
    except (DaemonUnreachableError, ApiError) as e:
        return _err(str(e))
    sys.stdout.write(str(result.get("text", "")))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo  # lazy: only for `demo`

    return run_demo(args)


def _cmd_netcheck(args: argparse.Namespace) -> int:
    import asyncio

    from agent.node.netcheck_cmd import format_report, netcheck_once

    try:
        config = load_config(args.config)
    except ConfigError as e:
        return _problems(args.config, e)
    if not config.derp.regions:
        return _err(f"netcheck: {args.config} has no [[derp.regions]] to measure")
    configure_logging("warning")  # failed probes are part of the report, not warnings
    report = asyncio.run(netcheck_once(config.derp))
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write("\n" + format_report(report, config.derp) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent", description="Userspace WireGuard-compatible overlay VPN agent."
    )
    parser.add_argument("--version", action="version", version=f"agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("genkey", help="print a new private key (base64, as `wg genkey`)")
    p.add_argument("-o", "--out", metavar="FILE", help="write it to FILE (mode 0600) instead")
    p.add_argument(
        "--if-missing",
        action="store_true",
        help="with --out: keep FILE if it already holds a private key",
    )
    p.set_defaults(func=_cmd_genkey)
    p = sub.add_parser("genpsk", help="print a new preshared key (base64, as `wg genpsk`)")
    p.set_defaults(func=_cmd_genpsk)
    p = sub.add_parser("pubkey", help="read a private key on stdin, print its public key")
    p.set_defaults(func=_cmd_pubkey)

    conf_help = f"config file (default {DEFAULT_CONFIG_PATH})"
    p = sub.add_parser("up", help="run the daemon in the foreground")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH, help=conf_help)
    p.add_argument("--log-level", default=os.environ.get("AGENT_LOG_LEVEL", "info"), choices=LEVELS)
    p.add_argument(
        "--log-format",
        default="auto",
        choices=("auto", "json", "console"),
        help="auto: readable on a terminal, JSON lines otherwise",
    )
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser(
        "join",
        help="join a coordinator: write [control] into the config, start the service",
        description="Write the [control] section of the config (other keys stay), then enable "
        "and (re)start the agent's systemd unit and print the addresses it got.",
    )
    p.add_argument("url", metavar="URL", help="the coordinator, https://HOST[:PORT]")
    p.add_argument(
        "--auth-key",
        required=True,
        metavar="KEY",
        help="from `agent coordinator keys create`; file:PATH reads it from a file",
    )
    p.add_argument("--ca-file", help="PEM CAs for the coordinator's TLS (default: system store)")
    p.add_argument("--hostname", help="the name peers see (default: this host's name)")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH, help=conf_help)
    p.add_argument("--no-start", action="store_true", help="only write the config; start nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_join)

    p = sub.add_parser("status", help="show the running daemon's interface and peers")
    p.add_argument("-c", "--config", help=conf_help)
    p.add_argument("--socket", help="control socket (default: control_socket of the config)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("ping", help="DISCO ping a peer; show the path and the time of each pong")
    p.add_argument("peer", metavar="PEER", help="peer name, overlay address or public key")
    p.add_argument("-c", "--config", help=conf_help)
    p.add_argument("--socket", help="control socket (default: control_socket of the config)")
    p.add_argument("-n", "--count", type=_positive, default=10, help="pings to send (default 10)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between pings (default 1)")
    p.add_argument(
        "--until-direct",
        action="store_true",
        help="stop at the first pong over a direct path; exit 1 if none came",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per pong")
    p.set_defaults(func=_cmd_ping)

    p = sub.add_parser("metrics", help="print the daemon's Prometheus metrics")
    p.add_argument("-c", "--config", help=conf_help)
    p.add_argument("--socket", help="control socket (default: control_socket of the config)")
    p.set_defaults(func=_cmd_metrics)

    p = sub.add_parser("netcheck", help="measure UDP, public endpoints and DERP region latency")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH, help=conf_help)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_netcheck)

    p = sub.add_parser("derper", help="run a DERP relay (TLS) and STUN server")
    p.add_argument("--addr", default=":443", help="HOST:PORT to listen on (default :443)")
    p.add_argument("--hostname", default="derp.local", help="TLS name of this relay")
    p.add_argument("--cert-mode", choices=("manual", "self-signed"), default="self-signed")
    p.add_argument(
        "--cert-dir",
        default="/var/lib/agent/derper-certs",
        help="manual: HOSTNAME.crt/.key are read here; self-signed: generated and kept here",
    )
    p.add_argument("--stun-port", type=int, default=3478, help="UDP STUN port, 0 = off")
    p.add_argument(
        "-c",
        "--config",
        help='server key file {"PrivateKey": "privkey:<hex>"}, created (0600) if missing; '
        "without it the key is new at every start",
    )
    p.add_argument("--mesh-key-file", help="region mesh key: a file of 64 hex digits")
    p.add_argument(
        "--mesh-with",
        default="",
        help="the region's other nodes, https://HOST[:PORT],... (our own address is skipped)",
    )
    p.add_argument(
        "--mesh-ca-file",
        help="PEM certificates trusted when dialling mesh nodes (default: the system store)",
    )
    p.add_argument(
        "--verify-clients-file",
        help="allowed client public keys, one a line (base64 or nodekey:<hex>, # comments)",
    )
    p.add_argument(
        "--rate-config",
        metavar="FILE",
        help='per-client receive limit, JSON {"PerClientRateLimitBytesPerSec": N, '
        '"PerClientRateBurstBytes": M} (N = 0: off); read again on SIGHUP',
    )
    p.add_argument("--log-level", default=os.environ.get("AGENT_LOG_LEVEL", "info"))
    p.set_defaults(func=_cmd_derper)

    from agent.coordinator.admin import add_parser as add_coordinator_parser  # light: argparse

    add_coordinator_parser(sub)

    p = sub.add_parser("demo", help="a self-contained tour on one machine (root)")
    p.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)  # reserved
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        return 2
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `agent status | head`
        return 0
    return rc

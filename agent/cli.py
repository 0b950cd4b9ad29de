"""The `agent` command: key tools, the daemon in the foreground, status, the demo.

    agent genkey | genpsk                  a new private / preshared key, base64 (as `wg genkey`)
    agent pubkey                           private key on stdin -> public key (as `wg pubkey`)
    agent genkey -o FILE [--if-missing]    write a new private key to FILE (0600)
    agent join URL --auth-key KEY          join a coordinator: config, then the service
    agent up -c FILE [--log-level L]       run the daemon in the foreground
    agent status [-v] [--json]             the running daemon's interface and peers
    agent ip [NAME] | whois ADDRESS        overlay addresses: ours, a peer's, who has one
    agent ping PEER | metrics | netcheck   ask the running daemon; measure the network
    agent derper | coordinator ...         the relay and the coordination server
    agent completion bash                  shell completion, generated from these parsers
    agent demo                             a self-contained tour on one machine (root)

The full list, with every flag: docs/reference.md.

Expected failures (a missing file, a bad key, a bad config, no daemon) print one line and exit 1;
never a traceback. Logging is configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from agent import __version__
from agent.api import ApiError, DaemonUnreachableError, Status, request
from agent.cli_text import completion_script, format_pong, format_status, format_whois
from agent.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    control_socket_path,
    format_problems,
    load_config,
)
from agent.keys import KeyError_, NodePrivate, PresharedKey
from agent.log import LEVELS, configure_logging

__all__ = ["main"]

_PING_WAIT = 5.0  # the daemon waits this long for a pong


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count")
    return n


_DEFAULT_SOCKET = "/run/agent/agent0.sock"


def _err(msg: str) -> int:
    sys.stderr.write(f"agent: {msg}\n")
    return 1


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
    from agent.node.progress import for_up  # light; on a terminal: what it waits for and got

    progress = for_up(sys.stdout, json=args.json)
    fmt = {"auto": True if args.json else None, "json": True, "console": False}[args.log_format]
    level = args.log_level or ("warning" if progress.terminal else "info")
    try:
        hook = progress.clear if sys.stderr.isatty() else None  # logs share its terminal
        configure_logging(level, json=fmt, before_write=hook)
    except ValueError as e:  # a bad AGENT_LOG_LEVEL (argparse does not check defaults)
        return _err(str(e))
    try:
        from agent.node.main import run_daemon  # lazy: heavy, and only for `up`
    except ImportError as e:
        return _err(f"the daemon is not available: {e}")
    try:
        return run_daemon(config, progress)
    except KeyboardInterrupt:
        return 130


def _cmd_join(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agent.join import JoinError, run_join, wait_for_addresses

    joined: dict[str, str | None] = {"name": None}

    def ask(path: str) -> list[str]:
        st = Status.from_dict(request(path, "status"))
        joined["name"] = st.name
        return [a.partition("/")[0] for a in st.addresses]

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
    name = joined["name"]
    if args.json:
        doc = {"config": args.config, "name": name, "addresses": got}
        sys.stdout.write(json.dumps(doc) + "\n")
    elif got:  # "joined as a, 100.64.0.1, fd7a:115c:a1e0::1"
        sys.stdout.write(f"joined{f' as {name}' if name else ''}, {', '.join(got)}\n")
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


def _status(args: argparse.Namespace) -> Status | int:
    """The daemon's status, or the exit status after saying why there is none."""
    path = _socket_path(args)
    if isinstance(path, int):
        return path
    try:
        return Status.from_dict(request(path, "status"))
    except DaemonUnreachableError as e:
        return _err(str(e))
    except ApiError as e:
        return _err(f"bad answer from the daemon at {path}: {e}")


def _cmd_status(args: argparse.Namespace) -> int:
    status = _status(args)
    if isinstance(status, int):
        return status
    if args.json:
        sys.stdout.write(json.dumps(status.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(format_status(status, time.time(), verbose=args.verbose) + "\n")
    return 0


def _hosts(prefixes: Sequence[str]) -> list[str]:
    """The single addresses among prefixes (/32, /128): what a node "has"."""
    out = []
    for p in prefixes:
        net = ipaddress.ip_network(p, strict=False)
        if net.num_addresses == 1:
            out.append(str(net.network_address))
    return out


def _cmd_ip(args: argparse.Namespace) -> int:
    status = _status(args)
    if isinstance(status, int):
        return status
    if args.name is None:
        addrs = [a.partition("/")[0] for a in status.addresses]
    else:
        peer = next((p for p in status.peers if args.name in (p.name, p.public_key)), None)
        if peer is None:
            return _err(f"ip: no peer named {args.name!r} (`agent status` lists them)")
        addrs = _hosts(peer.allowed_ips)
    if args.family:
        addrs = [a for a in addrs if ipaddress.ip_address(a).version == args.family]
    sys.stdout.write("".join(a + "\n" for a in addrs))
    return 0 if addrs else 1


def _cmd_whois(args: argparse.Namespace) -> int:
    try:
        address = ipaddress.ip_address(args.address)
    except ValueError:
        return _err(f"whois: {args.address!r} is not an IP address")
    status = _status(args)
    if isinstance(status, int):
        return status
    info: dict[str, Any]
    if any(ipaddress.ip_interface(a).ip == address for a in status.addresses):
        info = {"name": status.interface, "self": True, "public_key": status.public_key}
    else:
        peer = next(
            (
                p
                for p in status.peers
                if any(address in ipaddress.ip_network(n, strict=False) for n in p.allowed_ips)
            ),
            None,
        )
        if peer is None:
            return _err(f"whois: no node has {address}")
        info = {
            "name": peer.name,
            "self": False,
            "public_key": peer.public_key,
            "user": peer.user,
            "tags": list(peer.tags),
            "addresses": _hosts(peer.allowed_ips),
        }
    sys.stdout.write((json.dumps(info) if args.json else format_whois(address, info)) + "\n")
    return 0


def _cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(completion_script(_parser()))
    return 0


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
    from agent.node.portmapping import netcheck_with_portmap

    try:
        config = load_config(args.config)
    except ConfigError as e:
        return _problems(args.config, e)
    if not config.derp.regions:
        return _err(f"netcheck: {args.config} has no [[derp.regions]] to measure")
    configure_logging("warning")  # failed probes are part of the report, not warnings
    probe = config.interface.portmap
    report = asyncio.run(netcheck_with_portmap(netcheck_once(config.derp), probe=probe))
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
    p.add_argument(
        "--log-level",
        default=os.environ.get("AGENT_LOG_LEVEL"),
        choices=LEVELS,
        help="least severe level logged (default AGENT_LOG_LEVEL, else info; warning when "
        "stdout is a terminal, which then shows progress)",
    )
    p.add_argument(
        "--log-format",
        default="auto",
        choices=("auto", "json", "console"),
        help="auto: readable on a terminal, JSON lines otherwise",
    )
    p.add_argument("--json", action="store_true", help="no progress; one JSON line once up")
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
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also keys, all allowed IPs and counters"
    )
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("ip", help="print this node's overlay addresses, or a peer's")
    p.add_argument("name", nargs="?", metavar="NAME", help="a peer's name or public key")
    p.add_argument("-c", "--config", help=conf_help)
    p.add_argument("--socket", help="control socket (default: control_socket of the config)")
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="family", action="store_const", const=4, help="IPv4 only")
    fam.add_argument("-6", dest="family", action="store_const", const=6, help="IPv6 only")
    p.set_defaults(func=_cmd_ip, family=None)

    p = sub.add_parser("whois", help="which node (and user or tags) has an overlay address")
    p.add_argument("address", metavar="ADDRESS", help="an overlay IP address")
    p.add_argument("-c", "--config", help=conf_help)
    p.add_argument("--socket", help="control socket (default: control_socket of the config)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=_cmd_whois)

    p = sub.add_parser("completion", help="print a shell completion script")
    p.add_argument("shell", metavar="SHELL", choices=("bash",), help="the shell (bash)")
    p.set_defaults(func=_cmd_completion)

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
    p.add_argument(
        "--cert-mode",
        choices=("manual", "self-signed"),
        default="self-signed",
        help="self-signed: made once in --cert-dir; manual: HOSTNAME.crt/.key read from it",
    )
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
    p.add_argument(
        "--log-level",
        default=os.environ.get("AGENT_LOG_LEVEL", "info"),
        choices=LEVELS,
        help="least severe level logged (default info, or AGENT_LOG_LEVEL)",
    )
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

"""What the `agent` command prints for people: status, pongs, sizes, ages, bash completion.

Everything here is a pure function of data the daemon answered (agent.api) or of the argument
parsers; nothing reads a socket or the clock (`now` comes in). Human output never shows a
Python repr: nested counters are flattened to `name.sub value` words, and a missing value is
"-". Machines use `--json`, which prints the daemon's answer as it is.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from agent.api import PeerStatus, Status

__all__ = [
    "ago",
    "completion_script",
    "dns_lines",
    "flatten",
    "format_pong",
    "format_status",
    "format_whois",
    "owner",
    "path_text",
    "plural",
    "size",
]


def plural(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def ago(then: int, now: float) -> str:
    """`then` (unix seconds) as "4s ago", "3m ago", "2h ago", "5d ago"."""
    secs = int(now) - then
    if secs <= 0:
        return "just now"
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= span:
            return f"{secs // span}{unit} ago"
    return f"{secs}s ago"


def size(n: int) -> str:
    """Bytes in binary units: 880 B, 1.2 KiB, 3.4 MiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def flatten(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted name, text) of every leaf of nested mappings; lists become comma lists."""
    for key in sorted(values):
        value = values[key]
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, name + ".")
        elif isinstance(value, list | tuple):
            yield name, ", ".join(str(v) for v in value) or "-"
        elif value is None:
            yield name, "-"
        else:
            yield name, str(value)


def owner(peer: PeerStatus) -> str:
    """Who a peer belongs to: its tags, else "user@", else "-"."""
    if peer.tags:
        return ",".join(peer.tags)
    if peer.user:
        return f"{peer.user}@"
    return "-"


def path_text(peer: PeerStatus) -> str:
    if peer.path == "direct":
        return f"direct {peer.endpoint}" if peer.endpoint else "direct"
    if peer.path == "derp":
        return f"relay {peer.derp_region}" if peer.derp_region is not None else "relay"
    return "idle"


def _host(prefix: str) -> str:
    return prefix.partition("/")[0]


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_status(st: Status, now: float, *, verbose: bool = False) -> str:
    """The interface on top, then one line per peer (as `tailscale status`).

    `verbose` adds the interface's counters and, per peer, its key, every allowed IP,
    latency and keepalive."""
    home = st.derp.home_region
    named = f"{st.interface} ({st.name})" if st.name else st.interface
    lines = [
        f"{named}  {', '.join(_host(a) for a in st.addresses) or 'no address'}"
        f"  port {st.listen_port}" + (f"  home relay {home}" if home is not None else "  no relay")
    ]
    impl = st.dataplane.get("impl")
    if impl:
        why = st.dataplane.get("impl_reason")
        lines.append(f"  data plane: {impl}" + (f" ({why})" if why else ""))
    lines += dns_lines(st.dns, verbose=verbose)
    if st.portmap:
        pm = st.portmap
        lines.append(
            f"  port mapped: {pm.get('external')} ({pm.get('protocol')}, "
            f"lifetime {pm.get('lifetime')} s)"
        )
    if verbose:
        lines.append(f"  public key {st.public_key}")
        connected = ", ".join(str(r) for r in st.derp.connected_regions) or "none"
        lines.append(f"  relays connected: {connected}")
        for title, values in (
            ("data plane", {k: v for k, v in st.dataplane.items() if k != "impl_reason"}),
            ("drops", {k: v for k, v in st.drops.items() if v}),
            ("relay links", st.derp.stats),
        ):
            if values:
                lines.append(f"  {title}:")
                lines += [f"    {k} {v}" for k, v in flatten(values)]
    if not st.peers:
        lines.append("no peers")
        return "\n".join(lines)
    lines.append("")
    rows = []
    for p in st.peers:
        hs = ago(p.latest_handshake, now) if p.latest_handshake else "-"
        traffic = f"rx {size(p.rx_bytes)}, tx {size(p.tx_bytes)}"
        first = _host(p.allowed_ips[0]) if p.allowed_ips else "-"
        rows.append([first, p.name, owner(p), path_text(p), f"handshake {hs}", traffic])
    table = _table(rows)
    if not verbose:
        return "\n".join(lines + table)
    for p, row in zip(st.peers, table, strict=True):
        lines.append(row)
        lines.append(f"    key {p.public_key}")
        lines.append(f"    allowed ips {', '.join(p.allowed_ips) or '-'}")
        if p.latency_ms is not None:
            lines.append(f"    latency {p.latency_ms:.1f} ms")
        if p.persistent_keepalive:
            lines.append(f"    keepalive every {plural(p.persistent_keepalive, 'second')}")
    return "\n".join(lines)


def dns_lines(dns: Mapping[str, Any] | None, *, verbose: bool = False) -> list[str]:
    """The name service under the interface line: where it answers, whether the system
    resolver knows (or how to point one at it); its counters with `verbose`."""
    if dns is None:
        return []
    if not dns.get("enabled"):
        return ["  dns off"]
    service = ", ".join(dns.get("service", [])[:1]) or "-"
    head = f"  dns {dns.get('domain')} at {service}, {plural(int(dns.get('names', 0)), 'name')}"
    state = dns.get("resolved")
    if state == "applied":
        lines = [f"{head}, used by systemd-resolved for {dns.get('domain')} (search domain)"]
    else:
        lines = [f"{head}, not used by the system resolver"]
        if dns.get("hint"):
            lines.append(f"    {dns['hint']}")
    if verbose:
        upstreams = ", ".join(dns.get("upstreams", [])) or "none"
        dropped = ", ".join(f"{k} {v}" for k, v in flatten(dns.get("dropped", {}))) or "none"
        lines.append(f"    upstreams {upstreams}")
        tcp = dns.get("tcp") or {}
        lines.append(
            f"    answered {dns.get('answered', 0)}, forwarded {dns.get('forwarded', 0)}, "
            f"over TCP {tcp.get('queries', 0)}, dropped: {dropped}"
        )
    return lines


def format_whois(address: object, info: Mapping[str, Any]) -> str:
    """`agent whois`: the node that has `address`, its owner and key."""
    lines = [f"{address}: {info['name']}{' (this node)' if info['self'] else ''}"]
    if info.get("tags"):
        lines.append(f"  tags: {', '.join(info['tags'])}")
    elif info.get("user"):
        lines.append(f"  user: {info['user']}")
    lines.append(f"  key: {info['public_key']}")
    return "\n".join(lines)


def format_pong(result: Mapping[str, Any]) -> str:
    """One `tailscale ping`-like line: `pong from b (100.64.0.2) via DERP(lab) in 3.1ms`."""
    who = f"{result.get('peer')} ({result.get('address')})"
    if not result.get("pong"):
        return f"timeout waiting for pong from {who}"
    if result.get("via") == "derp":
        via = f"DERP({result.get('derp_code') or result.get('derp_region')})"
    else:
        via = str(result.get("endpoint"))
    return f"pong from {who} via {via} in {float(result.get('latency_ms') or 0):.1f}ms"


# -- bash completion ------------------------------------------------------------------------------


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], list[str], list[str]]]:
    """(command path, its subcommands, its options) for every parser in the tree."""
    subs: list[str] = []
    options: list[str] = []
    children: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:  # argparse has no public walk over its tree
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                subs.append(name)
                children.append((name, child))
        elif action.help != argparse.SUPPRESS:
            longs = [o for o in action.option_strings if o.startswith("--")]
            options += longs or list(action.option_strings)
    yield path, subs, options
    for name, child in children:
        yield from _commands(child, (*path, name))


def completion_script(parser: argparse.ArgumentParser, prog: str = "agent") -> str:
    """A bash completion function for `prog`, generated from its parsers.

    Completes subcommands and options at every level, and file names after options that take
    a file. Install: `agent completion bash > /etc/bash_completion.d/agent`."""
    tree = list(_commands(parser))
    known = [" ".join(path) for path, _, _ in tree if path]
    words = [(" ".join(path), " ".join([*subs, *opts])) for path, subs, opts in tree]
    func = f"_{prog.replace('-', '_')}_complete"
    out = [
        f"# bash completion for {prog}, generated from its argument parsers",
        f"{func}() {{",
        "    local cur prev path='' next w i words=''",
        '    cur="${COMP_WORDS[COMP_CWORD]}"',
        '    prev="${COMP_WORDS[COMP_CWORD-1]}"',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        w="${COMP_WORDS[i]}"',
        '        [[ "$w" == -* ]] && continue',
        '        next="${path:+$path }$w"',
        '        case "$next" in',
        f'            {"|".join(shlex.quote(k) for k in known)}) path="$next" ;;',
        "        esac",
        "    done",
        '    case "$prev" in',
        f"        {'|'.join(_FILE_OPTIONS)})",
        '            COMPREPLY=($(compgen -f -- "$cur")); return ;;',
        "    esac",
        '    case "$path" in',
    ]
    out += [f"        {shlex.quote(p)}) words={shlex.quote(w)} ;;" for p, w in words]
    out += [
        "    esac",
        '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        "}",
        f"complete -o default -F {func} {prog}",
        "",
    ]
    return "\n".join(out)


_FILE_OPTIONS = (
    "-c", "--config", "--ca-file", "-o", "--out", "--socket", "--cert-dir", "--mesh-key-file",
    "--mesh-ca-file", "--verify-clients-file", "--rate-config",
)  # fmt: skip

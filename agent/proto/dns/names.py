"""Node names: hostname -> DNS label, unique per network, FQDNs and reverse (PTR) names.

A node's name is one DNS label (RFC 1035 LDH: a-z, 0-9, '-', at most 63 octets, no leading or
trailing '-') under the network's domain, `mesh.internal` unless configured (`.internal` is
reserved for private use). Sanitising follows MagicDNS: take the hostname's first label,
lowercase it, turn anything else into '-', and keep letters of other scripts as an IDNA A-label
(`xn--…`, punycode) when that fits, else drop them.

Assignment is stable: a node keeps the name it has while its hostname still sanitises to the
same base; a newcomer whose base is taken gets `base-1`, `base-2`, … (the first free one).

Reverse names cover the overlay prefixes 100.64.0.0/10 and fd7a:115c:a1e0::/48: PTR queries under
them are ours to answer (NXDOMAIN for an address no node has).
"""

from __future__ import annotations

import ipaddress
import unicodedata
from collections.abc import Collection, Hashable, Mapping
from typing import Final, TypeVar

from agent.proto.errors import LocalProtocolError

__all__ = [
    "DEFAULT_DOMAIN",
    "MAX_LABEL",
    "MAX_NAME",
    "OVERLAY_V4",
    "OVERLAY_V6",
    "SERVICE_V4",
    "SERVICE_V6",
    "IPAddress",
    "sanitize_label",
    "is_valid_label",
    "normalize_domain",
    "assign_name",
    "assign_names",
    "fqdn",
    "reverse_name",
    "is_reverse_zone_name",
    "address_from_reverse",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
K = TypeVar("K", bound=Hashable)

DEFAULT_DOMAIN: Final = "mesh.internal"
MAX_LABEL: Final = 63
MAX_NAME: Final = 253  # presentation form without the trailing dot
FALLBACK_LABEL: Final = "node"

OVERLAY_V4: Final = ipaddress.IPv4Network("100.64.0.0/10")
OVERLAY_V6: Final = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
SERVICE_V4: Final = ipaddress.IPv4Address("100.100.100.100")
SERVICE_V6: Final = ipaddress.IPv6Address("fd7a:115c:a1e0::53")

_LDH: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_ACE_PREFIX: Final = "xn--"
# fd7a:115c:a1e0::/48 as 12 reversed nibbles under ip6.arpa.
_V6_ZONE: Final = "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa"
_V4_SUFFIX: Final = "100.in-addr.arpa"


def _collapse(text: str) -> str:
    """Runs of '-' become one; no '-' at either end."""
    out: list[str] = []
    for ch in text:
        if ch == "-" and (not out or out[-1] == "-"):
            continue
        out.append(ch)
    return "".join(out).strip("-")


def _trim(label: str, limit: int = MAX_LABEL) -> str:
    return label[:limit].rstrip("-")


def sanitize_label(hostname: str, fallback: str = FALLBACK_LABEL) -> str:
    """The DNS label for `hostname` (its first dot-separated part); `fallback` when nothing is left.

    >>> sanitize_label("Bob's MacBook Pro.local")
    'bob-s-macbook-pro'
    """
    first = unicodedata.normalize("NFKC", hostname).split(".", 1)[0].casefold()
    chars = []
    for ch in first:
        if ch in _LDH or (not ch.isascii() and ch.isalnum()):
            chars.append(ch)
        else:
            chars.append("-")
    text = _collapse("".join(chars))
    ascii_only = _collapse("".join(ch if ch.isascii() else "-" for ch in text))
    if text != ascii_only:
        try:
            ace = _ACE_PREFIX + text.encode("punycode").decode("ascii")
        except UnicodeError:  # pragma: no cover - punycode encodes every str
            ace = ""
        if len(ace) <= MAX_LABEL and is_valid_label(ace):
            return ace
        text = ascii_only
    # ASCII text holds no "--" after _collapse, so it can never pass for an A-label.
    return _trim(text) or fallback


def is_valid_label(label: str) -> bool:
    """An LDH label: 1-63 of a-z0-9- (lowercase), not starting or ending with '-'."""
    return (
        0 < len(label) <= MAX_LABEL
        and all(ch in _LDH for ch in label)
        and not label.startswith("-")
        and not label.endswith("-")
    )


def normalize_domain(domain: str) -> str:
    """`domain` lowercased, without the trailing dot; LocalProtocolError when it is not valid."""
    text = domain.strip().rstrip(".").lower()
    labels = text.split(".")
    if not text or len(text) > MAX_NAME - MAX_LABEL - 1 or not all(map(is_valid_label, labels)):
        raise LocalProtocolError(f"not a valid DNS domain: {domain!r}")
    return text


def _base_of(name: str, base: str) -> bool:
    """Whether `name` is `base` or `base` (possibly trimmed) with a `-N` suffix."""
    if name == base:
        return True
    stem, sep, num = name.rpartition("-")
    if not (sep and num.isdigit() and not num.startswith("0")):
        return False
    return stem == _trim(base, MAX_LABEL - 1 - len(num))


def assign_name(base: str, taken: Collection[str]) -> str:
    """`base` when free, else the first free `base-N` (N = 1, 2, …), trimmed to 63 octets."""
    if base not in taken:
        return base
    n = 1
    while True:
        suffix = f"-{n}"
        candidate = _trim(base, MAX_LABEL - len(suffix)) + suffix
        if candidate not in taken:
            return candidate
        n += 1


def assign_names(hostnames: Mapping[K, str], previous: Mapping[K, str]) -> dict[K, str]:
    """A unique name for every node of `hostnames` (node -> hostname), in its order.

    A node keeps its `previous` name while that name still belongs to its hostname's base (a
    rename gives a new name); the others are assigned in the mapping's order (join order, so
    the first node to claim a name keeps it bare) and clashes get `-1`, `-2`, ….
    """
    bases = {node: sanitize_label(host) for node, host in hostnames.items()}
    result: dict[K, str] = {}
    taken: set[str] = set()
    for node, base in bases.items():
        old = previous.get(node)
        if old is not None and old not in taken and _base_of(old, base):
            result[node] = old
            taken.add(old)
    for node, base in bases.items():
        if node not in result:
            result[node] = name = assign_name(base, taken)
            taken.add(name)
    return {node: result[node] for node in hostnames}


def fqdn(name: str, domain: str = DEFAULT_DOMAIN) -> str:
    """`<name>.<domain>` (no trailing dot)."""
    if not is_valid_label(name):
        raise LocalProtocolError(f"not a valid DNS label: {name!r}")
    return f"{name}.{normalize_domain(domain)}"


def reverse_name(address: IPAddress) -> str:
    """The PTR owner name of `address` (no trailing dot): `4.3.2.1.in-addr.arpa`, nibbles for v6."""
    return address.reverse_pointer


def is_reverse_zone_name(name: str) -> bool:
    """Whether `name` (lowercase, no trailing dot) lies in a reverse zone of the overlay."""
    if name == _V6_ZONE or name.endswith("." + _V6_ZONE):
        return True
    if not name.endswith("." + _V4_SUFFIX):
        return False
    second = name[: -len(_V4_SUFFIX) - 1].rsplit(".", 1)[-1]
    return (
        second.isdigit()
        and not (second.startswith("0") and second != "0")
        and (64 <= int(second) <= 127)
    )


def address_from_reverse(name: str) -> IPAddress | None:
    """The overlay address a complete PTR name (lowercase, no trailing dot) stands for, if any."""
    if name.endswith(".in-addr.arpa"):
        parts = name[: -len(".in-addr.arpa")].split(".")
        if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
            return None
        if any(p.startswith("0") and p != "0" for p in parts):
            return None
        try:
            v4 = ipaddress.IPv4Address(".".join(reversed(parts)))
        except ValueError:
            return None
        return v4 if v4 in OVERLAY_V4 else None
    if name.endswith(".ip6.arpa"):
        nibbles = name[: -len(".ip6.arpa")].split(".")
        if len(nibbles) != 32 or not all(len(n) == 1 and n in "0123456789abcdef" for n in nibbles):
            return None
        v6 = ipaddress.IPv6Address(int("".join(reversed(nibbles)), 16))
        return v6 if v6 in OVERLAY_V6 else None
    return None

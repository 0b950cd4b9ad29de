"""This machine's own addresses, as candidate endpoints for peers (pyroute2, before the loop)."""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute

__all__ = ["local_addresses"]


def local_addresses(exclude_ifnames: tuple[str, ...] = ()) -> list[str]:
    """Global unicast IPv4/IPv6 addresses of the up interfaces, except loopback, link-local and
    the interfaces named (our own TUN): where peers on the same network may reach us."""
    out: list[str] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") or "" for link in ipr.get_links()}
        for msg in ipr.get_addr():
            if names.get(msg["index"], "") in exclude_ifnames:
                continue
            text = msg.get_attr("IFA_ADDRESS")
            if not text:
                continue
            ip = ipaddress.ip_address(text)
            if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
                continue
            if str(ip) not in out:
                out.append(str(ip))
    return out

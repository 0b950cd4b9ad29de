"""Split DNS on our own link through systemd-resolved's D-Bus API (org.freedesktop.resolve1).

    agent up ──► ResolvedLink.connect()  ──► NameHasOwner(org.freedesktop.resolve1)?
                   │ no bus / no resolved: ResolvedUnavailable(hint) — nothing is changed
                 .apply(ifindex, domain)  ──► SetLinkDNS(ifindex, [(AF_INET, 100.100.100.100),
                                                                  (AF_INET6, fd7a:115c:a1e0::53)])
                                              SetLinkDomains(ifindex, [(domain, False)])
                                              SetLinkDefaultRoute(ifindex, False)
    agent down ──► .revert()              ──► RevertLink(ifindex)

Only the agent's own interface is touched, so the machine's other resolvers keep every name
outside our domain (no default route). The domain is a search domain, as Tailscale's MagicDNS
makes it: names in it go to our link, and a bare `ping laptop` becomes laptop.<domain>.
resolved forgets a link's settings when the link goes away, so a crash leaves nothing behind
once the TUN is gone; `revert` is still called on a clean exit.

resolved authorises these calls with polkit (actions org.freedesktop.resolve1.set-dns-servers,
.set-domains, .set-default-route, .revert); root always passes, another user needs a rule.
AccessDenied becomes a `ResolvedError` with that hint.

The messages are built by pure functions (`set_link_dns`, …) with jeepney, which does no I/O
of its own until a router sends them; jeepney is pure Python with no dependencies and has an
asyncio router, which is all this needs.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from jeepney import (  # type: ignore[import-untyped]
    DBusAddress,
    DBusErrorResponse,
    MessageType,
    new_method_call,
)
from jeepney.bus_messages import message_bus  # type: ignore[import-untyped]
from jeepney.io.asyncio import DBusRouter, open_dbus_router  # type: ignore[import-untyped]

from agent.proto.dns.names import (
    DEFAULT_DOMAIN,
    SERVICE_V4,
    SERVICE_V6,
    IPAddress,
    normalize_domain,
)

__all__ = [
    "RESOLVE1",
    "ResolvedError",
    "ResolvedUnavailable",
    "ResolvedLink",
    "link_dns",
    "set_link_dns",
    "set_link_domains",
    "set_link_default_route",
    "revert_link",
    "flush_caches",
    "name_has_owner",
    "manual_hint",
]

RESOLVE1: Final = "org.freedesktop.resolve1"
MANAGER: Final = DBusAddress(
    "/org/freedesktop/resolve1", bus_name=RESOLVE1, interface="org.freedesktop.resolve1.Manager"
)
_ACCESS_DENIED: Final = frozenset(
    {
        "org.freedesktop.DBus.Error.AccessDenied",
        "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
    }
)


class ResolvedError(Exception):
    """resolved refused a call; `hint` says what a person can do about it."""

    def __init__(self, method: str, name: str, detail: str, hint: str) -> None:
        super().__init__(f"{method}: {name}: {detail} ({hint})")
        self.method = method
        self.name = name
        self.hint = hint


@dataclass(frozen=True, slots=True)
class ResolvedUnavailable:
    """No systemd-resolved to configure: nothing was changed; `hint` is for `agent status`."""

    reason: str
    hint: str


def manual_hint(domain: str) -> str:
    """How to send `domain` to our responder by hand (for status output without resolved)."""
    return (
        f"systemd-resolved is not running, so the system resolver does not know {domain}: "
        f"send queries for {domain} to {SERVICE_V4} (dnsmasq: server=/{domain}/{SERVICE_V4}; "
        f"unbound: a forward-zone for {domain} to {SERVICE_V4}), or query it directly "
        f"(dig @{SERVICE_V4} NAME.{domain})"
    )


# ---------------------------------------------------------------------------- pure messages


def link_dns(servers: Sequence[IPAddress]) -> list[tuple[int, bytes]]:
    """SetLinkDNS's a(iay): (address family, packed address) per server."""
    return [(socket.AF_INET if s.version == 4 else socket.AF_INET6, s.packed) for s in servers]


def set_link_dns(ifindex: int, servers: Sequence[IPAddress]) -> Any:
    return new_method_call(MANAGER, "SetLinkDNS", "ia(iay)", (ifindex, link_dns(servers)))


def set_link_domains(ifindex: int, domains: Sequence[tuple[str, bool]]) -> Any:
    """(domain, routing_only) pairs; routing-only is resolvectl's `~domain`."""
    return new_method_call(MANAGER, "SetLinkDomains", "ia(sb)", (ifindex, list(domains)))


def set_link_default_route(ifindex: int, enable: bool) -> Any:
    return new_method_call(MANAGER, "SetLinkDefaultRoute", "ib", (ifindex, enable))


def revert_link(ifindex: int) -> Any:
    return new_method_call(MANAGER, "RevertLink", "i", (ifindex,))


def flush_caches() -> Any:
    return new_method_call(MANAGER, "FlushCaches")


def name_has_owner(name: str = RESOLVE1) -> Any:
    return message_bus.NameHasOwner(name)


# ---------------------------------------------------------------------------- the client


class ResolvedLink:
    """One connection to the system bus configuring one link; owned by the daemon's main task."""

    def __init__(self, router: DBusRouter, context: open_dbus_router) -> None:
        self._router = router
        self._context = context
        self.ifindex: int | None = None  # set by apply, cleared by revert

    @classmethod
    async def connect(
        cls, bus: str = "SYSTEM", domain: str = DEFAULT_DOMAIN
    ) -> ResolvedLink | ResolvedUnavailable:
        """A client when resolved runs on `bus`; otherwise why not, and the manual hint."""
        hint = manual_hint(normalize_domain(domain))
        context = open_dbus_router(bus=bus)
        try:
            router = await context.__aenter__()
        except (OSError, EOFError, KeyError, ValueError) as e:
            return ResolvedUnavailable(f"no D-Bus {bus.lower()} bus: {e}", hint)
        link = cls(router, context)
        try:
            (owned,) = await link._call("NameHasOwner", name_has_owner())
        except (ResolvedError, OSError, EOFError) as e:
            await link.close()
            return ResolvedUnavailable(f"D-Bus name lookup failed: {e}", hint)
        if not owned:
            await link.close()
            return ResolvedUnavailable(f"{RESOLVE1} is not on the {bus.lower()} bus", hint)
        return link

    async def _call(self, method: str, message: Any) -> tuple[Any, ...]:
        reply = await self._router.send_and_get_reply(message)
        if reply.header.message_type == MessageType.error:
            err = DBusErrorResponse(reply)
            name = str(err.name)
            detail = str(err.data[0]) if err.data else ""
            if name in _ACCESS_DENIED:
                hint = (
                    "the agent's user may not change resolved's link settings: run it as root "
                    "or allow the org.freedesktop.resolve1.set-* and .revert polkit actions"
                )
            elif name.endswith(".NoSuchLink"):
                hint = "resolved does not know the interface: is the TUN up?"
            elif name.endswith(".LinkBusy"):
                hint = "another network manager (systemd-networkd) owns this link's DNS"
            else:
                hint = "see `journalctl -u systemd-resolved`"
            raise ResolvedError(method, name, detail, hint)
        return tuple(reply.body)

    async def apply(
        self,
        ifindex: int,
        domain: str,
        servers: Sequence[IPAddress] = (SERVICE_V4, SERVICE_V6),
    ) -> None:
        """Send `domain` (only) to `servers` on link `ifindex`; ResolvedError when refused."""
        domain = normalize_domain(domain)
        self.ifindex = ifindex
        await self._call("SetLinkDNS", set_link_dns(ifindex, servers))
        await self._call("SetLinkDomains", set_link_domains(ifindex, [(domain, False)]))
        await self._call("SetLinkDefaultRoute", set_link_default_route(ifindex, False))

    async def flush(self) -> None:
        """Drop resolved's cache (after a netmap change removed names)."""
        await self._call("FlushCaches", flush_caches())

    async def revert(self) -> None:
        """Undo `apply` (RevertLink); a no-op when nothing was applied."""
        if self.ifindex is not None:
            ifindex, self.ifindex = self.ifindex, None
            await self._call("RevertLink", revert_link(ifindex))

    async def close(self) -> None:
        await self._context.__aexit__(None, None, None)

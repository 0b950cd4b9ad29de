"""The coordinator's request handling, apart from sockets: a request in, a `Reply` out.

`Service.handle()` routes one HTTP request (method, target, Authorization header, body, `now` in
unix seconds) and talks to the Store (blocking: the server runs it on its database thread). A
netmap request is authenticated here and answered with `WaitForNetmap`; the server then waits for
the network version to pass `since` and calls `Service.netmap_reply()`, which only reads a
`Snapshot` (no database), so a thousand waiting nodes cost one database read per change. Each
node gets only the peers the access policy lets it exchange traffic with, and its own packet
filter (netmaps.py).

Errors are `ServiceError(status, code, message)` and become `{"error": code, "message": ...}`
bodies; the codes are listed in the package docstring.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, urlsplit

from nacl.exceptions import CryptoError

from agent.coordinator.config import CoordinatorConfig
from agent.coordinator.netmaps import SnapshotNetmaps
from agent.coordinator.store import (
    AuthKeyRejected,
    NodeExpired,
    NodeRecord,
    NotFound,
    ReplayedRegistration,
    Snapshot,
    Store,
    StoreError,
)
from agent.proto.coordinator_messages import (
    API,
    BadMessage,
    ErrorBody,
    RegisterRequest,
    Registration,
    SealedRequest,
    SealedResponse,
    ServerKey,
    UpdateRequest,
    derp_to_json,
    seal,
    unseal,
)

__all__ = [
    "MAX_SKEW",
    "ServiceError",
    "Reply",
    "WaitForNetmap",
    "Service",
]

MAX_SKEW: Final = 60.0  # a register timestamp this far from the coordinator's clock is refused


class ServiceError(Exception):
    """A request the coordinator refuses: HTTP status, error code and message for the body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def reply(self) -> Reply:
        return Reply(self.status, ErrorBody(self.code, self.message).encode())


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    changed: bool = False  # the request changed the database: servers re-read it at once


@dataclass(frozen=True, slots=True)
class WaitForNetmap:
    node_id: int
    since: int | None  # None: answer at once
    version: int  # the database's version when the request was authenticated


def _unauthorized() -> ServiceError:
    """A fresh error each time: raising one shared instance grew its traceback (and every frame
    and request body it held) by two entries per request, without bound."""
    return ServiceError(401, "unauthorized", "unknown or revoked token (node removed?)")


class Service:
    """Routes requests; owns nothing but the store handle and the settings."""

    def __init__(
        self,
        store: Store,
        config: CoordinatorConfig,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.store = store
        self.config = config
        self.server_key = store.server_key()
        self._randbytes = randbytes
        self._netmaps: SnapshotNetmaps | None = None  # of the last snapshot asked for
        rest = json.dumps(
            {
                "ipv4_range": str(config.ipv4_range),
                "ipv6_range": str(config.ipv6_range),
                "derp": derp_to_json(config.derp),
            },
            separators=(",", ":"),
        ).encode()
        self._tail = rest[1:]  # `"ipv4_range":...}`: the end of every netmap

    # -- routing -----------------------------------------------------------------------------------

    def handle(
        self, method: str, target: str, authorization: str | None, body: bytes, now: float
    ) -> Reply | WaitForNetmap:
        """One request; blocking (database). Never raises ServiceError: it becomes the reply."""
        try:
            return self._route(method, target, authorization, body, now)
        except ServiceError as e:
            return e.reply()

    def _route(
        self, method: str, target: str, authorization: str | None, body: bytes, now: float
    ) -> Reply | WaitForNetmap:
        url = urlsplit(target)
        routes: dict[str, tuple[str, Callable[[], Reply | WaitForNetmap]]] = {
            f"{API}/key": ("GET", lambda: self._key(now)),
            f"{API}/register": ("POST", lambda: self._register(body, now)),
            f"{API}/update": ("POST", lambda: self._update(authorization, body, now)),
            f"{API}/netmap": ("GET", lambda: self._netmap(authorization, url.query, now)),
        }
        route = routes.get(url.path)
        if route is None:
            raise ServiceError(404, "not_found", f"no such endpoint: {url.path}")
        want, handler = route
        if method != want and not (want == "GET" and method == "HEAD"):
            raise ServiceError(405, "method_not_allowed", f"{url.path} takes {want}")
        return handler()

    # -- endpoints ---------------------------------------------------------------------------------

    def _key(self, now: float) -> Reply:
        return Reply(200, ServerKey(self.server_key.public(), now).encode())

    def _register(self, body: bytes, now: float) -> Reply:
        try:
            sealed = SealedRequest.parse(body)
        except BadMessage as e:
            raise ServiceError(400, "bad_request", str(e)) from None
        try:
            plain = unseal(self.server_key, sealed.node_key.raw, sealed.nonce, sealed.sealed)
        except CryptoError:
            raise ServiceError(
                401, "bad_seal", "the request is not sealed by the node key to this coordinator"
            ) from None
        try:
            req = RegisterRequest.parse(plain)
        except BadMessage as e:
            raise ServiceError(400, "bad_request", str(e)) from None
        if abs(req.timestamp - now) > MAX_SKEW:
            raise ServiceError(
                400, "bad_timestamp", "the timestamp is not the coordinator's time (GET /key)"
            )
        cfg = self.config
        try:
            node, token = self.store.register_node(
                auth_key=req.auth_key,
                node_key=sealed.node_key,
                disco_key=req.disco_key,
                hostname=req.hostname,
                endpoints=req.endpoints,
                home_region=req.home_region,
                timestamp=req.timestamp,
                key_lifetime=cfg.node_key_expiry,
                ipv4_range=cfg.ipv4_range,
                ipv6_range=cfg.ipv6_range,
                now=now,
            )
        except AuthKeyRejected as e:
            raise ServiceError(401, e.code, str(e)) from None
        except NodeExpired as e:
            raise ServiceError(403, e.code, str(e)) from None
        except ReplayedRegistration as e:
            raise ServiceError(409, e.code, str(e)) from None
        except StoreError as e:
            raise ServiceError(503, e.code, str(e)) from None
        registration = Registration(
            node=node.info(),
            token=token,
            ipv4_range=cfg.ipv4_range,
            ipv6_range=cfg.ipv6_range,
            derp=cfg.derp,
        )
        nonce = self._randbytes(24)
        out = seal(self.server_key, sealed.node_key.raw, registration.encode(), nonce)
        return Reply(200, SealedResponse(nonce, out).encode(), changed=True)

    def _authenticate(self, authorization: str | None, now: float) -> NodeRecord:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceError(401, "unauthorized", "missing Authorization: Bearer TOKEN")
        node = self.store.node_by_token(token.strip())
        if node is None:
            raise _unauthorized()
        if node.expired(now):
            raise ServiceError(403, "node_expired", f"the key of node {node.name!r} expired")
        return node

    def _update(self, authorization: str | None, body: bytes, now: float) -> Reply:
        node = self._authenticate(authorization, now)
        try:
            req = UpdateRequest.parse(body)
        except BadMessage as e:
            raise ServiceError(400, "bad_request", str(e)) from None
        try:
            _, changed = self.store.update_node(
                node.id,
                disco_key=req.disco_key,
                endpoints=req.endpoints,
                home_region=req.home_region,
                now=now,
            )
        except NotFound:
            raise _unauthorized() from None
        except NodeExpired as e:
            raise ServiceError(403, e.code, str(e)) from None
        return Reply(200, b'{"changed":%s}' % (b"true" if changed else b"false"), changed=changed)

    def _netmap(self, authorization: str | None, query: str, now: float) -> WaitForNetmap:
        node = self._authenticate(authorization, now)
        values = parse_qs(query).get("since", [])
        if values and not values[0].isdigit():
            raise ServiceError(400, "bad_request", "since: expected a version number")
        since = int(values[0]) if values else None
        return WaitForNetmap(node.id, since, self.store.version())

    # -- netmaps (no database) ---------------------------------------------------------------------

    def netmap_reply(self, node_id: int, snapshot: Snapshot, now: float) -> Reply:
        """The netmap of `node_id` from `snapshot`: 401 when the node is gone, 403 expired.

        Everything a netmap holds is computed once per snapshot (netmaps.py: each node's JSON,
        the compiled policy, each node's peers and filter), so answering every waiting node
        after a change costs a join of byte strings each, not JSON encoding or compiling."""
        netmaps = self._netmaps
        if netmaps is None or netmaps.snapshot is not snapshot:
            netmaps = SnapshotNetmaps(
                snapshot, tail=self._tail, dns_domain=self.config.dns_domain, now=now
            )
            self._netmaps = netmaps
        me = netmaps.fragments.get(node_id)
        if me is None:
            return _unauthorized().reply()
        if me[0].expired(now):
            return ServiceError(
                403, "node_expired", f"the key of node {me[0].name!r} expired"
            ).reply()
        return Reply(200, netmaps.body(node_id, now))

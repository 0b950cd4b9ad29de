"""The agent's side of the coordinator API (asyncio): register, update, poll the netmap.

    client = CoordinatorClient("https://coord.example.net:8443", ca_file="/etc/agent/coord-ca.pem")
    reg = await client.register(node_key=priv, disco_key=disco, hostname="a", auth_key=key)
    # reg.addresses() -> the interface addresses; client.token is now set
    netmap = await client.poll_netmap(None)            # at once
    while True:
        netmap = await client.poll_netmap(netmap.version)   # returns on a change, or ~25 s
    await client.update(disco_key=disco, endpoints=[("198.18.0.1", 41641)], home_region=900)

Each request is one HTTPS connection (TLS with `ca_file` or the system store; h11 for HTTP), so a
long-poll in one task and updates in another never wait for each other. Registration proves the
node key: the request is a NaCl box from the node's private key to the coordinator's key (read
first from GET /api/v1/key), timestamped with the coordinator's own clock, and the answer (with the
bearer token) is a box back, readable only by the node.

Errors, all `CoordinatorError`:
    CoordinatorUnavailable  cannot connect, TLS failure, timeout, 5xx: retry later (back off)
    CoordinatorRejected     a 4xx answer: `status`, `code`, `message` (a bug or a bad argument)
      NotAuthorized         401/403: unknown or used auth key, node removed, key expired:
                            retrying will not help without a new auth key
    BadResponse             the answer is not what the API promises
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Final, TypeVar
from urllib.parse import urlsplit

import h11
from nacl.exceptions import CryptoError

from agent.keys import DiscoPublic, NodePrivate
from agent.proto.coordinator_messages import (
    API,
    LONG_POLL,
    BadMessage,
    Endpoint,
    ErrorBody,
    NetMap,
    RegisterRequest,
    Registration,
    SealedRequest,
    SealedResponse,
    ServerKey,
    UpdateRequest,
    seal,
    unseal,
)

__all__ = [
    "MAX_RESPONSE",
    "CoordinatorError",
    "CoordinatorUnavailable",
    "CoordinatorRejected",
    "NotAuthorized",
    "BadResponse",
    "CoordinatorClient",
]

MAX_RESPONSE: Final = 32 << 20  # a netmap of many thousand nodes fits
_T = TypeVar("_T")


class CoordinatorError(Exception):
    """Base of every error the client raises."""


class CoordinatorUnavailable(CoordinatorError):
    """No answer (network, TLS, timeout) or a 5xx: try again later."""


class CoordinatorRejected(CoordinatorError):
    """The coordinator refused the request (4xx)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class NotAuthorized(CoordinatorRejected):
    """401/403: bad or used auth key, node removed or its key expired."""


class BadResponse(CoordinatorError):
    """The answer does not parse as the API's message."""


class CoordinatorClient:
    """One coordinator, one node. `token` is set by `register()` (or by the caller from a
    previous registration) and sent with `update()` and `poll_netmap()`."""

    def __init__(
        self,
        url: str,
        *,
        ca_file: str | None = None,
        timeout: float = 10.0,
        token: str | None = None,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        """ValueError for a URL that is not https://HOST[:PORT][/PREFIX] or an unreadable
        `ca_file` (PEM; None = the system trust store)."""
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"{url!r}: the coordinator URL must be https://HOST[:PORT]")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 443
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.token = token
        self._randbytes = randbytes
        try:
            self._ssl = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"ca_file {ca_file!r}: {getattr(e, 'strerror', None) or e}") from e

    def __repr__(self) -> str:  # the token is a secret
        return f"CoordinatorClient({self.url!r}, registered={self.token is not None})"

    # -- the API -----------------------------------------------------------------------------------

    async def server_key(self) -> ServerKey:
        _, body = await self._request("GET", "/key")
        return _parse(ServerKey.parse, body)

    async def register(
        self,
        *,
        node_key: NodePrivate,
        disco_key: DiscoPublic,
        hostname: str,
        auth_key: str = "",
        endpoints: Sequence[Endpoint] = (),
        home_region: int | None = None,
    ) -> Registration:
        """Join, or come back after a restart (a registered, unexpired node key needs no auth
        key). Sets `self.token`. NotAuthorized when the auth key is refused."""
        key = await self.server_key()
        # The coordinator's clock when it answered, plus what passed here since the answer
        # arrived: a lower bound of its clock now, so registrations one after the other carry
        # increasing timestamps. (Timing from before the request counted the TLS handshake
        # and the round trip as well: a slow first connection then put the timestamp ahead of
        # the next registration's, which was refused as a replay.)
        got_key = time.monotonic()
        req = RegisterRequest(
            auth_key=auth_key,
            disco_key=disco_key,
            hostname=hostname,
            endpoints=tuple(endpoints),
            home_region=home_region,
            timestamp=key.time + (time.monotonic() - got_key),
        )
        nonce = self._randbytes(24)
        sealed = SealedRequest(
            node_key.public(), nonce, seal(node_key, key.public_key.raw, req.encode(), nonce)
        )
        _, body = await self._request("POST", "/register", sealed.encode())
        answer = _parse(SealedResponse.parse, body)
        try:
            plain = unseal(node_key, key.public_key.raw, answer.nonce, answer.sealed)
        except CryptoError:
            raise BadResponse("the registration answer is not sealed by the coordinator") from None
        registration = _parse(Registration.parse, plain)
        if registration.node.node_key != node_key.public():
            raise BadResponse("the registration answer is for another node key")
        self.token = registration.token
        return registration

    async def update(
        self,
        *,
        disco_key: DiscoPublic,
        endpoints: Sequence[Endpoint],
        home_region: int | None,
    ) -> bool:
        """Report this node's current state (all of it); True when something changed."""
        req = UpdateRequest(disco_key, tuple(endpoints), home_region)
        _, body = await self._request("POST", "/update", req.encode(), auth=True)
        return body.strip() == b'{"changed":true}'

    async def poll_netmap(self, since: int | None = None) -> NetMap:
        """The netmap: at once when `since` is None or differs from the coordinator's version,
        else when the version changes or after about LONG_POLL seconds (the same version)."""
        path = "/netmap" if since is None else f"/netmap?since={int(since)}"
        extra = 0.0 if since is None else LONG_POLL
        _, body = await self._request("GET", path, auth=True, limit=self.timeout + extra)
        return _parse(NetMap.parse, body)

    # -- HTTP --------------------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        auth: bool = False,
        limit: float | None = None,
    ) -> tuple[int, bytes]:
        headers = [
            ("host", self.host if self.port == 443 else f"{self.host}:{self.port}"),
            ("user-agent", "agent-coordinator-client/1"),
            ("accept", "application/json"),
            ("connection", "close"),
        ]
        if auth:
            if self.token is None:
                raise NotAuthorized(401, "unauthorized", "not registered: call register() first")
            headers.append(("authorization", f"Bearer {self.token}"))
        if body or method == "POST":
            headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
        target = f"{self.prefix}{API}{path}"
        timeout = limit or self.timeout
        try:
            async with asyncio.timeout(timeout):
                status, answer = await self._exchange(method, target, headers, body)
        except TimeoutError:
            raise CoordinatorUnavailable(f"{self.url}: no answer in {timeout:g}s") from None
        except ssl.SSLError as e:
            raise CoordinatorUnavailable(f"{self.url}: TLS failed: {e.reason or e}") from None
        except OSError as e:
            raise CoordinatorUnavailable(f"{self.url}: {e.strerror or e}") from None
        except h11.ProtocolError as e:
            raise BadResponse(f"{self.url}: not HTTP/1.1: {e}") from None
        if status >= 400:
            try:
                err = ErrorBody.parse(answer)
                code, message = err.error, err.message
            except BadMessage:
                code, message = "http_error", answer[:200].decode("utf-8", "replace")
            if status >= 500:
                raise CoordinatorUnavailable(f"{self.url}: {status} {code}: {message}")
            cls = NotAuthorized if status in (401, 403) else CoordinatorRejected
            raise cls(status, code, message)
        if status != 200:
            raise BadResponse(f"{self.url}: unexpected status {status}")
        return status, answer

    async def _exchange(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self._ssl, server_hostname=self.host
        )
        try:
            conn = h11.Connection(h11.CLIENT)
            out = conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
            if body:
                out += conn.send(h11.Data(data=body)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            writer.write(out)
            await writer.drain()
            status = 0
            answer = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    answer += event.data
                    if len(answer) > MAX_RESPONSE:
                        raise BadResponse(f"an answer longer than {MAX_RESPONSE} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    return status, bytes(answer)
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionResetError("the coordinator closed the connection")
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


def _parse(parse: Callable[[bytes], _T], body: bytes) -> _T:
    try:
        return parse(body)
    except BadMessage as e:
        raise BadResponse(f"bad answer from the coordinator: {e}") from None

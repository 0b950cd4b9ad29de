"""One bounded HTTP/1.1 exchange with a router (UPnP description and SOAP), sans-I/O on h11.

    shell: connect(host, port); send(exchange.request_bytes())
           for each chunk read: exchange.receive_data(chunk) -> True when the response is complete
           at EOF: exchange.receive_eof()
           exchange.response() -> HttpResponse(status, headers, body)

The request says `Connection: close`, so a response without a length ends at EOF. Everything
the router sends is bounded: `max_size` bytes in all (headers and body); more raises
MalformedAnswer, as does anything h11 rejects. Headers are lower-cased.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11

from .errors import MalformedAnswer

__all__ = ["MAX_RESPONSE", "HttpResponse", "HttpExchange"]

MAX_RESPONSE = 128 * 1024  # the largest IGD descriptions seen are ~20 KiB; SOAP answers < 2 KiB
USER_AGENT = "Linux UPnP/1.1 agent-portmap/1"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class HttpExchange:
    """A request to `host:port` and the parse of its response. One use only."""

    method: str
    host: str
    port: int
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    max_size: int = MAX_RESPONSE
    _conn: h11.Connection = field(init=False)
    _received: int = field(init=False, default=0)
    _status: int | None = field(init=False, default=None)
    _resp_headers: dict[str, str] = field(init=False, default_factory=dict)
    _body: bytearray = field(init=False, default_factory=bytearray)
    _done: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)

    def request_bytes(self) -> bytes:
        host = self.host if self.port == 80 else f"{self.host}:{self.port}"
        headers = [
            ("Host", host),
            ("User-Agent", USER_AGENT),
            ("Connection", "close"),
            *self.headers,
        ]
        if self.body or self.method == "POST":
            headers.append(("Content-Length", str(len(self.body))))
        out = self._conn.send(h11.Request(method=self.method, target=self.target, headers=headers))
        wire = out or b""
        if self.body:
            wire += self._conn.send(h11.Data(data=self.body)) or b""
        return wire + (self._conn.send(h11.EndOfMessage()) or b"")

    def receive_data(self, data: bytes) -> bool:
        """Feed bytes read from the socket; True once the whole response is in."""
        if self._done:
            return True
        self._received += len(data)
        if self._received > self.max_size:
            raise MalformedAnswer(f"HTTP response over {self.max_size} bytes")
        self._conn.receive_data(data)
        return self._pump()

    def receive_eof(self) -> bool:
        """The router closed the connection; True if that completed the response."""
        if self._done:
            return True
        self._conn.receive_data(b"")
        return self._pump()

    def _pump(self) -> bool:
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as e:
                raise MalformedAnswer(f"HTTP: {e}") from e
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return False
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                self._status = event.status_code
                self._resp_headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers
                }
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
                return True
            elif isinstance(event, h11.ConnectionClosed):
                raise MalformedAnswer("HTTP connection closed before the response ended")

    def response(self) -> HttpResponse:
        if not self._done or self._status is None:
            raise MalformedAnswer("HTTP response incomplete")
        return HttpResponse(self._status, self._resp_headers, bytes(self._body))

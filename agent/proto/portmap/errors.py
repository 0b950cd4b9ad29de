"""Errors of the port-mapping codecs: every router answer is hostile input.

    RemoteProtocolError                  (agent.proto.errors)
    ├── MalformedPacket
    │   └── MalformedAnswer              wrong size, version, opcode, XML, HTTP or field
    └── RouterRefused                    a well-formed answer saying no (result code, SOAP fault)
        └── UpnpFault                    UPnPError errorCode / errorDescription

Parsers raise only these (and so only RemoteProtocolError); the client logs one line and moves
on to the next protocol or a backoff.
"""

from __future__ import annotations

from agent.proto.errors import MalformedPacket, RemoteProtocolError

__all__ = ["MalformedAnswer", "RouterRefused", "UpnpFault"]


class MalformedAnswer(MalformedPacket):
    """The router's answer does not parse: size, version, opcode, nonce, XML or HTTP."""


class RouterRefused(RemoteProtocolError):
    """A well-formed answer refusing the request; `code` is the protocol's result code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class UpnpFault(RouterRefused):
    """A SOAP fault carrying a UPnPError (718 conflict, 725 only permanent leases, ...)."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"UPnP error {code}: {description}", code)
        self.description = description

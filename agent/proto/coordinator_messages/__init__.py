"""The coordinator's wire messages: JSON bodies as frozen dataclasses with `parse`/`encode`.

Every body is one UTF-8 JSON object (agent/coordinator's package docstring says which endpoint
carries which). Keys are WireGuard base64, times are unix seconds (floats), endpoints are
`IP:PORT` strings (`[V6]:PORT` for IPv6), overlay addresses are bare IP strings and the address
ranges CIDR strings. The DERP map has the shape of the agent config's `[derp]` table (`regions`,
each with `id`, `code` and `nodes` of `host`, `port`, `stun_port`, `ca_file`,
`insecure_skip_verify`) and parses into `agent.proto.derpmap.DerpConfig`, so the daemon handles
static and coordinated DERP maps alike.

`parse` raises only `BadMessage` (a `MalformedPacket`, so a `RemoteProtocolError`) naming the
field at fault; `encode` trusts its own fields. Unknown keys are ignored (newer peers may add
some); missing or mistyped ones are errors.

Modules: `fields` (limits, `BadMessage`, the JSON field readers), `registration` (server key,
sealed register request and answer, updates, error bodies) and `netmap` (nodes, the DERP map's
JSON, `NetMap`).
"""

from agent.proto.coordinator_messages.fields import (
    API,
    LONG_POLL,
    MAX_BODY,
    MAX_ENDPOINTS,
    MAX_HOSTNAME,
    MAX_REGION,
    BadMessage,
    Endpoint,
)
from agent.proto.coordinator_messages.netmap import (
    NetMap,
    NodeInfo,
    derp_from_json,
    derp_to_json,
    interface_addresses,
)
from agent.proto.coordinator_messages.registration import (
    ErrorBody,
    RegisterRequest,
    Registration,
    SealedRequest,
    SealedResponse,
    ServerKey,
    UpdateRequest,
    seal,
    unseal,
)
from agent.proto.endpoint import format_endpoint, parse_endpoint

__all__ = [
    "API",
    "LONG_POLL",
    "MAX_BODY",
    "MAX_ENDPOINTS",
    "MAX_HOSTNAME",
    "MAX_REGION",
    "BadMessage",
    "Endpoint",
    "NodeInfo",
    "NetMap",
    "ServerKey",
    "RegisterRequest",
    "SealedRequest",
    "SealedResponse",
    "Registration",
    "UpdateRequest",
    "ErrorBody",
    "format_endpoint",
    "parse_endpoint",
    "derp_to_json",
    "derp_from_json",
    "interface_addresses",
    "seal",
    "unseal",
]

"""Port-mapping client (sans-I/O): asks the home router for a UDP mapping of our WireGuard port.

    model     protocols, phases, configuration, the mapping, HTTP requests, events
    core      the state machine: probing, mapping, renewing; outstanding requests and deadlines
    answers   NAT-PMP, PCP, SSDP and UPnP IGD answers, each moving the state machine
    client    PortmapClient: the public surface (inputs, outputs, next_deadline)

Layer rule: sans-I/O like the rest of agent.engine; codecs from agent.proto.portmap.
"""

from agent.engine.portmap.client import PortmapClient
from agent.engine.portmap.model import (
    HttpRequest,
    Mapping,
    MappingChanged,
    MappingLost,
    Phase,
    PortmapConfig,
    PortmapEvent,
    PortmapTimings,
    ProbeDone,
    Protocol,
)

__all__ = [
    "Protocol",
    "Phase",
    "PortmapTimings",
    "PortmapConfig",
    "Mapping",
    "HttpRequest",
    "ProbeDone",
    "MappingChanged",
    "MappingLost",
    "PortmapEvent",
    "PortmapClient",
]

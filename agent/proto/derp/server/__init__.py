"""The DERP relay core (`RelayCore`), sans-I/O, one module per concern.

core       lifecycle, receive loop and frame dispatch, per-connection deadlines
login      ClientInfo -> registration, mesh-key check
routing    clients by key, duplicate keys, delivery, PeerGone bookkeeping
mesh       keys other mesh nodes report; WatchConns, ForwardPacket, ClosePeer
ratelimit  per-connection receive token buckets, pausing reads
base       the tables and outputs they share; conn: one connection; events: what comes out
"""

from agent.proto.derp.server.conn import ConnState
from agent.proto.derp.server.core import RelayCore
from agent.proto.derp.server.events import (
    ClientRegistered,
    CloseConnection,
    ForwardToMesh,
    PauseReading,
    RelayCounters,
    RelayEvent,
    ResumeReading,
)
from agent.proto.derp.server.login import CLIENT_INFO_TIMEOUT
from agent.proto.derp.server.mesh import MESH_KEY_LEN
from agent.proto.derp.server.ratelimit import RATE_LIMIT_MIN_BURST, RATE_LIMIT_MIN_WAIT

__all__ = [
    "CLIENT_INFO_TIMEOUT",
    "MESH_KEY_LEN",
    "RATE_LIMIT_MIN_BURST",
    "RATE_LIMIT_MIN_WAIT",
    "ConnState",
    "RelayCore",
    "RelayCounters",
    "ClientRegistered",
    "CloseConnection",
    "ForwardToMesh",
    "PauseReading",
    "ResumeReading",
    "RelayEvent",
]

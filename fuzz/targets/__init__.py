"""One harness module per fuzz target; `TARGETS` names them in run order."""

from __future__ import annotations

TARGETS: tuple[str, ...] = (
    "wg_messages",
    "wg_device",
    "derp_frames",
    "derp_upgrade",
    "derp_client",
    "derp_server",
    "disco",
    "engine_disco",
    "stun",
    "offload",
    "uapi",
    "config",
    "coordinator_messages",
    "coordinator_service",
    "control_api",
    "policy",
    "packet_filter",
    "dns_responder",
    "dns_tcp",
)

"""Port mapping for the running node and for `agent netcheck`.

    PortmapLink(port, wire, flush) while `agent up` runs ([interface] portmap = true): keeps our
                                   WireGuard port mapped on the home router (node/portmap_io);
                                   MappingChanged hands the external endpoint to the path wire
                                   (a candidate of source `portmap`, engine/local_endpoints:
                                   sent in CallMeMaybe and reported to the coordinator),
                                   MappingLost withdraws it; the task, when cancelled, deletes
                                   the mapping on the router
    status()                       `agent status`: {protocol, external, lifetime} or None
    probe_port_mapping()           `agent netcheck`: which of upnp, pmp, pcp the gateway answered
    netcheck_with_portmap(run)     a netcheck report with that answer in `port_mapping`

Owned by the daemon's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Coroutine
from typing import Any, Final

from agent.engine.netcheck import Report
from agent.engine.portmap import (
    MappingChanged,
    MappingLost,
    PortmapConfig,
    PortmapEvent,
    PortmapTimings,
    Protocol,
)
from agent.log import get_logger
from agent.node.pathwire import PathWire
from agent.node.portmap_io import PortMapper
from agent.proto.endpoint import format_endpoint

__all__ = ["NETCHECK_ORDER", "PortmapLink", "netcheck_with_portmap", "probe_port_mapping"]

Endpoint = tuple[str, int]
NETCHECK_ORDER: Final = (Protocol.UPNP, Protocol.PMP, Protocol.PCP)  # as tailscale netcheck

log = get_logger("agent.portmap")


class PortmapLink:
    """The node's port mapping: one PortMapper task, its mapping as a DISCO candidate."""

    def __init__(
        self,
        listen_port: int,
        wire: PathWire,
        flush: Callable[[], None],
        *,
        mapper: Callable[..., PortMapper] = PortMapper,
    ) -> None:
        self.wire = wire
        self.flush = flush
        self.mapper = mapper(
            PortmapConfig(internal_port=listen_port), on_event=self._on_event, log=log
        )

    def start(self) -> asyncio.Task[None]:
        """The mapping task: keeps the mapping until cancelled, then deletes it (bounded)."""
        return asyncio.get_running_loop().create_task(self._run(), name="portmap")

    async def _run(self) -> None:
        try:
            await self.mapper.run()
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await self.mapper.close()

    def status(self) -> dict[str, Any] | None:
        m = self.mapper.mapping
        if m is None:
            return None
        return {
            "protocol": m.protocol.value,
            "external": format_endpoint(m.external),
            "lifetime": m.lifetime,
        }

    def _on_event(self, event: PortmapEvent) -> None:
        if isinstance(event, MappingChanged):
            self._mapped(event.mapping.external)
        elif isinstance(event, MappingLost) and self.mapper.mapping is None:
            self._mapped(None)

    def _mapped(self, endpoint: Endpoint | None) -> None:
        self.wire.set_mapped(endpoint, asyncio.get_running_loop().time())
        self.flush()


async def probe_port_mapping(budget: float = 3.0) -> tuple[str, ...] | None:
    """Which port-mapping protocols the default gateway answers (nothing is mapped); None when
    there is no gateway or the probe did not finish within `budget`."""
    config = PortmapConfig(internal_port=41641, probe_only=True, timings=PortmapTimings())
    mapper = PortMapper(config, log=log, announcements=False)
    try:
        async with asyncio.timeout(budget):
            await mapper.run()
    except TimeoutError:
        return None
    finally:
        await mapper.close(within=0.0)
    if not mapper.core.stopped or mapper.core.gateway is None:
        return None
    return tuple(p.value for p in NETCHECK_ORDER if p in mapper.available)


async def netcheck_with_portmap(run: Coroutine[object, object, Report], *, probe: bool) -> Report:
    """The netcheck report of `run`, with the port-mapping probe made at the same time (unless
    `probe` is False: `[interface] portmap = false` never talks to the router)."""
    if not probe:
        return await run
    report, protocols = await asyncio.gather(run, probe_port_mapping())
    return dataclasses.replace(report, port_mapping=protocols)

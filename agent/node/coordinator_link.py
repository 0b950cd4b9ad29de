"""The daemon's link to a coordinator (`[control]` in the config; agent/node/coordinator_client.py).

    join(config)              before the interface exists: register (the node key proves
                              itself), get the overlay addresses and the DERP map; retried with
                              backoff
    CoordinatorLink.run()     long-poll the network map; every new version goes to `on_netmap`
                              (peers added, changed, removed live, without touching the
                              interface)
    CoordinatorLink.report()  our endpoints and home region changed: one update, coalesced

A node the coordinator no longer accepts (removed by an admin, key expired: NotAuthorized) is
out of the network: the link stops, says why and the daemon drops the coordinator's peers; it
does not register again by itself (a reusable auth key would undo the removal): restarting
with a new auth key joins again. An unreachable coordinator is retried with backoff and
jitter; the tunnel keeps working meanwhile with the last network map.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
from collections.abc import Callable, Sequence

from agent.config import Config
from agent.engine.discokeys import static_disco_public
from agent.log import get_logger
from agent.node.coordinator_client import (
    CoordinatorClient,
    CoordinatorError,
    CoordinatorUnavailable,
    NotAuthorized,
)
from agent.proto.coordinator_messages import NetMap, Registration

__all__ = ["CoordinatorLink", "join"]

log = get_logger("agent.control")

JOIN_ATTEMPTS = 6
BACKOFF_MAX = 10.0
Endpoint = tuple[str, int]


def _delay(attempt: int) -> float:
    return float(min(0.5 * 2**attempt, BACKOFF_MAX) * (0.5 + random.random() / 2))


async def _register(client: CoordinatorClient, config: Config) -> Registration:
    assert config.control is not None
    key = config.interface.private_key
    return await client.register(
        node_key=key,
        disco_key=static_disco_public(key.public()),
        hostname=config.control.hostname or socket.gethostname(),
        auth_key=config.control.auth_key,
        home_region=config.derp.home_region,
    )


async def join(
    config: Config, on_retry: Callable[[str, float], None] = lambda error, delay: None
) -> tuple[Config, CoordinatorClient, Registration]:
    """Register with the coordinator; the config with its addresses (and DERP map, when it
    hands one out). Raises CoordinatorError (or ValueError for a bad URL/CA file).
    `on_retry(error, delay)` before each wait for another attempt."""
    control = config.control
    assert control is not None
    client = CoordinatorClient(control.url, ca_file=control.ca_file)
    for attempt in range(JOIN_ATTEMPTS):
        try:
            reg = await _register(client, config)
            break
        except CoordinatorUnavailable as e:
            if attempt == JOIN_ATTEMPTS - 1:
                raise
            delay = _delay(attempt)
            log.warning("coordinator unreachable, retrying", error=str(e), retry_in=round(delay, 1))
            on_retry(str(e), delay)
            await asyncio.sleep(delay)
    iface = dataclasses.replace(config.interface, addresses=tuple(reg.addresses()))
    derp = reg.derp if reg.derp.regions else config.derp
    if config.derp.home_region is not None and any(
        r.id == config.derp.home_region for r in derp.regions
    ):
        derp = dataclasses.replace(derp, home_region=config.derp.home_region)
    log.info(
        "joined",
        coordinator=control.url,
        node=reg.node.name,
        addresses=[str(a) for a in reg.addresses()],
        derp_regions=[r.id for r in derp.regions],
    )
    return dataclasses.replace(config, interface=iface, derp=derp), client, reg


class CoordinatorLink:
    """The running link: network maps in, our endpoints and home region out."""

    def __init__(
        self,
        client: CoordinatorClient,
        config: Config,
        on_netmap: Callable[[NetMap], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.client = client
        self.config = config
        self.on_netmap = on_netmap
        self.on_lost = on_lost
        self.version: int | None = None
        self.updates = 0
        self._state: tuple[tuple[Endpoint, ...], int | None] | None = None
        self._sent: tuple[tuple[Endpoint, ...], int | None] | None = None
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Long-poll until cancelled or refused; updates run beside it."""
        updates = asyncio.get_running_loop().create_task(self._update_loop())
        try:
            await self._poll_loop()
        finally:
            updates.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await updates

    def report(self, endpoints: Sequence[Endpoint], home_region: int | None) -> None:
        self._state = (tuple(endpoints), home_region)
        self._wake.set()

    async def _poll_loop(self) -> None:
        attempt = 0
        while True:
            try:
                netmap = await self.client.poll_netmap(self.version)
            except NotAuthorized as e:
                self.on_lost(f"the coordinator no longer accepts this node: {e}")
                return
            except CoordinatorError as e:
                delay = _delay(attempt)
                attempt += 1
                log.warning("netmap poll failed", error=str(e), retry_in=round(delay, 1))
                await asyncio.sleep(delay)
                continue
            attempt = 0
            if netmap.version != self.version:
                self.version = netmap.version
                self.on_netmap(netmap)

    async def _update_loop(self) -> None:
        attempt = 0
        key = self.config.interface.private_key.public()
        while True:
            await self._wake.wait()
            self._wake.clear()
            state = self._state
            if state is None or state == self._sent:
                continue
            try:
                await self.client.update(
                    disco_key=static_disco_public(key), endpoints=state[0], home_region=state[1]
                )
            except NotAuthorized:
                return  # the poll loop reports it
            except CoordinatorError as e:
                delay = _delay(attempt)
                attempt += 1
                log.warning("update failed", error=str(e), retry_in=round(delay, 1))
                await asyncio.sleep(delay)
                self._wake.set()
                continue
            attempt = 0
            self._sent = state
            self.updates += 1

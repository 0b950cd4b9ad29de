"""The port-mapping client as a lab process: `python -m tests.integration.portmap_client ...`.

    --port P        our "WireGuard" UDP port: a socket is bound to it and every datagram it
                    receives is printed as {"recv": text, "src": "ip:port"}
    --protocol X    force one protocol (upnp, pmp, pcp); default: all, in the client's order
    --lifetime S, --check S, --backoff S   short timings for the lab

Every client event is one JSON line on stdout ({"event": "mapped"|"lost"|"probe", ...}). SIGTERM
runs `PortMapper.close()` (delete the mapping) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket

from agent.engine.portmap import (
    MappingChanged,
    MappingLost,
    PortmapConfig,
    PortmapEvent,
    PortmapTimings,
    ProbeDone,
    Protocol,
)
from agent.node.portmap_io import PortMapper


def _emit(obj: dict[str, object]) -> None:
    print(json.dumps(obj), flush=True)


def _on_event(event: PortmapEvent) -> None:
    match event:
        case ProbeDone(available=avail, gateway=gw):
            _emit({"event": "probe", "available": sorted(p.value for p in avail), "gateway": gw})
        case MappingChanged(mapping=m):
            _emit({
                "event": "mapped", "protocol": m.protocol.value,
                "external": f"{m.external[0]}:{m.external[1]}", "lifetime": m.lifetime,
            })  # fmt: skip
        case MappingLost(protocol=p, external=ext, reason=why):
            _emit({"event": "lost", "protocol": p.value, "external": f"{ext[0]}:{ext[1]}",
                   "reason": why})  # fmt: skip


class _Echo(asyncio.DatagramProtocol):
    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        _emit({"recv": data.decode(errors="replace"), "src": f"{addr[0]}:{addr[1]}"})


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        _Echo, local_addr=("0.0.0.0", args.port), family=socket.AF_INET
    )
    protocols = (Protocol(args.protocol),) if args.protocol else tuple(Protocol)
    timings = PortmapTimings(
        lifetime=args.lifetime, check_interval=args.check, backoff_min=args.backoff,
        backoff_max=4 * args.backoff, permanent_renew=args.lifetime / 2,
    )  # fmt: skip
    mapper = PortMapper(
        PortmapConfig(args.port, protocols=protocols, timings=timings),
        on_event=_on_event,
        gateway_poll=2.0,
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    task = loop.create_task(mapper.run())
    await stop.wait()
    await mapper.close()
    task.cancel()
    transport.close()
    _emit({"event": "closed", "mapping": None if mapper.mapping is None else "kept"})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=41641)
    p.add_argument("--protocol", choices=[x.value for x in Protocol])
    p.add_argument("--lifetime", type=int, default=120)
    p.add_argument("--check", type=float, default=1.0)
    p.add_argument("--backoff", type=float, default=1.0)
    asyncio.run(main(p.parse_args()))

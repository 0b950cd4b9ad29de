"""`agent up`: the node daemon, an asyncio shell around the sans-I/O cores.

TUN, UDP, the data plane, DERP links, the coordinator link, the local API socket, UAPI and
metrics. Imports proto, engine, netio, config, api; never the relay or the coordinator.
"""

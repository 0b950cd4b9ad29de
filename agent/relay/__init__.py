"""`agent derper`: the DERP relay program (connections, HTTP and WebSocket, region mesh, STUN).

An asyncio shell around `agent.proto.derp.server.RelayCore`. Imports proto and netio; never the
node or the coordinator.
"""

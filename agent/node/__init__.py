"""The asyncio shell layer: the only code that does I/O.

TUN devices, UDP sockets, files, signals and clocks live here; the sans-I/O cores in
`agent.proto` and `agent.engine` are driven from it and never import it.
"""

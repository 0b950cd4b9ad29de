"""Userspace overlay VPN agent.

Layers (arrows point down only):
  cli            argparse front end; talks to the daemon over its control socket
  daemon         asyncio shell: TUN, UDP, files, signals, clocks (the only I/O)
  engine         sans-I/O composition of the protocol cores
  proto          sans-I/O protocol cores: bytes + now in, bytes + events + deadline out
  config, api    pure data and parsing
  keys, log      leaves
"""

__version__ = "0.1.0"

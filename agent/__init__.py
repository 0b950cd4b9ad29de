"""Userspace overlay VPN agent.

Layers (arrows point down only; tests/test_architecture.py checks every edge):
  cli                          argparse front end; talks to the daemon over its local socket
  node | relay | coordinator   the programs (`agent up`, `agent derper`, `agent coordinator`):
                               asyncio shells doing the I/O; they never import each other
  netio                        I/O the programs share: TLS streams, certificates, Prometheus
  engine                       sans-I/O composition of the protocol cores
  config, api                  pure data and parsing
  proto                        sans-I/O protocol cores: bytes + now in, bytes + events out
  keys, log                    leaves
"""

__version__ = "0.1.0"

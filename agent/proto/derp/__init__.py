"""DERP protocol core, sans-I/O: frame codec and (later) client and relay state machines.

Layer rule: pure computation on bytes; no sockets, clocks, threads or OS access
(tests/test_architecture.py checks it). The shell copies bytes between TLS streams and these
cores; upstream: tailscale's derp/.
"""

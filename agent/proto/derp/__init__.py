"""DERP protocol core, sans-I/O: frame codec and (later) client and relay state machines.

Layer rule: pure computation on bytes; no sockets, clocks, threads or OS access (STYLE.md §9.1).
The shell copies bytes between TLS streams and these cores; spec: shared/spec/derp-disco.md §2-§4.
"""

"""I/O the three programs (node, relay, coordinator) share: TLS streams, certificates and
Prometheus text.

Imports only proto, keys and log; never a program.
"""

"""I/O the three programs (node, relay, coordinator) share: TLS streams, certificates,
Prometheus text, the DERP dial and upgrade.

Imports only proto, keys and log; never a program.
"""

"""I/O the three programs (node, relay, coordinator) share: TLS streams, certificates,
Prometheus text and systemd's readiness message.

Imports only proto, keys and log; never a program.
"""
